"""Training-step speed: chatforge's step next to transformers' models at the same shape and precision, in one process.

For each shape (1M: the nanoGPT CPU recipe, 4 layers x 4 heads x 128 wide, batch 12 x 64; 10M; 30M; smollm2-lora:
SmolLM2-135M-Instruct with LoRA r8 on q/k/v/o, batch 4 x 256, next to peft on transformers), precision
(fp32, bf16 autocast) and mode (eager, torch.compile), it times chatforge's step (accumulate_gradients with the
stage's token loss, clipping, fused AdamW; compiled through train.speed.compiled_loss) and the reference
(GPT2LMHeadModel for the GPT-2 family, LlamaForCausalLM for the Llama family; its own loss, the same optimizer and
clipping) on the same batches, alternating step by step so that a busy machine slows both alike. MFU is model FLOPs
(model/shape.py) over the measured matmul peak (device.matmul_peak). A table per row: tokens/s, MFU, the ratio.

    python benchmarks/train_speed.py [--shapes 1M,10M,30M,smollm2-lora] [--dtypes fp32,bf16] [--modes eager,compiled]
                                     [--steps 10] [--threads 1] [--lora-trained 0.42]

--lora-trained: the share of positions that carry the loss in the LoRA row (1.0: every position, as pretraining;
an SFT row is mostly prompt: ~0.42 on the shop dialogs). Both sides get the same mask: chatforge's loss takes logits
of the trained positions only, peft's model gets labels of -100 elsewhere (transformers computes every position's
logits and ignores those). Tokens/s counts every position on both sides.

Threads: 1 by default. On two cores shared by several processes, two torch threads per process ran 6-8x slower
than one (both sides alike), so the ratio holds either way but one thread gives steadier numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

SHAPES = {  # name: (family, layers, heads, width, batch, seq)
    "1M": ("gpt2", 4, 4, 128, 12, 64),
    "1M-llama": ("llama", 4, 4, 128, 12, 64),
    "10M": ("llama", 8, 8, 320, 8, 256),
    "30M": ("llama", 12, 8, 448, 4, 256),
}
VOCAB = 4096  # chatforge's default tokenizer size


def models(shape: str):
    import torch

    from chatforge.model.gpt import GPT, ModelConfig

    family, L, H, D, B, T = SHAPES[shape]
    torch.manual_seed(0)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        ours = GPT(ModelConfig(family="gpt2", norm="layernorm", positions="learned", mlp="gelu",
                               activation="gelu_tanh", attn_bias=True, attn_out_bias=True, mlp_bias=True,
                               vocab_size=VOCAB, n_layer=L, n_head=H, d_model=D, max_seq_len=T))
        ref = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=D, n_layer=L, n_head=H,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         attn_implementation="sdpa"))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        ours = GPT(ModelConfig(family="llama", vocab_size=VOCAB, n_layer=L, n_head=H, d_model=D, max_seq_len=T))
        ref = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=ours.config.d_ff,
                                           num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H,
                                           max_position_embeddings=T, tie_word_embeddings=True,
                                           attn_implementation="sdpa"))
    return ours, ref, B, T


def batches(B: int, T: int, n: int):
    import torch

    from chatforge.data.pack import Batch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (B, T + 1), generator=g)
        out.append(Batch(x[:, :-1], x[:, 1:], torch.ones(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.long),
                         torch.arange(T).expand(B, T), packed=False))  # one record a row, as the reference sees it
    return out


def timed(step, data, tokens_per_step: int) -> tuple[float, dict[str, float]]:
    """(warm-up seconds, tokens/s of "ours" and "ref"): two warm-up steps each (and the compile), then the rest
    alternating step by step so that a busy machine slows both alike; the median step time counts."""
    t0 = time.perf_counter()
    for name in ("ours", "ref"):
        for b in data[:2]:
            step(name, b)
    warm = time.perf_counter() - t0
    times = {"ours": [], "ref": []}
    for b in data[2:]:
        for name in ("ours", "ref"):
            t = time.perf_counter()
            step(name, b)
            times[name].append(time.perf_counter() - t)
    return warm, {k: tokens_per_step / statistics.median(v) for k, v in times.items()}


def measure(shape: str, dtype_name: str, mode: str, steps: int) -> dict:
    import torch

    from chatforge.device import DTYPES, autocast, matmul_peak
    from chatforge.model.shape import flops_per_token
    from chatforge.train.loss import accumulate_gradients, token_loss
    from chatforge.train.speed import compiled_loss

    cpu, dtype = torch.device("cpu"), DTYPES[dtype_name]
    ours, ref, B, T = models(shape)
    data = batches(B, T, steps + 2)
    ctx = autocast(cpu, dtype)
    loss = compiled_loss(token_loss, ours, ctx) if mode == "compiled" else token_loss

    def ref_loss(batch):
        with ctx:
            return ref(batch.input_ids, labels=batch.input_ids).loss  # transformers shifts the labels itself

    ref_fn = torch.compile(ref_loss, dynamic=False) if mode == "compiled" else ref_loss
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, m in (("ours", ours), ("ref", ref))}

    def step(name: str, batch) -> None:
        model = ours if name == "ours" else ref
        if name == "ours":
            accumulate_gradients(ours, [batch], cpu, ctx, loss)
        else:
            ref_fn(batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    warm, tok = timed(step, data, B * T)
    flops = flops_per_token(ours.config, T)["training"]
    peak = matmul_peak(cpu, dtype)
    return {"shape": shape, "dtype": dtype_name, "mode": mode, "ours": tok["ours"], "ref": tok["ref"],
            "mfu_ours": flops * tok["ours"] / peak, "mfu_ref": flops * tok["ref"] / peak, "warm_s": warm,
            "peak_gflops": peak / 1e9, "ref_name": type(ref).__name__}


LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LORA_BATCH = (4, 256)  # the SmolLM2 LoRA recipe's micro-batch


def measure_lora(dtype_name: str, mode: str, steps: int, trained: float = 1.0) -> dict:
    """SmolLM2-135M-Instruct with LoRA: chatforge (the loop's set-up: apply_lora, the frozen base cast by
    train.speed.frozen_to, the stage's token loss) next to peft on transformers' LlamaForCausalLM loaded from the same
    converted folder (bf16: the base loaded in bf16, peft keeping its adapters fp32), the same LoRA settings,
    optimizer, clipping and batches; adapters and their AdamW state fp32 on both sides."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatforge.device import DTYPES, autocast, matmul_peak
    from chatforge.train.loss import accumulate_gradients, token_loss
    from chatforge.train.speed import compiled_loss, frozen_to, training_flops_per_token
    from chatforge.weights.loader import load, model_folder, resolve
    from chatforge.weights.lora import apply_lora

    cpu, dtype = torch.device("cpu"), DTYPES[dtype_name]
    B, T = LORA_BATCH
    torch.manual_seed(0)
    core = load("smollm2-135m-instruct").model
    ours = apply_lora(core, dict(LORA))
    if dtype == torch.bfloat16:
        frozen_to(ours, torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(model_folder(resolve("smollm2-135m-instruct")), dtype=dtype)
    ref = get_peft_model(ref, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                         target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    ours.train(), ref.train()
    vocab = core.config.vocab_size
    g = torch.Generator().manual_seed(1)
    from chatforge.data.pack import Batch

    data = []  # (chatforge's batch, the same targets as transformers' labels)
    for _ in range(steps + 2):
        x = torch.randint(0, vocab, (B, T + 1), generator=g)
        # a prompt, then a reply to the end of the row: the last `trained` share of each row carries the loss
        mask = torch.arange(T).expand(B, T) >= round((1 - trained) * T)
        lab = x[:, :-1].clone()
        lab[:, 1:][~mask[:, :-1]] = -100  # transformers shifts: labels[t] is predicted at t - 1
        data.append((Batch(x[:, :-1], x[:, 1:], mask, torch.zeros(B, T, dtype=torch.long),
                           torch.arange(T).expand(B, T), packed=False), lab))
    ctx = autocast(cpu, dtype)
    loss = compiled_loss(token_loss, ours, ctx) if mode == "compiled" else token_loss

    def ref_loss(batch, lab):
        with ctx:
            return ref(input_ids=batch.input_ids, labels=lab).loss

    ref_fn = torch.compile(ref_loss, dynamic=False) if mode == "compiled" else ref_loss
    trainable = {k: [p for p in m.parameters() if p.requires_grad] for k, m in (("ours", ours), ("ref", ref))}
    opts = {k: torch.optim.AdamW(v, lr=1e-4, fused=True) for k, v in trainable.items()}

    def step(name: str, item) -> None:
        batch, lab = item
        if name == "ours":
            accumulate_gradients(ours, [batch], cpu, ctx, loss)
        else:
            ref_fn(batch, lab).backward()
        torch.nn.utils.clip_grad_norm_(trainable[name], 1.0)
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    warm, tok = timed(step, data, B * T)
    flops = training_flops_per_token(core, T, lora=True)
    peak = matmul_peak(cpu, dtype)
    return {"shape": f"lora@{trained:g}", "dtype": dtype_name, "mode": mode, "ours": tok["ours"], "ref": tok["ref"],
            "mfu_ours": flops * tok["ours"] / peak, "mfu_ref": flops * tok["ref"] / peak, "warm_s": warm,
            "peak_gflops": peak / 1e9, "ref_name": "peft+Llama"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1M,10M,30M,smollm2-lora")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lora-trained", type=float, default=1.0, help="share of positions with a loss (LoRA row)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{a.threads} thread(s)")
    print(f"{'shape':9} {'dtype':5} {'mode':8} {'reference':17} {'ref tok/s':>10} {'ours tok/s':>10} "
          f"{'ratio':>6} {'ref MFU':>8} {'our MFU':>8} {'peak GF/s':>9} {'warm s':>7}")
    for shape in a.shapes.split(","):
        for dtype in a.dtypes.split(","):
            for mode in a.modes.split(","):
                r = measure_lora(dtype, mode, a.steps, a.lora_trained) if shape == "smollm2-lora" else \
                    measure(shape, dtype, mode, a.steps)
                print(f"{r['shape']:9} {dtype:5} {mode:8} {r['ref_name']:17} {r['ref']:10,.0f} {r['ours']:10,.0f} "
                      f"{r['ours'] / r['ref']:6.2f} {r['mfu_ref']:8.1%} {r['mfu_ours']:8.1%} "
                      f"{r['peak_gflops']:9.0f} {r['warm_s']:7.0f}", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
