"""Preference stages: DPO (`stage: dpo`) and a reward model (`stage: reward`), as plug-ins of the one loop.

Both train on pairs (data/preference.py renders them: the prompt exactly as inference renders it, each reply with
its one end-of-turn token). A batch holds B pairs as 2B right-padded rows, chosen first; padding is never in a loss
mask, and with right padding plain causal attention never lets a real token see a pad, so padding changes nothing.

DPO (Rafailov et al. 2023, as TRL's DPOTrainer computes it): with s(y) the summed log-probability of reply y's
tokens under the policy and s_ref under the reference, the logit is z = (s(c) - s(r)) - (s_ref(c) - s_ref(r)) and
  sigmoid: loss = -(1 - ls) log σ(βz) - ls log σ(-βz)     (ls: label smoothing, conservative DPO)
  ipo:     loss = (z - 1/(2β))²   on per-token mean log-probs (Azar et al. 2023, as TRL does)
  plus rpo_alpha × the chosen reply's per-token NLL when set (RPO, as TRL's rpo_alpha).
The implicit rewards are β(s - s_ref) of each reply; reward accuracy is the share of pairs whose chosen reward is
higher; the margin is their difference; the KL estimate is the mean per-token log(π/π_ref) over the replies in the
batch (an estimate on the preference data, not on samples of the policy).

The reference is one of: `frozen` (a frozen copy of the initial weights, for full fine-tuning), `adapter-off` (the
LoRA model with its adapter switched off through peft's disable_adapter: the base itself, no second copy), or
`precomputed` (its log-probs computed once before training and stored in out_dir/reference_logps.safetensors, read
back on resume). Held-out pairs always get their reference log-probs once, at set-up.

The reward model is the chatforge model with its output layer replaced by a scalar head (transformers'
*ForSequenceClassification layout, model/reward.py); its score is the head's value at the last token, trained with
the Bradley–Terry loss -log σ(r(c) - r(r)).

Every step is exactly resumable: a pair's order depends only on (seed, epoch), the reference is deterministic, and
the loop restores the RNG, optimizer and weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from chatforge.errors import ChatforgeError

REFERENCE_FILE = "reference_logps.safetensors"
METRICS = ("reward_acc", "chosen_reward", "rejected_reward", "margin", "kl", "chosen_nll")


# ---------------------------------------------------------------- batches

@dataclass
class PairBatch:
    """B pairs as 2B rows: rows [:B] the chosen replies, [B:] the rejected ones."""

    input_ids: "torch.Tensor"  # (2B, T) long, right-padded
    targets: "torch.Tensor"  # (2B, T) long
    loss_mask: "torch.Tensor"  # (2B, T) bool: the target is a reply token
    lengths: "torch.Tensor"  # (2B,) long: real tokens per row (input positions)
    ref: "torch.Tensor | None" = None  # (B, 2) float64: the reference's summed reply log-probs (chosen, rejected)
    stats: dict = field(default_factory=dict)  # what the loss saw, summed (the step's metrics)

    def to(self, device) -> "PairBatch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return PairBatch(move(self.input_ids), move(self.targets), move(self.loss_mask), move(self.lengths),
                         move(self.ref), self.stats)

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def n_trained(self) -> int:  # the loop divides the summed loss by this: the mean over the step's pairs
        return self.n_pairs

    @property
    def trained_tokens(self) -> int:  # what the metrics count: reply tokens, chosen and rejected
        return int(self.loss_mask.sum())


def make_pair_batch(enc, index, pad_id: int) -> PairBatch:
    import torch

    seqs = [enc.chosen[i] for i in index] + [enc.rejected[i] for i in index]
    masks = [enc.chosen_mask[i] for i in index] + [enc.rejected_mask[i] for i in index]
    width = max(len(s) for s in seqs)
    tokens = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=bool)
    for r, (s, m) in enumerate(zip(seqs, masks)):
        tokens[r, :len(s)] = s
        mask[r, :len(s)] = m.astype(bool)
    ref = None if enc.ref is None else torch.from_numpy(enc.ref[np.asarray(index)])
    lengths = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
    return PairBatch(torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:]),
                     torch.from_numpy(mask[:, 1:]), lengths, ref)


class PairStream:
    """Endless batches of pairs, reshuffled each epoch from (seed, epoch); {"epoch", "row"} is the whole position.
    `with_reference(batch)` fills a batch's reference log-probs when they are not precomputed."""

    def __init__(self, enc, batch_size: int, pad_id: int, seed: int, with_reference: Callable | None = None):
        if not len(enc):
            raise ChatforgeError("data: no preference pairs left after encoding (see data_report.json; a "
                                 "preference stage trains on {prompt, chosen, rejected} records)")
        self.enc, self.batch_size, self.pad_id, self.seed = enc, batch_size, pad_id, seed
        self.with_reference = with_reference
        self.epoch, self.row = 0, 0

    def rows_per_epoch(self) -> int:
        return len(self.enc)

    def state(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def load_state(self, state: dict) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])

    def next(self) -> PairBatch:
        index: list[int] = []
        while len(index) < self.batch_size:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.enc))
            take = min(self.batch_size - len(index), len(order) - self.row)
            index += order[self.row:self.row + take].tolist()
            self.row += take
            if self.row == len(order):
                self.epoch, self.row = self.epoch + 1, 0
        batch = make_pair_batch(self.enc, index, self.pad_id)
        if batch.ref is None and self.with_reference is not None:
            batch.ref = self.with_reference(batch)
        return batch


def pair_batches(enc, batch_size: int, pad_id: int):
    """Every pair once, in order (evaluation, precomputing the reference)."""
    for start in range(0, len(enc), batch_size):
        yield make_pair_batch(enc, list(range(start, min(start + batch_size, len(enc)))), pad_id)


# ---------------------------------------------------------------- log-probs and losses

def reply_logps(model, batch: PairBatch, autocast_ctx) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(summed log-prob of each row's reply tokens (2B,), reply tokens per row (2B,)). Only masked positions are
    read, so padding never counts."""
    import torch
    import torch.nn.functional as F

    with autocast_ctx:
        logits = model(batch.input_ids)
    rows = batch.loss_mask.nonzero()[:, 0]
    token_logps = -F.cross_entropy(logits[batch.loss_mask].float(), batch.targets[batch.loss_mask],
                                   reduction="none")
    sums = torch.zeros(batch.input_ids.shape[0], dtype=torch.float32, device=logits.device)
    return sums.index_add(0, rows, token_logps), batch.loss_mask.sum(1)


def _add(stats: dict, **values) -> None:
    for k, v in values.items():
        stats[k] = stats.get(k, 0.0) + float(v)


def dpo_loss(model, batch: PairBatch, autocast_ctx, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, rpo_alpha: float = 0.0):
    """(summed DPO loss over the batch's pairs, None, None); the batch's stats get the sums its metrics need.
    rpo_alpha: add that weight of the chosen reply's per-token NLL (RPO, Pang et al. 2024, TRL's rpo_alpha), which
    keeps the chosen reply likely instead of only pushing the rejected one down."""
    import torch.nn.functional as F

    logps, counts = reply_logps(model, batch, autocast_ctx)
    ref = batch.ref.to(logps.device, logps.dtype)
    B = batch.n_pairs
    pol_c, pol_r, ref_c, ref_r = logps[:B], logps[B:], ref[:, 0], ref[:, 1]
    if loss_type == "ipo":  # IPO on per-token mean log-probs
        n_c, n_r = counts[:B].to(logps.dtype), counts[B:].to(logps.dtype)
        z = (pol_c / n_c - pol_r / n_r) - (ref_c / n_c - ref_r / n_r)
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        z = (pol_c - pol_r) - (ref_c - ref_r)
        losses = -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing
    nll = -pol_c / counts[:B].to(logps.dtype).clamp(min=1)
    if rpo_alpha:
        losses = losses + rpo_alpha * nll
    chosen, rejected = beta * (pol_c - ref_c).detach(), beta * (pol_r - ref_r).detach()
    _add(batch.stats, pairs=B, reward_acc=(chosen > rejected).sum(), chosen_reward=chosen.sum(),
         rejected_reward=rejected.sum(), margin=(chosen - rejected).sum(),
         kl_nats=(logps.detach() - ref.t().reshape(-1)).sum(), kl_tokens=counts.sum(), loss=losses.detach().sum(),
         chosen_nll=nll.detach().sum())
    return losses.sum(), None, None


def reward_scores(model, batch: PairBatch, autocast_ctx) -> "torch.Tensor":
    """The scalar head's value at each row's last token (2B,): the whole sequence, its final token included, as
    score_conversations reads it at inference (the inputs stop one token short of the sequence: that is for
    next-token losses)."""
    import torch

    full = torch.cat([batch.input_ids[:, :1], batch.targets], 1)
    with autocast_ctx:
        out = model(full, logits_at=batch.lengths)
    return out[:, 0, 0].float()


def reward_loss(model, batch: PairBatch, autocast_ctx):
    """(summed Bradley–Terry loss -log σ(r(chosen) - r(rejected)), None, None)."""
    import torch.nn.functional as F

    scores = reward_scores(model, batch, autocast_ctx)
    B = batch.n_pairs
    chosen, rejected = scores[:B], scores[B:]
    losses = -F.logsigmoid(chosen - rejected)
    c, r = chosen.detach(), rejected.detach()
    _add(batch.stats, pairs=B, reward_acc=(c > r).sum(), chosen_reward=c.sum(), rejected_reward=r.sum(),
         margin=(c - r).sum(), loss=losses.detach().sum())
    return losses.sum(), None, None


def summarize(stats: list[dict]) -> dict:
    """Per-pair means of summed stats (and the KL estimate per reply token)."""
    total: dict = {}
    for s in stats:
        for k, v in s.items():
            total[k] = total.get(k, 0.0) + v
    n = total.get("pairs", 0.0)
    if not n:
        return {}
    out = {k: total[k] / n for k in ("reward_acc", "chosen_reward", "rejected_reward", "margin", "chosen_nll")
           if k in total}
    if total.get("kl_tokens"):
        out["kl"] = total["kl_nats"] / total["kl_tokens"]
    return out


# ---------------------------------------------------------------- the reference

def adapter_off(model):
    """A context in which a peft model runs as its base (no second copy); None when the model has no adapter."""
    inner = getattr(model, "_orig_mod", model)  # a compiled model
    return inner.disable_adapter() if hasattr(inner, "disable_adapter") else None


def reference_logps(model, batch: PairBatch, device, autocast_ctx, use_adapter_off: bool) -> "torch.Tensor":
    """(B, 2) float64 summed reply log-probs of the reference for one batch, in eval mode without gradients."""
    import contextlib

    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (adapter_off(model) if use_adapter_off else contextlib.nullcontext()):
            logps, _ = reply_logps(model, batch.to(device), autocast_ctx)
    finally:
        model.train(was_training)
    B = batch.n_pairs
    return torch.stack([logps[:B], logps[B:]], 1).double().cpu()


def precompute(enc, ref_fn: Callable, batch_size: int, pad_id: int) -> np.ndarray:
    import torch

    parts = [ref_fn(b) for b in pair_batches(enc, batch_size, pad_id)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 2))


def _digest(enc) -> np.ndarray:
    """A fingerprint of the encoded pairs, so stored reference log-probs are only reused for the same data."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for arrays in (enc.chosen, enc.chosen_mask, enc.rejected, enc.rejected_mask):
        for a in arrays:
            h.update(len(a).to_bytes(4, "little"))
            h.update(a.tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8).copy()


def _stored_reference(path: Path, key: str, enc) -> np.ndarray | None:
    """The stored reference log-probs of these pairs, or None (none stored, or stored for other data)."""
    from safetensors.numpy import load_file

    if not path.exists():
        return None
    saved = load_file(str(path))
    if key not in saved or not np.array_equal(saved.get(key + ".digest"), _digest(enc)):
        return None
    return saved[key]


# ---------------------------------------------------------------- the stages

@dataclass(frozen=True)
class PreferenceStage:
    """A pair-training stage (dpo or reward): the Stage protocol of loss.py, set up for one run by bind()."""

    name: str
    loss: Callable | None = None
    target: str = "assistant"
    split_long: bool = False
    reference: Callable | None = None  # batch -> (B, 2) reference log-probs (dpo, once bound)
    precomputed: bool = False
    out: Path | None = None
    autocast: object = None

    def bind(self, cfg, model, core, device, dtype, out) -> "PreferenceStage":
        from chatforge.device import autocast

        ctx = autocast(device, dtype)
        if self.name == "reward":
            from chatforge.model.reward import attach_scalar_head

            if cfg.reference != "auto":
                raise ChatforgeError("config: reference: a reward model has no reference model; remove reference:")
            attach_scalar_head(core)
            core.lm_head.to(device)
            return replace(self, loss=reward_loss, autocast=ctx, out=Path(out))
        mode = cfg.reference if cfg.reference != "auto" else ("adapter-off" if cfg.lora else "frozen")
        use_off = bool(cfg.lora) and mode in ("adapter-off", "precomputed")
        if mode == "frozen" and cfg.lora:
            raise ChatforgeError("config: reference: frozen keeps a second copy of the model; with lora use "
                                 "adapter-off (the base without the adapter), or precomputed")
        ref_model = model
        if mode == "frozen":
            import copy

            ref_model = copy.deepcopy(core).requires_grad_(False).eval()
        loss = partial(dpo_loss, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                       rpo_alpha=cfg.rpo_alpha)
        ref = partial(reference_logps, ref_model, device=device, autocast_ctx=ctx, use_adapter_off=use_off)
        return replace(self, loss=loss, reference=ref, precomputed=mode == "precomputed", out=Path(out),
                       autocast=ctx)

    def encode(self, records, tokenizer, seq_len: int):
        from chatforge.data.preference import encode_pairs

        return encode_pairs(records, tokenizer, seq_len + 1)

    def _fill_reference(self, enc, key: str, batch_size: int, pad_id: int) -> None:
        if self.reference is None or enc.ref is not None:
            return
        path = self.out / REFERENCE_FILE
        stored = _stored_reference(path, key, enc)
        if stored is None:
            from safetensors.numpy import load_file, save

            from chatforge.io import atomic_write_bytes

            stored = precompute(enc, self.reference, batch_size, pad_id)
            saved = load_file(str(path)) if path.exists() else {}
            atomic_write_bytes(path, save(saved | {key: np.ascontiguousarray(stored), key + ".digest": _digest(enc)}))
        enc.ref = stored

    def batches(self, enc, seq_len: int, batch_size: int, pad_id: int, seed: int):
        if self.precomputed and len(enc):
            self._fill_reference(enc, "train", batch_size, pad_id)
        return PairStream(enc, batch_size, pad_id, seed, self.reference)

    def eval_rows(self, enc, seq_len: int, pad_id: int):
        if not len(enc):
            return None
        self._fill_reference(enc, "val", 8, pad_id)
        return enc

    def step_metrics(self, batches) -> dict:
        return summarize([b.stats for b in batches])

    def evaluate(self, model, enc, batch_size: int, device, dtype, byte_table=None, max_batches=None) -> dict:
        """loss (mean per pair), acc (reward accuracy) and the other metrics on held-out pairs."""
        import torch

        from chatforge.device import autocast

        was_training = model.training
        model.eval()
        stats = []
        try:
            with torch.no_grad():
                for b, batch in enumerate(pair_batches(enc, batch_size, 0)):
                    if max_batches is not None and b >= max_batches:
                        break
                    batch = batch.to(device)
                    self.loss(model, batch, autocast(device, dtype))
                    stats.append(batch.stats)
        finally:
            model.train(was_training)
        pairs = sum(s["pairs"] for s in stats)
        if not pairs:
            raise ChatforgeError("evaluation: no held-out preference pairs")
        metrics = summarize(stats)
        loss = sum(s["loss"] for s in stats) / pairs
        return {"loss": loss, "ppl": None, "bpb": None, "acc": metrics["reward_acc"], "tokens": int(pairs),
                "extra": metrics}


DPO = PreferenceStage("dpo")
REWARD = PreferenceStage("reward")


def pair_accuracy(model, tokenizer, records, *, beta: float = 0.1, reference=None, batch_size: int = 8,
                  seq_len: int = 1024, device="cpu", dtype="fp32", kind: str = "dpo") -> dict:
    """Held-out pair accuracy outside training: of a policy's implicit reward against `reference` (a model; or
    None with a LoRA policy, whose adapter is switched off), or of a reward model (kind="reward")."""
    from chatforge.data.preference import encode_pairs
    from chatforge.device import autocast, pick_device, resolve_dtype

    device = pick_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    enc = encode_pairs(records, tokenizer, seq_len + 1)
    stage = REWARD if kind == "reward" else DPO
    if kind == "reward":
        stage = replace(stage, loss=reward_loss)
    else:
        ctx = autocast(device, dtype)
        ref_model = reference if reference is not None else model
        ref = partial(reference_logps, ref_model, device=device, autocast_ctx=ctx,
                      use_adapter_off=reference is None)
        enc.ref = precompute(enc, ref, batch_size, tokenizer.pad_id)
        stage = replace(stage, loss=partial(dpo_loss, beta=beta))
    out = stage.evaluate(model, enc, batch_size, device, dtype)
    return {"pairs": out["tokens"], "accuracy": out["acc"], "loss": out["loss"], **out["extra"]}
