"""An English and Chinese phrase lexicon for replies that survives obfuscation.

Text is matched on a skeleton: Unicode tricks undone (guard.unicode.normalize: zero-width characters, full-width
forms, homoglyphs), case folded, traditional Chinese converted to simplified (OpenCC t2s), and every character that is
not a letter, digit or ideograph dropped, so `k i l l`, `制 造 炸 弹`, `製造炸彈` and `制造 炸彈` all meet their entry.
A second skeleton spells every ideograph in toneless pinyin (pypinyin), so `zhi zao zha dan` and `制造zha弹` match
too (pinyin is matched for entries of 3+ ideographs, where a homophone is unlikely to be innocent).

English entries must start and end at word boundaries of the original text (`skill you` is not `kill you`).
Every hit carries the span of original characters it covers, for redaction.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from chatforge.errors import ChatforgeError

DEFAULT_LEXICON = Path(__file__).parent / "data" / "lexicon.json"
MIN_PINYIN_CHARS = 3


@dataclass(frozen=True)
class Hit:
    category: str
    entry: str  # "<category>/<language>#<index>": names the entry without repeating it
    start: int  # span of the original text the match covers
    end: int


def _is_ideograph(ch: str) -> bool:
    cp = ord(ch)
    return 0x3400 <= cp <= 0x9FFF or 0xF900 <= cp <= 0xFAFF or 0x20000 <= cp <= 0x3FFFF


@lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


@lru_cache(maxsize=1)
def _lazy_pinyin():
    """pypinyin without its phrase table (PYPINYIN_NO_PHRASES, read once at import): one ideograph at a time needs
    only the character table, the phrases cost 46 MiB resident, and without them every ideograph of U+3400-U+9FFF
    and U+F900-U+FAFF (28,160) is spelled the same (checked with pypinyin 0.55)."""
    before = os.environ.get("PYPINYIN_NO_PHRASES")
    os.environ["PYPINYIN_NO_PHRASES"] = "true"
    try:
        from pypinyin import lazy_pinyin
    finally:
        if before is None:
            del os.environ["PYPINYIN_NO_PHRASES"]
        else:
            os.environ["PYPINYIN_NO_PHRASES"] = before
    return lazy_pinyin


@lru_cache(maxsize=65536)
def _pinyin(ch: str) -> str:
    return "".join(_lazy_pinyin()(ch))


def _skeleton(text: str) -> tuple[str, list[int]]:
    """(skeleton, index in `text` of each skeleton character). `text` is the normalised text."""
    if any(_is_ideograph(c) for c in text):
        converted = _t2s().convert(text)
        if len(converted) == len(text):  # t2s maps character to character for all but a few phrases
            text = converted
    chars, where = [], []
    for i, ch in enumerate(text):
        if ch.isalnum():
            for c in unicodedata.normalize("NFKD", ch.casefold()):
                if not unicodedata.combining(c):
                    chars.append(c)
                    where.append(i)
    return "".join(chars), where


def _pinyin_skeleton(skeleton: str, where: list[int]) -> tuple[str, list[int]]:
    chars, at = [], []
    for ch, i in zip(skeleton, where):
        spelled = _pinyin(ch) if _is_ideograph(ch) else ch
        chars.append(spelled)
        at += [i] * len(spelled)
    return "".join(chars), at


class Lexicon:
    """Entries by category and language ("en", "zh"), compiled to skeletons once."""

    def __init__(self, categories: dict[str, dict[str, list[str]]]):
        self.entries: list[tuple[str, str, str, str]] = []  # (category, entry id, kind, skeleton)
        for category, by_language in categories.items():
            for language, phrases in by_language.items():
                for k, phrase in enumerate(phrases):
                    skeleton, _ = _skeleton(phrase.casefold())
                    entry = f"{category}/{language}#{k}"
                    if not skeleton:
                        raise ChatforgeError(f"lexicon: entry {entry} has no letters")
                    self.entries.append((category, entry, "word" if language == "en" else "plain", skeleton))
                    ideographs = sum(_is_ideograph(c) for c in skeleton)
                    if ideographs >= MIN_PINYIN_CHARS:
                        self.entries.append((category, entry, "pinyin", _pinyin_skeleton(skeleton, [0] * len(skeleton))[0]))
        self.categories = sorted(categories)
        # the longest entry, in original characters that carry a skeleton character (what a stream holds back)
        self.longest = max((len(s) for _, _, _, s in self.entries), default=0)

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_LEXICON) -> "Lexicon":
        from chatforge.io import read_json

        data = read_json(path)
        categories = data.get("categories")
        if not isinstance(categories, dict):
            raise ChatforgeError(f"{path}: field 'categories' must map a category to {{language: [phrases]}}")
        return cls(categories)

    def find(self, text: str) -> list[Hit]:
        """Every entry in `text`, with original spans; an entry is reported once per place it occurs."""
        from chatforge.guard.unicode import normalize_with_map

        clean, index = normalize_with_map(text)
        skeleton, where = _skeleton(clean)
        pinyin = None
        hits: list[Hit] = []
        seen: set[tuple[str, int]] = set()
        for category, entry, kind, pattern in self.entries:
            if kind == "pinyin":
                if pinyin is None:
                    pinyin = _pinyin_skeleton(skeleton, where)
                hay, at = pinyin
            else:
                hay, at = skeleton, where
            start = hay.find(pattern)
            while start != -1:
                a, b = at[start], at[start + len(pattern) - 1]
                if (kind != "word" or _word_edges(clean, a, b)) and (entry, a) not in seen:
                    seen.add((entry, a))
                    hits.append(Hit(category, entry, index[a], index[b] + 1))
                start = hay.find(pattern, start + 1)
        return sorted(hits, key=lambda h: (h.start, h.entry))

    def redact(self, text: str, hits: list[Hit], mask: str = "[redacted]") -> str:
        spans = sorted((h.start, h.end) for h in hits)
        out, pos = [], 0
        for a, b in spans:
            if b <= pos:
                continue
            out.append(text[pos:max(a, pos)])
            out.append(mask)
            pos = b
        return "".join(out) + text[pos:]


def _word_edges(text: str, a: int, b: int) -> bool:
    before = text[a - 1] if a > 0 else " "
    after = text[b + 1] if b + 1 < len(text) else " "
    return not (before.isascii() and before.isalnum()) and not (after.isascii() and after.isalnum())


@lru_cache(maxsize=1)
def default_lexicon() -> Lexicon:
    """The lexicon that ships with chatforge (chatforge/guard/data/lexicon.json)."""
    return Lexicon.load(DEFAULT_LEXICON)

