"""The bar the quickstart is measured against: a plain character-level GPT trained for the quickstart's wall time on
the quickstart's own split.

`--quickstart DIR` reads DIR/quickstart.json (running `chatforge quickstart --out DIR` first when it is missing),
takes its seed (the split: the data layer's de-duplicated test split of the built-in corpus) and its whole wall time,
loading and evaluation included, and trains the character-level GPT (4 layers, 128 wide, fp32, batch 12x64, AdamW
1e-3, the reference of DESIGN.md) for as long, with as many threads, on the same training split. It prints both
models' held-out bits per byte (English and Chinese separately) with the load average, so the two are measured back
to back at similar load. `--ppmd` adds what the PPMd compressor (order 8) spends on the test text after reading the
training text, a classical reference.

    python benchmarks/char_baseline.py --quickstart runs/quickstart [--minutes 9] [--ppmd]
    python benchmarks/char_baseline.py --seconds 90 [--threads 2] [--seed 0]     # the character-level GPT alone
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatforge.data import load_dataset
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.tools.quickstart import CORPUS, is_chinese


def dialog_text(records: list[dict]) -> str:
    return "".join("".join(m["content"] + "\n" for m in r["messages"]) + "\n" for r in records)


def splits(seed: int) -> tuple[list[dict], list[dict]]:
    """The quickstart's split: the data layer's cleaned, de-duplicated train/test split of the built-in corpus (the
    quickstart trains on the train part less a small dev slice; this model gets all of it)."""
    train, test, _ = load_dataset(CORPUS, 0.1, seed)
    return train, test


def run(seconds: float, seed: int) -> dict:
    torch.manual_seed(0)
    train, test = splits(seed)
    train_text = dialog_text(train)
    stoi = {c: i + 1 for i, c in enumerate(sorted(set(train_text)))}  # 0: a character never seen in training
    a = np.array([stoi.get(c, 0) for c in train_text], dtype=np.int64)
    vocab = len(stoi) + 1
    model = GPT(ModelConfig(family="gpt2", vocab_size=vocab, n_layer=4, n_head=4, d_model=128, max_seq_len=64,
                            norm="layernorm", positions="learned", mlp="gelu", activation="gelu_tanh",
                            attn_bias=True, attn_out_bias=True, mlp_bias=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    rng = np.random.default_rng(0)
    steps, start = 0, time.time()
    while time.time() - start < seconds:
        ix = rng.integers(0, len(a) - 65, 12)
        x = torch.from_numpy(np.stack([a[i:i + 64] for i in ix]))
        y = torch.from_numpy(np.stack([a[i + 1:i + 65] for i in ix]))
        F.cross_entropy(model(x).view(-1, vocab), y.view(-1)).backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    elapsed = time.time() - start
    model.eval()

    def bpb(records: list[dict]) -> tuple[float, int]:
        text = dialog_text(records)
        b = np.array([stoi.get(c, 0) for c in text], dtype=np.int64)
        nats = 0.0
        with torch.no_grad():
            for s in range(0, len(b) - 1, 64 * 16):  # 16 windows of 64 characters per forward
                chunk = b[s:s + 64 * 16 + 1]
                n = (len(chunk) - 1) // 64 * 64
                if n:
                    x, y = torch.from_numpy(chunk[:n]).view(-1, 64), torch.from_numpy(chunk[1:n + 1]).view(-1, 64)
                    nats += float(F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1), reduction="sum"))
                rest = len(chunk) - 1 - n
                if rest:
                    x, y = torch.from_numpy(chunk[n:n + rest])[None], torch.from_numpy(chunk[n + 1:n + 1 + rest])
                    nats += float(F.cross_entropy(model(x)[0], y, reduction="sum"))
        size = len(text.encode())
        return nats / math.log(2) / size, size

    rows = {"english": bpb([r for r in test if not is_chinese(r)]), "chinese": bpb([r for r in test if is_chinese(r)])}
    total = sum(v * n for v, n in rows.values()) / sum(n for _, n in rows.values())
    return {"model": "character-level GPT", "params": model.num_params(), "train s": round(elapsed),
            "tokens": steps * 12 * 64, "tokens/s": round(steps * 12 * 64 / elapsed), "test bpb": round(total, 3),
            "English": round(rows["english"][0], 3), "Chinese": round(rows["chinese"][0], 3)}


def ppmd_row(seed: int) -> dict:
    """Bits per byte PPMd spends on the test text after reading the training text: compress(train + test) minus
    compress(train). PPMd keeps adapting while it reads the test text, so this flatters it if anything."""
    try:
        import pyppmd
    except ImportError:
        raise SystemExit("the PPMd row needs pyppmd: pip install -e '.[bench]'") from None
    train, test = splits(seed)
    a = dialog_text(train).encode()

    def size(data: bytes) -> int:
        return len(pyppmd.compress(data, max_order=8, mem_size=256 << 20, variant="H"))

    base = size(a)
    row = {"model": "PPMd (order 8), after the training text"}
    for name, records in (("test bpb", test), ("English", [r for r in test if not is_chinese(r)]),
                          ("Chinese", [r for r in test if is_chinese(r)])):
        b = dialog_text(records).encode()
        row[name] = round(8 * (size(a + b) - base) / len(b), 3)
    return row


def quickstart_row(folder: Path, minutes: float) -> dict:
    """quickstart.json of DIR, made first (a subprocess, as a user runs it) when it is missing."""
    path = folder / "quickstart.json"
    if not path.exists():
        load = os.getloadavg()[0]
        subprocess.run([sys.executable, "-m", "chatforge.cli", "quickstart", "--out", str(folder), "--minutes",
                        str(minutes)], check=True)
        print(f"(load average at the quickstart's start: {load:.2f})")
    return json.loads(path.read_text(encoding="utf-8"))


def table(rows: list[dict]) -> None:
    cols = list(dict.fromkeys(c for row in rows for c in row))
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        cells = (row.get(c, "") for c in cols)
        print("| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", type=Path, help="a quickstart folder: its seed, wall time and threads")
    parser.add_argument("--minutes", type=float, default=9.0, help="for a quickstart this script runs")
    parser.add_argument("--seconds", type=float, default=90.0, help="without --quickstart")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="without --quickstart")
    parser.add_argument("--seed", type=int, default=0, help="the split, without --quickstart")
    parser.add_argument("--ppmd", action="store_true", help="add the PPMd row (pyppmd)")
    args = parser.parse_args()
    rows = []
    if args.quickstart:
        q = quickstart_row(args.quickstart, args.minutes)
        args.seconds, args.threads, args.seed = q["wall_s"], q["threads"], q["seed"]
        rows.append({"model": "chatforge quickstart", "params": q["params"], "train s": round(q["wall_s"]),
                     "tokens": q["pretrain_tokens"] + q["sft_tokens"],
                     "tokens/s": round(q["pretrain_tokens_per_s"]), "test bpb": round(q["test_bpb"], 3),
                     "English": round(q.get("test_bpb_english", float("nan")), 3),
                     "Chinese": round(q.get("test_bpb_chinese", float("nan")), 3)})
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows.append(run(args.seconds, args.seed))
    print(f"held-out bits per byte on the de-duplicated test split of {CORPUS} (seed {args.seed}); the "
          f"character-level GPT trained {args.seconds:.0f} s with {args.threads} thread(s), load average "
          f"{load:.2f} at its start, {os.getloadavg()[0]:.2f} at its end:")
    if args.ppmd:
        rows.append(ppmd_row(args.seed))
    table(rows)
    if args.quickstart:
        print(f"\nquickstart / character-level GPT: {rows[0]['test bpb'] / rows[1]['test bpb']:.3f}")


if __name__ == "__main__":
    main()
