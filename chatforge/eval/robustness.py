"""Robustness to perturbed input: held-out loss and bits-per-byte of the replies with clean vs perturbed user turns.

Only the user turns are perturbed (data/perturb.py: typos, swaps, homoglyphs, zero-width characters, casing,
whitespace) and the loss is on the same assistant replies either way, so the bytes scored are identical and the gap
is the price of the noise. Each kind is measured alone (every user turn perturbed) and all kinds mixed; the noise is
seeded, so the same seed scores the same text.
"""

from __future__ import annotations

import random

from chatforge.data.perturb import KINDS, perturb_record


def robustness_eval(model, tokenizer, records: list[dict], seq_len: int, batch_size: int, device, dtype,
                    seed: int = 0, rate: float = 1.0, kinds=KINDS) -> dict:
    """{clean_loss, clean_bpb, perturbed_loss, perturbed_bpb, gap_bpb, by_kind: {kind: {loss, bpb}}}."""
    from chatforge.train.loss import evaluate_loss

    def score(recs):
        out = evaluate_loss(model, tokenizer, recs, seq_len, batch_size, device, dtype)
        return {"loss": out["loss"], "bpb": out["bpb"]}

    def noisy(kind_list, salt):
        return [perturb_record(r, rate, kind_list, random.Random(f"{seed}:{salt}:{i}")) for i, r in enumerate(records)]

    clean = score(records)
    mixed = score(noisy(list(kinds), "mixed"))
    by_kind = {k: score(noisy([k], k)) for k in kinds}
    return {"clean_loss": clean["loss"], "clean_bpb": clean["bpb"], "perturbed_loss": mixed["loss"],
            "perturbed_bpb": mixed["bpb"], "gap_bpb": mixed["bpb"] - clean["bpb"], "rate": rate,
            "by_kind": by_kind}
