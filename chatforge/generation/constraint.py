"""Constrained decoding: a grammar the output must match (JSON schema, regex, choice list, Lark), as a token mask.

A `Constraint` is what a caller asks for, compiled and checked once, independent of any tokenizer; the engine turns
it into a per-request `Matcher` that, before each sampling step, says which token ids keep the output inside the
grammar (every other logit becomes -inf) and is advanced with the sampled id. End-of-turn ids are allowed only where
the grammar accepts, and once nothing but the end of the turn can follow, the request finishes ("stop") without
spending a forward on a token that is already decided.

The masks come from llguidance (Microsoft's Rust engine behind guidance, also used by vLLM, SGLang and llama.cpp).
Chosen over xgrammar and outlines-core after measuring all three on chatforge's byte-level BPE, SmolLM2's and
GPT-2's tokenizers (numbers in the module's tests and benchmarks/tool_calls.py): it reads tokenizer.json directly,
works on raw token bytes (a token may end in the middle of a UTF-8 character), never offers special tokens inside
the grammar, honours numeric bounds, lengths and array sizes exactly, refuses what it does not implement with a
message naming the keyword ("Unimplemented keys: ["uniqueItems"]", "Unsatisfiable schema: minimum (5) is greater
than maximum (1)"), costs ~0.03 ms per token on SmolLM2's 49k vocabulary, and is one dependency-free wheel.
xgrammar offered special tokens such as <|pad|> inside JSON strings, emitted a control character into a string with
our own tokenizer, silently ignored uniqueItems/if/not, and pulls triton; outlines-core ignored numeric bounds
(schema-invalid outputs) and silently accepted unsatisfiable schemas.

llguidance's masks are sound (every offered id keeps the output matchable) and offer the tokenizer's own
(canonical) encoding of every matching text, but may leave out spellings BPE itself never produces ('he' + 'l' + 'lo'
where 'll' is a token, or a token that starts with a UTF-8 continuation byte); tests hold both properties.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch

from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    from chatforge.tokenizer import Tokenizer

# Canonical, compact JSON (json.dumps' separators, no free whitespace): what models have seen most, and no way for a
# small model to wander into endless newlines between tokens.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_KEYS = ("json_schema", "regex", "choices")  # the keyword arguments Bot and generate accept


class Constraint:
    """A checked grammar (llguidance's serialized form) and what it was made from, for error messages.

    Build one with json_schema / json_object / regex / choices / lark; it is immutable and shared freely between
    requests (each request gets its own Matcher).
    """

    def __init__(self, grammar: str, kind: str, where: str):
        from llguidance import LLMatcher

        self.grammar, self.kind, self.where = grammar, kind, where
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ChatforgeError(f"{where}: {_explain(messages[0] if messages else 'invalid grammar')}")

    def __repr__(self) -> str:
        return f"Constraint({self.kind}, {self.where})"

    @classmethod
    def json_schema(cls, schema: dict | str, where: str = "json_schema") -> Constraint:
        """Output is one JSON value valid under `schema` (draft 2020-12 keywords; unsupported ones are an error)."""
        from llguidance import LLMatcher

        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ChatforgeError(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(schema, dict):
            raise ChatforgeError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
        return cls(LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=dict(JSON_STYLE)), "json_schema",
                   where)

    @classmethod
    def json_object(cls, where: str = "response_format") -> Constraint:
        """Any JSON object (OpenAI's JSON mode)."""
        return cls.json_schema({"type": "object"}, where)

    @classmethod
    def regex(cls, pattern: str, where: str = "regex") -> Constraint:
        """Output matches `pattern` as a whole (Rust regex syntax: no look-around or back-references)."""
        from llguidance import LLMatcher

        if not isinstance(pattern, str) or not pattern:
            raise ChatforgeError(f"{where}: must be a non-empty string, got {pattern!r}")
        return cls(LLMatcher.grammar_from_regex(pattern), "regex", where)

    @classmethod
    def choices(cls, options: list[str], where: str = "choices") -> Constraint:
        """Output is exactly one of `options`."""
        if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
            raise ChatforgeError(f"{where}: must be a list of non-empty strings, got {options!r}")
        return cls.lark("start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options), where)

    @classmethod
    def lark(cls, grammar: str, where: str = "grammar") -> Constraint:
        """A grammar in llguidance's Lark dialect (with %json {schema} for embedded JSON); tools.py builds these."""
        from llguidance import LLMatcher

        return cls(LLMatcher.grammar_from_lark(grammar), "lark", where)

    def matcher(self, tokenizer: Tokenizer) -> Matcher:
        return Matcher(self, tokenizer)


def _explain(message: str) -> str:
    """llguidance's message, with the unsupported or unsatisfiable part first and its source-position noise cut."""
    m = re.search(r"Unimplemented keys: \[(.*?)\]", message)
    if m:
        keys = ", ".join(json.loads(f"[{m.group(1)}]"))
        return f"unsupported JSON schema feature: {keys}"
    m = re.search(r"Unsatisfiable schema: ([^\n]*)", message)
    if m:
        return f"unsatisfiable schema: {m.group(1)}"
    return " ".join(message.split())


def constraint_from(kwargs: dict) -> Constraint | None:
    """Pop json_schema= / regex= / choices= out of sampling keyword arguments and build their Constraint (one at most:
    two grammars at once have no meaning)."""
    given = [k for k in _KEYS if kwargs.get(k) is not None]
    values = {k: kwargs.pop(k, None) for k in _KEYS}
    if len(given) > 1:
        raise ChatforgeError(f"sampling: give one of json_schema, regex, choices, not {' and '.join(given)}")
    if not given:
        return None
    return getattr(Constraint, given[0])(values[given[0]])


# ------------------------------------------------------------------------------- per request: the token mask

_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer: Tokenizer):
    """llguidance's view of a tokenizer (token bytes, a trie over them), built once per tokenizer (~0.4 s at 50k)."""
    from llguidance import LLTokenizer

    key = (tokenizer.vocab_size, tuple(sorted(tokenizer.stop_ids)))
    cached = _LL_TOKENIZERS.get(tokenizer)
    if cached is None or cached[0] != key:
        ll = LLTokenizer(tokenizer.hf.to_str(), n_vocab=tokenizer.vocab_size, eos_token=sorted(tokenizer.stop_ids))
        cached = _LL_TOKENIZERS[tokenizer] = (key, ll)
    return cached[1]


class Matcher:
    """One request's position in its grammar: `allowed()` before sampling, `advance(token)` after."""

    def __init__(self, constraint: Constraint, tokenizer: Tokenizer):
        from llguidance import LLMatcher

        self.constraint = constraint
        self.vocab_size = tokenizer.vocab_size
        self._stop_ids = sorted(tokenizer.stop_ids)
        self._m = LLMatcher(_ll_tokenizer(tokenizer), constraint.grammar, log_level=0)
        if self._m.is_error():
            raise ChatforgeError(f"{constraint.where}: {_explain(self._m.get_error())}")
        self._words = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)  # one bit per token id

    def allowed(self) -> torch.Tensor:
        """Bool (vocab_size,): the ids that keep the output inside the grammar."""
        self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        return torch.from_numpy(_unpack(self._words[None], [self])[0])

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of one row of logits with every id outside the grammar at -inf."""
        allowed = self.allowed()
        n = logits.shape[-1]
        if n > self.vocab_size:  # a model whose vocabulary is padded past the tokenizer's
            allowed = torch.cat([allowed, torch.zeros(n - self.vocab_size, dtype=torch.bool)])
        return logits.masked_fill(~allowed[:n], float("-inf"))

    def advance(self, token: int) -> None:
        """Take the sampled id (always one `allowed()` gave, so a refusal here is a bug)."""
        if not self._m.consume_token(int(token)):
            raise RuntimeError(f"constraint {self.constraint!r} refused token {token}: {self._m.get_error()}")

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (the end of the turn may come now)."""
        return self._m.is_accepting()

    @property
    def done(self) -> bool:
        """Nothing but the end of the turn can follow."""
        return self._m.is_stopped()



def _unpack(words: np.ndarray, matchers: list[Matcher]) -> np.ndarray:
    """Bool (rows, vocab_size) from llguidance's bitmasks (rows, words: one bit per id, little-endian). A row with
    nothing allowed cannot happen for a valid grammar; it ends the turn rather than sample from nothing."""
    vocab = matchers[0].vocab_size
    mask = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab].view(np.bool_)
    for row in np.flatnonzero(~mask.any(axis=1)):
        mask[row, matchers[row]._stop_ids] = True
    return mask


# ------------------------------------------------------------------------------- per step: masks beside the forward

_POOL = None  # one worker thread: llguidance releases the GIL while it computes, so masks overlap the forward


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatforge-constraint")
    return _POOL


class StepMasks:
    """The masks of one decode step's constrained rows, computed while the model runs that step's forward.

    A row's mask depends only on the tokens it has sampled so far, all known before the forward starts, so the
    engine starts them first (`StepMasks.start`), runs the forward, then `apply`s them to the batch's logits in one
    op: the mask costs no wall time where a core is free, and no torch op per row. The same masks as
    Matcher.allowed() row by row (tested).
    """

    def __init__(self, rows: list[int], matchers: list[Matcher]):
        self.rows, self.matchers = rows, matchers
        self._future = _pool().submit(self._compute)

    @classmethod
    def start(cls, matchers: list[Matcher | None]) -> StepMasks | None:
        """Masks for the rows whose matcher is not None (None when no row is constrained)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        return cls(rows, [matchers[i] for i in rows]) if rows else None

    def _compute(self) -> np.ndarray:
        words = np.empty((len(self.matchers), self.matchers[0]._words.size), dtype=np.int32)
        for j, m in enumerate(self.matchers):
            m._m.unsafe_compute_mask_ptr(words[j].ctypes.data, words[j].nbytes)
        return _unpack(words, self.matchers)

    def apply(self, logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """{row: that row of `logits` (batch, n) on the CPU, n <= vocab_size, with every id outside its grammar at
        -inf}; `logits` itself stays the model's own (for logprobs).

        One numpy select for all constrained rows: numpy runs it on this thread alone, where a torch op over a
        vocabulary row forks the intra-op thread pool, and each such fork on a busy machine can wait a time slice
        for a preempted worker (at load 6 on 2 cores, 8 rows of masked_fill + argmax took 2.7 ms at 1 thread and
        18 ms, median, at 2).
        """
        allowed = self._future.result()
        x = logits.numpy()
        masked = np.where(allowed[:, : x.shape[-1]], x[self.rows], np.float32(float("-inf")))
        return {row: torch.from_numpy(masked[j]) for j, row in enumerate(self.rows)}
