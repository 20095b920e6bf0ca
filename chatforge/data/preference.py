"""Preference pairs: read, validate, clean and render {prompt, chosen, rejected} for DPO and reward models.

Accepted raw forms (JSONL lines or JSON records):

- {"prompt": "text" | [messages], "chosen": "text" | message | [messages], "rejected": ...}
- {"messages": [messages ending with a user turn], "chosen": ..., "rejected": ...}
- {"chosen": [whole conversation], "rejected": [whole conversation]}: the two share a prefix (the prompt) that ends
  with a user turn, and differ from there on (Anthropic HH and TRL's implicit-prompt form).

The canonical record is TRL's conversational form: {"prompt": [messages ending with user], "chosen": [assistant
message, ...], "rejected": [...]}. A pair must share its prompt and have two different, non-empty replies; every
problem is a ChatforgeError naming "file:line" and the reason.

Rendering goes through `Tokenizer.render`, the one chat contract: the prompt is rendered with the generation prompt,
exactly as inference renders it, and the reply's tokens are what follows it in the rendering of prompt + reply (a
test holds that prefix equality), so the end-of-turn token appears once, where the template puts it, and nowhere
is an end-of-sequence token appended by hand.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from chatforge.data.formats import ROLE_ALIASES, Invalid, check_roles, to_record
from chatforge.errors import ChatforgeError

PREFERENCE = "preference"


def is_pair(raw: Any) -> bool:
    """A raw or canonical record that is a preference pair (has chosen and rejected)."""
    return isinstance(raw, dict) and "chosen" in raw and "rejected" in raw


def _fail(location: str, reason: str):
    raise ChatforgeError(f"{location}: {reason}")


def _messages(value: Any, field: str, location: str) -> list[dict]:
    """A list of {role, content} (roles through the same aliases as every format; content a string)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        _fail(location, f"field '{field}' must be a string, a message or a list of messages, "
                        f"got {type(value).__name__}")
    out = []
    for n, m in enumerate(value, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            _fail(location, f"{field} message {n} must be an object with 'role' and 'content'")
        role = ROLE_ALIASES.get(m["role"].strip().lower()) if isinstance(m["role"], str) else None
        if role is None:
            _fail(location, f"{field} message {n} has role {m['role']!r}; expected system, user or assistant")
        if not isinstance(m["content"], str):
            _fail(location, f"{field} message {n} content must be a string")
        out.append({"role": role, "content": m["content"]})
    return out


def _reply(value: Any, field: str, location: str) -> list[dict]:
    """A reply: text, one assistant message, or assistant-first alternating messages ending with assistant."""
    msgs = [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, field, location)
    if not msgs:
        _fail(location, f"{field} reply is empty (no messages)")
    for i, m in enumerate(msgs):
        expected = "assistant" if i % 2 == 0 else "user"
        if m["role"] != expected:
            _fail(location, f"{field} message {i + 1} has role {m['role']!r}; a reply starts with assistant "
                            "and alternates assistant/user")
    if msgs[-1]["role"] != "assistant":
        _fail(location, f"{field} ends with a user turn; a reply ends with an assistant message")
    for i, m in enumerate(msgs, 1):
        if not m["content"].strip():
            _fail(location, f"{field} reply is empty" + (f" (message {i})" if len(msgs) > 1 else ""))
    return msgs


def _check_prompt(prompt: list[dict], location: str) -> None:
    if not prompt or prompt[-1]["role"] != "user":
        _fail(location, "the prompt must end with a user turn (the reply follows it)")
    check_roles(prompt + [{"role": "assistant", "content": "x"}], location)
    for i, m in enumerate(prompt, 1):
        if m["role"] == "user" and not m["content"].strip():
            _fail(location, f"prompt message {i} (user) is empty")


def preference_record(raw: Any, location: str) -> dict:
    """Validate one raw pair and return the canonical {"prompt", "chosen", "rejected"}."""
    if isinstance(raw, Invalid):
        _fail(location, raw.reason)
    if not isinstance(raw, dict):
        _fail(location, f"expected an object with 'chosen' and 'rejected', got {type(raw).__name__}")
    for key in ("chosen", "rejected"):
        if key not in raw:
            _fail(location, f"missing field '{key}'")
    if "prompt" in raw and "messages" in raw:
        _fail(location, "give the prompt once: 'prompt' or 'messages', not both")
    given = raw.get("prompt", raw.get("messages"))
    if given is not None:
        prompt = [{"role": "user", "content": given}] if isinstance(given, str) else _messages(given, "prompt",
                                                                                               location)
        chosen, rejected = _reply(raw["chosen"], "chosen", location), _reply(raw["rejected"], "rejected", location)
    else:  # two whole conversations sharing the prompt
        a, b = _messages(raw["chosen"], "chosen", location), _messages(raw["rejected"], "rejected", location)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        if n == 0:
            _fail(location, "chosen and rejected share no prompt (no common messages ending with a user turn); "
                            "a pair is two replies to the same prompt")
        prompt = a[:n]
        if len(a) == n or len(b) == n:
            _fail(location, f"{'chosen' if len(a) == n else 'rejected'} has no reply after the shared prompt")
        if a[n]["role"] != "assistant" or b[n]["role"] != "assistant":
            _fail(location, f"chosen and rejected differ before the reply (message {n + 1}); "
                            "a pair must share its prompt")
        chosen, rejected = _reply(a[n:], "chosen", location), _reply(b[n:], "rejected", location)
    _check_prompt(prompt, location)
    if chosen == rejected:
        _fail(location, "chosen and rejected are the same reply; a pair needs two different replies")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_record(raw: Any, fmt: str, location: str) -> dict:
    """to_record for every format, preference pairs included (a prepared file may hold either kind)."""
    if fmt == PREFERENCE or (fmt == "messages" and is_pair(raw)):
        return preference_record(raw, location)
    return to_record(raw, fmt, location)


def clean_pair(record: dict, max_turn_chars: int, clean: Callable[[str], str]) -> tuple[dict | None, str | None]:
    """(cleaned pair, None), or (None, why it is dropped): a text empty or too long after cleaning, or the two
    replies equal once cleaned (they differed only in spacing or invisible characters)."""
    out = {}
    for key in ("prompt", "chosen", "rejected"):
        msgs = []
        for n, m in enumerate(record[key], 1):
            content = clean(m["content"])
            if len(content) > max_turn_chars:
                return None, f"{key} message {n} has {len(content):,} characters (max_turn_chars {max_turn_chars:,})"
            if not content and not (key == "prompt" and m["role"] == "system"):
                return None, f"{key} message {n} ({m['role']}) is empty after cleaning"
            if content:
                msgs.append({"role": m["role"], "content": content})
        out[key] = msgs
    if out["chosen"] == out["rejected"]:
        return None, "chosen and rejected are the same reply after cleaning"
    return out, None


# ---------------------------------------------------------------- rendering

def render_reply(tokenizer, prompt: list[dict], reply: list[dict],
                 prompt_ids: list[int] | None = None) -> tuple[list[int], list[int], int]:
    """(ids, mask, prompt length) of prompt + reply. ids[:prompt length] is the prompt rendered with the generation
    prompt, exactly as inference renders it; mask is the renderer's assistant mask after it (the reply's content and
    its one end-of-turn token)."""
    if prompt_ids is None:
        prompt_ids, _ = tokenizer.render(prompt, add_generation_prompt=True)
    ids, mask = tokenizer.render(prompt + reply)
    n = len(prompt_ids)
    if ids[:n] != prompt_ids:
        raise ChatforgeError("chat template: the prompt rendered for generation is not a prefix of the prompt "
                             "rendered with its reply, so training would not see the prompt inference sends")
    return ids, [0] * n + list(mask[n:]), n


class EncodedPairs:
    """Pairs as token arrays: per pair the chosen and rejected sequences (prompt + reply) and their reply masks;
    `ref` holds the reference model's summed reply log-probs (chosen, rejected) once computed."""

    def __init__(self) -> None:
        self.chosen: list[np.ndarray] = []
        self.rejected: list[np.ndarray] = []
        self.chosen_mask: list[np.ndarray] = []
        self.rejected_mask: list[np.ndarray] = []
        self.stats = {"records": 0, "pairs": 0, "tokens": 0, "trained_tokens": 0, "truncated": 0,
                      "truncated_tokens": 0, "split": 0, "dropped_no_trained_tokens": 0, "dropped_not_pairs": 0}
        self.ref: np.ndarray | None = None  # (pairs, 2) float64

    @property
    def ids(self) -> list[np.ndarray]:  # what the loop checks for "any data"
        return self.chosen

    def __len__(self) -> int:
        return len(self.chosen)


def encode_pairs(records, tokenizer, row_len: int) -> EncodedPairs:
    """Render every pair; a sequence longer than row_len keeps its prompt and loses the end of its reply (counted
    as truncated); a pair whose prompt leaves no room for a reply token is dropped. Records that are not pairs are
    counted and skipped (a preference stage trains on pairs only)."""
    enc = EncodedPairs()
    s = enc.stats
    for record in records:
        s["records"] += 1
        if not is_pair(record):
            s["dropped_not_pairs"] += 1
            continue
        prompt_ids, _ = tokenizer.render(record["prompt"], add_generation_prompt=True)
        if len(prompt_ids) >= row_len:
            s["dropped_no_trained_tokens"] += 1
            continue
        pieces = []
        for key in ("chosen", "rejected"):
            ids, mask, _ = render_reply(tokenizer, record["prompt"], record[key], prompt_ids)
            if len(ids) > row_len:
                s["truncated"] += 1
                s["truncated_tokens"] += len(ids) - row_len
                ids, mask = ids[:row_len], mask[:row_len]
            pieces.append((np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)))
        if not all(m.any() for _, m in pieces):
            s["dropped_no_trained_tokens"] += 1
            continue
        (c, cm), (r, rm) = pieces
        enc.chosen.append(c)
        enc.chosen_mask.append(cm)
        enc.rejected.append(r)
        enc.rejected_mask.append(rm)
        s["pairs"] += 1
        s["tokens"] += len(c) + len(r)
        s["trained_tokens"] += int(cm.sum() + rm.sum())
    return enc
