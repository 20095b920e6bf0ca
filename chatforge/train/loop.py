"""The one training loop: pretraining and SFT, from scratch or from a pretrained model, full or LoRA.

It reads top to bottom: set_up (run folder, data, tokenizer, model, optimizer, resume), then per optimizer step
train_step, evaluate and checkpoint, then finish (weights, plot, summary, samples). What a stage trains on and its
loss come from loss.py's Stage; the schedule and optimizer from optim.py; the run folder's files from run.py; the
resume state from state.py, which carries everything a resumed run needs to continue bit for bit. The loop prints
nothing: it emits events (events.py) that the command layer shows.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from chatforge.config import TrainConfig
from chatforge.errors import ChatforgeError
from chatforge.train.events import Evaluated, Note, Started, Stepped
from chatforge.train.loss import STAGES, Stage, accumulate_gradients
from chatforge.train.optim import budget_progress, lr_at, make_optimizer, schedule_progress, step_tokens, \
    warmup_share
from chatforge.train.run import open_run_folder, read_metrics, record_config, rewrite_metrics, plot_losses, \
    save_weights, write_samples
from chatforge.train.state import Progress


# ---------------------------------------------------------------- model and tokenizer

def set_dropout(model, p: float) -> None:
    from torch import nn

    model.config.dropout = p  # attention reads it from the shared config at each forward
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def build_tokenizer(cfg: TrainConfig, train_records, out: Path, resume: bool):
    """(tokenizer, ids of tokens added for chat). The tokenizer is cfg.tokenizer, the init model's, or a new one
    trained on the train split (never on validation text, which would leak it into the vocabulary); a resumed run
    reloads the one it trained. A tokenizer without chat tokens gets them, and the model grows to match. The init
    model's tokenizer comes through the one loader (an adapter's own, else its base's), before any weights."""
    from chatforge.tokenizer import Tokenizer, record_texts, train_tokenizer

    saved = out / "tokenizer"
    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
    elif cfg.init:
        from chatforge.weights.loader import load_tokenizer

        tok = load_tokenizer(cfg.init)
    elif resume and (saved / "tokenizer.json").exists():
        tok = Tokenizer.load(str(saved))
    else:
        tok = train_tokenizer(record_texts(train_records), vocab_size=cfg.vocab_size)
    new_ids: list[int] = []
    if not tok.has_chat_tokens():
        before = tok.vocab_size
        new_ids = list(range(before, before + tok.add_chat_tokens()))
    tok.save(str(saved))
    return tok, new_ids


def build_model(cfg: TrainConfig, tokenizer, new_token_ids: list[int] = ()):
    """(model to train, the plain GPT inside it). Seeded, so a resumed run builds the same frozen weights.

    `init:` is loaded by the one loader (a known name, .gguf file, model folder or LoRA adapter folder), its
    embeddings grown to `tokenizer`; the ids it never saw (new_token_ids, which build_tokenizer added, and any other
    the loader finds) train even with frozen embeddings, and a LoRA adapter names the loader's source as its base.
    """
    import torch

    from chatforge.model.gpt import GPT
    from chatforge.model.shape import model_config

    torch.manual_seed(cfg.seed)
    new_ids, source = [], None  # a model trained from scratch has no old rows to keep
    if cfg.init:
        from chatforge.weights.loader import load

        loaded = load(cfg.init, tokenizer=tokenizer)
        core = loaded.model
        if cfg.seq_len > core.config.max_seq_len:
            raise ChatforgeError(f"config: seq_len: {cfg.seq_len} is longer than the model's context "
                                 f"({core.config.max_seq_len})")
        new_ids, source = sorted(set(new_token_ids) | set(loaded.new_token_ids)), loaded.source
    else:
        core = GPT(model_config(cfg.model, tokenizer.vocab_size, cfg.seq_len))
    if cfg.dropout is not None:
        set_dropout(core, cfg.dropout)
    core.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.lora:
        from chatforge.weights.lora import apply_lora

        return apply_lora(core, asdict(cfg.lora), cfg.freeze_embeddings, cfg.freeze_blocks, new_ids, source), core
    if cfg.freeze_embeddings or cfg.freeze_blocks:
        from chatforge.weights.lora import freeze

        freeze(core, cfg.freeze_embeddings, cfg.freeze_blocks, new_ids)
    return core, core


# ---------------------------------------------------------------- set-up

@dataclass
class Run:
    """Everything set_up builds and the steps use."""

    cfg: TrainConfig
    out: Path
    stage: Stage
    device: object
    dtype: object
    tokenizer: object
    model: object  # what trains: the GPT, or the peft model around it
    core: object  # the plain GPT inside
    optimizer: object
    forward: object  # the model the steps call (DP-SGD's wrapper when cfg.privacy)
    stream: object
    val_rows: object
    val_records: list
    byte_table: np.ndarray
    autocast: object
    emit: object
    last_saved: Path | None = None
    private: object = None  # dp.PrivateTraining when cfg.privacy: DP-SGD's stream, forward and optimizer
    loss: object = None  # stage.loss, compiled with the model where speed.should_compile says it pays
    dist: object = None  # distributed.Dist under torchrun (several processes), else None
    flops_per_token: float = 0.0  # model FLOPs of one position (speed.training_flops_per_token), for MFU
    peak_flops: float = 0.0  # the measured matmul peak of this device and dtype (device.matmul_peak)
    started: float = field(default_factory=time.time)

    @property
    def trainable(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def main(self) -> bool:
        """The process that logs and writes files: the only one, or rank 0 under torchrun."""
        return self.dist is None or self.dist.main

    def weights(self) -> tuple:
        """(model, core) whose weights a model folder gets: under FSDP2 an unsharded copy (every rank calls this)."""
        if self.dist is not None and self.cfg.distributed == "fsdp":
            from chatforge.train.distributed import plain_copy

            plain = plain_copy(self.core, self.model)
            return plain, plain
        return self.model, self.core


def save_folder(run: Run, folder: Path) -> None:
    """best/ or final/: every rank takes part (FSDP2 gathers the shards), rank 0 writes."""
    model, core = run.weights()
    if run.main:
        save_weights(model, core, run.tokenizer, folder, bool(run.cfg.lora))


def set_up(cfg: TrainConfig, resume: bool, records: tuple | None, emit) -> tuple[Run, Progress]:
    """The run folder, data, tokenizer, model and optimizer, in the order that makes a resumed run bit-identical;
    then the saved progress when resuming."""
    import torch

    from chatforge.data.pack import token_byte_lengths
    from chatforge.device import autocast, matmul_peak, pick_device, resolve_dtype
    from chatforge.train import distributed
    from chatforge.train.speed import compiled_loss, frozen_to, should_compile, training_flops_per_token
    from chatforge.weights.folder import write_json

    started = time.time()
    out = Path(cfg.out_dir)
    dist = distributed.init(cfg.device)
    if dist is not None and not dist.main:
        emit = lambda event: None  # noqa: E731 -- rank 0 alone tells the user
    previous = open_run_folder(out, resume)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = dist.device if dist is not None else pick_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    from chatforge.data import load_dataset
    from chatforge.data import shards as token_shards

    shards = token_shards.open_index(cfg.data) if records is None and _shards_may_serve(cfg, out, resume) else None
    if records is None and shards is None:
        records = load_dataset(cfg.data, cfg.val_fraction, cfg.seed)
    train_records, val_records, data_report = records or (None, None, None)
    pool, per_epoch = [], 0  # replay: general dialogs against forgetting, a changing share of each epoch
    if cfg.replay is not None and train_records is not None:
        from chatforge.data.replay import replay_pool

        pool, per_epoch, data_report = replay_pool(train_records, data_report, cfg.replay, cfg.seed)
    tokenizer, new_ids = build_tokenizer(cfg, train_records + pool if pool else train_records, out, resume)
    why = shards and token_shards.mismatch(shards, cfg.stage, cfg.seq_len, tokenizer)
    if why:  # the shards of another tokenizer or seq_len: the records, tokenized in memory
        emit(Note(f"data: {cfg.data}/shards not used ({why}); tokenizing in memory"))
        shards, (train_records, val_records, data_report) = None, load_dataset(cfg.data, cfg.val_fraction, cfg.seed)
    model, core = build_model(cfg, tokenizer, new_ids)
    model.to(device)
    if cfg.lora and dtype == torch.bfloat16:  # the frozen base in bf16; adapters and their AdamW state stay fp32
        frozen_to(model, torch.bfloat16)
    stage = STAGES[cfg.stage].bind(cfg, model, core, device, dtype, out)
    if shards is not None:  # token shards from prepare --tokenizer, read through memory maps (data/shards.py)
        train_enc, val_enc = (token_shards.ShardedEncoded(cfg.data, shards, s) for s in ("train", "val"))
        val_records = token_shards.sample_records(cfg.data, cfg.sample_val_prompts)
        data_report = token_shards.prepared_report(cfg.data, shards)
    else:
        train_enc = stage.encode(train_records, tokenizer, cfg.seq_len)
        val_enc = stage.encode(val_records, tokenizer, cfg.seq_len)
    members = None
    if pool:
        from chatforge.data.replay import replay_members

        pool_enc = stage.encode(pool, tokenizer, cfg.seq_len)
        pieces = round(per_epoch * len(pool_enc) / len(pool))  # a record can be dropped (or split: pretraining)
        members = functools.partial(replay_members, len(train_enc), len(pool_enc), pieces)
        train_enc = train_enc + pool_enc
    world = dist.world if dist is not None else 1
    stream = stage.batches(train_enc, cfg.seq_len, cfg.batch_size * world, tokenizer.pad_id, cfg.seed,
                           **({"members": members} if members else {}))
    forward = model
    if dist is not None:  # each rank takes its slice of the global batch; DDP wraps, FSDP2 shards in place
        stream = distributed.RankSlice(stream, dist, cfg.batch_size)
        forward, model = distributed.wrap(model, cfg.distributed, dtype, dist)
        if cfg.distributed == "fsdp":
            core = model
    if shards is not None:
        from chatforge.data.pack import packed

        val_rows = packed(val_enc, cfg.seq_len, tokenizer.pad_id) if len(val_enc) else None
    else:
        val_rows = stage.eval_rows(val_enc, cfg.seq_len, tokenizer.pad_id)
    byte_table = token_byte_lengths(tokenizer)
    write_json(out / "data_report.json", dict(data_report) | {"encoding": {"train": train_enc.stats,
                                                                           "val": val_enc.stats}})
    for note in record_config(cfg, out, resume):
        emit(Note(note))
    ctx = autocast(device, dtype)
    run = Run(cfg, out, stage, device, dtype, tokenizer, model, core, make_optimizer(model, cfg, device, core),
              forward, stream, val_rows, val_records, byte_table, ctx, emit, started=started, dist=dist,
              loss=compiled_loss(stage.loss, forward, ctx) if should_compile(cfg, device) else stage.loss,
              flops_per_token=training_flops_per_token(core, cfg.seq_len, bool(cfg.lora)),
              peak_flops=matmul_peak(device, dtype))
    if cfg.privacy is not None:
        from chatforge.train.dp import make_private

        run.private = make_private(run, train_records)
    progress = _restore(run, previous) if resume else Progress()
    if not resume and run.main and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    _announce(run, progress, train_enc.stats)
    return run, progress


def _shards_may_serve(cfg: TrainConfig, out: Path, resume: bool) -> bool:
    """Token shards can stand in for the records when the tokenizer is known before the data (given, the init
    model's, or the resumed run's) and the stage tokenizes records one by one (not DP-SGD or perturbation)."""
    known_tokenizer = cfg.tokenizer or cfg.init or (resume and (out / "tokenizer" / "tokenizer.json").exists())
    return bool(isinstance(cfg.data, str) and known_tokenizer and cfg.stage in ("sft", "pretrain")
                and cfg.privacy is None and cfg.perturbation is None and cfg.replay is None)


def _restore(run: Run, previous: Path) -> Progress:
    from chatforge.train.state import load_state

    trainer = load_state(previous, run.model, run.optimizer)
    progress = Progress.from_trainer(trainer)
    run.stream.load_state(trainer["data"])
    if run.main:
        rewrite_metrics(run.out / "metrics.jsonl", progress.step)
    run.last_saved = previous
    run.emit(Note(f"resumed from {previous} (step {progress.step})"))
    return progress


def _announce(run: Run, progress: Progress, stats: dict) -> None:
    """Started (what trains on what), and a warning when the warm-up eats most of the budget."""
    import torch

    cfg = run.cfg
    share = warmup_share(cfg)
    if share is not None and share > 0.5:
        run.emit(Note(f"warning: the warm-up ({cfg.warmup_steps} steps) takes {min(share, 1):.0%} of the training "
                      "budget, leaving the cosine decay little or nothing; lower warmup_steps or raise the budget"))
    total = cfg.max_steps or (math.ceil(cfg.max_tokens / step_tokens(cfg)) if cfg.max_tokens else None)
    info = {"params": run.core.num_params(), "non_embedding": run.core.num_params(non_embedding=True),
            "trainable": sum(p.numel() for p in run.trainable), "vocab": run.tokenizer.vocab_size,
            "device": run.device.type, "dtype": str(run.dtype).removeprefix("torch."),
            "autocast": run.dtype != torch.float32, "data": stats, "rows_per_epoch": run.stream.rows_per_epoch(),
            "seq_len": cfg.seq_len, "val_records": len(run.val_records), "compiled": run.loss is not run.stage.loss,
            "peak_gflops": run.peak_flops / 1e9}
    run.emit(Started(progress.step, total, info))


# ---------------------------------------------------------------- one step, evaluation, checkpoint

def current_lr(run: Run, p: Progress) -> float:
    cfg = run.cfg
    share = warmup_share(cfg)
    progress = schedule_progress(cfg, p.step, p.tokens, p.elapsed_s)
    if share is None:  # a time-only budget: the warm-up's share is what it took
        if p.warmup_progress is None and p.step >= cfg.warmup_steps:
            p.warmup_progress = progress
        share = p.warmup_progress or 0.0
    return lr_at(p.step, progress, cfg.lr, cfg.final_min_lr, cfg.warmup_steps, share)


def train_step(run: Run, p: Progress) -> dict:
    """One optimizer step over grad_accum micro-batches; returns its metrics row. A non-finite loss or gradient
    stops the run before the weights change."""
    import torch

    cfg, started = run.cfg, time.time()
    lr = current_lr(run, p)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    if run.private is not None:  # DP-SGD (dp.py): records clipped one by one; optimizer.step() adds the noise
        batches, (loss, n_trained) = [], run.private.accumulate(run.device, run.autocast)
    else:
        batches = [run.stream.next() for _ in range(cfg.grad_accum)]
        loss, n_trained = accumulate_gradients(run.forward, batches, run.device, run.autocast, run.loss, run.dist)
    gnorm = None
    if cfg.grad_clip and run.private is None:
        gnorm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)  # FSDP2: a DTensor
    if not math.isfinite(loss) or (gnorm is not None and not math.isfinite(gnorm)):
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gnorm}"
        good = run.last_saved if run.last_saved is not None else "none (no checkpoint was saved yet)"
        raise ChatforgeError(f"step {p.step + 1}: {what}; stopped without updating the weights. "
                             f"Last good checkpoint: {good} (try a lower lr or more warmup_steps)")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    dt = time.time() - started
    p.step += 1
    p.tokens += step_tokens(cfg)
    p.trained_tokens += n_trained
    p.compute_s += dt
    # tok_s: positions processed (padding included); trained_tok_s: tokens that carried the loss; mfu: the model
    # FLOPs of the positions per second over the measured matmul peak.
    return {"step": p.step, "loss": loss, "lr": lr, "tokens": p.tokens, "trained_tokens": n_trained,
            "tok_s": round(step_tokens(cfg) / dt, 1), "trained_tok_s": round(n_trained / dt, 1),
            "mfu": round(run.flops_per_token * step_tokens(cfg) / dt / run.peak_flops, 4) if run.peak_flops else None,
            "grad_norm": gnorm, "epoch": run.stream.epoch,
            **run.stage.step_metrics(batches), **(run.private.step_metrics() if run.private is not None else {})}


def stop_reason(cfg: TrainConfig, p: Progress) -> str | None:
    """None while the budget lasts; "time limit" when max_time_s ran out before the step/token budget."""
    if budget_progress(cfg, p.step, p.tokens, p.elapsed_s) < 1.0:
        return None
    return "budget" if budget_progress(cfg, p.step, p.tokens, p.elapsed_s, clock=False) >= 1.0 else "time limit"


def evaluate(run: Run, p: Progress, row: dict) -> str | None:
    """Validation into row; the best weights are saved; returns "early stop" when patience ran out."""
    cfg = run.cfg
    val = run.stage.evaluate(run.model, run.val_rows, cfg.batch_size, run.device, run.dtype, run.byte_table,
                             cfg.eval_batches)
    p.last_val = val
    row |= {"val_loss": val["loss"], "val_ppl": val["ppl"], "val_bpb": val["bpb"], "val_acc": val["acc"],
            "val_tokens": val["tokens"]} | {f"val_{k}": v for k, v in val.get("extra", {}).items()}
    reason = None
    if val["loss"] < p.best_val:
        p.best_val, p.best_step, p.bad_evals = val["loss"], p.step, 0
        save_folder(run, run.out / "best")
        if run.private is not None:
            run.private.record(run.out / "best")
    else:
        p.bad_evals += 1
        if cfg.early_stop_patience and p.bad_evals >= cfg.early_stop_patience:
            reason = "early stop"
    run.emit(Evaluated(dict(row), best=p.best_step == p.step))
    return reason


def checkpoint(run: Run, p: Progress) -> None:
    from chatforge.train.state import save_state

    run.last_saved = save_state(run.out / "state", p.step, run.model, run.optimizer, p.trainer(run.stream.state()),
                                run.dist)


def run_steps(run: Run, p: Progress) -> str:
    """Steps until the budget, the time limit or early stopping ends the run; returns which."""
    import json

    cfg = run.cfg
    reason = stop_reason(cfg, p) and "budget"  # a resumed run that had already finished
    loop_start = time.time() - p.elapsed_s
    with open(run.out / "metrics.jsonl" if run.main else os.devnull, "a", encoding="utf-8") as metrics:
        while reason is None:
            try:
                row = train_step(run, p)
            except RuntimeError as e:  # gloo/NCCL: a peer died or hung past the timeout
                if run.dist is None:
                    raise
                from chatforge.train.distributed import lost_peer

                raise lost_peer(run.dist, p.step, e) from None
            p.elapsed_s = time.time() - loop_start
            reason = stop_reason(cfg, p)
            row["elapsed_s"] = round(p.elapsed_s, 3)
            if run.val_rows is not None and (p.step % cfg.eval_every == 0 or reason):
                reason = evaluate(run, p, row) or reason
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if p.step % cfg.save_every == 0 or reason:
                checkpoint(run, p)
            p.elapsed_s = time.time() - loop_start
            run.emit(Stepped(row, log=p.step % cfg.log_every == 0 or reason is not None))
    return reason


# ---------------------------------------------------------------- finish

def finish(run: Run, p: Progress, reason: str) -> dict:
    """Final (and, without validation, best) weights, loss.png, summary.json and samples.json."""
    from chatforge.model.shape import flops_per_token
    from chatforge.weights.folder import write_json

    cfg, out, lora = run.cfg, run.out, bool(run.cfg.lora)
    model, core = run.weights()  # every rank: FSDP2 gathers the shards
    if not run.main:
        return {"out_dir": str(out), "steps": p.step, "rank": run.dist.rank}
    if run.val_rows is None:
        save_weights(model, core, run.tokenizer, out / "best", lora)
        p.best_step = p.step
    save_weights(model, core, run.tokenizer, out / "final", lora)
    if run.private is not None:
        if run.val_rows is None:
            run.private.record(out / "best")
        run.private.record(out / "final")
        run.private.close()
    metrics = read_metrics(out / "metrics.jsonl")
    plot_losses(metrics, out / "loss.png", title=f"{cfg.stage}: {out}")
    per_s = (lambda x: x / p.compute_s) if p.compute_s else (lambda x: 0.0)
    summary = {
        "out_dir": str(out), "final_dir": str(out / "final"), "best_dir": str(out / "best"), "stage": cfg.stage,
        "steps": p.step, "tokens": p.tokens, "trained_tokens": p.trained_tokens,
        "epochs": run.stream.epoch + run.stream.row / max(run.stream.rows_per_epoch(), 1),
        "val_loss": None if math.isinf(p.best_val) else p.best_val, "best_step": p.best_step,
        "val_bpb": None, "val_ppl": None, "val_acc": None,
        "final_val_loss": p.last_val["loss"] if p.last_val else None, "tokens_per_s": per_s(p.tokens),
        "model_gflops_per_s": per_s(flops_per_token(run.core.config, cfg.seq_len)["training"] * p.tokens) / 1e9,
        "params": run.core.num_params(), "trainable_params": sum(x.numel() for x in run.trainable),
        "wall_s": time.time() - run.started, "train_s": p.elapsed_s, "stop_reason": reason,
    }
    best_rows = [m for m in metrics if m.get("step") == p.best_step and "val_loss" in m]
    if best_rows:
        summary |= {k: best_rows[-1][k] for k in ("val_bpb", "val_ppl", "val_acc")}
    if run.private is not None:
        summary["privacy"] = run.private.report()
    write_json(out / "summary.json", summary)
    summary["samples"] = write_samples(cfg, core, run.tokenizer, run.val_records, out)
    return summary


def train(cfg: TrainConfig, resume: bool = False, records: tuple | None = None, on_event=None) -> dict:
    """Train as cfg says; returns {"out_dir","final_dir","best_dir","steps","tokens","val_loss","val_bpb",
    "tokens_per_s","params","wall_s","stop_reason","samples", ...} (summary.json, plus the samples).

    records: (train, val, report) to use instead of loading cfg.data. on_event(event) receives the events of
    events.py as they happen (an exception from it, e.g. Optuna's pruning, stops the run).
    """
    import torch

    from chatforge.train import distributed

    threads = torch.get_num_threads()
    try:
        run, progress = set_up(cfg, resume, records, on_event or (lambda event: None))
        return finish(run, progress, run_steps(run, progress))
    finally:
        torch.set_num_threads(threads)  # cfg.num_threads is for this run, not for the caller's process
        distributed.close()
