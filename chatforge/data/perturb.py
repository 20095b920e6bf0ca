"""Perturbed text for robust training and robustness evaluation: typos, swaps, homoglyphs, zero-width characters,
casing and whitespace, the noise real users and attackers put into prompts.

Every function takes an explicit `random.Random`, so the same seed gives the same perturbation: training draws it
from (seed, epoch, record) and a resumed run sees exactly the text it would have seen. The homoglyph and invisible
character tables are shared with the guard (guard/unicode.py), which detects and undoes what they make.
"""

from __future__ import annotations

import random

KINDS = ("typo", "swap", "homoglyph", "zero_width", "casing", "whitespace")

# Latin letters and the Cyrillic/Ukrainian letters that look the same (what homograph attacks use).
HOMOGLYPHS = {"a": "а", "c": "с", "e": "е", "o": "о", "p": "р", "x": "х", "y": "у", "i": "і", "s": "ѕ", "j": "ј",
              "A": "А", "B": "В", "C": "С", "E": "Е", "H": "Н", "K": "К", "M": "М", "O": "О", "P": "Р", "T": "Т",
              "X": "Х"}
# Characters that render as nothing: zero-width space, ZWNJ, ZWJ, word joiner, soft hyphen, BOM.
ZERO_WIDTH_CHARS = ["\u200b", "\u200c", "\u200d", "\u2060", "\u00ad", "\ufeff"]
_KEYBOARD = "qwertyuiopasdfghjklzxcvbnm"


def _letters(chars: list[str]) -> list[int]:
    return [i for i, c in enumerate(chars) if c.isalpha()]


def perturb_text(text: str, kind: str, rng: random.Random, strength: float = 0.1) -> str:
    """`text` with one kind of noise; `strength` is the share of eligible characters (or words) touched, at least
    one wherever the kind applies. Text the kind cannot touch (no letters for a typo) comes back unchanged."""
    if kind not in KINDS:
        raise ValueError(f"perturb: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    chars = list(text)
    if kind == "whitespace":
        gaps = [i for i, c in enumerate(chars) if c == " "]
        if not gaps:
            return text + " "
        for i in rng.sample(gaps, max(1, int(strength * len(gaps)))):
            chars[i] = rng.choice(["  ", "   ", " \t", "\u00a0"])
        return "".join(chars)
    if kind == "zero_width":
        slots = [i for i in range(1, len(chars)) if not chars[i].isspace() and not chars[i - 1].isspace()]
        if not slots:
            return text
        picks = set(rng.sample(slots, max(1, int(strength * len(slots)))))
        return "".join(rng.choice(ZERO_WIDTH_CHARS) + c if i in picks else c for i, c in enumerate(chars))
    if kind == "homoglyph":
        slots = [i for i, c in enumerate(chars) if c in HOMOGLYPHS]
    elif kind == "swap":
        slots = [i for i in range(len(chars) - 1) if chars[i].isalpha() and chars[i + 1].isalpha()
                 and chars[i] != chars[i + 1]]
    else:
        slots = _letters(chars)
    if not slots:
        return text
    if kind == "casing":
        if rng.random() < 0.3:  # a whole message in capitals or in lower case, as people type
            return text.upper() if rng.random() < 0.5 else text.lower()
        for i in rng.sample(slots, max(1, int(strength * len(slots)))):
            chars[i] = chars[i].swapcase()
        return "".join(chars)
    picks = sorted(rng.sample(slots, max(1, int(strength * len(slots) / (1 if kind == "homoglyph" else 3)))),
                   reverse=True)  # right to left, so an insertion or deletion leaves earlier indices valid
    for i in picks:
        if kind == "homoglyph":
            chars[i] = HOMOGLYPHS[chars[i]]
        elif kind == "swap":
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        else:  # typo: a neighbouring key, a dropped letter or a doubled one
            op = rng.randrange(3)
            if op == 0 and chars[i].lower() in _KEYBOARD:
                k = _KEYBOARD.index(chars[i].lower())
                near = _KEYBOARD[max(0, k - 1)] if rng.random() < 0.5 else _KEYBOARD[min(len(_KEYBOARD) - 1, k + 1)]
                chars[i] = near.upper() if chars[i].isupper() else near
            elif op == 1 and len(chars) > 1:
                del chars[i]
            else:
                chars.insert(i, chars[i])
    return "".join(chars)


def perturb_messages(messages: list[dict], rate: float, kinds, rng: random.Random) -> list[dict]:
    """A copy of a conversation whose user turns are each perturbed with probability `rate` by a kind drawn from
    `kinds`. Only what the user typed changes; the replies the model learns stay as written."""
    out = []
    for m in messages:
        if m["role"] == "user" and rng.random() < rate:
            m = {**m, "content": perturb_text(m["content"], rng.choice(list(kinds)), rng)}
        out.append(m)
    return out


def perturb_record(record: dict, rate: float, kinds, rng: random.Random) -> dict:
    """A record (conversation, text or preference pair) with its user turns perturbed; plain text as one turn."""
    if "messages" in record:
        return {**record, "messages": perturb_messages(record["messages"], rate, kinds, rng)}
    if "prompt" in record and "chosen" in record:
        return {**record, "prompt": perturb_messages(record["prompt"], rate, kinds, rng)}
    if "text" in record and rng.random() < rate:
        return {**record, "text": perturb_text(record["text"], rng.choice(list(kinds)), rng)}
    return record
