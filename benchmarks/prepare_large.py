"""Data larger than memory: prepare a generated corpus into token shards, then train a few steps on them.

    .venv/bin/python benchmarks/prepare_large.py --size-mb 100            # one size
    .venv/bin/python benchmarks/prepare_large.py --size-mb 100 1024       # the table compares the sizes
    .venv/bin/python benchmarks/prepare_large.py --size-mb 100 --reference  # + the in-memory pipeline beside it

Per size: a seeded corpus of conversations (messages JSONL, templates filled with random words; ~1% duplicates
and a few invalid lines) is written to a temporary folder, `chatforge prepare --tokenizer` runs on it as a
subprocess (MB/s of input; peak RSS of the prepare process and of its process tree, workers included, sampled every
0.1 s), then a tiny model trains `--steps` steps on the shards in this process, with the resident memory read at
step 10 and at the last step. Targets: prepare's peak RSS < 1 GiB at 1 GB; training RSS that does not grow with the
corpus. The reference (--reference) is the in-memory pipeline (prepare.build, what prepare did before streaming) on
the same corpus, as a subprocess: its peak RSS. The folder is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact garden river music window coffee train station market "
         "doctor teacher letter paper table chair computer phone story game color animal city country road "
         "water money friend family school house night book idea question answer kitchen weather holiday "
         "mountain ocean forest bridge castle engine rocket planet summer winter autumn spring").split()
USER = ["Can you tell me about the {a} near the {b}?", "What is the best way to fix my {a}?",
        "Why does the {a} always {v} after the {b}?", "I need advice on {a} and {b}.",
        "How many {a} are there in a {b}?", "Please explain {a} to a {b}."]
ASSISTANT = ["The {a} is usually next to the {b}, and people {v} it every {c}.",
             "First check the {a}, then the {b}; if it still fails, {v} the {c}.",
             "Most {a} {v} because the {b} is too close to the {c}.",
             "Think of the {a} as a {b}: you {v} it, and the {c} follows."]
VERBS = ["move", "break", "open", "change", "shine", "stop", "grow", "sing"]
MB = 1 << 20


def rss_mb(pid: int | None = None) -> float:
    return psutil.Process(pid or os.getpid()).memory_info().rss / MB


def generate(path: Path, size_mb: float, seed: int) -> int:
    """A messages-JSONL corpus of about size_mb MiB; returns the number of lines."""
    rng = random.Random(seed)
    target, written, n = size_mb * MB, 0, 0
    recent: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            if recent and rng.random() < 0.01:  # an exact duplicate
                line = rng.choice(recent)
            elif rng.random() < 0.0005:
                line = '{"messages": [{"role": "user" "content": "broken"}]}\n'
            else:
                msgs = []
                for _ in range(rng.randint(1, 4)):
                    a, b, c = rng.choices(WORDS, k=3)
                    v = rng.choice(VERBS)
                    tail = " ".join(rng.choices(WORDS, k=rng.randint(0, 30)))
                    msgs.append({"role": "user", "content": rng.choice(USER).format(a=a, b=b, v=v) + " " + tail})
                    msgs.append({"role": "assistant",
                                 "content": rng.choice(ASSISTANT).format(a=a, b=b, c=c, v=v) + " " + tail[::-1]})
                line = json.dumps({"messages": msgs}) + "\n"
                if len(recent) < 1000:
                    recent.append(line)
                else:
                    recent[rng.randrange(1000)] = line
            f.write(line)
            written += len(line)
            n += 1
    return n


def run_measured(cmd: list[str]) -> dict:
    """Run cmd; its wall time and the peak RSS of its process tree (sampled every 0.1 s)."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent, tree_peak = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        try:
            procs = [parent, *parent.children(recursive=True)]
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in procs if p.is_running()) / MB)
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": time.time() - start, "peak_tree_mb": tree_peak, "stdout": out, "stderr": err}


def train_tokenizer_on_sample(corpus: Path, folder: Path) -> None:
    from chatforge.tokenizer import train_tokenizer

    texts = []
    with open(corpus, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 4000:
                break
            try:
                texts += [m["content"] for m in json.loads(line)["messages"]]
            except (ValueError, KeyError):
                pass
    train_tokenizer(texts, vocab_size=2048).save(str(folder))


def train_on_shards(data: Path, tokenizer: Path, out: Path, steps: int, seq_len: int) -> dict:
    """A tiny model trained `steps` steps on the shards in this process; RSS at step 10 and the last step."""
    from chatforge.config import load_config
    from chatforge.train.events import Note, Stepped
    from chatforge.train.loop import train

    rss, notes = {}, []

    def on_event(event) -> None:
        if isinstance(event, Stepped) and event.row["step"] in (10, steps):
            rss[event.row["step"]] = rss_mb()
        if isinstance(event, Note):
            notes.append(event.text if hasattr(event, "text") else str(event))

    over = {"stage": "sft", "data": str(data), "tokenizer": str(tokenizer), "out_dir": str(out),
            "model.preset": "nano", "model.d_model": 64, "model.n_head": 2, "model.n_kv_head": 1,
            "model.n_layer": 2, "seq_len": seq_len, "batch_size": 8, "max_steps": steps, "eval_every": steps,
            "eval_batches": 4, "save_every": steps, "log_every": steps, "dtype": "fp32", "num_threads": 1,
            "compile": False, "warmup_steps": 2}
    start = time.time()
    summary = train(load_config(None, [f"{k}={v}" for k, v in over.items()]), on_event=on_event)
    if any("not used" in n for n in notes):
        raise SystemExit(f"training did not read the shards: {notes}")
    return {"rss_10": rss.get(10), "rss_n": rss.get(steps), "train_s": time.time() - start,
            "tok_s": summary["tokens_per_s"]}


def one_size(size_mb: float, args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="cf-prepare-large-", dir=args.tmp))
    try:
        corpus = tmp / "corpus.jsonl"
        t = time.time()
        lines = generate(corpus, size_mb, args.seed)
        gen_s = time.time() - t
        mb = corpus.stat().st_size / MB
        train_tokenizer_on_sample(corpus, tmp / "tok")
        cli = [sys.executable, "-m", "chatforge.cli"]
        row = {"size_mb": mb, "lines": lines, "gen_s": gen_s}
        if args.reference:
            ref = run_measured([sys.executable, "-c", "import sys; from chatforge.data.prepare import PrepareOptions, build; "
                                "t, v, r = build([sys.argv[1]], PrepareOptions(skip_invalid=True)); print(len(t), len(v))", str(corpus)])
            row |= {"ref_s": ref["wall_s"], "ref_peak_mb": ref["peak_tree_mb"]}
        workers = [] if args.workers is None else ["--workers", str(args.workers)]
        res = run_measured([*cli, "prepare", str(corpus), "--out", str(tmp / "data"), "--skip-invalid",
                            "--tokenizer", str(tmp / "tok"), "--seq-len", str(args.seq_len), *workers])
        report = json.loads((tmp / "data" / "report.json").read_text())
        row |= {"prep_s": res["wall_s"], "mb_s": mb / res["wall_s"], "peak_tree_mb": res["peak_tree_mb"],
                "kept": report["kept"], "dup": report["dropped"].get("duplicate", 0),
                "invalid": report["dropped"].get("invalid", 0), "tokens": report["shards"]["train"]["tokens"]}
        corpus.unlink()
        row |= train_on_shards(tmp / "data", tmp / "tok", tmp / "run", args.steps, args.seq_len)
        row["load"] = os.getloadavg()[0]
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, nargs="+", default=[1024.0], help="corpus sizes in MiB (default 1024)")
    p.add_argument("--steps", type=int, default=40, help="training steps on the shards (RSS at 10 and at N)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="prepare --workers (default: one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", action="store_true", help="also run the in-memory pipeline (peak RSS)")
    p.add_argument("--tmp", default=None, help="where the temporary folder goes (default: the system's)")
    args = p.parse_args()
    rows = []
    for size in args.size_mb:
        rows.append(one_size(size, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{'corpus MiB':>10} {'convs':>9} {'kept':>9} {'dup':>7} {'train tokens':>13} {'prepare s':>9} "
          f"{'MiB/s':>6} {'peak RSS MiB':>12} {'ref peak':>9} {'train RSS@10':>12} {'RSS@N':>7} {'load':>5}")
    for r in rows:
        ref = f"{r['ref_peak_mb']:9.0f}" if "ref_peak_mb" in r else f"{'-':>9}"
        print(f"{r['size_mb']:10.0f} {r['lines']:9,} {r['kept']:9,} {r['dup']:7,} {r['tokens']:13,} "
              f"{r['prep_s']:9.1f} {r['mb_s']:6.2f} {r['peak_tree_mb']:12.0f} {ref} {r['rss_10']:12.0f} "
              f"{r['rss_n']:7.0f} {r['load']:5.1f}")
    print(f"targets: prepare peak RSS (process tree, workers included) < 1024 MiB; training RSS at step "
          f"{args.steps} the same across corpus sizes")


if __name__ == "__main__":
    main()
