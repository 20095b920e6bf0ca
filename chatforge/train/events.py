"""What a training run tells its caller while it runs. The loop only emits these; the command layer turns them into
lines and a progress bar, tune into Optuna reports, and a library caller may ignore them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Note:
    """A one-line message for the user: a resume, a changed config, a warning."""

    text: str


@dataclass
class Started:
    """The run is set up: it begins at `step` of `total_steps` (None: a token or time budget only)."""

    step: int
    total_steps: int | None
    info: dict  # params, non_embedding, trainable, vocab, device, dtype, data: encoding stats, rows, val records


@dataclass
class Stepped:
    """One optimizer step is done; row is its metrics.jsonl line. log: the step is one to show (log_every)."""

    row: dict
    log: bool


@dataclass
class Evaluated:
    """A validation pass; row is the step's metrics.jsonl line with val_* fields. best: the best so far."""

    row: dict
    best: bool
