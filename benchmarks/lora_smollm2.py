"""LoRA SFT of SmolLM2-135M-Instruct on the built-in English tech dialogs: what fine-tuning buys and costs here.

Runs configs/sft-smollm2-lora.yaml through the one training loop and prints, as a table: held-out loss before
and after, wall time, training tokens/s, peak memory (RSS), greedy decode tokens/s at batch 1 through the engine
(KV cache), and three before/after replies to held-out questions.

    python benchmarks/lora_smollm2.py [key=value ...]     # overrides as for `chatforge train`, e.g. max_steps=8
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "sft-smollm2-lora.yaml"
REPLY_TOKENS = 48


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def replies_and_speed(model, tokenizer, questions: list[str]) -> tuple[list[str], float]:
    """Greedy replies through the engine at batch 1, and decode tokens/s (after the first token, so prefill is
    not counted; the KV cache makes each later step one token's work)."""
    from chatforge.generation.bot import Bot
    from chatforge.generation.engine import SamplingParams

    bot = Bot(model, tokenizer)
    params = SamplingParams(max_new_tokens=REPLY_TOKENS, temperature=0.0)
    replies, n_decoded, decode_s = [], 0, 0.0
    for q in questions:
        prompt = bot.prompt([{"role": "user", "content": q}], params.max_new_tokens)
        text, stamps = [], []
        for delta in bot.engine.generate(prompt, params):
            text.append(delta.text)
            stamps += [time.perf_counter()] * len(delta.token_ids)
        replies.append("".join(text).strip())
        if len(stamps) > 1:
            n_decoded += len(stamps) - 1
            decode_s += stamps[-1] - stamps[0]
    return replies, n_decoded / decode_s if decode_s else float("nan")


def held_out_loss(model, tokenizer, records, cfg) -> float:
    from chatforge.train.loss import evaluate_loss

    return evaluate_loss(model, tokenizer, records, cfg.seq_len, cfg.batch_size, dtype="fp32")["loss"]


def main(argv: list[str]) -> None:
    import torch

    from chatforge.weights.folder import load_model
    from chatforge.config import load_config
    from chatforge.data import load_dataset
    from chatforge.weights.lora import load_adapter
    from chatforge.weights.loader import load
    from chatforge.train.loop import train

    cfg = load_config(str(CONFIG), argv)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    load_start = os.getloadavg()[0]
    train_records, val_records, report = load_dataset(cfg.data, cfg.val_fraction, cfg.seed)
    questions = [r["messages"][0]["content"] for r in val_records if r["messages"][0]["role"] == "user"][:3]
    print(f"data: {cfg.data}: {report['read']} dialogs read, {report['kept']} distinct; "
          f"{len(train_records)} train, {len(val_records)} held out ({cfg.val_fraction:.0%})")

    loaded = load(cfg.init)
    base, tokenizer, folder = loaded.model, loaded.tokenizer, loaded.folder
    loss_before = held_out_loss(base, tokenizer, val_records, cfg)
    replies_before, decode_before = replies_and_speed(base, tokenizer, questions)
    del base

    t0 = time.perf_counter()
    summary = train(cfg, records=(train_records, val_records, report))
    wall = time.perf_counter() - t0

    tuned = load_adapter(load_model(folder), summary["best_dir"], merge=True)  # the adapter as users load it
    loss_after = held_out_loss(tuned, tokenizer, val_records, cfg)
    replies_after, decode_after = replies_and_speed(tuned, tokenizer, questions)

    rows = [
        ("held-out loss (nats/token, fp32)", f"{loss_before:.4f}", f"{loss_after:.4f}"),
        ("greedy decode tokens/s, batch 1, KV cache", f"{decode_before:.1f}", f"{decode_after:.1f} (merged)"),
        ("training wall time (s)", "", f"{wall:.0f} ({summary['steps']} steps, stop: {summary['stop_reason']})"),
        ("training tokens/s (positions incl. padding)", "", f"{summary['tokens_per_s']:,.0f}"),
        ("trained tokens (assistant replies)", "", f"{summary['trained_tokens']:,}"),
        ("trainable / total parameters", "", f"{summary['trainable_params']:,} / {summary['params']:,}"),
        ("peak memory, RSS (MiB)", "", f"{peak_rss_mib():,.0f}"),
        ("machine: CPUs, torch threads, 1-min load avg", f"{load_start:.1f}",
         f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'LoRA SFT of SmolLM2-135M-Instruct':<{width}} | {'before':>10} | after")
    print(f"{'-' * width}-|-{'-' * 10}-|-{'-' * 40}")
    for name, before, after in rows:
        print(f"{name:<{width}} | {before:>10} | {after}")
    print(f"\nthree held-out questions, greedy, at most {REPLY_TOKENS} tokens:")
    for q, b, a in zip(questions, replies_before, replies_after):
        print(f"\nQ: {q}\n  before: {b!r}\n  after:  {a!r}")
    print(f"\nadapter: {summary['best_dir']} (chat: chatforge chat {summary['best_dir']})")


if __name__ == "__main__":
    main(sys.argv[1:])
