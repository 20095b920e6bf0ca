"""Normalise text, filter and de-duplicate records, split train/validation, and count every decision.

Invisible characters and odd spacing make identical sentences tokenize differently and let duplicates slip through
de-duplication, so text is normalised before anything is compared. Every record that is not kept is counted under a
reason in the Report: read == kept + sum(dropped), overall and per source.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import sys
import unicodedata
from collections import Counter
from typing import Iterable

from chatforge.errors import ChatforgeError

# Drop reasons (keys of Report.dropped / Report.turns_dropped).
INVALID = "invalid"  # failed validation, skipped with --skip-invalid
EMPTY = "empty"  # nothing left after cleaning
TOO_LONG = "too_long"  # a turn longer than max_turn_chars
DUPLICATE = "duplicate"  # same cleaned content as an earlier record
TRAILING_USER = "trailing_user_turn"  # a user turn with no reply after it (turn-level only)

_JOINERS = "\u200c\u200d"  # ZWNJ/ZWJ: spelling in Persian and Indic scripts, and emoji sequences
_LINE_BREAKS = re.compile("\r\n|[\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")  # the other ways to end a line
_HANGUL_FILLERS = "\u115f\u1160\u3164\uffa0"  # letters by category, but render as nothing
_STRAY_JOINERS = re.compile(f"(?<![^\\s{_JOINERS}])[{_JOINERS}]+|[{_JOINERS}]+(?![^\\s{_JOINERS}])")
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S \n]")  # runs, or any lone non-space blank
_TRAILING_SPACE = re.compile(r" +\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")


@functools.lru_cache(maxsize=1)
def _invisible() -> re.Pattern:
    """Control (Cc) except newline/tab, format (Cf) except the joiners, surrogates (Cs), Hangul fillers.

    Built once from the Unicode database as a class of ranges (a class of single characters is ~10x slower).
    """
    codes = [c for c in range(sys.maxunicode + 1)
             if unicodedata.category(chr(c)) in ("Cc", "Cf") and chr(c) not in "\n\t" + _JOINERS]
    codes = sorted({*codes, *range(0xD800, 0xE000), *map(ord, _HANGUL_FILLERS)})
    ranges: list[list[int]] = []
    for c in codes:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    cls = "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in ranges)
    return re.compile(f"[{cls}]+")


def clean_text(s: str) -> str:
    """NFKC; strip control and invisible characters; normalise whitespace.

    Zero-width joiners (ZWJ/ZWNJ) are kept only between two visible characters, where they carry meaning
    (Persian spelling, Indic conjuncts, emoji sequences); everywhere else they are stray and removed.
    """
    s = _LINE_BREAKS.sub("\n", s)
    s = _invisible().sub("", s)
    if "\u200c" in s or "\u200d" in s:
        s = _STRAY_JOINERS.sub("", s)
    s = unicodedata.normalize("NFKC", s)
    s = _SPACES.sub(" ", s)
    s = _TRAILING_SPACE.sub("\n", s)
    s = _MANY_NEWLINES.sub("\n\n", s)
    return s.strip()


class Report:
    """What happened to every record read: kept, or dropped under a reason; overall and per source."""

    MAX_EXAMPLES = 20  # invalid records quoted in the report, so the user can find and fix them

    def __init__(self) -> None:
        self.read = 0
        self.kept = 0
        self.dropped: Counter[str] = Counter()
        self.turns_dropped: Counter[str] = Counter()  # turns removed from conversations that were kept
        self.sources: dict[str, dict] = {}
        self.invalid_examples: list[str] = []
        self.ignored_files: list[str] = []
        self.train = 0
        self.val = 0
        self.settings: dict = {}

    def source(self, name: str, fmt: str | None = None) -> dict:
        entry = self.sources.setdefault(name, {"format": fmt, "read": 0, "kept": 0, "dropped": Counter()})
        if fmt is not None:
            entry["format"] = fmt
        return entry

    def count_read(self, source: str) -> None:
        self.read += 1
        self.source(source)["read"] += 1

    def count_kept(self, source: str) -> None:
        self.kept += 1
        self.source(source)["kept"] += 1

    def count_dropped(self, source: str, reason: str, message: str | None = None) -> None:
        self.dropped[reason] += 1
        self.source(source)["dropped"][reason] += 1
        if message is not None and len(self.invalid_examples) < self.MAX_EXAMPLES:
            self.invalid_examples.append(message)

    def count_turn_dropped(self, source: str, reason: str) -> None:
        self.turns_dropped[reason] += 1

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "train": self.train,
            "val": self.val,
            "turns_dropped": dict(sorted(self.turns_dropped.items())),
            "sources": {
                name: {**s, "dropped": dict(sorted(s["dropped"].items()))} for name, s in self.sources.items()
            },
            "invalid_examples": list(self.invalid_examples),
            "ignored_files": list(self.ignored_files),
            "settings": dict(self.settings),
        }

    def summary(self) -> str:
        """A table a person reads after `chatforge prepare`."""
        dropped = sum(self.dropped.values())
        lines = [
            f"read {self.read:,} records from {len(self.sources)} source(s): kept {self.kept:,} "
            f"(train {self.train:,}, val {self.val:,}), dropped {dropped:,}"
        ]
        if self.sources:
            width = max(len("source"), *(len(n) for n in self.sources))
            fwidth = max(len("format"), *(len(str(s["format"])) for s in self.sources.values()))
            lines.append(
                f"  {'source'.ljust(width)}  {'format'.ljust(fwidth)}  {'read':>8}  {'kept':>8}  {'dropped':>8}"
            )
            for name, s in self.sources.items():
                lines.append(
                    f"  {name.ljust(width)}  {str(s['format']).ljust(fwidth)}  {s['read']:>8,}  {s['kept']:>8,}"
                    f"  {sum(s['dropped'].values()):>8,}"
                )
        if self.dropped:
            lines.append("dropped: " + ", ".join(f"{r} {n:,}" for r, n in sorted(self.dropped.items())))
        if self.turns_dropped:
            lines.append(
                "turns removed from kept conversations: "
                + ", ".join(f"{r} {n:,}" for r, n in sorted(self.turns_dropped.items()))
            )
        if self.ignored_files:
            lines.append(f"ignored (unsupported file type): {', '.join(self.ignored_files)}")
        if self.invalid_examples:
            shown = len(self.invalid_examples)
            lines.append(f"invalid records skipped ({self.dropped[INVALID]:,}; first {shown} shown):")
            lines += [f"  {m}" for m in self.invalid_examples]
        return "\n".join(lines)


def _alternates(messages: list[dict]) -> bool:
    start = 1 if messages and messages[0]["role"] == "system" else 0
    body = [m["role"] for m in messages[start:]]
    return len(body) >= 2 and len(body) % 2 == 0 and all(
        role == ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(body)
    )


def clean_record(record: dict, max_turn_chars: int = 4000) -> tuple[dict | None, str | None, list[str]]:
    """(cleaned record, None, turn-drop reasons) or (None, drop reason, []).

    A bad (empty / over-long) user or assistant turn is removed; if that breaks the alternation the whole
    conversation goes, under that turn's reason. An empty system message is just removed; an over-long one drops
    the conversation, since the replies may depend on it. A trailing user turn (no reply) is removed and counted.
    """
    if "text" in record and "messages" not in record:
        text = clean_text(record["text"])
        return ({"text": text}, None, []) if text else (None, EMPTY, [])
    kept: list[dict] = []
    turn_drops: list[str] = []
    first_bad = None
    for m in record["messages"]:
        content = clean_text(m["content"])
        reason = EMPTY if not content else TOO_LONG if len(content) > max_turn_chars else None
        if reason is None:
            kept.append({"role": m["role"], "content": content})
        elif m["role"] == "system" and reason == TOO_LONG:
            return None, TOO_LONG, []
        else:
            turn_drops.append(reason)
            if m["role"] != "system":
                first_bad = first_bad or reason
    if kept and kept[-1]["role"] == "user":
        kept.pop()
        turn_drops.append(TRAILING_USER)
    if not _alternates(kept):
        return None, first_bad or EMPTY, []
    return {"messages": kept}, None, turn_drops


def _canonical(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogatepass")


def clean_records(
    records: Iterable[dict | tuple[str, dict]], report: Report, max_turn_chars: int = 4000
) -> list[dict]:
    """Clean, filter and exactly de-duplicate records; items are records or (source name, record) pairs."""
    if max_turn_chars < 1:
        raise ChatforgeError(f"max_turn_chars must be at least 1, got {max_turn_chars}")
    seen: set[bytes] = set()
    out: list[dict] = []
    for item in records:
        source, record = item if isinstance(item, tuple) else ("(records)", item)
        report.count_read(source)
        cleaned, reason, turn_drops = clean_record(record, max_turn_chars)
        if cleaned is None:
            report.count_dropped(source, reason)
            continue
        key = hashlib.blake2b(_canonical(cleaned), digest_size=16).digest()
        if key in seen:
            report.count_dropped(source, DUPLICATE)
            continue
        seen.add(key)
        out.append(cleaned)
        report.count_kept(source)
        for r in turn_drops:
            report.count_turn_dropped(source, r)
    return out


def split(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split by conversation.

    The records whose hash (content + seed) is smallest go to validation, so the split depends only on the set of
    records, not on their order. At least one record goes each way when there are two or more and
    val_fraction > 0. Both lists keep the input order.
    """
    if not 0 <= val_fraction < 1:
        raise ChatforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(records)
    n_val = math.floor(n * val_fraction + 0.5)
    if n < 2:
        n_val = 0
    elif val_fraction > 0:
        n_val = min(max(n_val, 1), n - 1)
    salt = f"{seed}\0".encode()
    order = sorted(range(n), key=lambda i: (hashlib.blake2b(salt + _canonical(records[i]), digest_size=8).digest(), i))
    val_ids = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_ids]
    val = [r for i, r in enumerate(records) if i in val_ids]
    return train, val
