"""Attention variants on the built-in corpus: multi-head, grouped-query, multi-query and sliding-window attention,
each trained from scratch (nano preset: 4 layers, d_model 128, 4 query heads) on every token of the built-in dialogs
for the same token budget, with the same seed, tokenizer, data split and batches.

    python benchmarks/ablate_attention.py                   # 1M tokens per variant; prints the table
    python benchmarks/ablate_attention.py --max-tokens 300000 --out runs/ablate-quick

Writes OUT/ablate.md, ablate.json, ablate_bpb.png and ablate_curves.png (see chatforge/ablate.py for what each
column means). Exit 1 if a variant's validation bits-per-byte did not improve on its first evaluation: a variant
that does not learn would make the comparison meaningless.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=1_000_000)
    parser.add_argument("--out", default="runs/ablate-attention")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from chatforge.tools.ablate import ablate, write_outputs

    t0 = time.time()
    rows = ablate(None, max_tokens=args.max_tokens, out=args.out, window=args.window, overrides=[f"seed={args.seed}"],
                  overwrite=True, progress=False)
    res = write_outputs(rows, Path(args.out))
    import torch

    print(f"built-in corpus, nano preset, {args.max_tokens:,} tokens per variant, seed {args.seed}, "
          f"{torch.get_num_threads()} threads, {time.time() - t0:.0f} s in all")
    print(res["table"])
    stuck = [r["variant"] for r in rows if not r["curve"] or r["curve"][-1][1] >= r["curve"][0][1]]
    if stuck:
        print(f"FAIL: no improvement for {', '.join(stuck)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
