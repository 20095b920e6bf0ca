"""Differentially private training: DP-SGD through Opacus, one conversation as the privacy unit.

With `privacy:` in the training config the loop trains differently in three places, all set up here (ghost
clipping is not offered: asking for it, with or without tied embeddings, is one refusal):

- data: every training record (one conversation, or one text) is its own row, never packed with another and never
  split across rows (a longer one is truncated to seq_len), so one person's conversation touches one per-sample
  gradient. Each step draws its records by Poisson sampling (each record independently with probability
  q = batch_size * grad_accum / N), the sampling Opacus's accountants assume; the draw of step s depends only on
  (seed, s), so a resumed run draws the same batches.
- gradients: Opacus's GradSampleModule computes per-record gradients of the record's mean token loss; its
  DPOptimizer clips each to `max_grad_norm`, sums them, adds Gaussian noise of std noise_multiplier * max_grad_norm
  once per optimizer step and divides by the expected batch (q * N). A drawn batch larger than batch_size runs in
  micro-batches of at most batch_size rows whose clipped gradients are summed before the one noise draw, so
  grad_accum only bounds memory and the guarantee is that of one step over the whole draw.
- accounting: epsilon after s steps comes from Opacus's accountant (RDP by default, PRV on request) for
  (noise_multiplier, q, s) at delta (default 1/N); it is a field of every metrics row (the progress bar shows it)
  and is written, with everything needed to recompute it, to privacy.json in each saved model folder.

Opacus is imported only here and only when a config asks for privacy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatforge.errors import ChatforgeError

PRIVACY_FILE = "privacy.json"  # beside config.json in a model folder


# ---------------------------------------------------------------- refusals

def check_model(spec, cfg, core) -> None:
    """Refuse what the built model makes incompatible (the config-only refusals are in config.PrivacySpec)."""
    if spec.clipping == "ghost":  # one refusal: not offered, and with tied embeddings not possible at all
        tied = (" (nor could it clip this model's tied embeddings: the input embedding is the output layer, and "
                "ghost clipping computes each layer's per-sample norm apart)") if core.config.tie_embeddings else ""
        raise ChatforgeError("privacy: clipping ghost is not offered: chatforge computes each record's whole "
                             f"per-sample gradient and clips that{tied}; use clipping: flat")
    if cfg.freeze_embeddings and core.model.embed_tokens.weight.requires_grad:
        raise ChatforgeError("privacy: freeze_embeddings with new token rows trains only those rows through a "
                             "gradient mask, which per-sample gradients bypass (the noise would change the frozen "
                             "rows); train the embeddings, or freeze them with no new tokens")


# ---------------------------------------------------------------- data: one record a row, Poisson sampling

class PoissonStream:
    """Training rows, one record each, drawn by Poisson sampling. Its position is the number of draws made, so
    {"draws": s} is all a resumed run needs. `epoch` and `row` say how many records' worth have been drawn in
    expectation (q * N per draw), for the loop's counters."""

    def __init__(self, enc, seq_len: int, pad_id: int, sample_rate: float, seed: int,
                 units: np.ndarray | None = None):
        """units: the privacy unit of each row (0..U-1, a unit's rows together); None: every row is its own."""
        from chatforge.data.pack import build_rows

        if not enc.ids:
            raise ChatforgeError("data: no training records left after encoding (see data_report.json)")
        self.rows = build_rows(enc, [[i] for i in range(len(enc.ids))], seq_len + 1, pad_id)
        self.lengths = np.array([len(i) for i in enc.ids])
        self.units = np.arange(len(enc.ids)) if units is None else np.asarray(units)
        self.n_units = int(self.units.max()) + 1
        self.sample_rate, self.seed, self.draws = sample_rate, seed, 0

    def __len__(self) -> int:
        return len(self.rows)

    def draw(self) -> np.ndarray:
        """Indices of this step's rows, a unit's rows together: each privacy unit in with probability q,
        independently."""
        rng = np.random.default_rng([self.seed, 0x44505347, self.draws])  # "DPSG": apart from the other streams
        self.draws += 1
        drawn = rng.random(self.n_units) < self.sample_rate
        index = np.flatnonzero(drawn[self.units])
        return index[np.argsort(self.units[index], kind="stable")]

    def batch(self, index: np.ndarray):
        """Rows `index` cut to their longest record (the padding after it is never trained or attended to)."""
        from chatforge.data.pack import Rows, make_batch

        width = int(self.lengths[index].max())
        r = self.rows
        return make_batch(Rows(r.tokens[:, :width], r.mask[:, :width], r.doc[:, :width], r.pos[:, :width]), index)

    def rows_per_epoch(self) -> int:
        return len(self.rows)

    @property
    def epoch(self) -> int:
        return int(self.draws * self.sample_rate)

    @property
    def row(self) -> int:
        return int(round((self.draws * self.sample_rate - self.epoch) * len(self.rows)))

    def state(self) -> dict:
        return {"draws": self.draws}

    def load_state(self, state: dict) -> None:
        self.draws = int(state["draws"])


def unit_chunks(index: np.ndarray, units: np.ndarray, micro_batch: int) -> list[np.ndarray]:
    """Micro-batches of at most micro_batch rows that never split a unit (a larger unit is a micro-batch alone):
    a unit's gradient is clipped whole, so all its rows must be in the backward that precedes its clipping."""
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]]).tolist() + [len(index)]
    chunks, begin = [], 0
    for a, b in zip(starts[:-1], starts[1:]):
        if b - begin > micro_batch and a > begin:
            chunks.append(index[begin:a])
            begin = a
    chunks.append(index[begin:])
    return chunks


def group_by_unit(params, units: np.ndarray) -> None:
    """Per-row gradients -> per-unit gradients (the sum of the unit's rows'), which the optimizer then clips: one
    user's records together are bounded by max_grad_norm, however many there are."""
    import torch

    _, inverse = np.unique(units, return_inverse=True)
    if len(inverse) == inverse.max() + 1:  # one row per unit: nothing to sum
        return
    index = None
    for p in params:
        gs = p.grad_sample
        if index is None:
            index = torch.as_tensor(inverse, device=gs.device)
        p.grad_sample = gs.new_zeros((int(inverse.max()) + 1, *gs.shape[1:])).index_add_(0, index, gs)


# ---------------------------------------------------------------- loss of each record

def row_losses(model, batch, autocast_ctx):
    """(mean token loss of each row (B,), summed token loss, predictions, targets). A row is one record, so its
    own mean is the loss whose gradient is clipped: every record weighs the same, whatever its length."""
    import torch.nn.functional as F

    with autocast_ctx:
        logits = model(batch.input_ids, position_ids=batch.position_ids)  # one record a row: plain causal attention
    B, T, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(B * T, V), batch.targets.reshape(B * T), reduction="none")
    mask = batch.loss_mask.to(ce.dtype).view(B, T)
    per_row = (ce.view(B, T) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return per_row, (ce.view(B, T) * mask).sum()


# ---------------------------------------------------------------- accounting

def make_accountant(kind: str, noise_multiplier: float, sample_rate: float, steps: int):
    """Opacus's accountant holding `steps` steps of the sampled Gaussian mechanism (noise_multiplier, sample_rate)."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=kind)
    if steps:
        accountant.history = [(noise_multiplier, sample_rate, steps)]
    return accountant


def epsilon_after(kind: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    if steps == 0:
        return 0.0
    return float(make_accountant(kind, noise_multiplier, sample_rate, steps).get_epsilon(delta=delta))


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str) -> float:
    """The smallest noise multiplier (Opacus's binary search, to 0.01 in epsilon) that spends at most
    target_epsilon over `steps` steps."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=kind))


def planned_steps(cfg) -> int | None:
    from chatforge.train.optim import step_tokens

    if cfg.max_steps:
        return cfg.max_steps if not cfg.max_tokens else min(cfg.max_steps, math.ceil(cfg.max_tokens / step_tokens(cfg)))
    return math.ceil(cfg.max_tokens / step_tokens(cfg)) if cfg.max_tokens else None


# ---------------------------------------------------------------- the private run

@dataclass
class PrivateTraining:
    """DP-SGD state of one run: the wrapped model and optimizer, the stream and the accounting parameters."""

    module: object  # opacus GradSampleModule around the model
    optimizer: object  # opacus DPOptimizer around the run's optimizer
    stream: PoissonStream
    micro_batch: int
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    units: int  # privacy units (records, or users)
    accountant: str
    clipping: str
    target_epsilon: float | None
    planned_steps: int | None
    unit: str = "record"  # the privacy unit: record, or user (records sharing a `user` field)
    records: int = 0  # training records (rows)
    last_batch: int = 0  # privacy units drawn by the last step

    def accumulate(self, device, autocast_ctx) -> tuple[float, int]:
        """Draw this step's records and backward them micro-batch by micro-batch; the loop's optimizer.step() then
        clips the last micro-batch, adds the noise and steps. Returns (mean loss per trained token, trained tokens)."""
        import torch

        index = self.stream.draw()
        units = self.stream.units[index]
        self.last_batch = len(np.unique(units))
        if len(index) == 0:  # the noise alone is this step's gradient, as the accounting assumes
            for p in self.optimizer.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            return 0.0, 0
        chunks = unit_chunks(index, units, self.micro_batch)
        loss_sum, n_trained = 0.0, 0
        for k, chunk in enumerate(chunks):
            batch = self.stream.batch(chunk).to(device)
            per_row, summed = row_losses(self.module, batch, autocast_ctx)
            per_row.mean().backward()  # GradSampleModule (loss_reduction mean) rescales to each row's own gradient
            group_by_unit(self.optimizer.params, self.stream.units[chunk])
            loss_sum += float(summed.detach())
            n_trained += batch.n_trained
            if k < len(chunks) - 1:  # clip and sum this micro-batch; the noise waits for the step's last one
                self.optimizer.signal_skip_step(do_skip=True)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / max(n_trained, 1), n_trained

    def epsilon(self, steps: int | None = None) -> float:
        steps = self.stream.draws if steps is None else steps
        return epsilon_after(self.accountant, self.noise_multiplier, self.sample_rate, steps, self.delta)

    def step_metrics(self) -> dict:
        return {"epsilon": self.epsilon(), "dp_batch": self.last_batch}

    def report(self) -> dict:
        """privacy.json: the guarantee so far and everything that recomputes it."""
        unit = "one training record (conversation)" if self.unit == "record" else \
            "one user (every training record with the same 'user' field; a record without one on its own)"
        return {"mechanism": "DP-SGD (Opacus)", "privacy_unit": unit,
                "epsilon": self.epsilon(), "delta": self.delta, "steps": self.stream.draws,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate, "expected_batch": self.sample_rate * self.units,
                "records": self.records, "units": self.units,
                "accountant": self.accountant, "clipping": self.clipping,
                "target_epsilon": self.target_epsilon, "planned_steps": self.planned_steps,
                "opacus": _opacus_version()}

    def record(self, folder: Path) -> None:
        """privacy.json into a saved model folder, atomically."""
        from chatforge.weights.folder import write_json

        write_json(Path(folder) / PRIVACY_FILE, self.report())

    def close(self) -> None:
        """Remove Opacus's hooks from the model (generation after training must not carry them)."""
        self.module._close()


def encode_units(records: list[dict], unit: str, encode) -> tuple[object, np.ndarray]:
    """(Encoded rows, the privacy unit of each row). unit "record": each record its own; "user": the records that
    share a `user` field together (in order of first appearance; a record without one is its own unit). A unit
    whose records all encode to nothing is left out, so units number 0..U-1 without gaps."""
    from collections import Counter

    from chatforge.data.pack import Encoded

    if unit == "record":
        enc = encode(records)
        return enc, np.arange(len(enc.ids))
    groups: dict[object, list[dict]] = {}
    for i, record in enumerate(records):
        groups.setdefault(("user", record["user"]) if "user" in record else ("record", i), []).append(record)
    ids, masks, units, stats = [], [], [], Counter()
    for group in groups.values():
        part = encode(group)
        stats.update(part.stats)
        if part.ids:
            units += [units[-1] + 1 if units else 0] * len(part.ids)
            ids += part.ids
            masks += part.masks
    return Encoded(ids, masks, dict(stats)), np.asarray(units, dtype=np.int64)


def _opacus_version() -> str:
    from importlib import metadata

    return metadata.version("opacus")


def make_private(run, train_records) -> PrivateTraining:
    """Swap the run's stream, forward and optimizer for their private versions; emits a note of the settings."""
    try:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
    except ImportError:
        raise ChatforgeError("privacy: needs the opacus package (pip install 'chatforge[privacy]')") from None
    from chatforge.data.pack import encode_records
    from chatforge.train.events import Note

    cfg, spec = run.cfg, run.cfg.privacy
    check_model(spec, cfg, run.core)
    enc, units = encode_units(train_records, spec.unit, lambda rs: encode_records(
        rs, run.tokenizer, run.stage.target, cfg.seq_len + 1, split_long=False))
    n = int(units.max()) + 1 if len(units) else 0
    if run.stage.split_long and enc.stats["truncated"]:
        raise ChatforgeError(f"privacy: {enc.stats['truncated']} training records are longer than seq_len "
                             f"({cfg.seq_len} tokens); pretraining splits such a record across rows, each clipped "
                             "apart, so one record would count as several privacy units; raise seq_len or shorten "
                             "the records")
    unit = "records" if spec.unit == "record" else "users"
    expected = cfg.batch_size * cfg.grad_accum
    if expected > n:
        raise ChatforgeError(f"privacy: batch_size x grad_accum ({expected}) is more than the {n} training {unit}; "
                             "the sample rate would exceed 1")
    q = expected / n
    delta = spec.delta if spec.delta is not None else 1.0 / n
    steps = planned_steps(cfg)
    sigma = spec.noise_multiplier
    if sigma is None:
        sigma = calibrate(spec.target_epsilon, delta, q, steps, spec.accountant)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # the embedding's integer inputs
    module = GradSampleModule(run.model, batch_first=True, loss_reduction="mean", strict=True)
    optimizer = DPOptimizer(run.optimizer, noise_multiplier=sigma, max_grad_norm=spec.max_grad_norm,
                            expected_batch_size=expected, loss_reduction="mean")
    stream = PoissonStream(enc, cfg.seq_len, run.tokenizer.pad_id, q, cfg.seed, units)
    private = PrivateTraining(module, optimizer, stream, cfg.batch_size, sigma, spec.max_grad_norm, q, delta, n,
                              spec.accountant, spec.clipping, spec.target_epsilon, steps, spec.unit, len(enc.ids))
    run.stream, run.forward, run.optimizer = stream, module, optimizer
    planned = f"epsilon {private.epsilon(steps):.3g} after the {steps} planned steps" if steps else \
        "no step budget: epsilon grows with every step"
    target = f" (calibrated to epsilon {spec.target_epsilon:g})" if spec.target_epsilon is not None else ""
    users = f" ({len(enc.ids)} records)" if spec.unit == "user" else ""
    run.emit(Note(f"privacy: DP-SGD, noise multiplier {sigma:.4g}{target}, clipping {spec.max_grad_norm:g} per "
                  f"{spec.unit}, sample rate {q:.4g} ({expected} of {n} {unit}{users} expected per step), delta "
                  f"{delta:.3g}; {planned} ({spec.accountant}); {enc.stats['truncated']} records truncated to seq_len"))
    if not (cfg.tokenizer or cfg.init):
        run.emit(Note("privacy: warning: the tokenizer was trained on these training records, outside the DP "
                      "guarantee (its merges can spell out a repeated secret); set tokenizer: to one trained on "
                      "public data"))
    return private
