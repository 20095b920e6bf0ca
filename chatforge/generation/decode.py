"""The fast path under the engine: prefill a prompt into a cache slot, and the one-token decode step.

Decode is memory-bound (every weight is read once per step), so the step avoids everything that is not reading
weights: positions and the attended span come from host-side lengths (no device read inside a step), keys are
written in place into a static KVCache, and only sampled positions get logits. `compile_decode(model)` swaps in a
torch.compile'd forward for the step (inductor, freezing by default: weights become constants so quantized weights
are prepacked once); shapes are dynamic, so one graph serves every length and batch size above 1 (batch 1 and a
batch on cache rows other than 0..B-1 get one more each). Prefill stays eager: it is matmul-bound over many tokens,
where compiling gains little and every prompt length would cost a compile (measured in benchmarks/decode_speed.py).
Inductor's artefacts are cached on disk (TORCHINDUCTOR_CACHE_DIR, by default under the user cache), so only the
first start on a machine pays the compile; `warmup` runs it at load. Without compile the same functions run the
eager model and give the same greedy tokens (tested).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from chatforge.errors import ChatforgeError

COMPILED = "compiled_forward"  # the model attribute holding the compiled forward


def inductor_cache_dir() -> Path:
    """Where compiled artefacts live: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/chatforge/inductor."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "chatforge" / "inductor"


def compile_decode(model: torch.nn.Module, freeze: bool = True, mode: str | None = None) -> None:
    """Make prefill() and step() run a compiled forward of `model` (in place; `uncompile` undoes it).

    freeze: inductor freezing (weights folded as constants; the model must not be trained afterwards).
    mode: torch.compile mode; on CUDA "reduce-overhead" adds CUDA graphs.
    """
    import torch._inductor.config as inductor_config

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    inductor_config.freezing = freeze
    inductor_config.fx_graph_cache = True
    setattr(model, COMPILED, torch.compile(model.forward, dynamic=True, mode=mode))


def uncompile(model: torch.nn.Module) -> None:
    """Back to the eager forward (same greedy tokens)."""
    if hasattr(model, COMPILED):
        delattr(model, COMPILED)


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
    cache.use_rows(slots)
    cache.reserve(kv_len)
    ids = torch.tensor(tokens, device=device)[:, None]
    pos = torch.tensor(positions, device=device)[:, None]
    return _forward(model)(ids, position_ids=pos, cache=cache, kv_len=kv_len)[:, 0]


def warmup(model: torch.nn.Module, batch_sizes: tuple[int, ...] = (1, 2), prompt_len: int = 16) -> float:
    """Run a prefill and decode steps once so a compiled model compiles (or loads from the disk cache) now, at
    load, not on the first request; returns the seconds it took (the server reports it)."""
    from chatforge.model.gpt import KVCache

    t0 = time.perf_counter()
    param = next(model.parameters())
    cache_dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    need = prompt_len + 4
    if need > model.config.max_seq_len:
        raise ChatforgeError(f"warmup: prompt_len {prompt_len} does not fit max_seq_len {model.config.max_seq_len}")
    cache = KVCache(model.config, max(batch_sizes), need, device=param.device, dtype=cache_dtype)
    with torch.inference_mode():
        for b in batch_sizes:
            for slot in range(b):
                prefill(model, cache, slot, [slot % model.config.vocab_size] * (prompt_len - slot))
            for i in range(2):
                step(model, cache, list(range(b)), [0] * b, [prompt_len + i] * b)
    return time.perf_counter() - t0
