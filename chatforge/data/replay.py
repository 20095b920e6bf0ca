"""Replay: general dialogs mixed into a domain fine-tuning set, so a pretrained model keeps its everyday conversation.

Fine-tuning on a few hundred short domain dialogs pulls a model towards them and it forgets some of what it could
(its loss on general dialogs rises). Mixing a share of general dialogs into the training set is the standard remedy.
The replay dialogs come from the *train* split of their corpus, split exactly as `prepare` splits it with the given
val_fraction and seed, so its held-out conversations — the ones a forgetting measurement scores — never train. Each
is cut to its first `max_messages` messages (ending on a reply): the style is what replay keeps, and short dialogs
cost few tokens. Each epoch replays dialogs no earlier epoch had (for `epochs` epochs, then they come round): a
fixed few, replayed every epoch, are memorised (training loss ~0) and stop holding the model to general dialog.
"""

from __future__ import annotations

import random

import numpy as np

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


def replay_pool(train: list[dict], report: dict | None, spec, seed: int) -> tuple[list[dict], int, dict]:
    """(the replay dialogs of spec.epochs epochs, how many each epoch takes, the data report with a `replay` entry).

    An epoch's replay dialogs make up spec.share of its records (the domain records are all in every epoch);
    replay_members says which. The validation split is left as it is (it measures the domain)."""
    per_epoch = round(spec.share * len(train) / (1.0 - spec.share))
    pool = replay_records(spec, per_epoch * spec.epochs, seed)
    per_epoch = min(per_epoch, len(pool))
    report = dict(report or {})
    report["replay"] = {"data": spec.data, "share": spec.share, "records_per_epoch": per_epoch, "pool": len(pool),
                        "domain_records": len(train), "max_messages": spec.max_messages,
                        "val_fraction": spec.val_fraction}
    return pool, per_epoch, report


def replay_members(n_domain: int, n_pool: int, per_epoch: int, epoch: int) -> np.ndarray:
    """Indices of epoch `epoch`'s records when the domain's n_domain come first and the pool's n_pool after them:
    every domain record, and the pool's next per_epoch, wrapping round once the pool is used up."""
    if n_pool == 0 or per_epoch == 0:
        return np.arange(n_domain)
    start = (epoch * per_epoch) % n_pool
    return np.concatenate([np.arange(n_domain), n_domain + (start + np.arange(per_epoch)) % n_pool])
