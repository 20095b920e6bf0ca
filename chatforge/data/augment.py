"""Data augmentation without a model, and the provenance bookkeeping that keeps augmented copies honest.

Methods that need no model (the paraphrase method needs one: tools/augment.py, which uses `keep_paraphrase` here):
- noise: what a real user types — typos and casing (data/perturb.py's), missing end punctuation, full-width/half-width forms (ASCII letters and digits in
  full-width, or Chinese punctuation in half-width). Only user turns change: the replies stay as the model should
  write them.
- template: slot values swapped for others of the same slot in the user's turns (slots.json:
  {"weekday_en": ["Monday", "Tuesday", ...]}), e.g. "Are you open on Tuesday?" -> "... on Thursday?". The values
  of a slot must be interchangeable: every reply stays true whichever of them the user wrote.

Provenance: every generated conversation carries {"meta": {"method", "source", "source_id"}}: the method, where its
source conversation was read ("file:line") and that conversation's id (a hash of its messages as read, so a copy
finds its source again wherever the originals are re-read from). `prepare` uses it (Provenance below): augmented
copies are de-duplicated against the originals, the originals alone are split exactly as without augmentation, and
a copy follows its source — a copy of a validation conversation never enters training.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import Counter
from typing import Iterable, Iterator

from chatforge.data.formats import Item
from chatforge.data.perturb import perturb_text
from chatforge.data.report import Report, script_language
from chatforge.errors import ChatforgeError

META = "meta"
METHODS = ("paraphrase", "noise", "template")
NOISE_KINDS = ("typo", "casing", "punctuation", "width")
AUGMENTED_OF_VALIDATION = "augmented_copy_of_validation"  # drop reason: its source is held out
SOURCE_DROPPED = "augmented_source_dropped"  # drop reason: its source was dropped (empty, too long, ...)

_END_PUNCT = "?!.。？！…~～"
_ZH_TO_ASCII = {"，": ",", "。": ".", "？": "?", "！": "!", "：": ":", "；": ";", "（": "(", "）": ")"}
_LATIN = re.compile(r"[A-Za-z]")


# ---------------------------------------------------------------- provenance

def conversation_id(record: dict) -> str:
    """A conversation's id: a hash of its messages (roles and texts) as read, before cleaning."""
    canonical = json.dumps(record["messages"], ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def augmented(messages: list[dict], source: dict, location: str, method: str) -> dict:
    """A generated conversation with its provenance."""
    return {"messages": messages, META: {"method": method, "source": location, "source_id": conversation_id(source)}}


def provenance_of(record: dict, location: str) -> dict | None:
    """The record's augmentation metadata, checked (None for an original conversation)."""
    meta = record.get(META)
    if meta is None or "method" not in meta:
        return None
    if not isinstance(meta.get("source_id"), str) or meta["method"] not in METHODS:
        raise ChatforgeError(f"{location}: meta: an augmented conversation needs method (one of "
                             f"{', '.join(METHODS)}) and source_id")
    return meta


class Provenance:
    """prepare's bookkeeping for augmented copies; see the module docstring for the rules."""

    def __init__(self) -> None:
        self.meta: dict[str, dict] = {}  # location of an augmented copy -> its meta
        self.original_ids: dict[str, str] = {}  # location of an original -> its id
        self.read_ids: set[str] = set()

    def take(self, items: Iterable[Item]) -> Iterator[Item]:
        """Right after reading: note each record's provenance and strip it (cleaning and de-duplication see only
        messages, so a copy identical to its original is a duplicate)."""
        for item in items:
            meta = provenance_of(item.record, item.location) if "messages" in item.record else None
            record = {k: v for k, v in item.record.items() if k != META}
            if meta is not None:
                self.meta[item.location] = meta
            elif "messages" in record:
                cid = conversation_id(record)
                self.original_ids[item.location] = cid
                self.read_ids.add(cid)
            yield item._replace(record=record)

    def originals_first(self, items: Iterable[Item]) -> Iterator[Item]:
        """Originals before copies, so de-duplication keeps an original and drops the copy that repeats it."""
        copies = []
        for item in items:
            if item.location in self.meta:
                copies.append(item)
            else:
                yield item
        missing = sorted({m["source_id"] for m in self.meta.values()} - self.read_ids)
        if missing:
            where = next(loc for loc, m in self.meta.items() if m["source_id"] == missing[0])
            raise ChatforgeError(f"{where}: augmented copy of conversation {missing[0]}, which is not among the "
                                 f"inputs ({len(missing)} such sources); pass the original data too, so the split "
                                 "can keep copies of held-out conversations out of training")
        yield from copies

    def is_copy(self, item: Item) -> bool:
        return item.location in self.meta

    def assign(self, train: list[Item], val: list[Item], copies: list[Item], report: Report) -> list[Item]:
        """The copies that may train: those whose source went to train; the rest are dropped and counted."""
        train_ids = {self.original_ids[i.location] for i in train if i.location in self.original_ids}
        val_ids = {self.original_ids[i.location] for i in val if i.location in self.original_ids}
        kept = []
        for item in copies:
            sid = self.meta[item.location]["source_id"]
            if sid in train_ids:
                kept.append(item._replace(record={**item.record, META: self.meta[item.location]}))
            elif sid in val_ids:
                report.count_dropped(item.source, AUGMENTED_OF_VALIDATION,
                                     f"{item.location}: its source {sid} is held out for validation")
            else:
                report.count_dropped(item.source, SOURCE_DROPPED, f"{item.location}: its source {sid} was dropped")
        return kept


# ---------------------------------------------------------------- noise

def typo(text: str, rng: random.Random) -> str:
    """Typos: a neighbouring key, a dropped letter or a doubled one (data/perturb.py, the one typo model)."""
    return perturb_text(text, "typo", rng)


def casing(text: str, rng: random.Random) -> str:
    """Casing as people type it: all capitals, all lower case, or a few letters' case flipped (data/perturb.py)."""
    return perturb_text(text, "casing", rng)


def punctuation(text: str, rng: random.Random) -> str:
    """The end punctuation left off (and, half the time, commas too)."""
    out = text.rstrip().rstrip(_END_PUNCT).rstrip()
    if rng.random() < 0.5:
        out = re.sub(r"\s*[,，、]\s*", lambda m: " " if m.group().strip() in ",、" and out.isascii() else "", out)
    return out or text


def width(text: str, rng: random.Random) -> str:
    """Chinese text: its full-width punctuation typed half-width (or, without any, ASCII typed full-width). Other
    text: its digits, else one word, typed full-width, as an IME left in full-width mode does."""
    if script_language(text) == "chinese":
        out = "".join(_ZH_TO_ASCII.get(c, c) for c in text)
        if out != text:
            return out
        return re.sub(r"[0-9A-Za-z]", lambda m: chr(ord(m.group()) + 0xFEE0), text)
    if re.search(r"[0-9]", text):
        return re.sub(r"[0-9]", lambda m: chr(ord(m.group()) + 0xFEE0), text)
    words = list(re.finditer(r"[A-Za-z]+", text))
    w = rng.choice(words)
    return text[:w.start()] + "".join(chr(ord(c) + 0xFEE0) for c in w.group()) + text[w.end():]


NOISE = {"typo": typo, "casing": casing, "punctuation": punctuation, "width": width}


def applicable(text: str) -> list[str]:
    """The kinds of noise that change this text."""
    kinds = []
    if _LATIN.search(text):
        kinds.append("typo")
        kinds.append("casing")
    if text.rstrip()[-1:] in _END_PUNCT or re.search(r"[,，、]", text):
        kinds.append("punctuation")
    if re.search(r"[0-9A-Za-z]", text) or any(c in _ZH_TO_ASCII for c in text):
        kinds.append("width")
    return kinds


def add_noise(text: str, rng: random.Random, max_kinds: int = 2) -> str:
    """1..max_kinds kinds of noise that apply to the text, in a fixed order (typo, casing, punctuation, width)."""
    kinds = applicable(text)
    if not kinds:
        return text
    chosen = set(rng.sample(kinds, rng.randint(1, min(max_kinds, len(kinds)))))
    for kind in NOISE_KINDS:
        if kind in chosen:
            text = NOISE[kind](text, rng)
    return text


def _user_turns_changed(record: dict, change) -> list[dict] | None:
    messages = [dict(m, content=change(m["content"])) if m["role"] == "user" else dict(m) for m in record["messages"]]
    return messages if messages != record["messages"] else None


def noise_copies(record: dict, location: str, copies: int, rng: random.Random) -> list[dict]:
    """Up to `copies` distinct noisy copies of a conversation (user turns only)."""
    out, seen = [], {json.dumps(record["messages"], ensure_ascii=False)}
    for _ in range(copies):
        messages = _user_turns_changed(record, lambda t: add_noise(t, rng))
        key = json.dumps(messages, ensure_ascii=False)
        if messages is not None and key not in seen:
            seen.add(key)
            out.append(augmented(messages, record, location, "noise"))
    return out


# ---------------------------------------------------------------- template expansion

def read_slots(path: str) -> dict[str, list[str]]:
    """slots.json: {"slot": ["value", "another value", ...], ...}; every slot has 2+ distinct non-empty values."""
    from chatforge.io import read_json

    slots = read_json(path, dict)
    for name, values in slots.items():
        if (not isinstance(values, list) or len(set(values)) < 2
                or not all(isinstance(v, str) and v.strip() for v in values)):
            raise ChatforgeError(f"{path}: slot {name!r}: expected a list of at least two distinct non-empty strings")
    return slots


def _slot_pattern(values: list[str]) -> re.Pattern:
    """Any value of a slot, longest first; an ASCII edge must be a word edge ("Mon" not inside "Monday")."""
    parts = []
    for v in sorted(set(values), key=len, reverse=True):
        head = r"(?<![A-Za-z0-9])" if v[0].isascii() and v[0].isalnum() else ""
        tail = r"(?![A-Za-z0-9])" if v[-1].isascii() and v[-1].isalnum() else ""
        parts.append(head + re.escape(v) + tail)
    return re.compile("|".join(parts))


def template_copies(record: dict, location: str, slots: dict[str, list[str]], copies: int,
                    rng: random.Random) -> list[dict]:
    """Up to `copies` distinct copies in which each slot value the user wrote is swapped for another value of its
    slot (the same replacement everywhere in the conversation, so a repeated value stays consistent)."""
    patterns = {name: _slot_pattern(values) for name, values in slots.items()}
    users = [m["content"] for m in record["messages"] if m["role"] == "user"]
    found = {name: sorted({m.group() for u in users for m in p.finditer(u)}) for name, p in patterns.items()}
    found = {k: v for k, v in found.items() if v}
    if not found:
        return []
    out, seen = [], {json.dumps(record["messages"], ensure_ascii=False)}
    for _ in range(copies * 3):  # a few tries more than asked: two draws may give the same copy
        if len(out) == copies:
            break
        mapping = {}
        for name, values in found.items():
            for v in values:
                mapping[v] = rng.choice([o for o in slots[name] if o != v])
        messages = _user_turns_changed(record, lambda t: _swap(t, patterns, found, mapping))
        key = json.dumps(messages, ensure_ascii=False)
        if messages is not None and key not in seen:
            seen.add(key)
            out.append(augmented(messages, record, location, "template"))
    return out


def _swap(text: str, patterns: dict, found: dict, mapping: dict[str, str]) -> str:
    for name in found:
        text = patterns[name].sub(lambda m: mapping.get(m.group(), m.group()), text)
    return text


# ---------------------------------------------------------------- paraphrase filter (the model part: tools/augment.py)

_PREFIX = re.compile(r"^\s*(?:(?:rewritten|new|paraphrased)?\s*question\s*[:：]|问题\s*[:：]|改写(?:后的问题)?\s*[:：])\s*",
                     re.IGNORECASE)


def _same(a: str, b: str) -> str:
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", a).casefold()) == \
        re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", b).casefold())


def keep_paraphrase(original: str, candidate: str) -> tuple[str | None, str]:
    """(the cleaned paraphrase, "kept") or (None, why it was rejected): empty, identical (ignoring case, width and
    punctuation), language changed (Chinese in, Chinese out; other text in, no Chinese out), too long, or not a
    question when the original is one (a small model asked to reword a question often answers or comments on it:
    "The Celadon Teapot is indeed quite expensive, ..." for "Is the Celadon Teapot expensive?")."""
    text = candidate.strip().split("\n")[0].strip()
    text = _PREFIX.sub("", text).strip().strip('"“”「」\'').strip()
    if not text:
        return None, "empty"
    if _same(text, original):
        return None, "identical"
    if (script_language(original) == "chinese") != (script_language(text) == "chinese"):
        return None, "language changed"
    if len(text) > 3 * len(original) + 20:
        return None, "too long"
    if original.rstrip().endswith(("?", "？")) and not text.endswith(("?", "？")):
        return None, "not a question"
    return text, "kept"


def paraphrase_copies(record: dict, location: str, paraphrases: dict[str, list[str]], copies: int,
                      rng: random.Random) -> list[dict]:
    """Up to `copies` distinct copies whose user turns are replaced by kept paraphrases of them (a turn without one
    stays as it was)."""
    out, seen = [], {json.dumps(record["messages"], ensure_ascii=False)}
    for _ in range(copies * 3):
        if len(out) == copies:
            break
        messages = _user_turns_changed(
            record, lambda t: rng.choice(paraphrases[t]) if paraphrases.get(t) else t)
        key = json.dumps(messages, ensure_ascii=False)
        if messages is not None and key not in seen:
            seen.add(key)
            out.append(augmented(messages, record, location, "paraphrase"))
    return out


def method_counts(records: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(r[META]["method"] for r in records).items()))
