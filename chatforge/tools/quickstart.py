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
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError

RECIPES = Path(__file__).resolve().parent.parent / "configs"  # shipped in the package; configs/ at the root links here
CORPUS = "builtin:chatterbot"  # English + Chinese dialogs; plain "builtin" adds the much larger chitchat set
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


def _pick_threads() -> tuple[int, str | None]:
    """(threads, a note): all cores, unless the machine is already busier than its core count: then torch's OpenMP
    threads wait for each other at every barrier while descheduled, and one thread trains several times faster."""
    import os

    import torch

    cores = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load >= (os.cpu_count() or cores):
        return 1, (f"note: the machine is busy (load {load:.1f} on {os.cpu_count()} cores): training with 1 thread; "
                   "timings will be slower than on an idle machine")
    return cores, None


def raw_protocol_test(seed: int) -> tuple[list[dict], int]:
    """10% of the raw corpus' records at random, duplicates kept: how the 1.62 character-level figure was measured.

    The raw corpus repeats itself (english/tech_support alone holds 1,040 copies of 10 dialogs), so many of these
    "held-out" records also sit in the training data; returns (records, how many duplicate a training record).
    """
    import numpy as np

    from chatforge.data.builtin import load_builtin

    raw = load_builtin(CORPUS)
    order = np.random.default_rng(seed).permutation(len(raw))
    n = len(raw) // 10
    test, rest = [raw[i] for i in order[:n]], [raw[i] for i in order[n:]]
    seen = {json.dumps(r, sort_keys=True) for r in rest}
    return test, sum(json.dumps(r, sort_keys=True) in seen for r in test)


@dataclass
class Said:
    """A line of the quickstart's own story (data, tokenizer, the stage that starts), for the command to print."""

    text: str


def quickstart(out: str = "runs/quickstart", minutes: float = 9.0, overwrite: bool = False, seed: int = 0,
               on_event=None) -> dict:
    """Tokenizer, pretraining and SFT on the built-in corpus within `minutes`; returns quickstart.json's content
    (held-out scores, samples, speeds). on_event hears Said lines and each stage's training events."""
    from chatforge.tokenizer import Tokenizer
    from chatforge.train.loop import train
    from chatforge.train.run import sample_replies
    from chatforge.weights.folder import load_model, save_model, write_json

    t0 = time.time()
    deadline = t0 + 60.0 * minutes
    emit = on_event or (lambda event: None)
    root = _fresh_folder(Path(out), overwrite)
    pre_cfg, sft_cfg, threads = _configs(root, seed, emit)
    train_set, dev, test, report, tok = _data_and_tokenizer(root, pre_cfg, seed, emit)
    budget = deadline - time.time() - RESERVE_S
    if budget < 30:
        raise ChatforgeError(f"quickstart: --minutes {minutes} leaves no time to train; give it at least 2")
    pre_cfg.max_time_s = PRETRAIN_SHARE * budget
    emit(Said(f"\n== pretraining on every token of the dialogs (up to {pre_cfg.max_time_s:.0f} s)"))
    pre = train(pre_cfg, records=(train_set, dev, report), on_event=emit)
    sft_cfg.max_time_s = max(deadline - time.time() - RESERVE_S - 5.0, 10.0)
    emit(Said(f"\n== SFT on the assistant replies (up to {sft_cfg.max_time_s:.0f} s)"))
    sft = train(sft_cfg, records=(train_set, dev, report), on_event=emit)

    final = root / "final"
    model = load_model(sft["best_dir"])
    save_model(model, tok, final)
    tok = Tokenizer.load(str(final))
    scores = held_out_scores(load_model(pre["best_dir"]), model, tok, test, pre_cfg.seq_len, sft_cfg.seq_len, seed)
    replies = sample_replies(model, tok, PROMPTS, max_new_tokens=40)
    result = {
        "wall_s": time.time() - t0, "params": pre["params"], "pretrain_tokens_per_s": pre["tokens_per_s"],
        "sft_tokens_per_s": sft["tokens_per_s"], "pretrain_steps": pre["steps"], "sft_steps": sft["steps"],
        "pretrain_epochs": pre["epochs"], "sft_epochs": sft["epochs"],
        **scores, "samples": dict(zip(PROMPTS, replies)), "final_dir": str(final), "threads": threads,
    }
    write_json(root / "quickstart.json", result)
    from chatforge.tools.report import write_report

    write_report(root / "sft")
    return result


def _fresh_folder(root: Path, overwrite: bool) -> Path:
    parts = [root / p for p in ("tokenizer", "pretrain", "sft", "final", "quickstart.json")]
    if any(p.exists() for p in parts):
        if not overwrite:
            raise ChatforgeError(f"{root}: holds an earlier quickstart; pass --overwrite or choose another --out")
        for p in parts:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _configs(root: Path, seed: int, emit) -> tuple:
    """The two recipes with this quickstart's folders, seed and threads."""
    from chatforge.config import load_config

    pre_cfg = load_config(_recipe("quickstart-pretrain.yaml"), values={"out_dir": str(root / "pretrain"), "seed": seed})
    sft_cfg = load_config(_recipe("quickstart-sft.yaml"), values={"out_dir": str(root / "sft"), "seed": seed,
                                                                  "init": str(root / "pretrain" / "best")})
    threads, note = _pick_threads()
    if note:
        emit(Said(note))
    pre_cfg.num_threads = sft_cfg.num_threads = threads
    sft_cfg.sample_prompts = []  # the quickstart shows its own samples at the end
    return pre_cfg, sft_cfg, threads


def _data_and_tokenizer(root: Path, pre_cfg, seed: int, emit) -> tuple:
    """(train, dev, test, report, tokenizer): the three-way split and a tokenizer trained on the training part."""
    from chatforge.data import load_dataset
    from chatforge.tokenizer import record_texts, train_tokenizer

    train_all, test, report = load_dataset(CORPUS, 0.1, seed)
    train_set, dev = split_dev(train_all, DEV_FRACTION, seed)
    report = dict(report) | {"quickstart_split": {"train": len(train_set), "dev": len(dev), "test": len(test)}}
    dropped = ", ".join(f"{n:,} {why}" for why, n in report.get("dropped", {}).items()) or "none"
    emit(Said(f"data: built-in corpus (English + Chinese), {report.get('read', 0):,} records read, dropped while "
              f"cleaning: {dropped}; {len(train_set)} training / {len(dev)} dev (early stopping) / {len(test)} "
              "held-out test conversations"))
    tok = train_tokenizer(record_texts(train_set), vocab_size=pre_cfg.vocab_size)
    tok.save(str(root / "tokenizer"))
    pre_cfg.tokenizer = str(root / "tokenizer")
    emit(Said(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, trained on the training split"))
    return train_set, dev, test, report, tok


def held_out_scores(pretrained, final, tok, test: list[dict], pre_len: int, sft_len: int, seed: int) -> dict:
    """Bits per byte on the test split (and on the raw-corpus protocol of the 1.62 reference)."""
    import torch

    from chatforge.train.loss import evaluate_loss

    def bpb(model, records, target, seq_len):  # long conversations are scored in pieces: every byte counts
        return evaluate_loss(model, tok, records, seq_len, 16, torch.device("cpu"), "fp32", target=target)

    text, text_final = bpb(pretrained, test, "content", pre_len), bpb(final, test, "content", sft_len)
    reply = bpb(final, test, "assistant", sft_len)
    raw_test, n_dup = raw_protocol_test(seed)
    raw = bpb(pretrained, raw_test, "content", pre_len)
    return {"test_records": len(test), "test_bytes": text["bytes"], "test_bpb_dialog": text["bpb"],
            "test_bpb_dialog_final": text_final["bpb"], "test_bpb_replies_final": reply["bpb"],
            "test_acc_replies_final": reply["acc"], "raw_protocol_records": len(raw_test),
            "raw_protocol_duplicates": n_dup, "raw_protocol_bpb_dialog": raw["bpb"]}


def format_scores(r: dict) -> list[str]:
    """The held-out lines the quickstart prints, from its result."""
    return [
        "\n== held-out bits per byte of dialog text (each turn's content and its end-of-turn; control tokens count "
        "0 bytes)",
        f"  test split: {r['test_records']} de-duplicated conversations, never trained on nor used to pick a "
        f"checkpoint ({r['test_bytes']:,} bytes)",
        f"    {r['test_bpb_dialog']:.3f} pretrained model, {r['test_bpb_dialog_final']:.3f} final chat model; "
        f"assistant replies alone {r['test_bpb_replies_final']:.3f} (next-token accuracy "
        f"{r['test_acc_replies_final']:.1%})",
        f"    a plain 1M-parameter character-level GPT trained 90 s on the same split: {CHAR_BASELINE_DEDUP:.2f}; "
        f"the PPMd compressor after reading the training text: {PPMD_DEDUP:.2f}",
        f"  10% of the raw corpus at random ({r['raw_protocol_records']} records, {r['raw_protocol_duplicates']} of "
        f"them copies of training records; the protocol of the 1.62 reference): {r['raw_protocol_bpb_dialog']:.3f} "
        "pretrained model",
        "    the same character-level GPT: 1.62 (ARCHITECTURE.md; benchmarks/char_baseline.py)",
    ]
