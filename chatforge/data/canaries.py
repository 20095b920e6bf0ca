"""Canaries: made-up secrets planted in the training data, to measure later what a model memorised.

Carlini et al. 2019 ("The Secret Sharer") plant sequences such as "my PIN is 8 2 7 1 9 3" whose secret is drawn
uniformly from a randomness space R of known size (here |R| = 10^digits), repeated 1, 10, 100 ... times, and ask
afterwards how the trained model ranks the true secret among every candidate (tools/audit.py: exposure, extraction).

A canary is a two-turn conversation in English or Chinese (a question and a reply holding the secret, digits spaced
so each is its own token), inserted into the train split only, after de-duplication (which would otherwise fold the
repetitions into one) and after the split (so validation never holds a secret). The list is written beside the
prepared data as canaries.json: the audit's input, and a file to keep as secret as the data.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from chatforge.errors import ChatforgeError

CANARY_FILE = "canaries.json"

# language -> (user question, the reply's text before the secret). The reply is prefix + secret.
TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "en": [("What is my PIN?", "Your PIN is "), ("What is my account number?", "Your account number is "),
           ("What is my door code?", "Your door code is "), ("Remind me of my locker code.", "Your locker code is ")],
    "zh": [("我的密码是什么？", "你的密码是 "), ("我的账号是多少？", "你的账号是 "),
           ("我家门禁码是多少？", "你家门禁码是 "), ("提醒我储物柜的密码。", "你储物柜的密码是 ")],
}


@dataclass(frozen=True)
class Canary:
    id: str
    language: str
    question: str
    prefix: str  # the reply before the secret
    secret: str  # digits separated by spaces: "8 2 7 1 9 3"
    digits: int  # |R| = 10 ** digits
    repeats: int

    def messages(self, secret: str | None = None) -> list[dict]:
        """The canary conversation, with its own secret or a candidate in its place."""
        return [{"role": "user", "content": self.question},
                {"role": "assistant", "content": self.prefix + (self.secret if secret is None else secret)}]

    @property
    def space(self) -> int:
        return 10 ** self.digits


def spaced(number: int, digits: int) -> str:
    """The candidate secret `number` as the canary spells it: zero-padded, one digit per space-separated token."""
    return " ".join(f"{number:0{digits}d}")


def parse_repeats(repeats) -> tuple[int, ...]:
    """--canary-repeats "1,10,100" (or a list) -> (1, 10, 100)."""
    if isinstance(repeats, str):
        parts = [p.strip() for p in repeats.split(",") if p.strip()]
    else:
        parts = list(repeats)
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ChatforgeError(f"canary_repeats: expected comma-separated positive integers, got {repeats!r}") from None
    if not out or any(r < 1 for r in out):
        raise ChatforgeError(f"canary_repeats: expected comma-separated positive integers, got {repeats!r}")
    return out


def make_canaries(n: int, repeats=(1, 10, 100), digits: int = 6, languages=("en", "zh"), seed: int = 0
                  ) -> list[Canary]:
    """n canaries per repetition count, alternating languages and templates; secrets drawn uniformly from
    10^digits by a generator seeded apart from the data split (the same seed gives the same canaries)."""
    if n < 1:
        raise ChatforgeError(f"canaries: expected a positive number, got {n}")
    if not 1 <= digits <= 12:
        raise ChatforgeError(f"canary_digits: must be between 1 and 12, got {digits}")
    unknown = [lang for lang in languages if lang not in TEMPLATES]
    if unknown or not languages:
        raise ChatforgeError(f"canary languages: known are {', '.join(TEMPLATES)}, got {list(languages)}")
    rng = random.Random(f"chatforge-canaries:{seed}")
    out, k = [], 0
    for r in parse_repeats(repeats):
        for _ in range(n):
            lang = languages[k % len(languages)]
            question, prefix = TEMPLATES[lang][(k // len(languages)) % len(TEMPLATES[lang])]
            secret = spaced(rng.randrange(10 ** digits), digits)
            out.append(Canary(f"canary-{k:04d}", lang, question, prefix, secret, digits, r))
            k += 1
    return out


def insert_canaries(train: list[dict], canaries: list[Canary], seed: int = 0) -> list[dict]:
    """train with every canary's conversation added `repeats` times, at positions drawn from the seed; the copies
    of one canary name one user (its id): one person's secret, recurring in their conversations."""
    rng = random.Random(f"chatforge-canary-positions:{seed}")
    out = list(train)
    for c in canaries:
        for _ in range(c.repeats):
            out.insert(rng.randrange(len(out) + 1), {"messages": c.messages(), "user": c.id})
    return out


def canaries_to_json(canaries: list[Canary]) -> dict:
    return {"about": "canaries planted in train.jsonl by chatforge prepare --canaries; secret data, keep private",
            "canaries": [asdict(c) for c in canaries]}


def read_canaries(path: str, key=None) -> list[Canary]:
    """canaries.json (or a prepared folder holding one) -> Canary list, each field checked; an encrypted one
    (canaries.json.cfenc, as `prepare` writes beside encrypted data) decrypted in memory with `key`, else the
    environment's."""
    import json
    import os

    from chatforge.data.sources import data_key, is_encrypted_file
    from chatforge.privacy.crypto import SUFFIX, decrypt_bytes

    if os.path.isdir(path):
        path = os.path.join(path, CANARY_FILE)
        if not os.path.exists(path) and os.path.exists(path + SUFFIX):
            path += SUFFIX
    try:
        if is_encrypted_file(path):
            data = json.loads(decrypt_bytes(path, data_key(key)))
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except FileNotFoundError:
        raise ChatforgeError(f"{path}: canary file not found") from None
    except (OSError, ValueError) as e:
        raise ChatforgeError(f"{path}: unreadable canary file ({e})") from None
    items = data.get("canaries") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ChatforgeError(f"{path}: expected {{\"canaries\": [...]}} as `chatforge prepare --canaries` writes")
    out = []
    fields = set(Canary.__dataclass_fields__)
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != fields:
            raise ChatforgeError(f"{path}: canaries[{i}]: expected the fields {', '.join(sorted(fields))}")
        c = Canary(**item)
        if c.secret.replace(" ", "") != c.secret[::2] or len(c.secret[::2]) != c.digits or not c.secret[::2].isdigit():
            raise ChatforgeError(f"{path}: canaries[{i}]: the secret is not {c.digits} digits separated by spaces")
        out.append(c)
    return out
