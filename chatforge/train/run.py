"""The run folder: what a training run leaves behind and reads back.

out_dir/ holds config.yaml (the config that reproduces the run), data_report.json, metrics.jsonl (one line per
step), loss.png, summary.json, samples.json (greedy replies to the sample prompts), tokenizer/, best/ and final/
(model folders, or adapter folders for LoRA) and state/ (the resume state, state.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from chatforge.config import TrainConfig, load_config
from chatforge.errors import ChatforgeError


def open_run_folder(out: Path, resume: bool) -> Path | None:
    """Check out_dir before anything is loaded and create it; returns the state to resume (None: a new run)."""
    from chatforge.train.state import latest_state

    if out.exists() and not out.is_dir():
        raise ChatforgeError(f"{out}: out_dir is an existing file, not a folder; choose another out_dir")
    previous = latest_state(out / "state")
    if previous is not None and not resume:
        raise ChatforgeError(f"{out}: already holds a run (state/latest.json); pass --resume to continue it "
                             "or choose another out_dir")
    if resume and previous is None:
        raise ChatforgeError(f"{out}: nothing to resume (no state/latest.json)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file, or no permission
        raise ChatforgeError(f"{out}: cannot create out_dir ({e.strerror})") from None
    return previous


def record_config(cfg: TrainConfig, out: Path, resume: bool) -> list[str]:
    """Save config.yaml; a resumed run whose config changed gets a note naming the changed fields."""
    notes = []
    if resume and (out / "config.yaml").exists():
        old = load_config(str(out / "config.yaml")).to_dict()
        changed = [k for k, v in cfg.to_dict().items() if old.get(k) != v]
        if changed:
            notes.append(f"note: config differs from {out / 'config.yaml'} in: {', '.join(changed)} "
                         "(using the new values)")
    cfg.save(out / "config.yaml")
    return notes


def read_metrics(path: str | os.PathLike) -> list[dict]:
    out = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    return out


def rewrite_metrics(path: Path, upto_step: int) -> None:
    """A resumed run redoes the steps after its checkpoint; drop their old lines so each step appears once."""
    from chatforge.io import atomic_write_text

    if path.exists():
        kept = [m for m in read_metrics(path) if m.get("step", 0) <= upto_step]
        atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in kept))


def plot_losses(metrics: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """loss.png: training loss per step and validation loss at each evaluation."""
    from chatforge.plots import pyplot, save_figure

    plt = pyplot()
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
    save_figure(fig, path)


def save_weights(model, core, tokenizer, folder: Path, lora: bool) -> None:
    """A model folder (full training) or an adapter folder (LoRA); a reward model's folder (merged)."""
    from chatforge.model.reward import is_reward_model

    if is_reward_model(core):
        from chatforge.weights.reward import save_reward_model

        save_reward_model(core, tokenizer, folder)
    elif lora:
        from chatforge.weights.lora import save_adapter

        save_adapter(model, str(folder), tokenizer=tokenizer)
    else:
        from chatforge.weights.folder import save_model

        save_model(core, tokenizer, folder)


def sample_dialogs(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 48) -> list[str]:
    """Greedy replies to conversations that end with a user turn, through the one engine."""
    from chatforge.generation.bot import Bot

    was_training = model.training
    try:
        bot = Bot(model, tokenizer)
        n = min(max_new_tokens, bot.context_length // 2)
        return bot.chat_batch(conversations, max_new_tokens=n, temperature=0.0)
    finally:
        model.train(was_training)


def sample_replies(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy replies to single-turn prompts."""
    return sample_dialogs(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens)


def val_prompts(records: list[dict], n: int) -> list[list[dict]]:
    """The first n validation conversations up to their first user turn (its system prompt included)."""
    out: list[list[dict]] = []
    for r in records:
        if len(out) >= n:
            break
        messages = r.get("messages") or []
        first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
        if first is not None:
            out.append(messages[: first + 1])
    return out


def write_samples(cfg: TrainConfig, core, tokenizer, val_records: list[dict], out: Path) -> list[dict]:
    """samples.json: greedy replies to cfg.sample_prompts and to cfg.sample_val_prompts validation prompts."""
    from chatforge.weights.folder import write_json

    conversations = [[{"role": "user", "content": p}] for p in cfg.sample_prompts]
    conversations += val_prompts(val_records, cfg.sample_val_prompts)
    if not conversations:
        return []
    replies = sample_dialogs(core, tokenizer, conversations)
    samples = [{"prompt": c[-1]["content"], "messages": c, "reply": r} for c, r in zip(conversations, replies)]
    write_json(out / "samples.json", samples)
    return samples
