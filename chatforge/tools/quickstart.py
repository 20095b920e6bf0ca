"""`chatforge quickstart`: a small chat model from the built-in corpus in minutes, with honest numbers.

The built-in corpus (chitchat's English open-domain conversations, ~11.6M characters after cleaning, plus
chatterbot's English and Chinese dialogs) is split three ways: the data layer's standard validation split is the
held-out test set, never trained on nor used to choose anything; a slice of the training split is the dev set that
early stopping and best-checkpoint selection look at; the rest trains the tokenizer and the model. Chinese is ~0.1%
of the text, so its training conversations are repeated ZH_WEIGHT times, and every held-out figure is also given per
language. Then: tokenizer -> pretraining on every token of the dialogs -> SFT on the assistant replies
(configs/quickstart-pretrain.yaml and configs/quickstart-sft.yaml hold the recipes; they also run as they are with
`chatforge train --config`). The recipes' token and step budgets drive the schedules, scaled to --minutes; the
wall-clock caps only stop a slower machine early, so a seeded quickstart trains the same model twice.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError

RECIPES = Path(__file__).resolve().parent.parent / "configs"  # shipped in the package; configs/ at the root links here
CORPUS = "builtin"  # chitchat (English) + chatterbot English and Chinese
ZH_WEIGHT = 8  # each Chinese training conversation is seen this many times per epoch (~10k of ~10.6M characters)
PROMPTS = ["Hello, how are you?", "What do you like to do on weekends?", "Tell me about your favourite food.",
           "What did you do today?", "Do you have any pets?", "What kind of music do you like?",
           "I just got back from a trip to the beach.", "What are you going to do this evening?", "你好", "你喜欢什么？"]
# How the sample replies are decoded; saved in final/generation_config.json, so `chatforge chat` and `load()` use them
# too. Greedy decoding of a 1M-parameter model gives one reply to every prompt ("I'm not a lot of the world."); 0.7
# makes up words ("anour of crare"); 0.5 with nucleus sampling and a light repetition penalty was the best of six
# settings tried on the same model (EXPERIMENTS.md).
DECODING = {"temperature": 0.5, "top_p": 0.9, "repetition_penalty": 1.1}
REPLY_TOKENS = 40
PIECE_MESSAGES = 16  # conversations are trained and scored in pieces of this many messages (see pieces)
MINUTES = 9.0  # the budget the recipes' max_tokens / max_steps are written for; other --minutes scale them
DEV_FRACTION = 0.03  # ~145 conversations, ~320 KB: plenty for early stopping; the rest trains
RESERVE_S = 100.0  # held back for the final evaluation (~1 MB of test text: ~80 s on 2 busy cores), samples, report
PRETRAIN_SHARE = 0.7  # of the training time; SFT gets the rest
# The plain character-level GPT (4 layers, 128 wide, ~0.8M parameters, fp32, batch 12x64, AdamW 1e-3) trained for the
# quickstart's whole wall time on the same split (seed 0), measured back to back with it (2026-12-02, 1 thread, load
# average 6.3 on the 2 cores): benchmarks/char_baseline.py --quickstart (EXPERIMENTS.md).
CHAR_BASELINE = {"all": 2.936, "english": 2.931, "chinese": 4.295, "wall_s": 546}


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
    from chatforge.weights.folder import load_model, save_model, write_json

    t0 = time.time()
    deadline = t0 + 60.0 * minutes
    emit = on_event or (lambda event: None)
    root = _fresh_folder(Path(out), overwrite)
    pre_cfg, sft_cfg, threads = _configs(root, seed, minutes, emit)
    train_set, dev, test, report, tok = _data_and_tokenizer(root, pre_cfg, seed, emit)
    budget = deadline - time.time() - RESERVE_S
    if budget < 30:
        raise ChatforgeError(f"quickstart: --minutes {minutes} leaves no time to train; give it at least 2")
    pre_cfg.max_time_s = max(PRETRAIN_SHARE * budget - 30.0, 10.0)  # each stage also encodes its data first
    emit(Said(f"\n== pretraining on every token of the dialogs ({pre_cfg.max_tokens:,} tokens, stopped at "
              f"{pre_cfg.max_time_s:.0f} s on a slower machine)"))
    pre = train(pre_cfg, records=(train_set, dev, report), on_event=emit)
    sft_cfg.max_time_s = max(deadline - time.time() - RESERVE_S - (pre["wall_s"] - pre["train_s"]), 10.0)
    emit(Said(f"\n== SFT on the assistant replies ({sft_cfg.max_steps:,} steps, stopped at {sft_cfg.max_time_s:.0f} s "
              "on a slower machine)"))
    sft = train(sft_cfg, records=(train_set, dev, report), on_event=emit)

    final = root / "final"
    model = load_model(sft["best_dir"])
    save_model(model, tok, final, generation_config=DECODING)
    tok = Tokenizer.load(str(final))
    scores = held_out_scores(model, tok, test, sft_cfg.seq_len)
    replies = sample_replies(str(final), PROMPTS, seed)
    result = {
        "wall_s": time.time() - t0, "params": pre["params"], "pretrain_tokens_per_s": pre["tokens_per_s"],
        "sft_tokens_per_s": sft["tokens_per_s"], "pretrain_steps": pre["steps"], "sft_steps": sft["steps"],
        "pretrain_tokens": pre["tokens"], "sft_tokens": sft["tokens"], "pretrain_epochs": pre["epochs"],
        "sft_epochs": sft["epochs"], "pretrain_stop": pre["stop_reason"], "sft_stop": sft["stop_reason"],
        "pretrain_dev_bpb": pre["val_bpb"],
        **scores, "decoding": DECODING, "samples": dict(zip(PROMPTS, replies)), "final_dir": str(final),
        "threads": threads, "seed": seed,
    }
    write_json(root / "quickstart.json", result)
    from chatforge.tools.report import write_report

    write_report(root / "sft")
    return result


def sample_replies(folder: str, prompts: list[str], seed: int) -> list[str]:
    """Replies of the saved chat model to single-turn prompts, decoded as `chatforge chat` and `load()` decode it
    (the folder's generation_config.json: DECODING); prompt i samples with seed + i, reproducible one by one (one
    seed for all would draw the same random numbers for each and start every reply alike)."""
    from chatforge.generation.bot import Bot

    bot = Bot.load(folder, max_batch_size=1)
    return [bot.chat([{"role": "user", "content": p}], max_new_tokens=REPLY_TOKENS, seed=seed + i)
            for i, p in enumerate(prompts)]


def _fresh_folder(root: Path, overwrite: bool) -> Path:
    parts = [root / p for p in ("tokenizer", "pretrain", "sft", "final", "quickstart.json")]
    if any(p.exists() for p in parts):
        if not overwrite:
            raise ChatforgeError(f"{root}: holds an earlier quickstart; pass --overwrite or choose another --out")
        for p in parts:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _configs(root: Path, seed: int, minutes: float, emit) -> tuple:
    """The two recipes with this quickstart's folders, seed and threads, their budgets scaled to `minutes`."""
    from chatforge.config import load_config

    pre_cfg = load_config(_recipe("quickstart-pretrain.yaml"), values={"out_dir": str(root / "pretrain"), "seed": seed})
    sft_cfg = load_config(_recipe("quickstart-sft.yaml"), values={"out_dir": str(root / "sft"), "seed": seed,
                                                                  "init": str(root / "pretrain" / "best")})
    threads, note = _pick_threads()
    if note:
        emit(Said(note))
    pre_cfg.num_threads = sft_cfg.num_threads = threads
    scale = minutes / MINUTES
    pre_cfg.max_tokens = max(round(pre_cfg.max_tokens * scale), pre_cfg.batch_size * pre_cfg.seq_len)
    sft_cfg.max_steps = max(round(sft_cfg.max_steps * scale), 1)
    sft_cfg.sample_prompts = []  # the quickstart shows its own samples at the end
    return pre_cfg, sft_cfg, threads


def _data_and_tokenizer(root: Path, pre_cfg, seed: int, emit) -> tuple:
    """(train, dev, test, report, tokenizer): the three-way split and a tokenizer trained on the training part."""
    from chatforge.data import load_dataset
    from chatforge.tokenizer import record_texts, train_tokenizer

    train_all, test, report = load_dataset(CORPUS, 0.1, seed)
    train_set, dev = split_dev(train_all, DEV_FRACTION, seed)
    tok = train_tokenizer(record_texts(train_set), vocab_size=pre_cfg.vocab_size)
    n_train, n_dev = len(train_set), len(dev)
    train_set, n_chinese = weight_chinese(train_set)  # the tokenizer saw each conversation once
    # rows hold 256 tokens: pieces of 16 messages lose little context, make encoding linear in a dialog's length, and
    # give SFT (which truncates to a row) every part of a long conversation instead of its first turns only
    train_set, dev = [x for r in train_set for x in pieces(r)], [x for r in dev for x in pieces(r)]
    report = dict(report) | {"quickstart_split": {"train": n_train, "train_chinese": n_chinese,
                                                  "chinese_weight": ZH_WEIGHT, "dev": n_dev, "test": len(test)}}
    dropped = ", ".join(f"{n:,} {why}" for why, n in report.get("dropped", {}).items()) or "none"
    languages = ", ".join(f"{lang} {v['records']:,} conversations / {v['characters']:,} characters"
                          for lang, v in report.get("languages", {}).items())
    emit(Said(f"data: built-in corpus (chitchat + chatterbot), {report.get('read', 0):,} records read, dropped while "
              f"cleaning: {dropped}; kept {languages}"))
    emit(Said(f"split: {n_train:,} training (Chinese: {n_chinese}, each seen "
              f"{ZH_WEIGHT}x per epoch) / {n_dev} dev (early stopping) / {len(test)} held-out test conversations; "
              f"trained in {len(train_set):,} pieces of up to {PIECE_MESSAGES} messages"))
    tok.save(str(root / "tokenizer"))
    pre_cfg.tokenizer = str(root / "tokenizer")
    emit(Said(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, trained on the training split"))
    return train_set, dev, test, report, tok


def is_chinese(record: dict) -> bool:
    from chatforge.data.report import script_language

    return any(script_language(m["content"]) == "chinese" for m in record["messages"])


def weight_chinese(records: list[dict], weight: int = ZH_WEIGHT) -> tuple[list[dict], int]:
    """(records with each Chinese conversation `weight` times, how many are Chinese): Chinese is ~0.1% of the
    built-in text, so unweighted the model would see a Chinese turn about once a minute."""
    chinese = [r for r in records if is_chinese(r)]
    return records + chinese * (weight - 1), len(chinese)


def held_out_scores(model, tok, test: list[dict], seq_len: int) -> dict:
    """Bits per byte of the chat model on the test split's dialog text, per language (English, Chinese) and overall
    (their byte-weighted mean: one pass over the text). bf16 autocast as in training: ~2x faster than fp32 here."""
    import torch

    from chatforge.train.loss import evaluate_loss

    def bpb(records, target):  # long conversations are scored in pieces: every byte counts
        return evaluate_loss(model, tok, records, seq_len, 16, torch.device("cpu"), "auto", target=target)

    out: dict = {"test_records": len(test)}
    total_bits = total_bytes = 0.0
    for language, records in (("english", [r for r in test if not is_chinese(r)]),
                              ("chinese", [r for r in test if is_chinese(r)])):
        if records:
            e = bpb([piece for r in records for piece in pieces(r)], "content")
            out |= {f"test_records_{language}": len(records), f"test_bytes_{language}": e["bytes"],
                    f"test_bpb_{language}": e["bpb"]}
            total_bits, total_bytes = total_bits + e["bpb"] * e["bytes"], total_bytes + e["bytes"]
    return out | {"test_bytes": int(total_bytes), "test_bpb": total_bits / total_bytes}


def pieces(record: dict, n: int = PIECE_MESSAGES) -> list[dict]:
    """A conversation as consecutive pieces of n messages (n even: each piece starts with the same role). Encoding
    locates every turn by rendering the conversation's prefixes, quadratic in its length and cubic for the content
    scores (chitchat has dialogs of 380 turns: 17 s each); rows hold 256 tokens, ~6 turns, so pieces of 16 lose little
    context."""
    messages = record["messages"]
    return [record | {"messages": messages[i:i + n]} for i in range(0, len(messages), n)] if messages else [record]


def format_scores(r: dict) -> list[str]:
    """The held-out lines the quickstart prints, from its result, beside the character-level GPT's."""
    def figure(key: str) -> str:
        return f"{r[key]:.3f}" if r.get(key) is not None else "-"

    def char(key: str) -> str:
        return f"{CHAR_BASELINE[key]:.3f}" if CHAR_BASELINE.get(key) is not None else "not measured"

    ratio = (f" ({r['test_bpb'] / CHAR_BASELINE['all']:.2f}x the character-level GPT's)"
             if CHAR_BASELINE.get("all") else "")
    return [
        "\n== held-out bits per byte of dialog text (each turn's content and its end-of-turn; control tokens count "
        "0 bytes)",
        f"  test split: {r['test_records']} de-duplicated conversations ({r['test_bytes']:,} bytes), never trained on "
        "nor used to pick a checkpoint",
        f"    chat model: {r['test_bpb']:.3f}{ratio}; English {figure('test_bpb_english')} "
        f"({r.get('test_records_english', 0)} conversations), Chinese {figure('test_bpb_chinese')} "
        f"({r.get('test_records_chinese', 0)}); the pretrained stage on the dev split {figure('pretrain_dev_bpb')}",
        f"    a plain character-level GPT trained for the quickstart's wall time "
        f"({CHAR_BASELINE['wall_s'] or 0:.0f} s) on the same split: {char('all')}; English {char('english')}, "
        f"Chinese {char('chinese')} (benchmarks/char_baseline.py --quickstart; seed 0)",
    ]
