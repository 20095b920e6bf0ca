"""Robust training: the token stages (pretrain, sft) with perturbed user turns (`perturbation: {rate, kinds}`).

Perturbation happens when an epoch's batches are built, not once in the data: each epoch re-draws which user turns
are perturbed and how, from (seed, epoch, record index) alone, so every epoch shows the model new noise and a
resumed run rebuilds exactly the rows it would have seen. Replies are never perturbed (the model learns to answer
noisy input with clean text), and validation stays clean (the loss that selects the best weights is comparable
with an unperturbed run's).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from chatforge.data.pack import BatchStream, Encoded, Rows, encode_records, pack
from chatforge.data.perturb import perturb_record


@dataclass
class RecordsEncoded(Encoded):
    """The clean encoding plus what re-encoding a perturbed epoch needs."""

    records: list | None = None
    tokenizer: object = None
    target: str = "assistant"
    row_len: int = 0
    split_long: bool = False


def perturbed_records(records: list, rate: float, kinds: tuple[str, ...], seed: int, epoch: int) -> list:
    """The records of one epoch, user turns perturbed; record i's noise depends on (seed, epoch, i) only."""
    return [perturb_record(r, rate, kinds, random.Random(f"{seed}:{epoch}:{i}")) for i, r in enumerate(records)]


class AugmentedStream(BatchStream):
    """BatchStream whose epoch e packs the records perturbed for epoch e (same shuffle rule, same position)."""

    def __init__(self, enc: RecordsEncoded, seq_len: int, batch_size: int, pad_id: int, seed: int, rate: float,
                 kinds: tuple[str, ...]):
        super().__init__(enc, seq_len, batch_size, pad_id, seed)
        self.rate, self.kinds = rate, kinds

    def _epoch_rows(self) -> Rows:
        if self._rows_epoch != self.epoch:
            e = self.enc
            noisy = perturbed_records(e.records, self.rate, self.kinds, self.seed, self.epoch)
            enc = encode_records(noisy, e.tokenizer, e.target, e.row_len, e.split_long)
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(enc.ids))
            self._rows = pack(enc, self.seq_len, self.pad_id, order)
            self._rows_epoch = self.epoch
        return self._rows


@dataclass(frozen=True)
class AugmentedStage:
    """A token Stage whose training batches carry perturbed user turns; everything else is the inner stage's."""

    inner: object
    rate: float
    kinds: tuple[str, ...]

    def __getattr__(self, name):  # name, target, split_long, loss, eval_rows, step_metrics, evaluate
        return getattr(self.inner, name)

    def encode(self, records, tokenizer, seq_len: int) -> RecordsEncoded:
        s = self.inner
        enc = encode_records(records, tokenizer, s.target, seq_len + 1, s.split_long)
        return RecordsEncoded(enc.ids, enc.masks, enc.stats, list(records), tokenizer, s.target, seq_len + 1,
                              s.split_long)

    def batches(self, enc, seq_len: int, batch_size: int, pad_id: int, seed: int):
        return AugmentedStream(enc, seq_len, batch_size, pad_id, seed, self.rate, self.kinds)
