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
import sys
from dataclasses import replace
from pathlib import Path

from chatforge.errors import ChatforgeError

VARIANTS = ("mha", "gqa", "mqa", "swa")
# The base run when no config is given: the nano preset pretrained on the built-in dialogs.
BASE = ["stage=pretrain", "data=builtin", "vocab_size=2048", "model={preset: nano}", "seq_len=256", "batch_size=16",
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
           overwrite: bool = False, progress: bool = True) -> list[dict]:
    """Train each variant under the same budget; returns one row per variant (see results_table)."""
    from chatforge.config import load_config
    from chatforge.data import load_dataset
    from chatforge.tools.sizing import kv_cache_bytes_per_token, model_config_from_train
    from chatforge.tokenizer import train_tokenizer
    from chatforge.tokenizer import record_texts
    from chatforge.train.loop import read_metrics, train

    variants = list(variants)
    if not variants or len(set(variants)) != len(variants):
        raise ChatforgeError(f"ablate: --variants must name distinct variants, got {variants}")
    for v in variants:
        variant_overrides(v, 4, window)  # unknown names fail before any training
    if max_tokens < 1 or window < 1:
        raise ChatforgeError("ablate: --max-tokens and --window must be positive")
    root = Path(out)
    budget = ["max_steps=null", "max_time_s=null", f"max_tokens={max_tokens}", "early_stop_patience=null"]
    if config:
        from chatforge.tools.tune import load_train_yaml

        base, _ = load_train_yaml(config, list(overrides) + budget)
    else:
        base = load_config(None, BASE + list(overrides) + budget)
    if base.init or base.lora:
        raise ChatforgeError("ablate: variants are trained from scratch; remove init/lora from the config")
    n_head = model_config_from_train(base).n_head
    for v in variants:
        variant_overrides(v, n_head, window)
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
    eval_every = max(1, steps // 8)
    rows = []
    for v in variants:
        fields = variant_overrides(v, n_head, window)
        cfg = replace(base, model=dict(base.model) | fields, out_dir=str(root / v), eval_every=eval_every)
        if progress:
            print(f"== {v}: {fields} ({steps} steps of {step_tokens} tokens)", file=sys.stderr, flush=True)
        summary = train(cfg, on_eval=None, progress=progress, records=records)
        metrics = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")
        last = _final_val(metrics)
        mc = model_config_from_train(cfg)
        rows.append({"variant": v, "n_kv_head": mc.n_kv_head, "sliding_window": mc.sliding_window,
                     "params": summary["params"], "tokens": summary["tokens"], "tokens_per_s": _median_tok_s(metrics),
                     "val_bpb": last["val_bpb"], "val_loss": last["val_loss"],
                     "kv_bytes_per_token": kv_cache_bytes_per_token(mc, 2),
                     "curve": [(m["tokens"], m["val_bpb"]) for m in metrics if "val_bpb" in m]})
    return rows


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


def ablate_command(config: str | None = None, data: str | None = None, variants: list[str] = VARIANTS,
                   max_tokens: int = 1_000_000, out: str = "runs/ablate", window: int = 32, seed: int | None = None,
                   overwrite: bool = False, overrides: list[str] = ()) -> int:
    """Train multi-head, grouped-query, multi-query and sliding-window attention for the same token budget on the
    same data and compare parameters, tokens/s, validation bits-per-byte and KV-cache bytes per token.

    Args:
        config: base training YAML (default: the nano preset pretrained on the built-in corpus).
        data: dataset for every variant (default: the config's, else builtin).
        variants: which of mha, gqa, mqa, swa to train.
        max_tokens: training tokens per variant (the same budget for all).
        out: folder for the variants' runs, ablate.md, ablate.json and the PNGs.
        window: sliding-window size for swa.
        seed: seed for all variants (default: the config's).
        overwrite: replace earlier runs of these variants in out.
        overrides: more config changes for every variant, such as model.n_layer=2 seq_len=128.
    """
    extra = list(overrides) + ([f"data={data}"] if data else []) + ([f"seed={seed}"] if seed is not None else [])
    rows = ablate(config, list(variants), max_tokens, out, window, extra, overwrite)
    res = write_outputs(rows, Path(out))
    print(res["table"])
    print(f"\nwrote {Path(out) / 'ablate.md'}, ablate.json and {', '.join(Path(p).name for p in res['plots'])}")
    return 0
