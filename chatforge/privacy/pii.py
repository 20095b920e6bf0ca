"""Personal data in text: recognizers that validate what they find, a scrubber, and a streaming redactor.

Each recognizer pairs a pattern with a validator (checksums, calendars, numbering plans), so an order number, a
timestamp or a version string that merely looks like an entity is left alone: CN_ID checks the ISO 7064 MOD 11-2
digit, the birth date and the province; CARD the Luhn digit and the issuer prefix and length; IBAN mod-97 and the
country's length; PHONE goes through `phonenumbers` (mainland China and international formats, plus North
American numbers); IP through `ipaddress`. Person names are not recognized: no well-kept library ships an offline
English and Chinese name model on PyPI (spaCy's and HanLP's models are downloaded from outside the registry).

Text is cut into *segments* first, at characters that no entity contains (CJK text, most punctuation, newlines)
and at spaces between words that cannot be groups of a spaced number (a word with a lowercase letter). Entities
are looked for inside each segment only, so a segment's result depends on that segment alone. That is what lets
`Redactor` redact a stream exactly as the whole text would be redacted: it holds back only the segment still open
at the end of the stream (bounded by `MAX_TOKEN` and `MAX_CHAIN`), and emits everything before it.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import ipaddress
import re
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

TYPES = ("EMAIL", "PHONE", "CN_ID", "CARD", "IBAN", "IP")
MODES = ("placeholder", "pseudonym")
PII_KEY_ENV = "CHATFORGE_PII_KEY"  # base64; keeps pseudonyms the same across runs
# When two matches overlap the longer wins; at equal length, the earlier type in this list.
_PRIORITY = {t: i for i, t in enumerate(("CN_ID", "CARD", "IBAN", "EMAIL", "IP", "PHONE"))}

# Segmentation. Entities are made of these characters only (space aside); any other one ends a segment.
_ALPHA = r"A-Za-z0-9._%+\-@:()"
# Characters of a group in a spaced entity ("138 1234 5678", "DE89 3704 0044", "4111 1111 1111 1111").
_GROUP = r"0-9A-Z+()\-."
MAX_TOKEN = 512  # a run of entity characters longer than this is cut (no entity is longer than 254)
MAX_GROUP = 64  # a word longer than this is not a group of a spaced number
MAX_CHAIN = 16  # at most this many groups joined by single spaces form one segment
_SEGMENT = re.compile(
    rf"(?P<chain>(?<![{_ALPHA}])[{_GROUP}]{{1,{MAX_GROUP}}}(?: [{_GROUP}]{{1,{MAX_GROUP}}}(?![{_ALPHA}])){{1,{MAX_CHAIN - 1}}})"
    rf"|[{_ALPHA}]{{1,{MAX_TOKEN}}}"
)
_ALPHA_SET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-@:()")
_TOKEN = re.compile(rf"[{_ALPHA}]*")
_NOT_GROUP = re.compile(rf"[^{_GROUP}]")
_SEED = re.compile(r"[0-9@:]")  # every entity has a digit, an @ or a colon

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}"
    r"[A-Za-z]{2,24}(?![A-Za-z0-9\-@_%+]|\.[A-Za-z0-9])"
)
_IPV4 = re.compile(r"(?<![A-Za-z0-9.\-])(?:\d{1,3}\.){3}\d{1,3}(?![A-Za-z0-9\-]|\.\d)")
_IPV6 = re.compile(r"(?<![A-Za-z0-9:.])[0-9A-Fa-f:.]{3,45}(?![A-Za-z0-9:]|\.[A-Za-z0-9])")
_CN_ID = re.compile(r"(?<![A-Za-z0-9])\d{17}[\dXx](?![A-Za-z0-9])")
_CARD = re.compile(r"(?<![A-Za-z0-9\-])\d(?:[ \-]?\d){11,18}(?![A-Za-z0-9]|[ \-]\d)")
_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)(?![A-Za-z0-9])"
)
_PHONE = re.compile(
    r"(?<![A-Za-z0-9+\-.])(?:\+|00)?\(?\d[\d\-. ()]{5,22}\d(?:(?:x|ext\.?) ?\d{1,6})?(?![A-Za-z0-9@]|[\-.]\d)"
)
_EXTENSION = re.compile(r"(?:x|ext\.?) ?\d{1,6}$")
_DATE_LIKE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")
_DOTTED_US = re.compile(r"(?:\+?1\.)?\(?\d{3}\)?\.\d{3}\.\d{4}")
# A North American number written as one: (415) 555-0123, 415-555-0123, 415.555.0123, 415 555 0123, 1-415-...
_NANP = re.compile(r"(?:1[ \-.]?)?(?:\(\d{3}\) ?|\d{3}[ \-.])\d{3}[ \-.]\d{4}")
_DATE_DIGITS = re.compile(r"1?(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?:[01]\d|2[0-3])")
_CN_MOBILE = re.compile(r"1[3-9]\d{9}")
_NON_DIGIT = re.compile(r"\D")
_DIGITS = re.compile(r"\d")
_NON_SPACE = re.compile(r"\S+")

# ISO 7064 MOD 11-2 weights and check characters of GB 11643 resident IDs.
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
# Province-level codes of GB/T 2260 (the first two digits of a resident ID).
_ID_PROVINCES = frozenset(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 61 62 63 64 65 71 81 82".split()
)
# IBAN length per country (SWIFT IBAN registry).
_IBAN_LENGTHS = {
    **dict.fromkeys(["NO"], 15), **dict.fromkeys(["BE"], 16),
    **dict.fromkeys(["DK", "FI", "FO", "GL", "NL", "SD", "FK"], 18), **dict.fromkeys(["MK", "SI"], 19),
    **dict.fromkeys(["AT", "BA", "EE", "KZ", "LT", "LU", "XK", "MN"], 20), **dict.fromkeys(["CH", "HR", "LI", "LV"], 21),
    **dict.fromkeys(["BG", "BH", "CR", "DE", "GB", "GE", "IE", "ME", "RS", "VA"], 22),
    **dict.fromkeys(["AE", "GI", "IL", "IQ", "TL", "OM", "SO"], 23),
    **dict.fromkeys(["AD", "CZ", "ES", "MD", "PK", "RO", "SA", "SE", "SK", "TN", "VG"], 24),
    **dict.fromkeys(["LY", "PT", "ST"], 25), **dict.fromkeys(["IS", "TR"], 26),
    **dict.fromkeys(["FR", "GR", "IT", "MC", "MR", "SM", "BI", "DJ"], 27),
    **dict.fromkeys(["AL", "AZ", "BY", "CY", "DO", "GT", "HU", "LB", "PL", "SV", "NI"], 28),
    **dict.fromkeys(["BR", "EG", "PS", "QA", "UA"], 29), **dict.fromkeys(["JO", "KW", "MU", "YE"], 30),
    **dict.fromkeys(["MT", "SC"], 31), **dict.fromkeys(["LC"], 32), **dict.fromkeys(["RU"], 33),
}


@dataclass(frozen=True)
class Entity:
    """One piece of personal data: its type, where it is (character offsets) and its text."""

    type: str
    start: int
    end: int
    text: str


# ---------------------------------------------------------------- validators


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_issuer_ok(d: str) -> bool:
    """The issuer identification number (IIN) of a known scheme, at one of that scheme's lengths."""
    n, p2, p4, p6 = len(d), int(d[:2]), int(d[:4]), int(d[:6])
    return (
        (d[0] == "4" and n in (13, 16, 19))  # Visa
        or ((51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16)  # Mastercard
        or (p2 in (34, 37) and n == 15)  # American Express
        or ((p4 == 6011 or 644 <= p4 // 10 <= 649 or p2 == 65 or 622126 <= p6 <= 622925) and 16 <= n <= 19)  # Discover
        or (3528 <= p4 <= 3589 and 16 <= n <= 19)  # JCB
        or (p4 in (2131, 1800) and n == 15)  # JCB, 15 digits
        or ((300 <= p4 // 10 <= 305 or p4 == 3095 or p2 in (36, 38, 39)) and 14 <= n <= 19)  # Diners Club
        or (p2 == 62 and 16 <= n <= 19)  # UnionPay
        or ((p2 in (50, 56, 57, 58) or p4 in (5893, 6304, 6390, 6759, 6761, 6762, 6763)) and 12 <= n <= 19)  # Maestro
        or (2200 <= p4 <= 2204 and n == 16)  # Mir
    )


def _id_structure_ok(d: str) -> bool:
    """Province code and birth date of an 18-digit resident ID (the check digit aside)."""
    if d[:2] not in _ID_PROVINCES:
        return False
    try:
        born = datetime.date(int(d[6:10]), int(d[10:12]), int(d[12:14]))
    except ValueError:
        return False
    return datetime.date(1900, 1, 1) <= born <= datetime.date.today()


def cn_id_ok(s: str) -> bool:
    """An 18-character mainland China resident ID: GB 11643 check character, real birth date, known province."""
    s = s.upper()
    if len(s) != 18 or not s[:17].isdigit():
        return False
    check = _ID_CHECK[sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS)) % 11]
    return s[17] == check and _id_structure_ok(s)


def card_ok(s: str) -> bool:
    """A payment card number: consistent grouping, a known issuer prefix and length, and the Luhn digit."""
    seps = {c for c in s if not c.isdigit()}
    if len(seps) > 1:
        return False
    if seps:
        groups = [len(g) for g in s.split(seps.pop())]
        if not (all(g == 4 for g in groups[:-1]) and 1 <= groups[-1] <= 4 or groups in ([4, 6, 5], [4, 6, 4])):
            return False
    d = _NON_DIGIT.sub("", s)
    if len(d) == 18 and _id_structure_ok(d):  # a resident ID with a mistyped check digit, not a card
        return False
    return 12 <= len(d) <= 19 and _card_issuer_ok(d) and luhn_ok(d)


def iban_ok(s: str) -> bool:
    """An IBAN: the country's length and the ISO 7064 mod-97 check."""
    s = s.replace(" ", "")
    if _IBAN_LENGTHS.get(s[:2]) != len(s):
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def phone_e164(s: str) -> str | None:
    """The number in E.164 form (+8613812345678) if `s` is a valid phone number as written, else None."""
    core = _EXTENSION.sub("", s).rstrip()
    if _DATE_LIKE.fullmatch(core) or core.count("(") != core.count(")") or core.count("(") > 1:
        return None
    if "." in core and not _DOTTED_US.fullmatch(core):  # dots: only the North American 415.555.0123 style
        return None
    digits = _NON_DIGIT.sub("", core)
    if core.startswith(("+", "00")):
        digits = digits[2:] if core.startswith("00") else digits
        if not 8 <= len(digits) <= 15:
            return None
        from phonenumbers import COUNTRY_CODE_TO_REGION_CODE

        # Country codes are prefix-free: the first 1-3 digits name at most one country.
        n = next((n for n in (1, 2, 3) if int(digits[:n]) in COUNTRY_CODE_TO_REGION_CODE), 0)
        cc, national = (int(digits[:n]), digits[n:]) if n else (0, "")
    elif _CN_MOBILE.fullmatch(digits):  # a mainland China mobile number
        cc, national = 86, digits
    elif digits[0] == "0" and 10 <= len(digits) <= 12:  # a China fixed line written with its area code
        cc, national = 86, digits[1:]
    elif not _NANP.fullmatch(core) and not (core.isdigit() and len(core) == 10 and not _DATE_DIGITS.fullmatch(core)):
        return None  # a North American number written as ten bare digits, unless they read as a date and hour
    elif len(digits) == 11 and digits[0] != "1" or len(digits) not in (10, 11):
        return None
    else:  # North American numbering plan
        cc, national = 1, digits[1:] if len(digits) == 11 else digits
    return f"+{cc}{national}" if cc and _number_ok(cc, national) else None


@functools.lru_cache(maxsize=65536)
def _number_ok(country_code: int, national: str) -> bool:
    """Whether `phonenumbers` (its offline metadata) knows the number: built directly, as parse() would leave it."""
    import phonenumbers

    if not national:
        return False
    number = phonenumbers.PhoneNumber(country_code=country_code, national_number=int(national))
    zeros = len(national) - len(national.lstrip("0"))
    if zeros:  # Italy and a few others keep a leading zero in the national number
        number.italian_leading_zero, number.number_of_leading_zeros = True, zeros
    return phonenumbers.is_valid_number(number)


def _phone_spans(seg: str, m: re.Match) -> list[tuple[int, int]]:
    """The candidate if it is a number, else the runs of its space-separated groups that are (longest first, left
    to right), so "10001 138 1234 5678" gives the phone after the postcode."""
    if phone_e164(m.group()) is not None:
        return [m.span()]
    groups = [(m.start() + g.start(), m.start() + g.end()) for g in _NON_SPACE.finditer(m.group())]
    if len(groups) < 2:
        return []
    counts = [sum(c.isdigit() for c in seg[a:b]) for a, b in groups]
    spans, i = [], 0
    while i < len(groups):
        for j in range(len(groups) - 1, i - 1, -1):
            if (j - i + 1 < len(groups)) and 7 <= sum(counts[i: j + 1]) <= 17 and phone_e164(seg[groups[i][0]: groups[j][1]]) is not None:
                spans.append((groups[i][0], groups[j][1]))
                i = j
                break
        i += 1
    return spans


def _ip_ok(s: str, v6: bool) -> bool:
    try:
        (ipaddress.IPv6Address if v6 else ipaddress.IPv4Address)(s)
    except ValueError:
        return False
    return True


def _segment_entities(seg: str) -> list[tuple[int, int, str]]:
    """(start, end, type) of the entities in one segment, overlaps resolved."""
    found: list[tuple[int, int, str]] = []
    if "@" in seg:
        found += [(*m.span(), "EMAIL") for m in _EMAIL.finditer(seg) if ".." not in m.group()
                  and not m.group().split("@")[0].startswith(".") and not m.group().split("@")[0].endswith(".")
                  and len(m.group()) <= 254]
    if ":" in seg:
        for m in _IPV6.finditer(seg):
            s, end = m.group(), m.end()
            while s.endswith("."):
                s, end = s[:-1], end - 1
            if ("::" in s or s.count(":") == 7) and any(c.isalnum() for c in s) and _ip_ok(s, True):
                found.append((m.start(), end, "IP"))
    digits = len(seg) - len(_DIGITS.sub("", seg))  # gates: each recognizer needs this many digits at least
    if digits >= 4 and "." in seg:
        found += [(*m.span(), "IP") for m in _IPV4.finditer(seg) if _ip_ok(m.group(), False)]
    if digits >= 17:
        found += [(*m.span(), "CN_ID") for m in _CN_ID.finditer(seg) if cn_id_ok(m.group())]
    if digits >= 12:
        found += [(*m.span(), "CARD") for m in _CARD.finditer(seg) if card_ok(m.group())]
    if digits >= 4:
        found += [(*m.span(), "IBAN") for m in _IBAN.finditer(seg) if iban_ok(m.group())]
    at = 0
    while digits >= 7 and (m := _PHONE.search(seg, at)):
        if any(a <= m.start() and m.end() <= b for a, b, _ in found):  # inside a longer entity: it would lose
            at = m.end()
            continue
        spans = _phone_spans(seg, m)
        found += [(a, b, "PHONE") for a, b in spans]
        # Go on after the last number found, or after the candidate's first group: a number can start inside it.
        at = spans[-1][1] if spans else m.start() + len(m.group().split(" ", 1)[0])
    if len(found) < 2:
        return found
    kept: list[tuple[int, int, str]] = []
    for e in sorted(found, key=lambda e: (e[0] - e[1], _PRIORITY[e[2]], e[0])):
        if all(e[1] <= k[0] or k[1] <= e[0] for k in kept):
            kept.append(e)
    return sorted(kept)


def _entities_in(text: str, matches: Iterable[re.Match], types: frozenset[str]) -> Iterator[Entity]:
    for m in matches:
        seg = m.group()
        if _SEED.search(seg):
            base = m.start()
            for a, b, t in _segment_entities(seg):
                if t in types:
                    yield Entity(t, base + a, base + b, text[base + a: base + b])


def find_entities(text: str, types: Iterable[str] = TYPES) -> list[Entity]:
    """Every entity of the given types in `text`, in order, none overlapping."""
    return list(_entities_in(text, _SEGMENT.finditer(text), _check_types(types)))


def _check_types(types: Iterable[str]) -> frozenset[str]:
    from chatforge.errors import ChatforgeError

    types = frozenset(t.upper() for t in types)
    unknown = sorted(types - set(TYPES))
    if unknown:
        raise ChatforgeError(f"unknown PII type(s) {', '.join(unknown)}; known: {', '.join(TYPES)}")
    return types


# ---------------------------------------------------------------- replacement


def _normal(e: Entity) -> str:
    """One spelling per entity, so that a pseudonym does not change with formatting."""
    if e.type == "EMAIL":
        return e.text.lower()
    if e.type == "IP":
        return ipaddress.ip_address(e.text).compressed
    if e.type == "PHONE":
        return phone_e164(e.text) or e.text
    return re.sub(r"[\s\-]", "", e.text).upper()


class Scrubber:
    """Replaces entities with `<TYPE>` placeholders or keyed pseudonyms `<TYPE_1a2b3c4d5e>`.

    A pseudonym is an HMAC-SHA256 of the entity (normalised), so the same e-mail address gets the same pseudonym
    everywhere in a dataset while the key stays secret; with no key given, a random one is drawn, which keeps
    pseudonyms consistent within this scrubber's lifetime only. `counts` adds up what was replaced, per type.
    """

    def __init__(self, mode: str = "placeholder", key: bytes | None = None, types: Iterable[str] = TYPES):
        from chatforge.errors import ChatforgeError

        if mode not in MODES:
            raise ChatforgeError(f"PII mode must be one of {', '.join(MODES)}, got {mode!r}")
        if key is not None and len(key) < 16:
            raise ChatforgeError("a pseudonym key must be at least 16 bytes")
        self.mode = mode
        self.types = _check_types(types)
        self._key = key if key is not None else secrets.token_bytes(32)
        self.counts: Counter = Counter()

    def __repr__(self) -> str:  # never the key
        return f"Scrubber(mode={self.mode!r}, types={sorted(self.types)})"

    def replacement(self, e: Entity) -> str:
        if self.mode == "placeholder":
            return f"<{e.type}>"
        digest = hmac.new(self._key, f"{e.type}\0{_normal(e)}".encode(), hashlib.sha256).hexdigest()
        return f"<{e.type}_{digest[:10]}>"

    def known(self, text: str) -> frozenset[str]:
        """The entities in `text` (normalised), for Redactor(keep=): what a reply may repeat unredacted."""
        if not _SEED.search(text):
            return frozenset()
        return frozenset(f"{e.type}\0{_normal(e)}" for e in _entities_in(text, _SEGMENT.finditer(text), self.types))

    def _replace(self, text: str, entities: Iterable[Entity], offset: int = 0,
                 keep: frozenset[str] = frozenset()) -> str:
        out, at = [], 0
        for e in entities:
            if keep and f"{e.type}\0{_normal(e)}" in keep:
                continue
            out += [text[at: e.start - offset], self.replacement(e)]
            at = e.end - offset
            self.counts[e.type] += 1
        out.append(text[at:])
        return "".join(out)

    def scrub(self, text: str) -> str:
        """`text` with every entity replaced."""
        if not _SEED.search(text):
            return text
        return self._replace(text, _entities_in(text, _SEGMENT.finditer(text), self.types))

    def scrub_record(self, record):
        """A conversation record (or any JSON value) with every string scrubbed but roles and keys."""
        if isinstance(record, str):
            return self.scrub(record)
        if isinstance(record, list):
            return [self.scrub_record(v) for v in record]
        if isinstance(record, dict):
            return {k: v if k == "role" else self.scrub_record(v) for k, v in record.items()}
        return record


def pseudonym_key(var: str = PII_KEY_ENV) -> bytes | None:
    """The pseudonym key in environment variable `var` (base64, at least 16 bytes), or None when it is unset:
    set it to keep pseudonyms the same across runs; unset, each run draws its own."""
    import base64
    import binascii
    import os

    from chatforge.errors import ChatforgeError

    value = os.environ.get(var)
    if not value:
        return None
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ChatforgeError(f"environment variable {var}: not base64") from None
    if len(key) < 16:
        raise ChatforgeError(f"environment variable {var}: a pseudonym key must be at least 16 bytes")
    return key


class Redactor:
    """Redacts a stream of text chunks (the tokens of a reply) exactly as `Scrubber.scrub` redacts the whole text.

    `feed(chunk)` returns the text that is safe to show now; what could still be part of an entity is held back
    (the segment open at the end: a word, or up to MAX_CHAIN groups of digits). `flush()` returns the rest at the
    end of the stream. `held` says how many characters are held back. keep (Scrubber.known of the prompt): entities
    the conversation itself holds, which the reply may repeat — a user's own e-mail address in a tool call's
    arguments, the shop's phone number from the system prompt; redaction is for what the model brings from its
    training data.
    """

    def __init__(self, scrubber: Scrubber | None = None, keep: frozenset[str] = frozenset()):
        self.scrubber = scrubber if scrubber is not None else Scrubber()
        self.keep = keep
        self._context = ""  # the last character emitted: the segment pattern looks one character behind
        self._buffer = ""

    @property
    def held(self) -> int:
        return len(self._buffer)

    def feed(self, chunk: str) -> str:
        self._buffer += chunk
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self._context + self._buffer
        pos = len(self._context)
        done: list[re.Match] = []
        cut = len(text)
        for m in _SEGMENT.finditer(text, pos):
            if not final and not _segment_closed(text, m):
                cut = m.start()
                break
            done.append(m)
        if cut == pos:
            return ""
        out = self.scrubber._replace(text[pos:cut], _entities_in(text, done, self.scrubber.types), offset=pos,
                                     keep=self.keep)
        self._context, self._buffer = text[cut - 1], text[cut:]
        return out


def _segment_closed(text: str, m: re.Match) -> bool:
    """Whether segment `m` stays the same whatever text follows (the pattern looks at most one word ahead)."""
    end, n = m.end(), len(text)
    if end >= n:
        return False
    c = text[end]
    if c != " " and c not in _ALPHA_SET:  # a character no entity contains
        return True
    if m.group("chain") is None and (c != " " or _NOT_GROUP.search(m.group())):  # a word, whole or cut at MAX_TOKEN
        return True
    if m.group("chain") is not None and m.group().count(" ") == MAX_CHAIN - 1:
        return True
    nxt = _TOKEN.match(text, end + 1).end()  # the next word decides whether the chain goes on
    return nxt < n or nxt - end - 1 > MAX_GROUP or bool(_NOT_GROUP.search(text, end + 1, nxt))


def scrub_text(text: str, mode: str = "placeholder", key: bytes | None = None) -> tuple[str, Counter]:
    """(`text` with every entity replaced, counts per type): a one-off call."""
    scrubber = Scrubber(mode, key)
    return scrubber.scrub(text), scrubber.counts
