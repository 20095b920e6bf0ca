"""Domain fine-tuning of SmolLM2-135M-Instruct with LoRA: does it learn a shop's facts, and what does it forget?

Runs configs/shop-smollm2-lora.yaml (examples/shop: 150 EN+ZH customer-service dialogs of a fictional tea shop)
through the one training loop and prints, before and after, as a table:
- fact accuracy on the held-out paraphrased questions of examples/shop/facts.jsonl (greedy replies, a fact counts
  when the reply holds every expected string; eval/facts.py), English and Chinese separately;
- loss on general held-out dialogs: a fixed sample of chitchat's validation split (builtin:chitchat, seed 0), the
  assistant replies scored as SFT trains them — how much of its everyday conversation the model forgets;
- training wall time and the machine's load (the machine is shared: `uptime` load beside every figure);
then a few before/after replies, unedited. The base model's figures are kept in OUT_DIR-before.json (keyed by the
base, the fact file's hash and the sample) and reused: on a loaded 2 cores they cost ~10 minutes. The recipe's replay
dialogs (chitchat's train split) are checked to share no dialog with the scored general sample.

    python benchmarks/domain_finetune.py [key=value ...]      # config overrides, e.g. max_steps=20
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "shop-smollm2-lora.yaml"
FACTS = ROOT / "examples" / "shop" / "facts.jsonl"
GENERAL = "builtin:chitchat"
GENERAL_SAMPLE = 40  # conversations of chitchat's validation split, a fixed seeded sample
REPLY_TOKENS = 64
SHOWN = 6  # before/after replies printed


def general_records(seed: int = 0, n: int = GENERAL_SAMPLE) -> list[dict]:
    """A fixed sample of chitchat's validation split as the run's seed splits it: replay draws from the train split
    of the same split, so the two stay apart."""
    from chatforge.data import load_dataset
    from chatforge.eval.evaluate import pick_records

    _, val, _ = load_dataset(GENERAL, 0.1, seed)
    return pick_records(val, n, 0)


def check_replay_apart(cfg, records: tuple, general: list[dict]) -> None:
    """The recipe's replay dialogs come from chitchat's train split: none may be (the start of) a scored dialog."""
    if cfg.replay is None:
        return
    from chatforge.data.replay import replay_pool

    pool, _, _ = replay_pool(records[0], records[2], cfg.replay, cfg.seed)
    scored = [r["messages"] for r in general]
    shared = [r for r in pool if any(m[:len(r["messages"])] == r["messages"] for m in scored)]
    if shared:
        raise SystemExit(f"{len(shared)} replay dialogs are also scored as general held-out dialogs")


def cached_before(cfg, facts_path: Path, general: list[dict], compute) -> dict:
    """The base model's figures, kept beside the run: they depend only on the base, the fact file and the sample."""
    import hashlib
    import json

    from chatforge.io import atomic_write_text

    key = {"init": cfg.init, "facts": hashlib.sha256(facts_path.read_bytes()).hexdigest(), "general": len(general),
           "general_seed": cfg.seed, "reply_tokens": REPLY_TOKENS}
    path = Path(cfg.out_dir + "-before.json")
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["before"]
    before = compute()
    atomic_write_text(path, json.dumps({"key": key, "before": before}, ensure_ascii=False))
    return before


def measure(model, tokenizer, facts: list[dict], general: list[dict]) -> dict:
    """Fact check (greedy, batched through the engine) and general held-out loss (fp32) of one model."""
    from chatforge.eval.facts import fact_check
    from chatforge.generation.bot import Bot
    from chatforge.generation.engine import Engine
    from chatforge.train.loss import evaluate_loss

    bot = Bot(model, tokenizer, Engine(model, tokenizer, max_batch_size=16, max_seq_len=512))
    t0 = time.perf_counter()
    result = fact_check(bot, facts, REPLY_TOKENS)
    fact_s = time.perf_counter() - t0
    loss = evaluate_loss(model, tokenizer, general, 512, 8, dtype="fp32")["loss"]
    return {"facts": result, "general_loss": loss, "fact_s": fact_s}


def finetune(cfg, records: tuple) -> tuple[dict, float]:
    from chatforge.train.loop import train

    t0 = time.perf_counter()
    summary = train(cfg, records=records)
    return summary, time.perf_counter() - t0


def load_tuned(summary: dict):
    from chatforge.weights.loader import load

    return load(summary["best_dir"])  # the adapter as users load it: on its base, merged


def fact_cells(m: dict) -> dict[str, str]:
    by = m["facts"]["by_lang"]
    return {lang: f"{b['accuracy']:.1%} ({b['correct']}/{b['total']})" for lang, b in by.items()}


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    w1 = max(10, *(len(r[1]) for r in rows))
    print(f"\n{title:<{width}} | {'before':>{w1}} | after")
    print(f"{'-' * width}-|-{'-' * w1}-|-{'-' * 30}")
    for name, before, after in rows:
        print(f"{name:<{width}} | {before:>{w1}} | {after}")


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min), {os.cpu_count()} CPUs"


def main(argv: list[str]) -> None:
    import json

    import torch

    from chatforge.config import load_config
    from chatforge.data import load_dataset
    from chatforge.eval.facts import read_facts
    from chatforge.io import atomic_write_text
    from chatforge.weights.loader import load

    cfg = load_config(str(CONFIG), argv)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    load_start = load_text()
    records = load_dataset(cfg.data, cfg.val_fraction, cfg.seed)
    facts = read_facts(str(FACTS))
    general = general_records(cfg.seed)
    replay = (f"; replay: {cfg.replay.share:.0%} of training records from {cfg.replay.data}'s train split"
              if cfg.replay else "")
    print(f"data: {cfg.data}: {len(records[0])} train, {len(records[1])} held out{replay}; fact checks: "
          f"{len(facts)} ({FACTS.relative_to(ROOT)}); general: {len(general)} dialogs of {GENERAL}'s validation split")

    check_replay_apart(cfg, records, general)

    def measure_base() -> dict:
        base = load(cfg.init)
        return measure(base.model, base.tokenizer, facts, general)

    before = cached_before(cfg, FACTS, general, measure_base)
    summary, wall = finetune(cfg, records)
    tuned = load_tuned(summary)
    after = measure(tuned.model, tuned.tokenizer, facts, general)
    atomic_write_text(Path(cfg.out_dir) / "fact_check.json", json.dumps(after["facts"], ensure_ascii=False, indent=1))

    fb, fa = fact_cells(before), fact_cells(after)
    ratio = after["general_loss"] / before["general_loss"]
    rows = [(f"fact accuracy, {lang} (held-out paraphrases)", fb[lang], fa[lang]) for lang in fb]
    rows += [
        ("fact accuracy, all", f"{before['facts']['accuracy']:.1%}", f"{after['facts']['accuracy']:.1%}"),
        (f"general held-out loss ({len(general)} chitchat dialogs, fp32)", f"{before['general_loss']:.4f}",
         f"{after['general_loss']:.4f} ({ratio - 1:+.1%})"),
        ("training wall time (s)", "", f"{wall:.0f} ({summary['steps']} steps, stop: {summary['stop_reason']}, "
                                       f"{summary['tokens_per_s']:,.0f} tokens/s)"),
        ("trainable / total parameters", "", f"{summary['trainable_params']:,} / {summary['params']:,}"),
        ("machine load (uptime)", load_start, load_text()),
    ]
    print_table("LoRA on the shop dialogs, SmolLM2-135M-Instruct", rows)
    print(f"\nheld-out questions, greedy, at most {REPLY_TOKENS} tokens (unedited):")
    items_b, items_a = before["facts"]["items"], after["facts"]["items"]
    half = len(items_b) // 2
    for i in list(range(SHOWN // 2)) + list(range(half, half + SHOWN // 2)):
        b, a = items_b[i], items_a[i]
        print(f"\nQ: {b['question']}   (expect {b['expect']})\n  before [{'ok' if b['ok'] else 'no'}]: {b['reply']!r}"
              f"\n  after  [{'ok' if a['ok'] else 'no'}]: {a['reply']!r}")
    print(f"\nadapter: {summary['best_dir']} (chatforge chat {summary['best_dir']}); every held-out question and "
          f"reply: {cfg.out_dir}/fact_check.json")


if __name__ == "__main__":
    main(sys.argv[1:])
