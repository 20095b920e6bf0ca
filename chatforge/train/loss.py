"""Stages, their loss and the evaluation of a model on held-out rows.

A stage is a small plug-in: which records it reads and how they become rows (its batch kind), and the loss of one
batch. Pretraining and SFT share the token loss: cross-entropy summed over trained targets (every token for
pretraining; assistant replies and their closing end-of-turn for SFT) and divided by the trained tokens of the whole
optimizer step, so gradient accumulation gives exactly the gradient of one big batch. A preference stage (DPO, a
reward model) adds its own encoding of pairs and its own loss here; the loop does not change.
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from chatforge.errors import ChatforgeError

LN2 = math.log(2.0)


def token_loss(model, batch, autocast_ctx):
    """(summed cross-entropy over trained targets, argmax predictions there, the targets; None for both in a
    training step).

    Eager, only the trained positions get logits (`only=`): an SFT row is mostly prompt, and the vocabulary head and
    its fp32 cross-entropy are a large share of a small-model step; in a training step the model fuses the head with
    the loss (`targets=`, model/head_loss.py). Under torch.compile the loss runs over every
    position with untrained targets ignored instead: the shapes stay static (one graph, no data-dependent count)."""
    import torch
    import torch.nn.functional as F

    static = torch.compiler.is_compiling()
    doc_ids = batch.doc_ids if batch.packed else None  # rows of one record each: plain causal attention
    if not static and torch.is_grad_enabled():  # training: the head and its loss in one pass (model/head_loss.py)
        from chatforge.weights.lora import autocast_inputs

        with autocast_ctx, autocast_inputs(model, batch.input_ids.device.type):
            return model(batch.input_ids, position_ids=batch.position_ids, doc_ids=doc_ids,
                         only=batch.loss_mask, targets=batch.targets[batch.loss_mask]), None, None
    with autocast_ctx:
        logits = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=doc_ids,
                       only=None if static else batch.loss_mask)
    if static:
        targets = batch.targets.masked_fill(~batch.loss_mask, -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               reduction="sum"), None, None
    logits, targets = logits[0], batch.targets[batch.loss_mask]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), logits.argmax(-1), targets


@dataclass(frozen=True)
class Stage:
    """What a stage trains on and how: `target` tokens carry the loss, long records are split into rows
    (`split_long`) or truncated, and `loss(model, batch, autocast_ctx)` gives (summed loss, predictions, targets)."""

    name: str
    target: str
    split_long: bool
    loss: Callable = token_loss

    def encode(self, records, tokenizer, seq_len: int):
        from chatforge.data.pack import encode_records

        return encode_records(records, tokenizer, self.target, seq_len + 1, self.split_long)

    def batches(self, enc, seq_len: int, batch_size: int, pad_id: int, seed: int, members=None):
        """The training batches: packed rows, reshuffled each epoch, with a resumable position; members(epoch): the
        records of an epoch (data/pack.BatchStream)."""
        from chatforge.data.pack import BatchStream

        return BatchStream(enc, seq_len, batch_size, pad_id, seed, members)

    def eval_rows(self, enc, seq_len: int, pad_id: int):
        from chatforge.data.pack import pack

        return pack(enc, seq_len, pad_id) if enc.ids else None

    def bind(self, cfg, model, core, device, dtype, out) -> "Stage":
        """This stage set up for one run, before the optimizer is made: a stage that needs the model or the config
        (DPO's reference, a reward head, perturbation) returns a configured copy; the token stages keep theirs."""
        if cfg.perturbation is not None:
            from chatforge.train.augment import AugmentedStage

            return AugmentedStage(self, cfg.perturbation.rate, tuple(cfg.perturbation.kinds))
        return self

    def step_metrics(self, batches) -> dict:
        """Extra fields of a step's metrics row (DPO: reward accuracy, margin, KL); none for the token stages."""
        return {}

    def evaluate(self, model, rows, batch_size: int, device, dtype, byte_table, max_batches=None) -> dict:
        return evaluate_rows(model, rows, batch_size, device, dtype, byte_table, max_batches, self.loss)


def _stages() -> dict:
    from chatforge.train.preference import DPO, REWARD

    return {"pretrain": Stage("pretrain", target="all", split_long=True),
            "sft": Stage("sft", target="assistant", split_long=False), "dpo": DPO, "reward": REWARD}


STAGES: dict[str, Stage] = _stages()


def accumulate_gradients(model, micro_batches, device, autocast_ctx, loss=None, dist=None) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; returns (mean loss, trained tokens).

    Each micro-batch's summed loss is divided by the count of the whole step (`n_trained`: trained tokens, or pairs
    for a preference step), not by its own, so the accumulated gradient equals that of one batch holding all of them,
    however they fall between micro-batches. The returned count is always tokens that carried the loss.
    dist (distributed.Dist): the count is the whole global step's, over every process, and the loss is scaled by
    the world size because DDP/FSDP average gradients; the result equals one process holding the global batch.
    Under DDP the micro-batches before the last skip the all-reduce (no_sync); FSDP2 reduce-scatters each one,
    which keeps only its shard of the gradients in memory.
    """
    loss = loss or token_loss
    n_trained = sum(b.n_trained for b in micro_batches)
    scale = 1.0
    if dist is not None:
        n_trained, scale = int(dist.sum(n_trained)), float(dist.world)
    if n_trained == 0:
        raise ChatforgeError("training: a step without trained tokens (every record in it was fully masked)")
    loss_sum, tokens = 0.0, sum(b.trained_tokens for b in micro_batches)
    last = len(micro_batches) - 1
    for i, b in enumerate(micro_batches):
        # DDP all-reduces in backward: only the last micro-batch's does, over the gradients accumulated locally
        with model.no_sync() if i < last and hasattr(model, "no_sync") else contextlib.nullcontext():
            ce, _, _ = loss(model, b.to(device), autocast_ctx)
            (ce / n_trained * scale if dist is not None else ce / n_trained).backward()
        loss_sum += float(ce.detach())
    if dist is not None:
        loss_sum, tokens = dist.sums([loss_sum, tokens])
    return loss_sum / n_trained, int(tokens)


def evaluate_rows(model, rows, batch_size: int, device, dtype, byte_table: np.ndarray,
                  max_batches: int | None = None, loss=None) -> dict:
    """loss (nats per trained token), ppl, bpb (bits per UTF-8 byte of the trained tokens), acc, tokens."""
    import torch

    from chatforge.data.pack import iter_batches
    from chatforge.device import autocast

    loss = loss or token_loss
    was_training = model.training
    model.eval()
    nats, correct, n, n_bytes = 0.0, 0, 0, 0
    table = torch.from_numpy(byte_table.astype(np.int64))
    with torch.no_grad():
        for batch in iter_batches(rows, batch_size, max_batches):
            n_bytes += int(table[batch.targets[batch.loss_mask]].sum())
            batch = batch.to(device)
            summed, pred, targets = loss(model, batch, autocast(device, dtype))
            nats += float(summed)
            correct += int((pred == targets).sum())
            n += int(targets.numel())
    model.train(was_training)
    if n == 0:
        raise ChatforgeError("evaluation: no trained tokens in the evaluation records")
    mean = nats / n
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "bpb": nats / LN2 / max(n_bytes, 1),
            "acc": correct / n, "tokens": n, "bytes": n_bytes}


def evaluate_loss(model, tokenizer, records, seq_len: int, batch_size: int, device="cpu", dtype="fp32",
                  max_batches: int | None = None, target: str = "assistant") -> dict:
    """Loss, perplexity, bits-per-byte and next-token accuracy of a model on records, in rows of seq_len tokens.

    target: assistant (assistant replies + their end-of-turn; text records: every token), content (every turn's
    content + end-of-turn, role headers excluded: the held-out dialog text), or all (every token).
    Control tokens count 0 bytes in bits-per-byte, though their loss counts, so bpb never flatters the model.
    """
    import torch

    from chatforge.data.pack import encode_records, pack, token_byte_lengths
    from chatforge.device import pick_device, resolve_dtype

    device = pick_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    enc = encode_records(records, tokenizer, target, seq_len + 1, split_long=True)  # every byte is scored
    if not enc.ids:
        raise ChatforgeError("evaluation: no records with trained tokens")
    rows = pack(enc, seq_len, tokenizer.pad_id)
    out = evaluate_rows(model, rows, batch_size, device, dtype or torch.float32, token_byte_lengths(tokenizer),
                        max_batches)
    return out | {"records": enc.stats["records"], "split": enc.stats["split"]}
