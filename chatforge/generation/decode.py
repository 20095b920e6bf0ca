"""The fast path under the engine: prefill a prompt into a cache slot, and the one-token decode step.

Decode is memory-bound (every weight is read once per step), so the step avoids everything that is not reading
weights: positions and the attended span come from host-side lengths (no device read inside a step), keys are
written in place into a static KVCache, and only sampled positions get logits. `compile_decode(model)` swaps in a
torch.compile'd forward for the step (inductor, freezing by default: weights become constants so quantized weights
are prepacked once). Shapes are static: dynamic shapes over a 30-layer int8-dyn model did not finish compiling in
14 minutes, and a static graph per kv length recompiled at every token. So the compiled step reads the cache up to
a bucket (`kv_bucket`: kv_len rounded up to a multiple of `KV_BUCKET`, capped by the cache) instead of kv_len; the
mask already hides the slots past each row's position and `KVCache.reserve` zeroes them, so the extra keys change
nothing. One graph is compiled per (batch size, bucket, rows 0..B-1 or not); the eager step reads exactly kv_len.
Prefill stays eager: it is matmul-bound over many tokens, where compiling gains little and every prompt length
would cost a compile (measured in benchmarks/decode_speed.py). Inductor's artefacts are cached on disk
(TORCHINDUCTOR_CACHE_DIR, by default under the user cache), so only the first start on a machine pays the compile;
`warmup` runs it at load (up to `max_len`, every bucket a request will reach). Without compile the same functions
run the eager model and give the same greedy tokens (tested, across a bucket boundary).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from chatforge.errors import ChatforgeError

COMPILED = "compiled_forward"  # the model attribute holding the compiled forward
BUCKET = "compiled_kv_bucket"  # the model attribute holding its kv bucket
KV_BUCKET = 256  # slots per bucket: few graphs (2 for a 170-token prompt + 128 tokens), little extra attention
RECOMPILE_LIMIT = 64  # graphs per compiled forward before dynamo falls back to eager for new shapes


def inductor_cache_dir() -> Path:
    """Where compiled artefacts live: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/chatforge/inductor."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "chatforge" / "inductor"


def compile_decode(model: torch.nn.Module, freeze: bool = True, mode: str | None = None,
                   bucket: int = KV_BUCKET) -> None:
    """Make step() run a compiled forward of `model` (in place; `uncompile` undoes it).

    freeze: inductor freezing (weights folded as constants; the model must not be trained afterwards).
    mode: torch.compile mode; on CUDA "reduce-overhead" adds CUDA graphs.
    bucket: the step reads the cache in multiples of this many slots, so static graphs are few (see `kv_bucket`).
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    if bucket < 1:
        raise ChatforgeError(f"compile: bucket must be at least 1, got {bucket}")
    device = next(model.parameters()).device
    if getattr(model, "quantization", None) == "int8-dyn" and device.type == "cpu" and not int_mm_takes_one_row():
        raise ChatforgeError(f"compile: int8-dyn decodes garbage when compiled on this CPU with torch "
                             f"{torch.__version__} (torch._int_mm gets one token's row with stride 0 from inductor "
                             f"and returns wrong sums: pytorch/pytorch#195066); use int4-wo or int8-wo, or int8-dyn "
                             f"without compile")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    inductor_config.freezing = freeze
    inductor_config.fx_graph_cache = True
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    from torch._inductor import list_mode_options

    # torch.compile takes a mode or options, not both: the mode's options, and the guard filter; no size and stride
    # asserts on the ~270 inputs at every call (dynamo's guards check the step's own inputs); on CPU the graph is
    # called from C++ rather than from a Python wrapper (SmolLM2 int4 through the engine: 143-144 against 137-139
    # tokens/s, Granite Rapids, 2 threads)
    options = {**list_mode_options(mode or "default"), "guard_filter_fn": _identity_guards, "size_asserts": False,
               "cpp_wrapper": device.type == "cpu"}
    setattr(model, COMPILED, torch.compile(model.forward, dynamic=False, options=options))
    setattr(model, BUCKET, bucket)


def int_mm_takes_one_row() -> bool:
    """Whether torch._int_mm (torchao's int8-dyn matmul) is right for a one-row input whose row stride is 0, the
    layout inductor gives a single token's activations: oneDNN's int8 gemm reads the stride as the leading dimension
    and leaves the output unwritten (pytorch/pytorch#195066; on Granite Rapids with torch 2.13, every compiled
    int8-dyn step)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (1, 64), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (64, 64), dtype=torch.int8, generator=gen)
    return torch.equal(torch._int_mm(a.as_strided((1, 64), (0, 1)), b), a.int() @ b.int())


def _identity_guards(entries) -> list[bool]:
    """Which of dynamo's guards the compiled step checks at every call: all but those on the model's insides,
    where only the ID_MATCH ones stay (which parameter and buffer objects it holds: they tell one model from
    another, whose frozen weights would otherwise be reused, and a replaced weight from the one compiled in).
    The ~1,000 others (hook dicts empty, submodule types, config constants) took 1.3 ms of a 10 ms SmolLM2 step;
    what they guard cannot change under freezing without a new model anyway."""
    return [not (e.name.startswith(("self.", "self[")) and e.guard_type != "ID_MATCH") for e in entries]


def kv_bucket(kv_len: int, cache, config, bucket: int = KV_BUCKET) -> int:
    """The cache length a compiled step reads for `kv_len`: rounded up to a multiple of `bucket`, capped by the
    cache (and by max_seq_len, which learned positions check), never below kv_len (so a sequence past the cache
    still raises). Reading more slots is exact: a query at p masks every slot past p, and reserve() zeroes them. A
    full ring reads all of its window at any length, so with rope every length past it is the window's graph."""
    if cache.ring and config.positions != "learned":
        kv_len = min(kv_len, cache.capacity)
    limit = min(cache.capacity, config.max_seq_len)
    if kv_len >= limit:
        return kv_len
    return min(limit, -(-kv_len // bucket) * bucket)


def uncompile(model: torch.nn.Module) -> None:
    """Back to the eager forward (same greedy tokens)."""
    for name in (COMPILED, BUCKET):
        if hasattr(model, name):
            delattr(model, name)


def is_compiled(model: torch.nn.Module) -> bool:
    return hasattr(model, COMPILED)


def _forward(model: torch.nn.Module):
    return getattr(model, COMPILED, model)


def prefill(model: torch.nn.Module, cache, slot: int, prompt_ids: list[int], chunk: int = 512,
            start: int = 0) -> torch.Tensor:
    """Write the prompt's keys from position `start` on (the row holds the ones before: a reused prefix or an
    earlier chunk) into cache row `slot`, `chunk` tokens per forward; logits (V,) of the last token."""
    device = cache.k.device
    n = len(prompt_ids)
    cache.use_rows([slot])
    cache.reserve(n)
    ids = torch.tensor([prompt_ids[start:]], device=device)
    logits = None
    for begin in range(start, n, chunk):
        end = min(n, begin + chunk)
        pos = torch.arange(begin, end, device=device)[None]
        logits = model(ids[:, begin - start:end - start], position_ids=pos, cache=cache, kv_len=end, last_only=True)
    return logits[0, 0]


def prefill_rows(model: torch.nn.Module, cache, slots: list[int], chunks: list[list[int]],
                 starts: list[int]) -> torch.Tensor:
    """One forward for several rows' prompt chunks (many short prompts cost about one weight read, not one each):
    chunks[i] at positions starts[i].. into cache row slots[i], right-padded to the longest; logits (B, V) of each
    chunk's last token. A pad writes keys past its row's chunk, which that row's next token overwrites before any
    query reads them (a query at p sees positions <= p), so the caller keeps starts[i] + longest <= the cache's
    capacity and uses it on a ring cache never (a pad would overwrite a kept position)."""
    device = cache.k.device
    T = max(map(len, chunks))
    if cache.ring or max(starts) + T > cache.capacity:
        raise RuntimeError("prefill_rows: padded chunks do not fit the KV cache (or it is a ring)")
    ids = torch.tensor([c + [c[-1]] * (T - len(c)) for c in chunks], device=device)
    pos = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)[None]
    kv_len = max(starts) + T
    cache.use_rows(slots)
    cache.reserve(kv_len)
    last = torch.tensor([len(c) - 1 for c in chunks], device=device)
    return model(ids, position_ids=pos, cache=cache, kv_len=kv_len, logits_at=last)[:, 0]


def step(model: torch.nn.Module, cache, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
    """One token for each running row: tokens[i] at positions[i] into cache row slots[i]; logits (B, V).

    Everything the step needs to know about lengths is a host int here, so it never waits on the device.
    """
    device = cache.k.device
    kv_len = max(positions) + 1
    if is_compiled(model):  # a few static shapes: the read span rounded up to a bucket
        kv_len = kv_bucket(kv_len, cache, model.config, getattr(model, BUCKET))
    cache.use_rows(slots)
    cache.reserve(kv_len)
    ids = torch.tensor(tokens, device=device)[:, None]
    pos = torch.tensor(positions, device=device)[:, None]
    return _forward(model)(ids, position_ids=pos, cache=cache, kv_len=kv_len)[:, 0]


def warmup(model: torch.nn.Module, batch_sizes: tuple[int, ...] = (1, 2), prompt_len: int = 16, *,
           rows: int | None = None, max_len: int | None = None, reach: int | None = None,
           cache_dtype: torch.dtype | None = None) -> float:
    """Run a prefill and decode steps once so a compiled model compiles (or loads from the disk cache) now, at
    load, not on the first request; returns the seconds it took (the server reports it).

    rows, max_len: the shape of the engine's KVCache (its max_batch_size and context length). A static graph is
    specific to the cache's shape and dtype (cache_dtype: the engine's kv_dtype; unset, the model's) and to its
    being an inference tensor, as the engine's is, so warming another cache would compile graphs the engine never
    runs; unset, a cache just big enough.
    reach: the longest sequence to warm for; a compiled model runs one step in every kv bucket up to it (default:
    the buckets of prompt_len + 2), each on rows 0..B-1 and, when the cache has more rows than B, on others (a
    gather: another graph), so a run within `reach` compiles nothing more (tested).
    """
    from chatforge.model.gpt import KVCache

    t0 = time.perf_counter()
    param = next(model.parameters())
    cache_dtype = cache_dtype or (param.dtype if param.dtype.is_floating_point else torch.float32)
    rows = rows or max(batch_sizes)
    reach = max(reach or 0, prompt_len + 2)
    max_len = max_len or reach
    if reach > min(max_len, model.config.max_seq_len) or max(batch_sizes) > rows:
        raise ChatforgeError(f"warmup: batch sizes {batch_sizes} and length {reach} do not fit a cache of {rows} "
                             f"rows, {max_len} positions (max_seq_len {model.config.max_seq_len})")
    positions = [prompt_len, prompt_len + 1]
    if is_compiled(model):  # one step per bucket: position (k-1)*bucket is the first to read k buckets
        positions = list(range(0, reach, getattr(model, BUCKET)))
    with torch.inference_mode():  # the engine makes its cache in inference mode, and a graph guards on that too
        cache = KVCache(model.config, rows, max_len, device=param.device, dtype=cache_dtype)
        for b in batch_sizes:
            for slot in range(b):
                prefill(model, cache, slot, [slot % model.config.vocab_size] * (prompt_len - slot))
            for slots in [list(range(b))] + ([list(range(rows - b, rows))] if rows > b else []):
                for p in positions:
                    step(model, cache, slots, [0] * b, [p] * b)
    return time.perf_counter() - t0
