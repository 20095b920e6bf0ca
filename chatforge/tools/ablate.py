"""`chatforge ablate`: the attention variants of model.py trained under identical conditions, side by side.

Variants are config switches of the one model: multi-head (n_kv_head = n_head), grouped-query (n_kv_head = the
largest proper divisor of n_head up to n_head / 2), multi-query (n_kv_head = 1) and sliding-window (multi-head with
attention limited to the last `window` positions). Every variant trains through train.train for the same token budget
(max_tokens; no step/time limit, no early stopping), with the same seed, data split, batches and tokenizer (trained
once and shared), so the only difference is the attention. Reported: parameters, training tokens/s (the median
step's, so warm-up and other load on the machine weigh little), validation bits-per-byte at the end of the budget,
and KV-cache bytes per token in bf16 (2 * layers * kv_heads * head_dim * 2).

chatforge's KVCache allocates every position up to the context length, so a sliding window saves compute on long
contexts but not cache memory here (a rolling cache could keep only `window` positions).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from chatforge.errors import ChatforgeError

VARIANTS = ("mha", "gqa", "mqa", "swa")
# The base run when no config is given: the nano preset pretrained on the built-in dialogs.
BASE = ["stage=pretrain", "data=builtin:chatterbot", "vocab_size=2048", "model={preset: nano}", "seq_len=256", "batch_size=16",
        "lr=3.0e-3", "min_lr=1.0e-4", "warmup_steps=30", "weight_decay=0.1", "dropout=0.0", "eval_batches=null",
        "dtype=auto"]


def variant_overrides(variant: str, n_head: int, window: int) -> dict:
    """ModelConfig fields that make `variant` out of a model with n_head query heads."""
    if variant == "mha":
        return {"n_kv_head": n_head, "sliding_window": None}
    if variant == "mqa":
        return {"n_kv_head": 1, "sliding_window": None}
    if variant == "gqa":
        groups = [k for k in range(n_head // 2, 1, -1) if n_head % k == 0]
        if not groups:
            raise ChatforgeError(f"ablate: grouped-query attention needs n_head >= 4 with a divisor in between, "
                                 f"got n_head {n_head}")
        return {"n_kv_head": groups[0], "sliding_window": None}
    if variant == "swa":
        return {"n_kv_head": n_head, "sliding_window": window}
    raise ChatforgeError(f"ablate: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")


def _final_val(metrics: list[dict]) -> dict:
    vals = [m for m in metrics if "val_bpb" in m]
    if not vals:
        raise ChatforgeError("ablate: the run recorded no validation (is val_fraction 0?)")
    return vals[-1]


def _median_tok_s(metrics: list[dict]) -> float:
    """Median per-step throughput without the first (warm-up) step: robust to a slow start and to other load."""
    speeds = sorted(m["tok_s"] for m in metrics[1:] if "tok_s" in m) or [m["tok_s"] for m in metrics if "tok_s" in m]
    return float(speeds[len(speeds) // 2]) if speeds else 0.0


def results_table(rows: list[dict]) -> str:
    lines = ["| variant | kv heads | window | params | tokens/s | val bpb | val loss | KV cache bytes/token (bf16) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['n_kv_head']} | {r['sliding_window'] or '-'} | {r['params']:,} | "
                     f"{r['tokens_per_s']:,.0f} | {r['val_bpb']:.4f} | {r['val_loss']:.4f} | "
                     f"{r['kv_bytes_per_token']:,} |")
    return "\n".join(lines)


def ablate(config: str | None = None, variants: list[str] | tuple[str, ...] = VARIANTS, max_tokens: int = 1_000_000,
           out: str = "runs/ablate", window: int = 32, overrides: list[str] | tuple[str, ...] = (),
           overwrite: bool = False, on_event=None) -> list[dict]:
    """Train each variant under the same budget; returns one row per variant (see results_table). on_event hears
    a Note as each variant starts, then that run's training events."""
    from chatforge.data import load_dataset
    from chatforge.tokenizer import record_texts, train_tokenizer
    from chatforge.train.events import Note
    from chatforge.train.loop import train

    emit = on_event or (lambda event: None)
    base, n_head = _base_config(config, list(variants), max_tokens, window, list(overrides))
    root = Path(out)
    existing = [root / v for v in variants if (root / v).exists()]
    if existing and not overwrite:
        raise ChatforgeError(f"{existing[0]}: exists; pass --overwrite or choose another --out")
    for path in existing:
        shutil.rmtree(path)
    root.mkdir(parents=True, exist_ok=True)

    records = load_dataset(base.data, base.val_fraction, base.seed)
    if not base.tokenizer:  # one tokenizer for all, so every variant sees the same token stream
        tok = train_tokenizer(record_texts(records[0]), vocab_size=base.vocab_size)
        tok.save(str(root / "tokenizer"))
        base.tokenizer = str(root / "tokenizer")
    step_tokens = base.batch_size * base.grad_accum * base.seq_len
    steps = -(-max_tokens // step_tokens)
    rows = []
    for v in variants:
        fields = variant_overrides(v, n_head, window)
        cfg = replace(base, model=dict(base.model) | fields, out_dir=str(root / v), eval_every=max(1, steps // 8))
        emit(Note(f"== {v}: {fields} ({steps} steps of {step_tokens} tokens)"))
        summary = train(cfg, records=records, on_event=emit)
        rows.append(_variant_row(v, cfg, summary))
    return rows


def _base_config(config: str | None, variants: list[str], max_tokens: int, window: int, overrides: list[str]):
    """(the shared TrainConfig with the token budget, its n_head); every variant name and size checked first."""
    from chatforge.config import load_config, load_train_yaml
    from chatforge.tools.sizing import model_config_from_train

    if not variants or len(set(variants)) != len(variants):
        raise ChatforgeError(f"ablate: --variants must name distinct variants, got {variants}")
    for v in variants:
        variant_overrides(v, 4, window)  # unknown names fail before any training
    if max_tokens < 1 or window < 1:
        raise ChatforgeError("ablate: --max-tokens and --window must be positive")
    budget = ["max_steps=null", "max_time_s=null", f"max_tokens={max_tokens}", "early_stop_patience=null"]
    if config:
        base, _ = load_train_yaml(config, overrides + budget)
    else:
        base = load_config(None, BASE + overrides + budget)
    if base.init or base.lora:
        raise ChatforgeError("ablate: variants are trained from scratch; remove init/lora from the config")
    n_head = model_config_from_train(base).n_head
    for v in variants:
        variant_overrides(v, n_head, window)
    return base, n_head


def _variant_row(variant: str, cfg, summary: dict) -> dict:
    from chatforge.model.shape import kv_cache_bytes_per_token
    from chatforge.tools.sizing import model_config_from_train
    from chatforge.train.run import read_metrics

    metrics = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")
    last = _final_val(metrics)
    mc = model_config_from_train(cfg)
    return {"variant": variant, "n_kv_head": mc.n_kv_head, "sliding_window": mc.sliding_window,
            "params": summary["params"], "tokens": summary["tokens"], "tokens_per_s": _median_tok_s(metrics),
            "val_bpb": last["val_bpb"], "val_loss": last["val_loss"],
            "kv_bytes_per_token": kv_cache_bytes_per_token(mc, 2),
            "curve": [(m["tokens"], m["val_bpb"]) for m in metrics if "val_bpb" in m]}


def write_outputs(rows: list[dict], out: Path) -> dict:
    from chatforge.weights.folder import write_json
    from chatforge.io import atomic_write_text
    from chatforge.plots import bar_chart, curves

    table = results_table(rows)
    atomic_write_text(out / "ablate.md", table + "\n")
    write_json(out / "ablate.json", rows)
    bar = bar_chart([r["variant"] for r in rows], [r["val_bpb"] for r in rows], out / "ablate_bpb.png",
                    "validation bits per byte (lower is better)", "Attention variants at the same token budget")
    curve = curves({r["variant"]: ([t for t, _ in r["curve"]], [b for _, b in r["curve"]]) for r in rows},
                   out / "ablate_curves.png", "training tokens", "validation bits per byte",
                   "Validation during training")
    return {"table": table, "plots": [bar, curve]}
