"""`chatforge augment`: flags -> chatforge.tools.augment -> the files in DIR and a summary, printed."""

from __future__ import annotations

import os


def augment_command(data: str, *, out: str, methods: str = "paraphrase,noise", copies: int = 2,
                    slots: str | None = None, model: str | None = "smollm2-135m-instruct", seed: int = 0) -> int:
    """Make more training conversations: paraphrased user turns, user noise, slot values swapped.

    DIR then holds original.jsonl (the input as read) and augmented.jsonl (each copy with its source and method in
    "meta"); train on DIR or `chatforge prepare DIR`: copies are de-duplicated against the originals, and a copy of
    a held-out conversation never enters training.

    Args:
        data: conversations to augment (a file, a folder or a builtin spec, as for prepare).
        out: the output folder.
        methods: comma list of paraphrase (a chat model rewords user turns), noise (typos, casing, punctuation,
            full/half width) and template (slot values swapped; needs --slots).
        copies: copies per conversation and method, at most.
        slots: a JSON file of interchangeable values, {"slot": ["value", ...]}, for the template method.
        model: the chat model that paraphrases (a known name, model folder or adapter; loaded offline).
        seed: the same seed makes the same copies.
    """
    from chatforge.tools.augment import augment, write_augmented

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    summary = write_augmented(augment(data, chosen, copies, slots, model, seed), out)
    print(f"{summary['conversations']:,} conversations -> {summary['augmented']:,} augmented copies "
          f"({', '.join(f'{m} {n:,}' for m, n in summary['by_method'].items()) or 'none'})")
    if "paraphrase" in summary:
        p = summary["paraphrase"]
        print(f"paraphrases of {p['user_turns']:,} distinct user turns, {p['candidates']} candidates each: "
              + ", ".join(f"{k} {v:,}" for k, v in p["decisions"].items()))
    print(f"wrote {os.path.join(out, 'original.jsonl')} and {os.path.join(out, 'augmented.jsonl')}; "
          f"train on {out} or run: chatforge prepare {out} --out DIR")
    return 0
