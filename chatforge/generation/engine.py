"""The one generator: prefill, KV-cache decoding, sampling, stop strings and continuous batching.

The CLI chat, the Python API (chat.Bot), evaluation and the server all generate through `Engine`. Requests wait in
a queue, take a free slot (one row of a shared KV cache) when one opens, and leave at the token boundary where they
finish, so a batch is never held up by its longest member. Each step runs one decode forward for all running rows
that have a token to feed, then prefills admitted prompts, one at a time (the prompt's keys depend only on the
prompt), so a request's tokens depend on its batch neighbours only through float rounding of the batched matmuls
(measured: < 1e-6 on the logits). Sampling uses each request's own torch.Generator, so a seeded request gives the
same text whatever else runs.

Chunked prefill: a step prefills at most `prefill_chunk` prompt tokens in all, so a long prompt is written over
several steps while the running streams still get one token in every step. Prefix caching: a cache row keeps the
keys of its last occupant (prompt and reply) after it finishes; a new prompt takes the free row holding the longest
common token prefix (or gets that prefix copied from a running row) and prefills only the rest, so a shared system
prompt or a conversation's earlier turns are prefilled once. The keys of a position depend only on the tokens up to
it, so the reused keys are the ones a fresh prefill would write, up to float rounding. A sliding-window model's ring
rows hold only the last `window` positions: they are never reused. Prompts admitted in the same step do not share
with each other (no row holds their keys yet): a cold start prefills a common system prompt once per slot.

Text is streamed through the tokenizer's UTF-8-safe decoder and a stop-string hold-back: text that could still turn
out to be the start of a stop string is held until it can't, so a stop string (or a prefix of one) never reaches the
stream, even when it spans several tokens.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from chatforge.errors import ChatforgeError
from chatforge.generation import decode
from chatforge.generation.constraint import Constraint, StepMasks
from chatforge.tokenizer import token_bytes

PREFILL_CHUNK = 512  # prompt tokens per prefill forward: bounds the attention scores' memory for long prompts
PREFILL_PER_STEP = 256  # default prompt tokens prefilled per engine step (chunked prefill), across all prompts
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing logits by 1e-300 overflows to inf


@dataclass
class SamplingParams:
    """How one request samples. The sampling-defaults rule, the same for the CLI, Python and the server: a field
    the caller leaves unset takes the model folder's generation_config.json value (Bot.defaults), else the default
    written here, the one built-in default. Explicit flags, keyword arguments and request fields always win."""

    max_new_tokens: int | None = 256  # None: until the context window is full
    temperature: float = 0.7  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 0.9
    repetition_penalty: float = 1.0  # CTRL-style, on prompt+generated ids
    presence_penalty: float = 0.0  # OpenAI semantics, on generated ids
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # matched on decoded text, also across tokens; never emitted
    stop_token_ids: list[int] = field(default_factory=list)  # extra; tokenizer.stop_ids always stop
    seed: int | None = None  # per-request torch.Generator: output independent of batch composition
    logprobs: int | None = None  # None: off; 0: chosen token's logprob; k>0: plus top-k alternatives
    constraint: Constraint | None = None  # a grammar the output must match (generation/constraint.py)

    def validate(self) -> None:
        """Reject values that have no meaning, naming the field (a user's mistake, not a bug)."""
        def bad(name: str, why: str) -> ChatforgeError:
            return ChatforgeError(f"sampling: {name} {why}, got {getattr(self, name)!r}")

        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise bad("max_new_tokens", "must be a positive integer")
        if not self.temperature >= 0:
            raise bad("temperature", "must be >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's -2..2 range is the server's to enforce
            if not abs(getattr(self, name)) < float("inf"):
                raise bad(name, "must be a finite number")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be None or an integer 0..{MAX_LOGPROBS}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise bad("constraint", "must be None or a generation.constraint.Constraint")


class ContextLengthError(ChatforgeError):
    """A prompt, with the reply asked for, that does not fit the context window (the server's
    context_length_exceeded)."""


def reply_budget(prompt_tokens: int, max_new_tokens: int | None, context: int, *, clamp: bool = False) -> int:
    """The one prompt-budget check (engine, Bot, server): new tokens a reply may take after a prompt.

    max_new_tokens None means whatever the context window has left. Asking for more than is left is a
    ContextLengthError, or with clamp (the Bot's policy) just what is left. A prompt that leaves no room is always
    an error.
    """
    room = context - prompt_tokens
    if max_new_tokens is not None and max_new_tokens > room and not clamp:
        raise ContextLengthError(f"prompt: {prompt_tokens} tokens + {max_new_tokens} new tokens = "
                                 f"{prompt_tokens + max_new_tokens} exceed the context window of {context} tokens; "
                                 f"shorten the prompt or ask for fewer new tokens")
    if room < 1:
        raise ContextLengthError(f"prompt: {prompt_tokens} tokens leave no room for a reply in the context window of "
                                 f"{context} tokens; shorten the prompt")
    return room if max_new_tokens is None else min(max_new_tokens, room)


@dataclass
class Delta:
    """One streamed piece of one request."""

    text: str  # new text: never a broken UTF-8 character, never part of a stop string
    token_ids: list[int]
    # per token: {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}
    logprobs: list[dict] | None
    finish_reason: str | None  # None while running, else "stop" | "length"


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # every generated id, including an end-of-turn id that finished it (not in text)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None


class Request:
    """One prompt being generated; returned by Engine.add_request and carried in step()'s results."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams, limit: int, vocab: int):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.output_ids: list[int] = []
        self.cached_tokens = 0  # prompt tokens whose keys were reused from another request (prefix cache)
        self.finished = False
        self.finish_reason: str | None = None
        self.text = ""  # everything streamed so far
        self._limit = limit  # new tokens allowed: max_new_tokens, or what is left of the context
        self._slot: int | None = None
        self._prefilled = 0  # prompt positions whose keys are in the slot (reused prefix + prefilled chunks)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator().manual_seed(seed)
        self._decoder = None  # the tokenizer's StreamDecoder, made on admission
        self._matcher = None  # the constraint's Matcher (set by add_request), None when unconstrained
        self._held = ""  # decoded text not streamed yet: it could be the start of a stop string
        self._seen: torch.Tensor | None = None  # prompt+generated ids, for the repetition penalty
        self._counts: torch.Tensor | None = None  # generated-id counts, for presence/frequency penalties
        if params.repetition_penalty != 1.0:
            self._seen = torch.zeros(vocab, dtype=torch.bool)
            self._seen[torch.tensor([i for i in prompt_ids if i < vocab], dtype=torch.long)] = True
        if params.presence_penalty or params.frequency_penalty:
            self._counts = torch.zeros(vocab, dtype=torch.float32)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    def __repr__(self) -> str:
        return f"Request(id={self.id}, prompt={len(self.prompt_ids)}, out={len(self.output_ids)}, " \
               f"finish={self.finish_reason})"


# ---------------------------------------------------------------- sampling (pure functions, tested exactly)

def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """One row of logits (V,) after penalties, temperature, top-k and top-p, in that order; removed ids are -inf.

    repetition_penalty (CTRL): for ids in `seen` (prompt + generated), a positive logit is divided by it and a
    negative one multiplied, so the penalty always lowers them. presence/frequency (OpenAI): logit -= presence *
    [count > 0] + frequency * count over generated ids. Temperature 0 (or below GREEDY_BELOW) means greedy: logits
    are left unscaled and unfiltered (top-k and top-p never remove the most likely id, and sorting the vocabulary
    for each token cost a quarter of a batch-16 decode step). top-k keeps the k largest (ties with the k-th are
    kept); top-p keeps the most likely ids until their probability reaches top_p (always at least one).
    """
    x = logits.float().clone()
    p = params
    if p.repetition_penalty != 1.0 and seen is not None:
        x = torch.where(seen, torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
    if (p.presence_penalty or p.frequency_penalty) and counts is not None:
        x = x - p.presence_penalty * (counts > 0).float() - p.frequency_penalty * counts
    if p.temperature < GREEDY_BELOW:
        return x
    x = x / p.temperature
    if 0 < p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        x = _top_p(x, p.top_p)
    return x


def _top_p(x: torch.Tensor, top_p: float, head: int = 256) -> torch.Tensor:
    """Keep the most likely ids until their probability reaches top_p. The nucleus nearly always lies within the
    `head` most likely ids, found with topk instead of sorting the whole vocabulary; else the full sort."""
    probs = torch.softmax(x, dim=-1)
    k = min(head, x.shape[-1])
    top, order = torch.topk(probs, k) if k < x.shape[-1] else torch.sort(probs, descending=True)
    before = torch.cumsum(top, dim=-1) - top  # mass of the more likely ids
    if k < x.shape[-1] and before[-1] + top[-1] < top_p:  # the nucleus may reach past the head
        top, order = torch.sort(probs, descending=True)
        before = torch.cumsum(top, dim=-1) - top
    keep = before < top_p
    keep[0] = True
    out = torch.full_like(x, float("-inf"))
    kept = order[keep]
    out[kept] = x[kept]
    return out


def sample_token(processed: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> int:
    """Argmax when temperature is (about) 0, else a draw from softmax(processed) with the request's own generator."""
    if temperature < GREEDY_BELOW:
        return int(torch.argmax(processed))
    probs = torch.softmax(processed, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def holdback(text: str, stops: list[str]) -> int:
    """Where the longest suffix of `text` that is a proper prefix of a stop string begins (len(text) if none).

    Everything before that index can be streamed: no stop string can start there any more.
    """
    if not stops:
        return len(text)
    longest = max(map(len, stops))
    for i in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[i:]
        if any(s.startswith(tail) for s in stops):
            return i
    return len(text)


def find_stop(text: str, stops: list[str]) -> int | None:
    """Start of the earliest complete stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists (binary search over C-speed slice compares)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------- the engine

@dataclass
class EngineStats:
    """Counters since the engine was made: what prefix caching and chunked prefill do (tests, benchmarks)."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests
    cached_tokens: int = 0  # of those, keys reused from another request's row (not prefilled)
    prefill_tokens: int = 0  # prompt tokens run through prefill forwards
    prefill_forwards: int = 0  # forwards that ran them (prompts admitted together share one)
    decode_tokens: int = 0  # rows of decode forwards
    steps: int = 0


class Engine:
    """Continuous-batching generator over one model and one KV cache of `max_batch_size` rows.

    Not thread-safe: one thread calls add_request/abort/step (serve/scheduler.py wraps it). `generate` and
    `generate_batch` drive step() themselves and need an idle engine.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 8, max_seq_len: int | None = None, device=None,
                 dtype=None, prefix_cache: bool = True, prefill_chunk: int | None = PREFILL_PER_STEP,
                 kv_dtype=None):
        """prefix_cache: reuse the keys of a shared prompt prefix from another request's row. prefill_chunk: the
        most prompt tokens prefilled per step (None: every admitted prompt whole, in the step that admits it).
        kv_dtype: what the KV cache stores (default: the model's dtype); attention reads it in the model's."""
        from chatforge.device import pick_device, resolve_dtype

        if max_batch_size < 1:
            raise ChatforgeError(f"engine: max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ChatforgeError(f"engine: prefill_chunk must be None or an integer >= 1, got {prefill_chunk!r}")
        param = next(model.parameters())
        self.device = param.device if device is None else (
            pick_device(device) if isinstance(device, str) else torch.device(device))
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype, self.device)
        self.dtype = dtype or param.dtype
        self.kv_dtype = (resolve_dtype(kv_dtype, self.device) if isinstance(kv_dtype, str) else kv_dtype) or self.dtype
        if param.device != self.device or param.dtype != self.dtype:
            model.to(device=self.device, dtype=self.dtype)  # in place: the engine owns where its model runs
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        model_len = model.config.max_seq_len
        if max_seq_len is not None and max_seq_len < 2:
            raise ChatforgeError(f"engine: max_seq_len must be >= 2, got {max_seq_len}")
        self._context = min(max_seq_len or model_len, model_len)
        window = model.config.sliding_window
        self.prefix_cache = prefix_cache and not (window and window < self._context)  # a ring row is not reusable
        self.prefill_chunk = prefill_chunk
        self.stats = EngineStats()
        # Sample only ids the tokenizer can decode (a model may pad its vocabulary past the tokenizer's).
        self._vocab = min(model.config.vocab_size, tokenizer.vocab_size)
        self._stop_ids = set(tokenizer.stop_ids)
        self._ids = itertools.count()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admitted, not finished
        self._free = list(range(max_batch_size))  # least recently used first
        self._held: list[Request | None] = [None] * max_batch_size  # whose keys each row holds (current or last)
        self._cache = None  # KVCache, made on first use
        self._bytes: dict[int, bytes] = {}

    # -- public API ---------------------------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self._context

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Request:
        """Queue a prompt; ChatforgeError if it is empty, ContextLengthError if it does not fit (reply_budget)."""
        params = params if params is not None else SamplingParams()
        params.validate()
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ChatforgeError("prompt: empty (at least one token is needed to predict the next)")
        n_vocab = self.model.config.vocab_size
        bad = [i for i in prompt_ids if not 0 <= i < n_vocab]
        if bad:
            raise ChatforgeError(f"prompt: token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")
        limit = reply_budget(len(prompt_ids), params.max_new_tokens, self._context)
        req = Request(next(self._ids), prompt_ids, params, limit, self._vocab)
        req._matcher = params.constraint.matcher(self.tokenizer) if params.constraint is not None else None
        self._waiting.append(req)
        return req

    def abort(self, request: Request) -> None:
        """Drop a request (a client went away); its slot is free for the next step."""
        if request.finished:
            return
        if request in self._waiting:
            self._waiting.remove(request)
        self._finish(request, "abort")

    def step(self) -> list[tuple[Request, Delta]]:
        """Admit waiting requests into free slots, decode one token for every running request past its prompt,
        then prefill up to `prefill_chunk` prompt tokens.

        Every request past its prompt gets exactly one new token; one whose prompt is now fully written gets its
        first. Finished requests leave the batch here, so their slots take waiting requests in the next step.
        """
        out: list[tuple[Request, Delta]] = []
        with torch.inference_mode():
            self.stats.steps += 1
            self._admit()
            decoding = sorted((r for r in self._running if r.output_ids), key=lambda r: r._slot)  # rows in order
            if decoding:
                masks = StepMasks.start([r._matcher for r in decoding])  # computed while the forward runs
                logits = self._decode(decoding)
                masked = masks.apply(logits) if masks is not None else {}
                for i, (req, row) in enumerate(zip(decoding, logits)):
                    out.append((req, self._next_token(req, row, masked.get(i))))
            for req, row in self._prefill_step():
                out.append((req, self._next_token(req, row)))
        return out

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[Delta]:
        """Stream one request's deltas (the last carries finish_reason); closing the iterator aborts it."""
        self._require_idle()
        req = self.add_request(prompt_ids, params)
        return self._drive(req)

    def generate_batch(self, prompts: list[list[int]],
                       params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Generate for many prompts at once (continuous batching; more prompts than slots simply queue)."""
        self._require_idle()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ChatforgeError(f"generate_batch: {len(prompts)} prompts but {len(plist)} sampling params")
        reqs = []
        try:
            for p, sp in zip(prompts, plist):
                reqs.append(self.add_request(p, sp))
            texts: dict[int, list[str]] = {r.id: [] for r in reqs}
            lps: dict[int, list[dict]] = {r.id: [] for r in reqs}
            while self.has_work():
                for req, delta in self.step():
                    texts[req.id].append(delta.text)
                    lps[req.id].extend(delta.logprobs or [])
        finally:
            for r in reqs:
                self.abort(r)  # no-op for finished ones; an error must not leave requests behind
        return [Completion(text="".join(texts[r.id]), token_ids=list(r.output_ids), finish_reason=r.finish_reason,
                           prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                           logprobs=lps[r.id] if r.params.logprobs is not None else None) for r in reqs]

    # -- internals ----------------------------------------------------------------------------------------------

    def _require_idle(self) -> None:
        if self.has_work():
            raise RuntimeError("engine is busy with other requests; use add_request/step to share it")

    def _drive(self, req: Request) -> Iterator[Delta]:
        try:
            while not req.finished:
                for r, delta in self.step():
                    if r is req:
                        yield delta
        finally:
            self.abort(req)

    def _ensure_cache(self) -> None:
        """One static cache of the context length, made once; the forwards touch (zero) its pages only as far as
        each row reads, so memory follows the rows in use and their lengths, and nothing is reallocated or
        copied."""
        from chatforge.model.gpt import KVCache

        if self._cache is None:
            self._cache = KVCache(self.model.config, self.max_batch_size, self._context, device=self.device,
                                  dtype=self.kv_dtype)

    def _admit(self) -> None:
        """Give waiting requests free rows, each with whatever prefix of its prompt is cached (no forwards here)."""
        while self._waiting and self._free:
            req = self._waiting.popleft()
            self._ensure_cache()
            req._slot, req._prefilled = self._place(req.prompt_ids)
            req.cached_tokens = req._prefilled
            self._held[req._slot] = req
            req._decoder = self.tokenizer.stream_decoder(skip_special=True)
            self._running.append(req)
            self.stats.prompt_tokens += len(req.prompt_ids)
            self.stats.cached_tokens += req._prefilled

    def _place(self, prompt: list[int]) -> tuple[int, int]:
        """A free row for `prompt` and how many of its first positions already hold its keys.

        The longest common prefix with any row's keys wins (a free row on a tie: no copy); at least the last prompt
        token is always prefilled, for the logits of the first new token. A prefix found in a running row, or in a
        free row other than the one taken, is copied in place; otherwise the least recently used free row is taken.
        """
        if not self.prefix_cache:
            return self._free.pop(0), 0
        best_row, best = None, 0
        for row, held in enumerate(self._held):
            if held is None:
                continue
            n = min(common_prefix(self._keys_of(held), prompt), len(prompt) - 1)
            if n > best or (n == best and n and row in self._free and best_row not in self._free):
                best_row, best = row, n
        if best and best_row in self._free:
            self._free.remove(best_row)
            return best_row, best
        row = self._free.pop(0)
        if best:
            self._cache.copy_row(best_row, row, best)
        return row, best

    @staticmethod
    def _keys_of(req: Request) -> list[int]:
        """The ids whose keys a request has written into its row, position by position."""
        if req._prefilled < len(req.prompt_ids):
            return req.prompt_ids[: req._prefilled]
        return req.prompt_ids + req.output_ids[:-1]  # the last sampled token is fed (written) by the next step

    def _prefill_step(self) -> list[tuple[Request, torch.Tensor]]:
        """Prefill up to `prefill_chunk` prompt tokens, oldest request first; (request, logits of its first new
        token) for each prompt that is now fully written. Chunks of similar length run as one padded forward."""
        budget = self.prefill_chunk or float("inf")
        chunks = []  # (request, end)
        for req in [r for r in self._running if r._prefilled < len(r.prompt_ids)]:
            if budget <= 0:
                break
            end = int(min(len(req.prompt_ids), req._prefilled + budget))
            budget -= end - req._prefilled
            chunks.append((req, end))
        done = []
        for group in self._prefill_groups(chunks):
            if len(group) == 1:
                (req, end), = group
                logits = decode.prefill(self.model, self._cache, req._slot, req.prompt_ids[:end], PREFILL_CHUNK,
                                        start=req._prefilled)[None]
            else:
                logits = decode.prefill_rows(self.model, self._cache, [r._slot for r, _ in group],
                                             [r.prompt_ids[r._prefilled:end] for r, end in group],
                                             [r._prefilled for r, _ in group])
            self.stats.prefill_forwards += 1
            for (req, end), row in zip(group, logits):
                self.stats.prefill_tokens += end - req._prefilled
                req._prefilled = end
                if end == len(req.prompt_ids):
                    done.append((req, row[: self._vocab].float().cpu()))
        return done

    def _prefill_groups(self, chunks: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
        """Chunks batched into one padded forward when padding at most doubles their tokens (longest first); a
        ring cache, a chunk longer than PREFILL_CHUNK or one whose padding would not fit runs alone."""
        if self._cache.ring:
            return [[c] for c in chunks]
        groups: list[list[tuple[Request, int]]] = []
        real = 0
        for req, end in sorted(chunks, key=lambda c: c[0]._prefilled - c[1]):  # longest chunk first
            n = end - req._prefilled
            if groups and n <= PREFILL_CHUNK:
                longest = groups[-1][0][1] - groups[-1][0][0]._prefilled
                fits = req._prefilled + longest <= self._cache.capacity
                if fits and longest <= PREFILL_CHUNK and (len(groups[-1]) + 1) * longest <= 2 * (real + n):
                    groups[-1].append((req, end))
                    real += n
                    continue
            groups.append([(req, end)])
            real = n
        return groups

    def _decode(self, reqs: list[Request]) -> torch.Tensor:
        """One forward for all running rows: each feeds its last token at its own position into its own slot."""
        self.stats.decode_tokens += len(reqs)
        logits = decode.step(self.model, self._cache, [r._slot for r in reqs], [r.output_ids[-1] for r in reqs],
                             [len(r.prompt_ids) + len(r.output_ids) - 1 for r in reqs])
        return logits[:, : self._vocab].float().cpu()

    def _next_token(self, req: Request, logits: torch.Tensor, masked: torch.Tensor | None = None) -> Delta:
        """masked: `logits` with the constraint's mask applied, when the step computed it (StepMasks)."""
        p = req.params
        allowed = logits if req._matcher is None else masked if masked is not None else req._matcher.mask_logits(logits)
        token = sample_token(process_logits(allowed, p, req._seen, req._counts), p.temperature, req._generator)
        if req._matcher is not None:
            req._matcher.advance(token)
        logprobs = [self._logprob_entry(logits, token, p.logprobs)] if p.logprobs is not None else None
        req.output_ids.append(token)
        if req._seen is not None:
            req._seen[token] = True
        if req._counts is not None:
            req._counts[token] += 1
        finish = None
        if token in self._stop_ids or token in p.stop_token_ids:
            finish, piece = "stop", req._decoder.flush()  # the end-of-turn token itself is never text
        else:
            piece = req._decoder.push(token)
            if req._matcher is not None and req._matcher.done:  # only the end of the turn may follow: it is now
                finish = "stop"
                piece += req._decoder.flush()
            elif len(req.output_ids) >= req._limit:
                finish = "length"
                piece += req._decoder.flush()
        text = req._held + piece
        cut = find_stop(text, p.stop)
        if cut is not None:
            text, req._held, finish = text[:cut], "", "stop"
        elif finish is None:
            keep = holdback(text, p.stop)
            text, req._held = text[:keep], text[keep:]
        else:
            req._held = ""  # finishing: a held prefix that never became a stop string is ordinary text
        req.text += text
        if finish is not None:
            self._finish(req, finish)
        return Delta(text=text, token_ids=[token], logprobs=logprobs, finish_reason=finish)

    def _finish(self, req: Request, reason: str) -> None:
        req.finished, req.finish_reason = True, reason
        if req in self._running:
            self._running.remove(req)
        if req._slot is not None:
            self._free.append(req._slot)  # its keys stay in the row for a later prompt that shares a prefix
            req._slot = None

    def _token_info(self, token_id: int) -> dict:
        b = self._bytes.get(token_id)
        if b is None:
            b = self._bytes[token_id] = token_bytes(self.tokenizer, token_id)
        return {"token": b.decode("utf-8", errors="backslashreplace"), "bytes": list(b)}

    def _logprob_entry(self, logits: torch.Tensor, token: int, top: int) -> dict:
        """The model's own distribution (before penalties and temperature), as OpenAI reports logprobs."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        entry = self._token_info(token) | {"logprob": float(lp[token]), "top_logprobs": []}
        if top:
            values, ids = torch.topk(lp, min(top, lp.shape[-1]))
            entry["top_logprobs"] = [self._token_info(int(i)) | {"logprob": float(v)} for v, i in zip(values, ids)]
        return entry
