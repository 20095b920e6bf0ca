"""`chatforge augment DATA --out DIR`: more training conversations from the ones a user has.

Methods (data/augment.py has the model-free ones and the rules): paraphrase (user turns reworded by a pretrained
chat model through the one loader and Bot, filtered: not empty, not identical, same language, not too long), noise
(typos, casing, punctuation, full/half width) and template (slot values swapped, with --slots). DIR gets:
- original.jsonl: the input conversations as read (prepare reads DIR as one dataset: originals + copies);
- augmented.jsonl: the generated conversations, each with {"meta": {method, source, source_id}};
- .augment.json (hidden, so prepare does not read it as data): what each method made and why paraphrases were rejected.
`prepare DIR` (and training on `data: DIR`) then de-duplicates copies against the originals and splits by source.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter

from chatforge.data.augment import (
    METHODS, keep_paraphrase, method_counts, noise_copies, paraphrase_copies, read_slots, template_copies,
)
from chatforge.data.prepare import PrepareOptions, resolve_inputs
from chatforge.data.report import Report, script_language
from chatforge.data.sources import read_sources
from chatforge.errors import ChatforgeError
from chatforge.io import atomic_write_text

SUMMARY = ".augment.json"
PROMPTS = {  # the instruction a chat model gets, per script of the question
    "en": "Rewrite this customer question in different words, keeping its meaning. Reply with the new question "
          "only.\n\nQuestion: {q}",
    "zh": "请用不同的说法改写下面这个顾客问题，意思保持不变。只回复改写后的问题。\n\n问题：{q}",
}


def read_conversations(data: str | list[str]) -> list[tuple[str, dict]]:
    """(location, record) of every conversation of DATA, as read and validated (not cleaned: a copy's source id is
    the hash of its source as read, which prepare computes the same way)."""
    report = Report()
    sources = resolve_inputs([data] if isinstance(data, str) else list(data), PrepareOptions(), report)
    return [(i.location, i.record) for i in read_sources(sources, report) if "messages" in i.record]


def paraphrases(bot, texts: list[str], n: int, seed: int, max_new_tokens: int = 48,
                temperature: float = 0.9) -> tuple[dict[str, list[str]], Counter]:
    """Up to n kept paraphrases per text (sampled, seeded) and the count of each filter decision."""
    prompts = [[{"role": "user", "content": PROMPTS["zh" if script_language(t) == "chinese" else "en"].format(q=t)}]
               for t in texts]
    kept: dict[str, list[str]] = {t: [] for t in texts}
    decisions: Counter = Counter()
    for k in range(n):
        replies = bot.chat_batch(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95,
                                 seed=seed + k)
        for text, reply in zip(texts, replies):
            para, why = keep_paraphrase(text, reply)
            if para is not None and para in kept[text]:
                para, why = None, "repeated"
            decisions[why] += 1
            if para is not None:
                kept[text].append(para)
    return kept, decisions


def augment(data: str | list[str], methods: list[str], copies: int = 2, slots: str | None = None,
            model: str | None = None, seed: int = 0, bot=None, candidates: int = 4) -> dict:
    """{"original": [...], "augmented": [...], "summary": {...}}; `bot` (or `model`, loaded here) for paraphrase."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ChatforgeError(f"augment: unknown method {unknown[0]!r}; expected {', '.join(METHODS)}")
    if copies < 1:
        raise ChatforgeError(f"augment: --copies must be at least 1, got {copies}")
    if "template" in methods and not slots:
        raise ChatforgeError("augment: the template method needs --slots FILE (a JSON of slot -> values)")
    conversations = read_conversations(data)
    if not conversations:
        raise ChatforgeError(f"{data}: no conversations to augment")
    slot_table = read_slots(slots) if slots else None
    summary: dict = {"inputs": data, "methods": list(methods), "copies": copies, "seed": seed,
                     "conversations": len(conversations)}
    table = None
    if "paraphrase" in methods:
        if bot is None:
            from chatforge.generation.bot import Bot

            if not model:
                raise ChatforgeError("augment: the paraphrase method needs --model (e.g. smollm2-135m-instruct)")
            bot = Bot.load(model, max_batch_size=16)
        texts = sorted({m["content"] for _, r in conversations for m in r["messages"] if m["role"] == "user"})
        table, decisions = paraphrases(bot, texts, candidates, seed)
        summary["paraphrase"] = {"model": model, "user_turns": len(texts), "candidates": candidates,
                                 "decisions": dict(sorted(decisions.items()))}
    out: list[dict] = []
    for method in methods:
        rng = random.Random(f"{seed}:{method}")
        for location, record in conversations:
            if method == "noise":
                out += noise_copies(record, location, copies, rng)
            elif method == "template":
                out += template_copies(record, location, slot_table, copies, rng)
            else:
                out += paraphrase_copies(record, location, table, copies, rng)
    summary["augmented"] = len(out)
    summary["by_method"] = method_counts(out)
    return {"original": [r for _, r in conversations], "augmented": out, "summary": summary}


def write_augmented(result: dict, out: str) -> dict:
    """DIR/original.jsonl, DIR/augmented.jsonl and DIR/.augment.json (written last: its presence says all three
    belong together)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ChatforgeError(f"{out}: exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    for name in ("original", "augmented"):
        atomic_write_text(os.path.join(out, f"{name}.jsonl"),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result[name]))
    atomic_write_text(os.path.join(out, SUMMARY),
                      json.dumps(result["summary"], indent=2, ensure_ascii=False) + "\n")
    return result["summary"]
