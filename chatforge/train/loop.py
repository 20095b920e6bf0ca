"""The one training loop: pretraining and SFT, from scratch or from a pretrained model, full or LoRA.

The objective is a sum of cross-entropy over trained tokens (every token for pretraining, assistant replies and their
closing end-of-turn for SFT) divided by the number of trained tokens in the whole optimizer step, so gradient
accumulation gives exactly the gradient of one big batch. The learning rate is a linear warm-up times a cosine over
the share of the budget used (steps, tokens or seconds, whichever runs out first). Checkpoints are atomic and carry
everything a resumed run needs to continue bit for bit (train_state.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

from chatforge.config import TrainConfig, load_config
from chatforge.errors import ChatforgeError

LN2 = math.log(2.0)


# ---------------------------------------------------------------- schedule and optimizer

def lr_at(step: int, progress: float, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warm-up over warmup_steps, times a cosine from lr to min_lr over progress in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    cosine = min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * p))
    if warmup_steps and step < warmup_steps:
        return cosine * (step + 1) / warmup_steps
    return cosine


def budget_progress(cfg: TrainConfig, step: int, tokens: int, elapsed_s: float, clock: bool = True) -> float:
    """Share of the budget used: the largest of steps, tokens and (with clock) seconds. The run stops at 1."""
    shares = [0.0]
    if cfg.max_steps:
        shares.append(step / cfg.max_steps)
    if cfg.max_tokens:
        shares.append(tokens / cfg.max_tokens)
    if cfg.max_time_s and clock:
        shares.append(elapsed_s / cfg.max_time_s)
    return max(shares)


def schedule_progress(cfg: TrainConfig, step: int, tokens: int, elapsed_s: float) -> float:
    """How far the learning-rate schedule is: steps and tokens, so that a seeded run trains the same model on a fast
    or a busy machine; seconds only when max_time_s is the sole budget. A run whose max_time_s runs out first stops
    before its cosine has decayed, and says so ("time limit")."""
    return budget_progress(cfg, step, tokens, elapsed_s, clock=not (cfg.max_steps or cfg.max_tokens))


def param_groups(model, weight_decay: float, no_decay: set[int] = frozenset()) -> list[dict]:
    """Decay every matrix (embeddings included, as nanoGPT does: a tied embedding is the output layer too);
    never decay norms and biases, which would only pull them towards zero without regularising anything.
    no_decay: ids of further parameters to spare, e.g. frozen embeddings whose new rows alone get gradient."""
    decay, spared = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in no_decay else spared).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": spared, "weight_decay": 0.0}]


def make_optimizer(model, cfg: TrainConfig, device, core=None):
    import torch

    spare: set[int] = set()
    if cfg.freeze_embeddings and core is not None:  # only new rows train; decay must not shrink the frozen ones
        spare = {id(core.model.embed_tokens.weight), id(core.lm_head.weight)}
    groups = [g for g in param_groups(model, cfg.weight_decay, spare) if g["params"]]
    if not groups:
        raise ChatforgeError("config: nothing to train (every parameter is frozen)")
    fused = device.type in ("cpu", "cuda")  # 5x faster step on CPU than the foreach default (DESIGN.md)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


# ---------------------------------------------------------------- model and tokenizer

def set_dropout(model, p: float) -> None:
    from torch import nn

    model.config.dropout = p  # attention reads it from the shared config at each forward
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def _init_folder(init: str) -> str:
    try:
        from chatforge.weights.gguf import resolve_model
    except ImportError:
        return init
    return str(resolve_model(init))


def build_tokenizer(cfg: TrainConfig, train_records, out: Path, resume: bool):
    """(tokenizer, ids of tokens added for chat). The tokenizer is cfg.tokenizer, the init model's, or a new one
    trained on the train split (never on validation text, which would leak it into the vocabulary); a resumed run
    reloads the one it trained. A tokenizer without chat tokens gets them, and the model grows to match."""
    from chatforge.tokenizer import Tokenizer, record_texts, train_tokenizer

    saved = out / "tokenizer"
    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
    elif cfg.init:
        tok = Tokenizer.load(_init_folder(cfg.init))
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
    """(model to train, the plain GPT inside it). Seeded, so a resumed run builds the same frozen weights."""
    import torch

    from chatforge.model.gpt import ModelConfig, config_from_preset, GPT

    torch.manual_seed(cfg.seed)
    if cfg.init:
        from chatforge.weights.folder import load_model
        from chatforge.weights.loader import resize_vocab

        core = load_model(_init_folder(cfg.init))
        if tokenizer.vocab_size > core.config.vocab_size:
            resize_vocab(core, tokenizer.vocab_size)
        if cfg.seq_len > core.config.max_seq_len:
            raise ChatforgeError(f"config: seq_len: {cfg.seq_len} is longer than the model's context "
                                 f"({core.config.max_seq_len})")
        core.new_token_ids = list(new_token_ids)  # lora.py trains these rows even when embeddings are frozen
        core.name_or_path = cfg.init  # recorded in a LoRA adapter as its base model
    else:
        spec = dict(cfg.model)
        preset = spec.pop("preset", None)
        spec["vocab_size"] = tokenizer.vocab_size
        if "max_seq_len" in spec and spec["max_seq_len"] < cfg.seq_len:
            raise ChatforgeError(f"config: model.max_seq_len {spec['max_seq_len']} is shorter than seq_len {cfg.seq_len}")
        base = config_from_preset(preset, **spec) if preset else ModelConfig(**spec)
        if "max_seq_len" not in spec and base.max_seq_len < cfg.seq_len:
            base.max_seq_len = cfg.seq_len
        core = GPT(base)
    if cfg.dropout is not None:
        set_dropout(core, cfg.dropout)
    core.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.lora:
        from chatforge.weights.lora import apply_lora

        return apply_lora(core, dict(cfg.lora), cfg.freeze_embeddings, cfg.freeze_blocks), core
    if cfg.freeze_embeddings or cfg.freeze_blocks:
        from chatforge.weights.lora import freeze

        freeze(core, cfg.freeze_embeddings, cfg.freeze_blocks)
    return core, core


def save_weights(model, core, tokenizer, folder: Path, lora: bool) -> None:
    """A model folder (full training) or an adapter folder (LoRA)."""
    if lora:
        from chatforge.weights.lora import save_adapter

        save_adapter(model, str(folder), tokenizer=tokenizer)
    else:
        from chatforge.weights.folder import save_model

        save_model(core, tokenizer, folder)


# ---------------------------------------------------------------- loss and evaluation

def batch_loss(model, batch, autocast_ctx):
    """(summed cross-entropy over trained targets, number of correct argmax predictions, predicted ids)."""
    import torch.nn.functional as F

    with autocast_ctx:
        logits = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
    picked = logits[batch.loss_mask].float()
    targets = batch.targets[batch.loss_mask]
    return F.cross_entropy(picked, targets, reduction="sum"), picked.argmax(-1), targets


def accumulate_gradients(model, micro_batches, device, autocast_ctx) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; returns (mean loss per trained token, trained tokens).

    Each micro-batch's summed loss is divided by the trained tokens of the whole step, not by its own count, so the
    accumulated gradient equals that of one batch holding all of them, however the tokens fall between micro-batches.
    """
    n_trained = sum(b.n_trained for b in micro_batches)
    if n_trained == 0:
        raise ChatforgeError("training: a step without trained tokens (every record in it was fully masked)")
    loss_sum = 0.0
    for b in micro_batches:
        ce, _, _ = batch_loss(model, b.to(device), autocast_ctx)
        (ce / n_trained).backward()
        loss_sum += float(ce.detach())
    return loss_sum / n_trained, n_trained


def evaluate_rows(model, rows, batch_size: int, device, dtype, byte_table: np.ndarray,
                  max_batches: int | None = None) -> dict:
    """loss (nats per trained token), ppl, bpb (bits per UTF-8 byte of the trained tokens), acc, tokens."""
    import torch

    from chatforge.data.pack import iter_batches
    from chatforge.device import autocast

    was_training = model.training
    model.eval()
    nats, correct, n, n_bytes = 0.0, 0, 0, 0
    table = torch.from_numpy(byte_table.astype(np.int64))
    with torch.no_grad():
        for batch in iter_batches(rows, batch_size, max_batches):
            n_bytes += int(table[batch.targets[batch.loss_mask]].sum())
            batch = batch.to(device)
            loss, pred, targets = batch_loss(model, batch, autocast(device, dtype))
            nats += float(loss)
            correct += int((pred == targets).sum())
            n += int(targets.numel())
    model.train(was_training)
    if n == 0:
        raise ChatforgeError("evaluation: no trained tokens in the evaluation records")
    loss = nats / n
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": nats / LN2 / max(n_bytes, 1),
            "acc": correct / n, "tokens": n, "bytes": n_bytes}


def evaluate_loss(model, tokenizer, records, seq_len: int, batch_size: int, device="cpu", dtype="fp32",
                  max_batches: int | None = None, target: str = "assistant") -> dict:
    """Loss, perplexity, bits-per-byte and next-token accuracy of a model on records.

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


# ---------------------------------------------------------------- samples and plots

def sample_replies(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy replies to single-turn prompts, through the one engine."""
    from chatforge.generation.bot import Bot

    was_training = model.training
    try:
        bot = Bot(model, tokenizer)
        n = min(max_new_tokens, bot.context_length // 2)
        return bot.chat_batch([[{"role": "user", "content": p}] for p in prompts], max_new_tokens=n, temperature=0.0)
    finally:
        model.train(was_training)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    out = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    return out


def plot_losses(metrics: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """loss.png: training loss per step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chatforge.io import atomic_path

    steps = [m["step"] for m in metrics if "loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        losses = [m["loss"] for m in metrics if "loss" in m]
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="train")
        k = max(1, len(losses) // 50)
        if k > 1:
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"train (mean of {k})")
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the loop

def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """A resumed run redoes the steps after its checkpoint; drop their old lines so each step appears once."""
    from chatforge.io import atomic_write_text

    if path.exists():
        kept = [m for m in read_metrics(path) if m.get("step", 0) <= upto_step]
        atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in kept))


def train(cfg: TrainConfig, resume: bool = False, on_eval=None, progress: bool = True,
          records: tuple | None = None) -> dict:
    """Train as cfg says; returns {"out_dir","final_dir","best_dir","steps","tokens","val_loss","val_bpb",
    "tokens_per_s","params","wall_s", ...}.

    on_eval(step, metrics) runs after each validation (an exception from it, e.g. Optuna's pruning, stops the run).
    records: (train, val, report) to use instead of loading cfg.data.
    """
    import torch

    threads = torch.get_num_threads()
    try:
        return _train(cfg, resume, on_eval, progress, records)
    finally:
        torch.set_num_threads(threads)  # cfg.num_threads is for this run, not for the caller's process


def _train(cfg: TrainConfig, resume: bool, on_eval, progress: bool, records: tuple | None) -> dict:
    import torch

    from chatforge.data.pack import BatchStream, encode_records, pack, token_byte_lengths
    from chatforge.device import autocast, pick_device, resolve_dtype
    from chatforge.train.state import latest_state, load_state, save_state

    t0 = time.time()
    out = Path(cfg.out_dir)
    state_dir = out / "state"
    previous = latest_state(state_dir)
    if previous is not None and not resume:
        raise ChatforgeError(f"{out}: already holds a run (state/latest.json); pass --resume to continue it "
                             "or choose another out_dir")
    if resume and previous is None:
        raise ChatforgeError(f"{out}: nothing to resume (no state/latest.json)")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    # data, tokenizer, model
    if records is None:
        from chatforge.data import load_dataset

        train_records, val_records, data_report = load_dataset(cfg.data, cfg.val_fraction, cfg.seed)
    else:
        train_records, val_records, data_report = records
    tokenizer, new_ids = build_tokenizer(cfg, train_records, out, resume)
    model, core = build_model(cfg, tokenizer, new_ids)
    model.to(device)
    row_len = cfg.seq_len + 1
    target = "all" if cfg.stage == "pretrain" else "assistant"
    split = cfg.stage == "pretrain"
    train_enc = encode_records(train_records, tokenizer, target, row_len, split)
    val_enc = encode_records(val_records, tokenizer, target, row_len, split)
    stream = BatchStream(train_enc, cfg.seq_len, cfg.batch_size, tokenizer.pad_id, cfg.seed)
    val_rows = pack(val_enc, cfg.seq_len, tokenizer.pad_id) if val_enc.ids else None
    byte_table = token_byte_lengths(tokenizer)
    from chatforge.weights.folder import write_json

    write_json(out / "data_report.json", dict(data_report) | {"encoding": {"train": train_enc.stats,
                                                                           "val": val_enc.stats}})
    if resume and (out / "config.yaml").exists():
        old = load_config(str(out / "config.yaml"))
        changed = [k for k, v in cfg.to_dict().items() if old.to_dict().get(k) != v]
        if changed:
            say(f"note: config differs from {out / 'config.yaml'} in: {', '.join(changed)} (using the new values)")
    cfg.save(out / "config.yaml")

    optimizer = make_optimizer(model, cfg, device, core)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params = core.num_params()
    n_trainable = sum(p.numel() for p in trainable)
    fwd = torch.compile(model) if cfg.compile else model
    step_tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    metrics_path = out / "metrics.jsonl"

    step, tokens, trained_total, elapsed, compute_s = 0, 0, 0, 0.0, 0.0
    best_val, best_step, bad_evals = math.inf, None, 0
    last_val: dict | None = None
    stop_reason = "budget"
    if resume:
        st = load_state(previous, model, optimizer)
        step, tokens, trained_total = st["step"], st["tokens"], st["trained_tokens"]
        elapsed, compute_s = st["elapsed_s"], st["compute_s"]
        best_val = st["best_val"] if st["best_val"] is not None else math.inf
        best_step, bad_evals, last_val = st["best_step"], st["bad_evals"], st.get("last_val")
        stream.load_state(st["data"])
        _rewrite_metrics(metrics_path, step)
        say(f"resumed from {previous} (step {step})")
    elif metrics_path.exists():
        metrics_path.unlink()

    lora = bool(cfg.lora)
    say(f"model: {n_params:,} parameters ({core.num_params(non_embedding=True):,} non-embedding), "
        f"{n_trainable:,} trained; vocab {tokenizer.vocab_size}; device {device.type}, "
        f"{str(dtype).removeprefix('torch.')}{' autocast' if dtype != torch.float32 else ''}")
    s = train_enc.stats
    say(f"data: {s['records']} train records -> {s['tokens']:,} tokens ({s['trained_tokens']:,} trained), "
        f"{stream.rows_per_epoch()} rows of {cfg.seq_len} per epoch; {len(val_records)} val records; "
        f"truncated {s['truncated']}, split {s['split']}, dropped {s['dropped_no_trained_tokens']} "
        "with no trained tokens")

    def eval_now() -> dict:
        return evaluate_rows(model, val_rows, cfg.batch_size, device, dtype, byte_table, cfg.eval_batches)

    def checkpoint_state() -> Path:
        return save_state(state_dir, step, model, optimizer, {
            "tokens": tokens, "trained_tokens": trained_total, "elapsed_s": elapsed, "compute_s": compute_s,
            "best_val": None if math.isinf(best_val) else best_val, "best_step": best_step,
            "bad_evals": bad_evals, "last_val": last_val, "data": stream.state()})

    from tqdm import tqdm

    total = cfg.max_steps or (math.ceil(cfg.max_tokens / step_tokens) if cfg.max_tokens else None)
    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", dynamic_ncols=True, file=sys.stderr)
    ctx_autocast = autocast(device, dtype)
    model.train()
    done = budget_progress(cfg, step, tokens, elapsed) >= 1.0
    last_saved = latest_state(state_dir)
    loop_start = time.time() - elapsed
    recent_tok_s = 0.0
    try:
        with open(metrics_path, "a", encoding="utf-8") as mf:
            while not done:
                t_step = time.time()
                lr = lr_at(step, schedule_progress(cfg, step, tokens, elapsed), cfg.lr, cfg.final_min_lr,
                           cfg.warmup_steps)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                loss, n_trained = accumulate_gradients(fwd, [stream.next() for _ in range(cfg.grad_accum)],
                                                       device, ctx_autocast)
                gnorm = None
                if cfg.grad_clip:
                    gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
                if not math.isfinite(loss) or (gnorm is not None and not math.isfinite(gnorm)):
                    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gnorm}"
                    good = last_saved if last_saved is not None else "none (no checkpoint was saved yet)"
                    raise ChatforgeError(f"step {step + 1}: {what}; stopped without updating the weights. "
                                         f"Last good checkpoint: {good} (try a lower lr or more warmup_steps)")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += step_tokens
                trained_total += n_trained
                dt = time.time() - t_step
                compute_s += dt
                recent_tok_s = step_tokens / dt if not recent_tok_s else 0.9 * recent_tok_s + 0.1 * step_tokens / dt
                elapsed = time.time() - loop_start
                done = budget_progress(cfg, step, tokens, elapsed) >= 1.0
                if done and budget_progress(cfg, step, tokens, elapsed, clock=False) < 1.0:
                    stop_reason = "time limit"
                row = {"step": step, "loss": loss, "lr": lr, "tokens": tokens, "trained_tokens": n_trained,
                       "tok_s": round(step_tokens / dt, 1), "grad_norm": gnorm, "epoch": stream.epoch,
                       "elapsed_s": round(elapsed, 3)}
                if val_rows is not None and (step % cfg.eval_every == 0 or done):
                    last_val = eval_now()
                    row |= {"val_loss": last_val["loss"], "val_ppl": last_val["ppl"], "val_bpb": last_val["bpb"],
                            "val_acc": last_val["acc"], "val_tokens": last_val["tokens"]}
                    if last_val["loss"] < best_val:
                        best_val, best_step, bad_evals = last_val["loss"], step, 0
                        save_weights(model, core, tokenizer, out / "best", lora)
                    else:
                        bad_evals += 1
                        if cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience:
                            done, stop_reason = True, "early stop"
                    if progress:
                        bar.write(f"step {step}: val loss {last_val['loss']:.4f}, bpb {last_val['bpb']:.4f}, "
                                  f"acc {last_val['acc']:.3f}" + (" (best)" if best_step == step else ""))
                    if on_eval is not None:
                        on_eval(step, dict(row))
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                if step % cfg.save_every == 0 or done:
                    last_saved = checkpoint_state()
                elapsed = time.time() - loop_start
                if step % cfg.log_every == 0 or done:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{recent_tok_s:,.0f}", refresh=False)
                bar.update(1)
    finally:
        bar.close()

    if val_rows is None:
        save_weights(model, core, tokenizer, out / "best", lora)
        best_step = step
    save_weights(model, core, tokenizer, out / "final", lora)
    metrics = read_metrics(metrics_path)
    plot_losses(metrics, out / "loss.png", title=f"{cfg.stage}: {out}")
    from chatforge.tools.sizing import flops_per_token

    summary = {
        "out_dir": str(out), "final_dir": str(out / "final"), "best_dir": str(out / "best"), "stage": cfg.stage,
        "steps": step, "tokens": tokens, "trained_tokens": trained_total, "epochs": stream.epoch +
        stream.row / max(stream.rows_per_epoch(), 1),
        "val_loss": None if math.isinf(best_val) else best_val, "best_step": best_step,
        "val_bpb": None, "val_ppl": None, "val_acc": None, "final_val_loss": last_val["loss"] if last_val else None,
        "tokens_per_s": tokens / compute_s if compute_s else 0.0,
        "model_gflops_per_s": flops_per_token(core.config, cfg.seq_len)["training"] * tokens / compute_s / 1e9 if compute_s else 0.0,
        "params": n_params,
        "trainable_params": n_trainable, "wall_s": time.time() - t0, "train_s": elapsed, "stop_reason": stop_reason,
    }
    best_rows = [m for m in metrics if m.get("step") == best_step and "val_loss" in m]
    if best_rows:
        summary |= {"val_bpb": best_rows[-1]["val_bpb"], "val_ppl": best_rows[-1]["val_ppl"],
                    "val_acc": best_rows[-1]["val_acc"]}
    write_json(out / "summary.json", summary)
    if cfg.sample_prompts and progress:
        for p, r in zip(cfg.sample_prompts, sample_replies(core, tokenizer, cfg.sample_prompts)):
            print(f"> {p}\n{r}\n")
    return summary


def train_command(config: str | None = None, overrides: list[str] = (), resume: bool = False) -> int:
    """Pretrain or fine-tune (full or LoRA) as a YAML config says, with key=value overrides.

    Args:
        config: the YAML recipe (see configs/); without it, the defaults.
        overrides: config changes such as lr=3e-4 model.n_layer=6 lora.r=8 max_steps=200.
        resume: continue the run in out_dir from its last checkpoint (model, optimizer, schedule, RNG, data).
    """
    cfg = load_config(config, list(overrides))
    s = train(cfg, resume=resume)
    val = (f"best val loss {s['val_loss']:.4f} (bpb {s['val_bpb']:.4f}) at step {s['best_step']}"
           if s["val_loss"] is not None else "no validation split")
    print(f"done ({s['stop_reason']}): {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_s']:.0f} s "
          f"({s['tokens_per_s']:,.0f} tokens/s, {s['model_gflops_per_s']:.1f} model GFLOP/s); {val}")
    print(f"model: {s['final_dir']} (last), {s['best_dir']} (best); metrics: {Path(s['out_dir']) / 'metrics.jsonl'}")
    print(f"chat with it: chatforge chat {s['best_dir']}")
    return 0
