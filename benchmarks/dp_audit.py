"""Memorisation with and without differential privacy: canary exposure, DP slowdown, epsilon vs the accountant.

builtin:chatterbot is prepared with canaries planted 1, 10 and 100 times (4-digit secrets: |R| = 10^4, exposure by
exact enumeration, at most log2(10^4) = 13.3 bits); a nano model (~1M parameters) is trained on it by SFT from
scratch, once plainly and twice with DP-SGD at target epsilon 8: the privacy unit one record (a canary planted 100
times is 100 units, which epsilon does not bound together), and one user (`privacy.unit=user`: a canary's copies
are one person's conversations, every other record its own user); then `chatforge audit` measures each canary.

Targets (issue 14): exposure rises with repetition without DP and stays <= 3 bits with DP at epsilon <= 8; DP
slowdown <= 2.5x at ~1M parameters (trained tokens per second, the same data, one process, one after the other);
epsilon within 1% of Opacus's accountant called directly.

    .venv/bin/python benchmarks/dp_audit.py [--steps 300] [--out runs/bench-dp]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def step_ratio(rows: int = 32, repeats: int = 5, threads: int = 1) -> tuple[float, float, int]:
    """(plain s/step, DP s/step, params): the same 32 one-conversation rows (20-60 tokens) through the nano model,
    a plain step (loss, backward, AdamW) against Opacus's per-sample gradients, clipping and noise, in one process."""
    import contextlib

    import numpy as np
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from chatforge.data.pack import Encoded
    from chatforge.model.gpt import GPT
    from chatforge.model.shape import model_config
    from chatforge.train.dp import PoissonStream, row_losses

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(model_config({"preset": "nano"}, 2048, 128)).train()
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 2048, int(n)).astype(np.int32) for n in rng.integers(20, 60, rows)]
    enc = Encoded(ids, [np.r_[0, np.ones(len(i) - 1)].astype(np.uint8) for i in ids], {})
    batch = PoissonStream(enc, 128, 0, 1.0, 0).batch(np.arange(rows))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def timed(forward, optimizer) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            loss, _ = row_losses(forward, batch, contextlib.nullcontext())
            loss.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            best = min(best, time.perf_counter() - t)
        return best

    plain = timed(model, opt)
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp = timed(module, DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=rows))
    plain_again = timed(model, opt) if not module._close() else 0.0
    return min(plain, plain_again), dp, model.num_params()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/bench-dp")
    ap.add_argument("--canaries", type=int, default=2, help="canaries per repetition count")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="builtin:chatterbot",
                    help="the corpus the canaries go into (builtin = chatterbot + chitchat: a ~6x larger N)")
    ap.add_argument("--step-ratio-only", action="store_true", help="only the matched-batch step-time ratio")
    ap.add_argument("--dp-only", action="store_true", help="skip the run without DP (its table column is left out)")
    args = ap.parse_args()
    if args.step_ratio_only:
        plain, dp, n = step_ratio()
        print(f"load (uptime): {os.getloadavg()}; nano, {n:,} parameters, 32 one-conversation rows, 1 thread, "
              f"best of 5: plain step {plain * 1000:.0f} ms, DP-SGD step {dp * 1000:.0f} ms: {dp / plain:.2f}x")
        return

    import torch

    from chatforge.config import load_config
    from chatforge.data.prepare import prepare
    from chatforge.tools.audit import audit
    from chatforge.train.loop import train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    prepared = prepare([args.data], str(data), canaries=args.canaries, canary_repeats="1,10,100", canary_digits=4)
    # The tokenizer is trained on the same data without canaries: a BPE trained on the canaries themselves leaks
    # their digits into its merges (an untrained model then shows ~8 bits of exposure at 100 repeats), and it is
    # outside DP-SGD's guarantee. Public-data tokenizers are what a private run should use.
    from chatforge.data import load_dataset
    from chatforge.tokenizer import record_texts, train_tokenizer

    clean_train, _, _ = load_dataset(args.data)
    train_tokenizer(record_texts(clean_train), vocab_size=2048).save(str(out / "tokenizer"))
    common = [f"data={data}", "stage=sft", "model.preset=nano", f"tokenizer={out / 'tokenizer'}", "seq_len=128", "lr=3e-3",
              "warmup_steps=20", f"max_steps={args.steps}", "eval_every=100000", "eval_batches=4", "dtype=fp32",
              f"num_threads={args.threads}", "val_fraction=0.0", "save_every=100000", "dropout=0.0", "seed=0"]
    runs = {"no DP": common + ["batch_size=8", f"out_dir={out / 'plain'}"],
            # about as many conversations per step as 8 packed rows of 128 tokens hold (chatterbot: ~4 a row)
            f"DP eps<={args.epsilon:g}": common + ["batch_size=32", f"out_dir={out / 'dp'}",
                                                  f"privacy.target_epsilon={args.epsilon}", "privacy.max_grad_norm=1.0"],
            # the privacy unit a person: a canary's copies are one user's conversations (prepare names them so),
            # every other record its own user; sampled and clipped as one
            f"DP eps<={args.epsilon:g} per user": common + [
                "batch_size=32", f"out_dir={out / 'dp-user'}", f"privacy.target_epsilon={args.epsilon}",
                "privacy.max_grad_norm=1.0", "privacy.unit=user"]}
    if args.dp_only:
        runs.pop("no DP")
    results = {}
    for name, over in runs.items():
        cfg = load_config(None, over)
        if Path(cfg.out_dir).exists():
            import shutil

            shutil.rmtree(cfg.out_dir)
        t0 = time.time()
        s = train(cfg)
        wall = time.time() - t0
        a = audit(s["final_dir"], str(data / "canaries.json"), batch_size=500)
        # step compute time only (the loop's compute_s), not the final evaluation and checkpoint
        results[name] = {"summary": s, "audit": a, "wall_s": wall,
                         "trained_tok_s": s["tokens_per_s"] * s["trained_tokens"] / max(s["tokens"], 1)}

    print(f"load (uptime): {os.getloadavg()} on {os.cpu_count()} cores; {args.steps} steps each, torch threads "
          f"{args.threads}; data {args.data}: {prepared['train']} training records, of which a canary repeated "
          f"100 times is {100 / prepared['train']:.1%} (100 privacy units per record, 1 per user)\n")
    names = list(results)
    print("| repeats | " + " | ".join(f"exposure {n} (bits, mean / max)" for n in names) + " | extracted " +
          " / ".join(names) + " |")
    print("|---|" + "---|" * (len(names) + 1))
    for reps in results[names[0]]["audit"]["by_repeats"]:
        cells = [f"{results[n]['audit']['by_repeats'][reps]['mean_exposure']:.2f} / "
                 f"{results[n]['audit']['by_repeats'][reps]['max_exposure']:.2f}" for n in names]
        ext = " / ".join(f"{results[n]['audit']['by_repeats'][reps]['extracted']}" for n in names)
        print(f"| {reps} | " + " | ".join(cells) + f" | {ext} |")
    print(f"(max possible exposure: {results[names[0]]['audit']['canaries'][0]['max_exposure']:.2f} bits)\n")

    plain = results[names[0]]
    print("| run | params | steps | trained tokens | wall s | trained tokens/s | slowdown | final train loss |")
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        r, s = results[n], results[n]["summary"]
        loss = json.loads(Path(s["out_dir"], "metrics.jsonl").read_text().splitlines()[-1])["loss"]
        slow = "-" if args.dp_only else f"{plain['trained_tok_s'] / r['trained_tok_s']:.2f}x"
        print(f"| {n} | {s['params']:,} | {s['steps']} | {s['trained_tokens']:,} | {r['wall_s']:.0f} | "
              f"{r['trained_tok_s']:,.0f} | {slow} | {loss:.3f} |")

    from opacus.accountants import PRVAccountant, RDPAccountant

    for name in names:
        p = results[name]["summary"].get("privacy")
        if not p:
            continue
        rdp, prv = RDPAccountant(), PRVAccountant()
        for _ in range(p["steps"]):
            rdp.step(noise_multiplier=p["noise_multiplier"], sample_rate=p["sample_rate"])
            prv.step(noise_multiplier=p["noise_multiplier"], sample_rate=p["sample_rate"])
        ref = rdp.get_epsilon(p["delta"])
        print(f"\n{name}: epsilon chatforge {p['epsilon']:.4f} | Opacus RDPAccountant called directly {ref:.4f} "
              f"(ratio {p['epsilon'] / ref:.4f}) | PRV {prv.get_epsilon(p['delta']):.4f}; target {args.epsilon:g}, "
              f"delta {p['delta']:.3g} (1/N, N={p['units']} privacy units), noise "
              f"multiplier {p['noise_multiplier']:.3f}, sample rate {p['sample_rate']:.4f}, {p['steps']} steps")
    print(f"load (uptime) at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
