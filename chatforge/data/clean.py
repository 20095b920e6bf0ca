"""The clean and de-duplicate steps of `prepare`, and the train/validation split.

Invisible characters and odd spacing make identical sentences tokenize differently and let duplicates slip through
de-duplication, so text is normalised before anything is compared. Normalisation is NFC by default: it only
composes characters (e + U+0301 -> é) and leaves CJK punctuation (，？！：（）) and full-width forms as written;
NFKC, which folds them to ASCII, is a choice (`normalize="nfkc"`). Each rule counts the texts it changed, and every
record that is not kept is counted under a reason, with the first few named by location.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from typing import Callable, Iterable, Iterator, NamedTuple

from chatforge.data.formats import Item
from chatforge.data.report import DUPLICATE, EMPTY, TOO_LONG, TRAILING_USER, Report
from chatforge.errors import ChatforgeError

NORMAL_FORMS = ("nfc", "nfkc")
_JOINERS = "\u200c\u200d"  # ZWNJ/ZWJ: spelling in Persian and Indic scripts, and emoji sequences
_LINE_BREAKS = re.compile("\r\n|[\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")  # the other ways to end a line
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"  # marks, embeddings, overrides, isolates
_BIDI_CONTROLS = re.compile(f"[{_BIDI}]+")
_HANGUL_FILLERS = "\u115f\u1160\u3164\uffa0"  # letters by category, but render as nothing
_STRAY_JOINERS = re.compile(f"(?<![^\\s{_JOINERS}])[{_JOINERS}]+|[{_JOINERS}]+(?![^\\s{_JOINERS}])")
# Blanks: runs, or any lone blank other than a space, become one space; the ideographic space U+3000 is CJK
# typography like the full-width punctuation, and stays.
_SPACES = re.compile(r"[^\S\n\u3000]{2,}|[^\S \n\u3000]")
_TRAILING_SPACE = re.compile(r" +\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")
# Full-width Latin letters and digits (Ａ-Ｚ ａ-ｚ ０-９) -> ASCII, only when asked; punctuation is never touched.
_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for r in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
                    for c in range(r[0], r[1] + 1)}


def _char_class(codes: Iterable[int]) -> re.Pattern:
    """A regex matching runs of the given code points, written as ranges (a class of single characters is ~10x
    slower)."""
    ranges: list[list[int]] = []
    for c in sorted(set(codes)):
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    cls = "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in ranges)
    return re.compile(f"[{cls}]+")


@functools.lru_cache(maxsize=1)
def _invisible() -> tuple[re.Pattern, re.Pattern]:
    """(control characters Cc except newline and tab, invisible ones: format Cf except bidi controls, the joiners
    and the emoji tag characters of subdivision flags; surrogates, Hangul fillers), built once from the Unicode
    database. Only planes 0, 1 and 14 hold Cc/Cf characters (2-3 are ideographs, 15-16 private use), so only
    they are scanned: 8x faster than all 1.1M code points."""
    bidi = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
    flag_tags = set(range(0xE0020, 0xE0080))
    control, invisible = [], [*range(0xD800, 0xE000), *map(ord, _HANGUL_FILLERS)]
    for c in (*range(0x20000), *range(0xE0000, 0xF0000)):
        if c in flag_tags:
            continue
        category = unicodedata.category(chr(c))
        if category == "Cc" and chr(c) not in "\n\t":
            control.append(c)
        elif category == "Cf" and c not in bidi and chr(c) not in _JOINERS:
            invisible.append(c)
    return _char_class(control), _char_class(invisible)


def _spaces(s: str) -> str:
    s = _SPACES.sub(" ", s)
    s = _TRAILING_SPACE.sub("\n", s)
    return _MANY_NEWLINES.sub("\n\n", s).strip()


def _drop_invisible(s: str) -> str:
    s = _invisible()[1].sub("", s)
    return _STRAY_JOINERS.sub("", s) if "\u200c" in s or "\u200d" in s else s


@functools.lru_cache(maxsize=4)
def _rules(normalize: str, fullwidth_ascii: bool) -> tuple[tuple[str, Callable[[str], str], bool], ...]:
    """(name, rule, applies to ASCII text) in the order they run."""
    if normalize not in NORMAL_FORMS:
        raise ChatforgeError(f"normalize: expected {' or '.join(NORMAL_FORMS)}, got {normalize!r}")
    form = normalize.upper()
    rules = [
        ("line_breaks", lambda s: _LINE_BREAKS.sub("\n", s), True),
        ("control", lambda s: _invisible()[0].sub("", s), True),
        ("bidi", lambda s: _BIDI_CONTROLS.sub("", s), False),
        ("invisible", _drop_invisible, False),
        (normalize, lambda s: unicodedata.normalize(form, s), False),
    ]
    if fullwidth_ascii:
        rules.append(("fullwidth_ascii", lambda s: s.translate(_FULLWIDTH_ALNUM), False))
    rules.append(("spaces", _spaces, True))
    return tuple(rules)


def _ascii_needs_work(s: str) -> bool:
    """Whether an ASCII text has anything the rules would change: a control character (tab and CR included),
    two blanks in a row, a blank before a line break, three line breaks, or blanks at either end."""
    return (not s.replace("\n", "").isprintable() or "  " in s or " \n" in s or "\n\n\n" in s
            or s[:1].isspace() or s[-1:].isspace())


def clean_text(s: str, normalize: str = "nfc", fullwidth_ascii: bool = False, counts: Counter | None = None) -> str:
    """Normalise one text: line breaks to \\n; control, bidi-control and invisible characters removed; the normal
    form (NFC, or NFKC when asked); full-width letters and digits to ASCII when asked; blanks normalised.

    Zero-width joiners (ZWJ/ZWNJ) are kept only between two visible characters, where they carry meaning (Persian
    spelling, Indic conjuncts, emoji sequences); everywhere else they are stray and removed. With `counts`, each
    rule adds 1 for every text it changed.
    """
    ascii_only = s.isascii()
    if ascii_only and not _ascii_needs_work(s):  # most chat turns: nothing to do, found in one cheap pass
        return s
    for name, rule, on_ascii in _rules(normalize, fullwidth_ascii):
        if ascii_only and not on_ascii:
            continue
        new = rule(s)
        if counts is not None and new != s:
            counts[name] += 1
        s = new
    return s


class Cleaned(NamedTuple):
    record: dict | None  # None when the record is dropped
    reason: str | None  # why it was dropped, or why it was cut
    detail: str | None  # which message and what was wrong with it, for the report
    turns_removed: int  # turns cut from a kept conversation


def _alternates(messages: list[dict]) -> bool:
    start = 1 if messages and messages[0]["role"] == "system" else 0
    body = [m["role"] for m in messages[start:] if m["role"] != "tool" and not m.get("tool_calls")]  # round trips
    return len(body) >= 2 and len(body) % 2 == 0 and all(
        role == ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(body)
    )


def clean_record(record: dict, max_turn_chars: int = 4000, clean: Callable[[str], str] = clean_text) -> Cleaned:
    """Clean every text of a record and apply the one rule for bad turns.

    The rule: a user or assistant turn that is empty after cleaning or longer than `max_turn_chars` ends the
    conversation there — it is cut just before that turn, wherever the turn is, and a user turn left without a
    reply goes too, so what is kept always ends with an assistant reply. If no user -> assistant exchange is left,
    the whole conversation is dropped under that turn's reason. An empty system message is removed (it is
    optional); an over-long one drops the conversation, since every reply may depend on it. A conversation that
    simply ends with a user turn loses that turn (`trailing_user_turn`).
    """
    if "chosen" in record:  # a preference pair: every text cleaned, nothing cut
        from chatforge.data.preference import clean_pair

        pair, why = clean_pair(record, max_turn_chars, clean)
        return Cleaned(pair, None, None, 0) if pair else Cleaned(None, TOO_LONG if "characters" in why else EMPTY,
                                                                 why, 0)
    if "text" in record and "messages" not in record:
        text = clean(record["text"])
        user = {"user": record["user"]} if "user" in record else {}  # whose record: DP's per-user privacy unit
        return Cleaned({"text": text, **user}, None, None, 0) if text else \
            Cleaned(None, EMPTY, "empty after cleaning", 0)
    messages = record["messages"]
    extra = ({"tools": record["tools"]} if record.get("tools") else {}) | (
        {"user": record["user"]} if "user" in record else {})  # kept beside the messages (tools, whose record)
    kept: list[dict] = []
    reason = detail = None
    for n, m in enumerate(messages, 1):
        content = clean(m["content"])
        if (content or m.get("tool_calls")) and len(content) <= max_turn_chars:  # a call may have no text
            kept.append({**m, "content": content})
            continue
        reason = EMPTY if not content else TOO_LONG
        detail = (f"message {n} ({m['role']}) is empty after cleaning" if reason == EMPTY else
                  f"message {n} ({m['role']}) has {len(content):,} characters (max_turn_chars {max_turn_chars:,})")
        if m["role"] == "system":
            if reason == TOO_LONG:
                return Cleaned(None, TOO_LONG, detail, 0)
            reason = detail = None  # an empty system prompt is no prompt
            continue
        break
    while kept and (kept[-1]["role"] == "tool" or kept[-1].get("tool_calls")):  # a round trip cut short
        kept.pop()
    if reason is None and kept and kept[-1]["role"] == "user":
        kept.pop()
        return Cleaned({"messages": kept, **extra}, TRAILING_USER, None, 1) if _alternates(kept) else \
            Cleaned(None, EMPTY, "no reply left", 0)
    if kept and kept[-1]["role"] == "user":
        kept.pop()
    if not _alternates(kept):
        return Cleaned(None, reason or EMPTY, detail or "no user -> assistant exchange left", 0)
    removed = len([m for m in messages if m["role"] != "system"]) - len([m for m in kept if m["role"] != "system"])
    return Cleaned({"messages": kept, **extra}, reason if removed else None, detail, removed)


def clean(
    items: Iterable[Item], report: Report, max_turn_chars: int = 4000, normalize: str = "nfc",
    fullwidth_ascii: bool = False,
) -> Iterator[Item]:
    """The clean step: normalise every text, cut conversations at bad turns, drop what is left empty."""
    if max_turn_chars < 1:
        raise ChatforgeError(f"max_turn_chars must be at least 1, got {max_turn_chars}")
    _rules(normalize, fullwidth_ascii)  # check the settings before the first record

    def cleaner(s: str) -> str:
        return clean_text(s, normalize, fullwidth_ascii, report.cleaning)

    for item in items:
        report.count_read(item.source)
        result = clean_record(item.record, max_turn_chars, cleaner)
        if result.record is None:
            report.count_dropped(item.source, result.reason, f"{item.location}: {result.detail}")
            continue
        if result.turns_removed:
            example = f"{item.location}: cut before {result.detail}" if result.detail else None
            report.count_turns_dropped(result.reason, result.turns_removed, example)
        yield item._replace(record=result.record)


def canonical_json(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogatepass")


def dedup(items: Iterable[Item], report: Report) -> Iterator[Item]:
    """The de-duplicate step: an exact copy (after cleaning) of an earlier record is dropped, naming the first."""
    seen: dict[bytes, str] = {}
    for item in items:
        canonical = canonical_json(item.record)
        key = hashlib.blake2b(canonical, digest_size=16).digest()
        first = seen.get(key)
        if first is not None:
            report.count_dropped(item.source, DUPLICATE, f"{item.location}: same as {first}")
            continue
        seen[key] = item.location
        yield item._replace(canonical=canonical)


def clean_records(
    records: Iterable[dict | tuple[str, dict]], report: Report, max_turn_chars: int = 4000, **options
) -> list[dict]:
    """Clean and de-duplicate records held in memory; items are records or (source name, record) pairs."""
    items = (Item(r[0], f"{r[0]}:record {i}", r[1]) if isinstance(r, tuple) else Item("(records)", f"record {i}", r)
             for i, r in enumerate(records, 1))
    out = []
    for item in dedup(clean(items, report, max_turn_chars, **options), report):
        report.count_kept(item.source, item.record)
        out.append(item.record)
    return out


def val_count(n: int, val_fraction: float) -> int:
    """How many of n records the split holds out: the rounded share, at least one each way when n >= 2."""
    if not 0 <= val_fraction < 1:
        raise ChatforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = math.floor(n * val_fraction + 0.5)
    if n < 2:
        return 0
    return min(max(n_val, 1), n - 1) if val_fraction > 0 else n_val


def split(
    records: list[dict], val_fraction: float, seed: int, canonical: list[bytes] | None = None
) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split by conversation.

    The records whose hash (content + seed) is smallest go to validation, so the split depends only on the set of
    records, not on their order. At least one record goes each way when there are two or more and
    val_fraction > 0. Both lists keep the input order.
    """
    n = len(records)
    n_val = val_count(n, val_fraction)
    salt = f"{seed}\0".encode()
    canonical = canonical or [canonical_json(r) for r in records]  # de-duplication has them already
    order = sorted(range(n), key=lambda i: (hashlib.blake2b(salt + canonical[i], digest_size=8).digest(), i))
    val_ids = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_ids]
    val = [r for i, r in enumerate(records) if i in val_ids]
    return train, val
