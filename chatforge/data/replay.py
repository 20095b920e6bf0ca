"""Replay: general dialogs mixed into a domain fine-tuning set, so a pretrained model keeps its everyday conversation.

Fine-tuning on a few hundred short domain dialogs pulls a model towards them and it forgets some of what it could
(its loss on general dialogs rises). Mixing a share of general dialogs into the training set is the standard remedy.
The replay dialogs come from the *train* split of their corpus, split exactly as `prepare` splits it with the given
val_fraction and seed, so its held-out conversations — the ones a forgetting measurement scores — never train. Each
is cut to its first `max_messages` messages (ending on a reply): the style is what replay keeps, and short dialogs
cost few tokens.
"""

from __future__ import annotations

import random

REPLAY_META = "replay"  # records added here carry {"meta": {"replay": <corpus spec>}}


def replay_records(spec, n: int, seed: int) -> list[dict]:
    """n dialogs drawn (seeded) from the train split of spec.data, each cut to spec.max_messages messages."""
    from chatforge.data.prepare import load_dataset

    train, _, _ = load_dataset(spec.data, spec.val_fraction, seed)
    picked = random.Random(seed).sample(train, min(n, len(train)))
    out = []
    for record in picked:
        messages = list(record["messages"])
        if spec.max_messages is not None:
            messages = messages[:spec.max_messages]
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if any(m["role"] == "assistant" for m in messages):
            out.append({"messages": messages, "meta": {REPLAY_META: spec.data}})
    return out


def mix_replay(train: list[dict], report: dict | None, spec, seed: int) -> tuple[list[dict], dict]:
    """(train records with replay dialogs making up spec.share of them, the data report with a `replay` entry).

    The replay dialogs are shuffled in among the domain records; the validation split is left as it is (it measures
    the domain)."""
    n = round(spec.share * len(train) / (1.0 - spec.share))
    extra = replay_records(spec, n, seed)
    mixed = list(train) + extra
    random.Random(seed).shuffle(mixed)
    report = dict(report or {})
    report["replay"] = {"data": spec.data, "share": spec.share, "records": len(extra), "domain_records": len(train),
                        "max_messages": spec.max_messages, "val_fraction": spec.val_fraction}
    return mixed, report
