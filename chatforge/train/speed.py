"""How fast a step runs: whether to compile it, the compiled stage loss, bf16 for a frozen base, and MFU.

Measured on these machines (benchmarks/train_speed.py): torch.compile of the step (model and token loss as one graph)
makes a 1M-30M model's step 1.2-1.3x faster than the eager one in bf16 on CPU (2026-12-04, with the fused eager head
loss: 1M 17.0k vs 14.2k tokens/s, 10M 3.9k vs 3.2k), but its first compile costs one to several minutes on two busy
cores (seconds once inductor's cache under ~/.cache/chatforge/inductor holds the graphs), so `compile: auto` turns
it on where it pays: always on CUDA, and on CPU only for full training with a budget long enough to win the compile
back. LoRA is left eager on CPU: compiled, SmolLM2's LoRA step ran at 129 tokens/s against eager's ~700 (the
compiled loss takes every position's logits over the 49k vocabulary).
"""

from __future__ import annotations

import os

from chatforge.config import TrainConfig

AUTO_COMPILE_MIN_STEPS = 2000  # CPU: a cold compile (~1-4 min here) is won back at ~15% per step only past this


def should_compile(cfg: TrainConfig, device) -> bool:
    """cfg.compile: true/false as given; "auto": CUDA always, CPU for long full-training runs (see module doc)."""
    if cfg.compile != "auto":
        return bool(cfg.compile)
    if cfg.privacy is not None or cfg.stage not in ("pretrain", "sft"):  # Opacus' hooks; the preference losses
        return False
    if device.type == "cuda":
        return True
    if device.type != "cpu" or cfg.lora:
        return False
    return (cfg.max_steps or 0) >= AUTO_COMPILE_MIN_STEPS


def compiled_loss(loss, model, autocast_ctx):
    """`loss(model, batch, ctx)` compiled as one graph with the model (forward, cast, cross-entropy), artefacts
    cached in inductor's cache folder; returns a function with the same signature as `loss`."""
    import torch
    import torch._inductor.config as inductor_config

    from chatforge.generation.decode import inductor_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    inductor_config.fx_graph_cache = True
    compiled = torch.compile(lambda batch: loss(model, batch, autocast_ctx), dynamic=False)
    return lambda _model, batch, _ctx: compiled(batch)


def frozen_to(model, dtype) -> int:
    """Cast the frozen parameters (a LoRA base) to dtype, in place; trained ones (adapters, new embedding rows)
    stay fp32 with their fp32 AdamW state. Returns how many parameters moved. Halves the base's memory and the
    bytes each matmul reads; autocast computes in bf16 anyway, so the forward is unchanged."""
    import torch

    moved = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                moved += p.numel()
    return moved


def training_flops_per_token(core, seq_len: int, lora: bool) -> float:
    """Model FLOPs of one trained token position: 3x the forward for full training (backward = 2x); 2x for LoRA,
    whose frozen weights need gradients of their inputs but none of their own (the adapters' FLOPs are ~1%)."""
    from chatforge.model.shape import flops_per_token

    f = flops_per_token(core.config, seq_len)
    return f["forward"] * (2 if lora else 3)
