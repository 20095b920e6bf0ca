"""What `prepare` did with every record read: kept, or dropped under a reason — overall, per source and per language.

Invariant: read == kept + sum(dropped), overall and per source. The first few dropped (and trimmed) records of each
reason are named by location, so a user can find and fix them. The report is data (`to_dict`, written as
report.json); the command layer prints it.
"""

from __future__ import annotations

import re
from collections import Counter

# Drop reasons (keys of Report.dropped / Report.turns_dropped).
INVALID = "invalid"  # failed validation, skipped with --skip-invalid
EMPTY = "empty"  # nothing left after cleaning
TOO_LONG = "too_long"  # a turn longer than max_turn_chars
DUPLICATE = "duplicate"  # same cleaned content as an earlier record
TRAILING_USER = "trailing_user_turn"  # a user turn with no reply after it (turn-level only)

_KANA = re.compile("[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def script_language(text: str) -> str:
    """The language a text's script shows: japanese (kana), korean (hangul), chinese (Han without kana), else other.

    Enough to keep Chinese visible in a report; it does not tell English from French.
    """
    if _KANA.search(text):
        return "japanese"
    if _HANGUL.search(text):
        return "korean"
    if _HAN.search(text):
        return "chinese"
    return "other"


class Report:
    """Counts and named examples of every decision prepare made."""

    MAX_EXAMPLES = 5  # records named per reason
    MAX_INVALID_EXAMPLES = 20  # invalid ones carry their own message, so more are shown

    def __init__(self) -> None:
        self.read = 0
        self.kept = 0
        self.dropped: Counter[str] = Counter()
        self.turns_dropped: Counter[str] = Counter()  # turns removed from conversations that were kept
        self.sources: dict[str, dict] = {}
        self.languages: dict[str, dict] = {}
        self.cleaning: Counter[str] = Counter()  # texts each cleaning rule changed
        self.pii: Counter[str] = Counter()  # personal data replaced, per type (prepare --scrub-pii)
        self.dropped_examples: dict[str, list[str]] = {}
        self.turns_dropped_examples: dict[str, list[str]] = {}
        self.csv_headers: dict[str, dict] = {}
        self.ignored_files: list[dict] = []
        self.train = 0
        self.val = 0
        self.settings: dict = {}

    def source(self, name: str, fmt: str | None = None, language: str | None = None) -> dict:
        entry = self.sources.setdefault(
            name, {"format": fmt, "language": language, "read": 0, "kept": 0, "characters": 0, "dropped": Counter()}
        )
        if fmt is not None:
            entry["format"] = fmt
        if language is not None:
            entry["language"] = language
        return entry

    def _example(self, examples: dict[str, list[str]], reason: str, text: str | None) -> None:
        limit = self.MAX_INVALID_EXAMPLES if reason == INVALID else self.MAX_EXAMPLES
        shown = examples.setdefault(reason, [])
        if text is not None and len(shown) < limit:
            shown.append(text)

    def count_read(self, source: str) -> None:
        self.read += 1
        self.source(source)["read"] += 1

    def count_kept(self, source: str, record: dict) -> None:
        """A record that made it through every step: counted with its characters under its source and language."""
        entry = self.source(source)
        texts = [m["content"] for m in record["messages"]] if "messages" in record else [record.get("text", "")]
        if "chosen" in record:  # a preference pair
            texts = [m["content"] for key in ("prompt", "chosen", "rejected") for m in record[key]]
        chars = sum(map(len, texts))
        self.kept += 1
        entry["kept"] += 1
        entry["characters"] += chars
        lang = self.languages.setdefault(entry["language"] or script_language("\n".join(texts)),
                                         {"records": 0, "characters": 0})
        lang["records"] += 1
        lang["characters"] += chars

    def count_dropped(self, source: str, reason: str, example: str | None = None) -> None:
        """A dropped record; `example` ("file:line: why") is kept for the first few of each reason."""
        self.dropped[reason] += 1
        self.source(source)["dropped"][reason] += 1
        self._example(self.dropped_examples, reason, example)

    def count_turns_dropped(self, reason: str, n: int, example: str | None = None) -> None:
        self.turns_dropped[reason] += n
        self._example(self.turns_dropped_examples, reason, example)

    def ignore(self, path: str, reason: str) -> None:
        self.ignored_files.append({"path": path, "reason": reason})

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
            "languages": {k: dict(v) for k, v in sorted(self.languages.items())},
            "cleaning": dict(sorted(self.cleaning.items())),
            "pii": dict(sorted(self.pii.items())),
            "dropped_examples": {k: list(v) for k, v in sorted(self.dropped_examples.items()) if v},
            "turns_dropped_examples": {k: list(v) for k, v in sorted(self.turns_dropped_examples.items()) if v},
            "csv_headers": dict(self.csv_headers),
            "ignored_files": list(self.ignored_files),
            "settings": dict(self.settings),
        }
