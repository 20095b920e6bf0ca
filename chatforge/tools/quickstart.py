"""`chatforge quickstart`: a small chat model from the built-in corpus in minutes, with honest numbers.

The built-in corpus (English + Chinese chatterbot dialogs) is split three ways: the data layer's standard validation
split is the held-out test set, never trained on nor used to choose anything; a slice of the training split is the
dev set that early stopping and best-checkpoint selection look at; the rest trains the tokenizer and the model.
Then: tokenizer -> pretraining on every token of the dialogs -> SFT on the assistant replies, each stage under a
share of the wall-clock budget (configs/quickstart-pretrain.yaml and configs/quickstart-sft.yaml hold the recipes;
they also run as they are with `chatforge train --config`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from chatforge.errors import ChatforgeError

RECIPES = Path(__file__).resolve().parent.parent / "configs"  # shipped in the package; configs/ at the root links here
PROMPTS = ["Hello, how are you?", "What is your name?", "Tell me a joke.", "你好", "你会说中文吗？"]
DEV_FRACTION = 0.08
RESERVE_S = 40.0  # held back for the final evaluation, samples and report
PRETRAIN_SHARE = 0.72  # of the training time; SFT gets the rest
# Held-out bits per byte of the plain character-level GPT (4 layers, 128 wide, ~1M parameters, batch 12x64, AdamW
# 1e-3) after the 2,250 steps it runs in 90 s here, on the de-duplicated split this command tests on.
CHAR_BASELINE_DEDUP = 2.86  # benchmarks/char_baseline.py
# What the PPMd compressor (order 8) spends per byte of that split's test text after reading its training text: a strong
# classical reference for how much this corpus alone tells about unseen dialogs (EXPERIMENTS.md).
PPMD_DEDUP = 2.28  # benchmarks/char_baseline.py


def _recipe(name: str) -> str:
    path = RECIPES / name
    if not path.exists():
        raise ChatforgeError(f"{path}: quickstart recipe not found (chatforge/configs/ of the installed package)")
    return str(path)


def split_dev(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(records))
    n_dev = max(1, round(fraction * len(records)))
    dev = set(order[:n_dev].tolist())
    return [r for i, r in enumerate(records) if i not in dev], [r for i, r in enumerate(records) if i in dev]


def _pick_threads() -> int:
    """All cores, unless the machine is already busier than its core count: then torch's OpenMP threads wait for
    each other at every barrier while descheduled, and one thread trains several times faster than two."""
    import os

    import torch

    cores = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load >= (os.cpu_count() or cores):
        print(f"note: the machine is busy (load {load:.1f} on {os.cpu_count()} cores): training with 1 thread; "
              "timings will be slower than on an idle machine")
        return 1
    return cores


def raw_protocol_test(seed: int) -> tuple[list[dict], int]:
    """10% of the raw corpus' records at random, duplicates kept: how the 1.62 character-level figure was measured.

    The raw corpus repeats itself (english/tech_support alone holds 1,040 copies of 10 dialogs), so many of these
    "held-out" records also sit in the training data; returns (records, how many duplicate a training record).
    """
    import numpy as np

    from chatforge.data.builtin import load_builtin

    raw = load_builtin("builtin")
    order = np.random.default_rng(seed).permutation(len(raw))
    n = len(raw) // 10
    test, rest = [raw[i] for i in order[:n]], [raw[i] for i in order[n:]]
    seen = {json.dumps(r, sort_keys=True) for r in rest}
    return test, sum(json.dumps(r, sort_keys=True) in seen for r in test)


def quickstart(out: str = "runs/quickstart", minutes: float = 9.0, overwrite: bool = False, seed: int = 0) -> int:
    """Train a small chat model on the built-in corpus (tokenizer, pretraining, SFT), report held-out bits-per-byte
    and sample replies.

    Args:
        out: folder for everything the quickstart writes (tokenizer/, pretrain/, sft/, final/, quickstart.json).
        minutes: wall-clock budget for the whole command, loading and evaluation included.
        overwrite: replace the runs of an earlier quickstart in `out`.
        seed: seed for the data split, initialisation and batches.
    """
    t0 = time.time()
    deadline = t0 + 60.0 * minutes

    from chatforge.weights.folder import load_model, save_model
    from chatforge.config import load_config
    from chatforge.data import load_dataset
    from chatforge.tokenizer import Tokenizer, train_tokenizer
    from chatforge.tokenizer import record_texts
    from chatforge.train.loop import sample_replies, train

    root = Path(out)
    parts = [root / p for p in ("tokenizer", "pretrain", "sft", "final", "quickstart.json")]
    if any(p.exists() for p in parts):
        if not overwrite:
            raise ChatforgeError(f"{root}: holds an earlier quickstart; pass --overwrite or choose another --out")
        for p in parts:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    pre_cfg = load_config(_recipe("quickstart-pretrain.yaml"), [f"out_dir={root / 'pretrain'}", f"seed={seed}"])
    sft_cfg = load_config(_recipe("quickstart-sft.yaml"), [f"out_dir={root / 'sft'}", f"seed={seed}",
                                                           f"init={root / 'pretrain' / 'best'}"])

    threads = _pick_threads()
    pre_cfg.num_threads = sft_cfg.num_threads = threads
    sft_cfg.sample_prompts = []  # the quickstart shows its own samples at the end

    train_all, test, report = load_dataset("builtin", 0.1, seed)
    train_set, dev = split_dev(train_all, DEV_FRACTION, seed)
    report = dict(report) | {"quickstart_split": {"train": len(train_set), "dev": len(dev), "test": len(test)}}
    dropped = ", ".join(f"{n:,} {why}" for why, n in report.get("dropped", {}).items()) or "none"
    print(f"data: built-in corpus (English + Chinese), {report.get('read', 0):,} records read, dropped while "
          f"cleaning: {dropped}; {len(train_set)} training / {len(dev)} dev (early stopping) / {len(test)} "
          "held-out test conversations")
    tok = train_tokenizer(record_texts(train_set), vocab_size=pre_cfg.vocab_size)
    tok.save(str(root / "tokenizer"))
    pre_cfg.tokenizer = str(root / "tokenizer")
    print(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, trained on the training split")

    budget = deadline - time.time() - RESERVE_S
    if budget < 30:
        raise ChatforgeError(f"quickstart: --minutes {minutes} leaves no time to train; give it at least 2")
    pre_cfg.max_time_s = PRETRAIN_SHARE * budget
    print(f"\n== pretraining on every token of the dialogs (up to {pre_cfg.max_time_s:.0f} s)")
    pre = train(pre_cfg, records=(train_set, dev, report))
    sft_cfg.max_time_s = max(deadline - time.time() - RESERVE_S - 5.0, 10.0)
    print(f"\n== SFT on the assistant replies (up to {sft_cfg.max_time_s:.0f} s)")
    sft = train(sft_cfg, records=(train_set, dev, report))

    final = root / "final"
    model = load_model(sft["best_dir"])
    save_model(model, tok, final)
    tok = Tokenizer.load(str(final))
    scores = held_out_scores(load_model(pre["best_dir"]), model, tok, test, pre_cfg.seq_len, sft_cfg.seq_len, seed)

    print("\n== sample replies (greedy)")
    replies = sample_replies(model, tok, PROMPTS, max_new_tokens=40)
    for p, r in zip(PROMPTS, replies):
        print(f"> {p}\n{r.strip()}\n")
    wall = time.time() - t0
    result = {
        "wall_s": wall, "params": pre["params"], "pretrain_tokens_per_s": pre["tokens_per_s"],
        "sft_tokens_per_s": sft["tokens_per_s"], "pretrain_steps": pre["steps"], "sft_steps": sft["steps"],
        "pretrain_epochs": pre["epochs"], "sft_epochs": sft["epochs"],
        **scores, "samples": dict(zip(PROMPTS, replies)), "final_dir": str(final), "threads": threads,
    }
    from chatforge.weights.folder import write_json

    write_json(root / "quickstart.json", result)
    try:
        from chatforge.tools.report import report_command
    except ImportError:
        report_command = None
    if report_command is not None:
        report_command(str(root / "sft"))
    print(f"done in {wall:.0f} s: {pre['params']:,} parameters, pretraining at {pre['tokens_per_s']:,.0f} tokens/s "
          f"({threads} thread{'s' if threads > 1 else ''}), held-out bits per byte {scores['test_bpb_dialog']:.3f}")
    print(f"\nchat with it:  chatforge chat {final}")
    return 0


def held_out_scores(pretrained, final, tok, test: list[dict], pre_len: int, sft_len: int, seed: int) -> dict:
    """Bits per byte on the test split (and on the raw-corpus protocol of the 1.62 reference), printed and returned."""
    import torch

    from chatforge.train.loop import evaluate_loss

    def bpb(model, records, target, seq_len):  # long conversations are scored in pieces: every byte counts
        return evaluate_loss(model, tok, records, seq_len, 16, torch.device("cpu"), "fp32", target=target)

    text, text_final = bpb(pretrained, test, "content", pre_len), bpb(final, test, "content", sft_len)
    reply = bpb(final, test, "assistant", sft_len)
    raw_test, n_dup = raw_protocol_test(seed)
    raw = bpb(pretrained, raw_test, "content", pre_len)
    print("\n== held-out bits per byte of dialog text (each turn's content and its end-of-turn; control tokens "
          "count 0 bytes)")
    print(f"  test split: {len(test)} de-duplicated conversations, never trained on nor used to pick a checkpoint "
          f"({text['bytes']:,} bytes)")
    print(f"    {text['bpb']:.3f} pretrained model, {text_final['bpb']:.3f} final chat model; assistant replies "
          f"alone {reply['bpb']:.3f} (next-token accuracy {reply['acc']:.1%})")
    print(f"    a plain 1M-parameter character-level GPT trained 90 s on the same split: {CHAR_BASELINE_DEDUP:.2f}; "
          f"the PPMd compressor after reading the training text: {PPMD_DEDUP:.2f}")
    print(f"  10% of the raw corpus at random ({len(raw_test)} records, {n_dup} of them copies of training "
          f"records; the protocol of the 1.62 reference): {raw['bpb']:.3f} pretrained model")
    print("    the same character-level GPT: 1.62 (DESIGN.md)")
    return {"test_records": len(test), "test_bytes": text["bytes"], "test_bpb_dialog": text["bpb"],
            "test_bpb_dialog_final": text_final["bpb"], "test_bpb_replies_final": reply["bpb"],
            "test_acc_replies_final": reply["acc"], "raw_protocol_records": len(raw_test),
            "raw_protocol_duplicates": n_dup, "raw_protocol_bpb_dialog": raw["bpb"]}
