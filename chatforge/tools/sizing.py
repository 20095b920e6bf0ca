"""Plan a model size before training: parameters, FLOPs, memory and time, from the config alone plus a short probe.

The formulas are model/shape.py's (held to the built model by the tests); this module picks the config (a preset, a
parameter target, a model folder or a training YAML), measures throughput and peak memory with a few real training
steps on this machine, and recommends the largest preset that the data and the time budget can train
compute-optimally.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import replace

from typing import TYPE_CHECKING

from chatforge.errors import ChatforgeError
from chatforge.model.shape import TOKENS_PER_PARAM, compute_optimal_tokens, count_params, flops_per_token, \
    inference_memory, training_memory

if TYPE_CHECKING:  # torch is imported only when a function needs it, so `chatforge size --help` stays fast
    from chatforge.model.gpt import ModelConfig

MAX_EPOCHS = 4  # repeating data up to ~4 times is almost as good as fresh data (Muennighoff et al. 2023)
LADDER = ("nano", "micro", "mini", "small")  # the presets `size` recommends from, smallest first


# ---------------------------------------------------------------- shapes for a parameter budget

def parse_count(text: str) -> int:
    """"10M", "1.5B", "300k", "12000000" -> int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", str(text))
    if not m:
        raise ChatforgeError(f"--params: expected a count such as 10M, 1.5B or 300k, got {text!r}")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def config_for_params(target: int, vocab_size: int = 4096, max_seq_len: int = 1024) -> ModelConfig:
    """A Llama-style shape whose total parameter count is closest to `target`.

    Widths are multiples of 64 with 64-wide heads (32 below 256), half as many kv heads (grouped-query), and depth
    kept at a width/depth ratio of 24-96 like the presets (32-40) and GPT-2 (64).
    """
    from chatforge.model.gpt import ModelConfig

    if target <= 0:
        raise ChatforgeError(f"--params: must be positive, got {target}")
    best, best_key = None, None
    for d in range(64, 8193, 64):
        hd = 32 if d < 256 else 64
        heads = d // hd
        kv = heads // 2 if heads % 2 == 0 else heads
        for layers in range(max(1, d // 96), d // 24 + 1):
            c = ModelConfig(family="llama", vocab_size=vocab_size, n_layer=layers, n_head=heads, n_kv_head=kv,
                            d_model=d, max_seq_len=max_seq_len)
            key = (abs(math.log(count_params(c)["total"] / target)), abs(math.log(d / layers / 40)))
            if best_key is None or key < best_key:
                best, best_key = c, key
    return best


# ---------------------------------------------------------------- measuring on this machine

def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, trained_fraction: float = 1.0, seed: int = 0):
    """A packed batch of random tokens shaped like the training loop's: four records per row (so attention is
    masked by doc ids) and exactly round(trained_fraction * tokens) trained targets."""
    import torch

    from chatforge.data.pack import Batch

    g = torch.Generator().manual_seed(seed)
    B, T = batch_size, seq_len
    ids = torch.randint(0, vocab_size, (B, T + 1), generator=g)
    idx = torch.arange(T)
    doc = idx * 4 // T
    starts = torch.tensor([math.ceil(k * T / 4) for k in range(4)])
    pos = (idx - starts[doc]).expand(B, T).contiguous()
    doc = doc.expand(B, T).contiguous()
    mask = torch.zeros(B * T, dtype=torch.bool)
    mask[torch.randperm(B * T, generator=g)[: max(1, round(trained_fraction * B * T))]] = True
    return Batch(ids[:, :-1], ids[:, 1:].contiguous(), mask.view(B, T), doc, pos)


def _step_fn(model, device, dtype, batch_size: int, seq_len: int, trained_fraction: float = 1.0):
    """One optimizer step as train.train runs it (its accumulate_gradients, make_optimizer and clipping) on a
    synthetic packed batch; returns a closure so callers can time or profile repeated steps."""
    import torch

    from chatforge.config import TrainConfig
    from chatforge.device import autocast
    from chatforge.train.loss import accumulate_gradients
    from chatforge.train.optim import make_optimizer

    cfg = TrainConfig()
    batch = synthetic_batch(batch_size, seq_len, model.config.vocab_size, trained_fraction)
    opt = make_optimizer(model, cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        accumulate_gradients(model, [batch], device, autocast(device, dtype))
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure_training_peak(c: ModelConfig, batch_size: int, seq_len: int, device: str = "cpu",
                          dtype: str = "auto", gradient_checkpointing: bool = False, steps: int = 2,
                          trained_fraction: float = 1.0) -> int:
    """Peak bytes allocated by torch while building the model and running `steps` training steps.

    CUDA: torch.cuda.max_memory_allocated. CPU: torch's CPU allocator reports every allocation and free to the
    profiler when profile_memory=True, so the running sum of those events is the CPU analogue of
    max_memory_allocated. (tracemalloc cannot see C++ allocations; RSS includes the allocator's cache, the loaded
    libraries and page granularity, so it overstates and drifts.)
    """
    import torch

    from chatforge.device import pick_device, resolve_dtype
    from chatforge.model.gpt import GPT

    dev = pick_device(device)
    dt = resolve_dtype(dtype, dev)
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        model = GPT(c).to(dev).train()
        model.gradient_checkpointing = gradient_checkpointing
        step = _step_fn(model, dev, dt, batch_size, seq_len, trained_fraction)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = GPT(c).to(dev).train()
        model.gradient_checkpointing = gradient_checkpointing
        step = _step_fn(model, dev, dt, batch_size, seq_len, trained_fraction)
        for _ in range(steps):
            step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


def probe_throughput(c: ModelConfig, batch_size: int, seq_len: int, device: str = "auto", dtype: str = "auto",
                     steps: int = 3, gradient_checkpointing: bool = False, trained_fraction: float = 1.0) -> dict:
    """Training tokens per second of this shape on this machine: one warm-up step, then `steps` timed ones."""
    import torch

    from chatforge.device import pick_device, resolve_dtype
    from chatforge.model.gpt import GPT

    dev = pick_device(device)
    dt = resolve_dtype(dtype, dev)
    torch.manual_seed(0)
    model = GPT(c).to(dev).train()
    model.gradient_checkpointing = gradient_checkpointing
    step = _step_fn(model, dev, dt, batch_size, seq_len, trained_fraction)
    step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    tokens_per_s = batch_size * seq_len / seconds
    flops = flops_per_token(c, seq_len)["training"] * tokens_per_s
    return {"tokens_per_s": tokens_per_s, "step_s": seconds, "flops_per_s": flops, "device": str(dev),
            "dtype": str(dt).removeprefix("torch."), "batch_size": batch_size, "seq_len": seq_len}


# ---------------------------------------------------------------- which config

def model_config_from_train(cfg) -> ModelConfig:
    """The ModelConfig a TrainConfig trains, without building the model: the init model's config.json, else
    model/shape.py's rule with the tokenizer's vocabulary (cfg.tokenizer's, else the vocab_size trained here)."""
    from chatforge.model.shape import model_config

    if cfg.init:
        from chatforge.weights.loader import model_config as init_config

        c = init_config(cfg.init)
        return replace(c, dropout=cfg.dropout) if cfg.dropout is not None else c
    vocab_size = cfg.vocab_size
    if cfg.tokenizer:
        from chatforge.tokenizer import Tokenizer

        vocab_size = Tokenizer.load(cfg.tokenizer).vocab_size
    return model_config(cfg.model, vocab_size, cfg.seq_len, cfg.dropout)


def resolve_config(config: str | None, params: str | None, vocab_size: int) -> tuple[ModelConfig, str, object]:
    """(model config, its name, the TrainConfig if a training YAML was given) for `size`'s inputs."""
    from chatforge.model.gpt import PRESETS, config_from_preset

    if config and params:
        raise ChatforgeError("size: give --config or --params, not both")
    if params:
        c = config_for_params(parse_count(params), vocab_size)
        return c, f"{params} target", None
    if not config:
        return config_from_preset("nano", vocab_size=vocab_size), "nano", None
    if config in PRESETS:
        return config_from_preset(config, **({"vocab_size": vocab_size} if config in LADDER else {})), config, None
    if os.path.isdir(config):
        from chatforge.weights.folder import read_config

        return read_config(config), config, None
    if not os.path.exists(config):
        raise ChatforgeError(f"{config}: not a preset ({', '.join(PRESETS)}), a model folder or a YAML file")
    from chatforge.config import load_train_yaml

    cfg, _search = load_train_yaml(config)
    return model_config_from_train(cfg), config, cfg


def dataset_tokens(data: str, vocab_size: int, seq_len: int, stage: str = "sft", tokenizer: str | None = None,
                   val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Tokens of a dataset's training split as the training loop encodes them (a tokenizer is trained on the split
    when none is given, as training would)."""
    from chatforge.data import load_dataset
    from chatforge.data.pack import encode_records
    from chatforge.tokenizer import Tokenizer, train_tokenizer
    from chatforge.tokenizer import record_texts

    train_records, _val, _report = load_dataset(data, val_fraction, seed)
    tok = Tokenizer.load(tokenizer) if tokenizer else train_tokenizer(record_texts(train_records), vocab_size)
    target = "all" if stage == "pretrain" else "assistant"
    stats = encode_records(train_records, tok, target, seq_len + 1, stage == "pretrain").stats
    return {"records": stats["records"], "tokens": stats["tokens"], "trained_tokens": stats["trained_tokens"],
            "vocab_size": tok.vocab_size}


# ---------------------------------------------------------------- recommendation

def recommend(vocab_size: int, batch_size: int, seq_len: int, data_tokens: int | None = None,
              seconds: float | None = None, throughput=None, candidates: tuple[str, ...] = LADDER,
              dropout: float = 0.0) -> dict:
    """The largest preset that can be trained compute-optimally (20 tokens per parameter) within the tokens the
    data (up to MAX_EPOCHS passes) and the time budget (measured tokens/s x seconds) allow.

    throughput(config) -> tokens/s; only called for candidates the data allows, smallest first, stopping at the
    first one the time budget rules out (a larger model is slower and needs more tokens, so it cannot fit either).
    Candidates keep the caller's vocabulary and dropout (dropout switches attention to a slower kernel).
    """
    from chatforge.model.gpt import PRESETS, config_from_preset

    if data_tokens is None and seconds is None:
        raise ChatforgeError("size: a recommendation needs --data (or --tokens) and/or a time budget (--minutes)")
    rows, chosen = [], None
    for name in candidates:
        c = config_from_preset(name, vocab_size=vocab_size, max_seq_len=max(seq_len, PRESETS[name]["max_seq_len"]),
                               dropout=dropout)
        p = count_params(c)["total"]
        need = TOKENS_PER_PARAM * p
        row = {"preset": name, "params": p, "optimal_tokens": need, "data_tokens": None, "budget_tokens": None,
               "tokens_per_s": None, "hours_for_optimal": None}
        fits = True
        if data_tokens is not None:
            row["data_tokens"] = MAX_EPOCHS * data_tokens
            fits &= need <= row["data_tokens"]
        if seconds is not None and throughput is not None and fits:
            tps = throughput(c)
            row |= {"tokens_per_s": tps, "budget_tokens": int(tps * seconds), "hours_for_optimal": need / tps / 3600}
            fits &= need <= row["budget_tokens"]
        row["fits"] = fits
        rows.append(row)
        if fits:
            chosen = row
        else:
            break
    limits = [x for x in (rows[-1]["data_tokens"], rows[-1]["budget_tokens"]) if x is not None]
    if chosen is None:
        chosen = rows[0]
        available = min(limits) if limits else None
        why = (f"even {chosen['preset']} ({_count(chosen['params'])} parameters) wants "
               f"{_count(chosen['optimal_tokens'])} tokens for compute-optimal training, more than the "
               f"{_count(available)} available ({_limit_text(rows[0])}); train it anyway with early stopping "
               f"(validation loss) and expect it to be data/time-limited rather than size-limited")
    else:
        nxt = rows[-1] if not rows[-1]["fits"] else None
        why = (f"{chosen['preset']} ({_count(chosen['params'])} parameters) needs {_count(chosen['optimal_tokens'])} "
               f"tokens for compute-optimal training (20 per parameter), within {_limit_text(chosen)}")
        if nxt is not None:
            why += (f"; the next size, {nxt['preset']} ({_count(nxt['params'])}), would need "
                    f"{_count(nxt['optimal_tokens'])} tokens, more than {_limit_text(nxt)}")
    usable = [x for x in (chosen["data_tokens"], chosen["budget_tokens"]) if x is not None]
    train_tokens = min([chosen["optimal_tokens"], *usable])
    return {"preset": chosen["preset"], "params": chosen["params"], "max_tokens": int(train_tokens),
            "epochs": train_tokens / data_tokens if data_tokens else None, "reason": why, "candidates": rows}


def _limit_text(row: dict) -> str:
    parts = []
    if row["data_tokens"] is not None:
        parts.append(f"{_count(row['data_tokens'])} tokens the data gives in {MAX_EPOCHS} epochs")
    if row["budget_tokens"] is not None:
        parts.append(f"{_count(row['budget_tokens'])} tokens the time budget allows at "
                     f"{row['tokens_per_s']:,.0f} tokens/s")
    return " and ".join(parts) if parts else "no limit"


# ---------------------------------------------------------------- formatting and planning

def _count(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def describe(c: ModelConfig, batch_size: int, seq_len: int, mixed: bool, trained_fraction: float = 1.0) -> dict:
    """Every number `size` prints, for one config."""
    ckpt = training_memory(c, batch_size, seq_len, mixed, True, trained_fraction)
    return {"config": c.to_dict(), "params": count_params(c), "flops_per_token": flops_per_token(c, seq_len),
            "training_memory": training_memory(c, batch_size, seq_len, mixed, False, trained_fraction),
            "training_memory_checkpointed": ckpt,
            "inference_memory": inference_memory(c, dtype_bytes=2 if mixed else 4),
            "compute_optimal_tokens": compute_optimal_tokens(c)}


def format_report(name: str, d: dict, probe: dict | None) -> str:
    c, p, f = d["config"], d["params"], d["flops_per_token"]
    m, mc, inf = d["training_memory"], d["training_memory_checkpointed"], d["inference_memory"]
    prec = "bf16 autocast" if m["mixed_precision"] else "fp32"
    kv = "multi-head" if c["n_kv_head"] == c["n_head"] else "multi-query" if c["n_kv_head"] == 1 else "grouped-query"
    lines = [
        f"model {name}: {c['family']}, vocab {c['vocab_size']}, {c['n_layer']} layers, d_model {c['d_model']}, "
        f"{c['n_head']} heads ({c['n_kv_head']} kv, {kv}), head_dim {c['head_dim']}, ff {c['d_ff']}"
        + (f", sliding window {c['sliding_window']}" if c["sliding_window"] else ""),
        "",
        "| quantity | value |",
        "|---|---|",
        f"| parameters | {p['total']:,} = {p['embedding']:,} embedding + {p['non_embedding']:,} non-embedding |",
        f"| FLOPs per token (seq {m['seq_len']}) | forward {_count(f['forward'])} "
        f"(attention {_count(f['attention_forward'])}), training {_count(f['training'])} |",
        f"| training memory, batch {m['batch_size']} x {m['seq_len']}, {prec} | weights {_bytes(m['weights'])}, "
        f"gradients {_bytes(m['gradients'])}, AdamW {_bytes(m['optimizer'])}, "
        f"activations {_bytes(m['activations'])}, loss buffers {_bytes(m['loss_buffers'])} |",
        f"| training peak | {_bytes(m['peak'])} (gradient checkpointing: {_bytes(mc['peak'])}, "
        f"activations {_bytes(mc['activations'])}) |",
        f"| inference memory ({'bf16' if inf['dtype_bytes'] == 2 else 'fp32'}) | weights {_bytes(inf['weights'])}, "
        f"KV cache {_bytes(inf['kv_per_token'])}/token, {_bytes(inf['kv_per_sequence'])} per "
        f"{inf['seq_len']}-token sequence |",
        f"| compute-optimal tokens | {_count(d['compute_optimal_tokens'])} ({TOKENS_PER_PARAM} per parameter) |",
    ]
    if probe:
        secs = d["compute_optimal_tokens"] / probe["tokens_per_s"]
        lines.append(f"| measured throughput ({probe['device']}, {probe['dtype']}) | {probe['tokens_per_s']:,.0f} "
                     f"tokens/s ({_count(probe['flops_per_s'])}FLOP/s) -> compute-optimal training in "
                     f"{_duration(secs)} |")
    return "\n".join(lines)


def plan_size(config: str | None = None, params: str | None = None, batch_size: int | None = None,
              seq_len: int | None = None, data: str | None = None, tokens: int | None = None,
              seconds: float | None = None, vocab_size: int = 4096, trained_fraction: float = 1.0,
              probe: bool = True, probe_steps: int = 3, device: str = "auto", dtype: str | None = None) -> dict:
    """Every number `chatforge size` shows, as a dict: the config's shape, parameters, FLOPs and memory
    (describe), "throughput" when probed, "data" (the dataset's tokens) with data, and "recommendation" when a
    dataset and/or a time budget (seconds) bound the size; "train_yaml": config was a training YAML."""
    import torch

    from chatforge.device import pick_device, resolve_dtype

    model, name, cfg = resolve_config(config, params, vocab_size)
    batch_size = batch_size or (cfg.batch_size if cfg else 16)
    seq_len = seq_len or (cfg.seq_len if cfg else 256)
    dtype = dtype or (cfg.dtype if cfg else "auto")
    _check_plan(batch_size, seq_len, probe_steps, trained_fraction, seconds, data, tokens, probe)
    if seq_len > model.max_seq_len:
        model = replace(model, max_seq_len=seq_len) if model.positions == "rope" else model
        if seq_len > model.max_seq_len:
            raise ChatforgeError(f"size: --seq-len {seq_len} is longer than the model's context {model.max_seq_len}")
    mixed = resolve_dtype(dtype, pick_device(device)) != torch.float32
    result = {"name": name, "train_yaml": cfg is not None, **describe(model, batch_size, seq_len, mixed, trained_fraction)}

    def throughput(c: ModelConfig) -> dict:
        return probe_throughput(c, batch_size, seq_len, device, dtype, probe_steps, trained_fraction=trained_fraction)

    if probe:
        result["throughput"] = throughput(model)
        result["compute_optimal_hours"] = result["compute_optimal_tokens"] / result["throughput"]["tokens_per_s"] / 3600
    data_tokens = tokens
    if data is not None:
        # a YAML says its stage; a model folder is fine-tuned (SFT); a preset or --params shape is trained from
        # scratch, i.e. pretrained on all the text (the SFT encoding's truncated rows would undercount it ~5x)
        stage = cfg.stage if cfg else "sft" if config and os.path.isdir(config) else "pretrain"
        info = dataset_tokens(data, model.vocab_size, seq_len, stage, cfg.tokenizer if cfg else None)
        result["data"] = info | {"spec": data, "stage": stage}
        data_tokens = info["tokens"]
    if data_tokens is not None or seconds is not None:
        result["recommendation"] = _recommend_for(model, batch_size, seq_len, data_tokens, seconds, throughput,
                                                  result.get("throughput"))
    return result


def _check_plan(batch_size: int, seq_len: int, probe_steps: int, trained_fraction: float, seconds: float | None,
                data: str | None, tokens: int | None, probe: bool) -> None:
    for flag, value in (("batch_size", batch_size), ("seq_len", seq_len), ("probe_steps", probe_steps)):
        if value < 1:
            raise ChatforgeError(f"size: --{flag.replace('_', '-')} must be at least 1, got {value}")
    if not 0 < trained_fraction <= 1:
        raise ChatforgeError(f"size: --trained-fraction must be in (0, 1], got {trained_fraction}")
    if seconds is not None and seconds <= 0:
        raise ChatforgeError(f"size: the time budget must be positive, got {seconds:g} s")
    if data is not None and tokens is not None:
        raise ChatforgeError("size: give --data or --tokens, not both")
    if seconds is not None and not probe:
        raise ChatforgeError("size: a time budget needs the throughput probe (drop --no-probe)")


def _recommend_for(model: ModelConfig, batch_size: int, seq_len: int, data_tokens: int | None,
                   seconds: float | None, probe, measured: dict | None) -> dict:
    """recommend() with throughput probed once per candidate shape (the config's own shape already was)."""
    def shape(c: ModelConfig) -> tuple:
        return (c.vocab_size, c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.dropout, c.sliding_window)

    cache: dict = {shape(model): measured["tokens_per_s"]} if measured else {}

    def throughput(c: ModelConfig) -> float:
        if shape(c) not in cache:
            cache[shape(c)] = probe(c)["tokens_per_s"]
        return cache[shape(c)]

    return recommend(model.vocab_size, batch_size, seq_len, data_tokens, seconds, throughput, dropout=model.dropout)
