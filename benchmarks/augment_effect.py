"""What augmentation buys: fact accuracy on held-out paraphrased questions, LoRA with and without augmented data.

Both runs are configs/shop-smollm2-lora.yaml with the same steps, batch and seed; only the data differs:
- without: examples/shop/conversations.jsonl (200 dialogs);
- with: the same dialogs plus `chatforge augment`'s copies of them (paraphrases of the user turns by the base
  model itself, user noise, slot swaps from examples/shop/slots.json), prepared with the split by source, so the 20
  held-out dialogs and every copy of them stay out of training in both runs.
Prints fact accuracy (EN, ZH, all) for the base model and both runs, what augmentation made, wall times and load.

    python benchmarks/augment_effect.py [--without ADAPTER_DIR] [key=value ...]
      --without: reuse a finished run of the plain recipe (e.g. domain_finetune.py's) instead of training it again
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from domain_finetune import (  # noqa: E402
    CONFIG, FACTS, REPLY_TOKENS, ROOT, cached_before, finetune, general_records, load_text, measure, print_table,
)

SLOTS = ROOT / "examples" / "shop" / "slots.json"
METHODS = ["paraphrase", "noise", "template"]
COPIES = 1  # per method and conversation: the originals stay ~30% of what the same steps see
CANDIDATES = 1  # sampled paraphrases per user turn: generation is the slow part (~310 turns: ~12 min on a loaded 2 cores)


def facts_of(model, tokenizer, facts) -> dict:
    from chatforge.eval.facts import fact_check
    from chatforge.generation.bot import Bot
    from chatforge.generation.engine import Engine

    return fact_check(Bot(model, tokenizer, Engine(model, tokenizer, max_batch_size=16, max_seq_len=512)), facts,
                      REPLY_TOKENS)


def cell(result: dict, lang: str | None) -> str:
    if lang is None:
        return f"{result['accuracy']:.1%} ({result['correct']}/{result['total']})"
    b = result["by_lang"][lang]
    return f"{b['accuracy']:.1%} ({b['correct']}/{b['total']})"


def main(argv: list[str]) -> None:
    from dataclasses import replace

    from chatforge.config import load_config
    from chatforge.data import load_dataset
    from chatforge.eval.facts import read_facts
    from chatforge.generation.bot import Bot
    from chatforge.generation.engine import Engine
    from chatforge.tools.augment import augment, write_augmented
    from chatforge.weights.loader import load

    without_dir = None
    if "--without" in argv:
        i = argv.index("--without")
        without_dir, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    cfg = load_config(str(CONFIG), argv)
    load_start = load_text()
    facts = read_facts(str(FACTS))
    base = load(cfg.init)
    general = general_records(cfg.seed)  # only to reuse (or fill) domain_finetune.py's cache of the base model's figures
    before = cached_before(cfg, FACTS, general, lambda: measure(base.model, base.tokenizer, facts, general))["facts"]

    t0 = time.perf_counter()
    bot = Bot(base.model, base.tokenizer, Engine(base.model, base.tokenizer, max_batch_size=16, max_seq_len=512))
    result = augment(cfg.data, METHODS, COPIES, str(SLOTS), cfg.init, cfg.seed, bot=bot, candidates=CANDIDATES)
    aug_dir = os.path.join(cfg.out_dir + "-data")
    summary_aug = write_augmented(result, aug_dir)
    aug_s = time.perf_counter() - t0
    del base, bot

    if without_dir is None:
        plain_cfg = replace(cfg, out_dir=cfg.out_dir + "-plain")
        plain_summary, plain_wall = finetune(plain_cfg, load_dataset(plain_cfg.data, cfg.val_fraction, cfg.seed))
        without_dir, plain_note = plain_summary["best_dir"], f"{plain_wall:.0f} s, {plain_summary['steps']} steps"
    else:
        plain_note = "reused"
    aug_cfg = replace(cfg, data=aug_dir, out_dir=cfg.out_dir + "-augmented")
    records = load_dataset(aug_dir, cfg.val_fraction, cfg.seed)
    aug_summary, aug_wall = finetune(aug_cfg, records)

    plain = load(without_dir)
    without = facts_of(plain.model, plain.tokenizer, facts)
    del plain
    tuned = load(aug_summary["best_dir"])
    with_aug = facts_of(tuned.model, tuned.tokenizer, facts)

    rows = []
    for lang in list(before["by_lang"]) + [None]:
        acc = [r["accuracy"] if lang is None else r["by_lang"][lang]["accuracy"] for r in (without, with_aug)]
        rows.append((f"fact accuracy, {lang or 'all'}", cell(before, lang),
                     f"{cell(without, lang)}  ->  {cell(with_aug, lang)}  ({(acc[1] - acc[0]) * 100:+.1f} points)"))
    n_orig = sum("meta" not in r for r in records[0])
    rows += [
        ("training dialogs (train split)", "", f"{n_orig} originals  ->  {len(records[0])} with copies "
                                               f"(made: {summary_aug['by_method']})"),
        ("paraphrase filter decisions", "", str(summary_aug.get("paraphrase", {}).get("decisions"))),
        ("augment time (s)", "", f"{aug_s:.0f}"),
        ("training wall time (s)", "", f"without: {plain_note}; with: {aug_wall:.0f} s, {aug_summary['steps']} steps"),
        ("machine load (uptime)", load_start, load_text()),
    ]
    print_table("fact accuracy: base | LoRA without -> with augmentation", rows)
    print(f"\nheld-out questions where augmentation changed the verdict (greedy, at most {REPLY_TOKENS} tokens):")
    for a, b in zip(without["items"], with_aug["items"]):
        if a["ok"] != b["ok"]:
            print(f"\nQ: {a['question']}   (expect {a['expect']})\n  without [{'ok' if a['ok'] else 'no'}]: "
                  f"{a['reply']!r}\n  with    [{'ok' if b['ok'] else 'no'}]: {b['reply']!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
