"""`chatforge train`: flags -> config -> the training loop, with its events shown on stderr and a progress bar."""

from __future__ import annotations

import sys
from pathlib import Path

from chatforge.train.events import Evaluated, Note, Started, Stepped


class TrainProgress:
    """Shows a run's events: notes, what trains on what, a tqdm bar with loss, lr and tokens/s, validation lines.
    Call close() when the run ends (or fails) so the bar releases the terminal line."""

    def __init__(self, show: bool = True) -> None:
        self.show = show
        self.bar = None
        self.tok_s = 0.0

    def __call__(self, event) -> None:
        if not self.show:
            return
        if isinstance(event, Note):
            self._line(event.text)
        elif isinstance(event, Started):
            self._started(event)
        elif isinstance(event, Evaluated):
            r = event.row
            bpb = f"bpb {r['val_bpb']:.4f}" if r["val_bpb"] is not None else "pair accuracy"  # dpo, reward
            self._line(f"step {r['step']}: val loss {r['val_loss']:.4f}, {bpb}, "
                       f"acc {r['val_acc']:.3f}" + (" (best)" if event.best else ""))
        elif isinstance(event, Stepped) and self.bar is not None:
            r = event.row
            self.tok_s = r["tok_s"] if not self.tok_s else 0.9 * self.tok_s + 0.1 * r["tok_s"]
            if event.log:
                eps = {"eps": f"{r['epsilon']:.3g}"} if "epsilon" in r else {}  # privacy: DP-SGD's spent epsilon
                if r.get("mfu") is not None:  # model-FLOPs utilisation of the measured matmul peak
                    eps["mfu"] = f"{r['mfu']:.1%}"
                self.bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{self.tok_s:,.0f}",
                                     **eps, refresh=False)
            self.bar.update(1)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _started(self, event: Started) -> None:
        from tqdm import tqdm

        i, s = event.info, event.info["data"]
        self._line(f"model: {i['params']:,} parameters ({i['non_embedding']:,} non-embedding), {i['trainable']:,} "
                   f"trained; vocab {i['vocab']}; device {i['device']}, {i['dtype']}"
                   f"{' autocast' if i['autocast'] else ''}")
        self._line(f"data: {s['records']} train records -> {s['tokens']:,} tokens ({s['trained_tokens']:,} trained), "
                   f"{i['rows_per_epoch']} rows of {i['seq_len']} per epoch; {i['val_records']} val records; "
                   f"truncated {s['truncated']}, split {s['split']}, dropped {s['dropped_no_trained_tokens']} "
                   "with no trained tokens")
        self.close()
        self.bar = tqdm(total=event.total_steps, initial=event.step, unit="step", dynamic_ncols=True,
                        file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_samples(samples: list[dict]) -> None:
    for s in samples:
        print(f"> {s['prompt']}\n{s['reply']}\n")


def train_command(config: str | None = None, overrides: list[str] = (), resume: bool = False) -> int:
    """Pretrain or fine-tune (full or LoRA) as a YAML config says, with key=value overrides.

    Args:
        config: the YAML recipe (see configs/); without it, the defaults.
        overrides: config changes such as lr=3e-4 model.n_layer=6 lora.r=8 max_steps=200.
        resume: continue the run in out_dir from its last checkpoint (model, optimizer, schedule, RNG, data).
    """
    from chatforge.config import load_config
    from chatforge.train.loop import train

    cfg = load_config(config, list(overrides))
    progress = TrainProgress()
    try:
        s = train(cfg, resume=resume, on_event=progress)
    finally:
        progress.close()
    if "samples" not in s:  # another rank than 0 under torchrun: rank 0 reports
        return 0
    print_samples(s["samples"])
    bpb = f"bpb {s['val_bpb']:.4f}" if s["val_bpb"] is not None else \
        f"pair accuracy {s['val_acc']:.3f}" if s["val_acc"] is not None else ""  # no validation split: neither
    val = (f"best val loss {s['val_loss']:.4f} ({bpb}) at step {s['best_step']}"
           if s["val_loss"] is not None else "no validation split")
    print(f"done ({s['stop_reason']}): {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_s']:.0f} s "
          f"({s['tokens_per_s']:,.0f} tokens/s, {s['model_gflops_per_s']:.1f} model GFLOP/s); {val}")
    print(f"model: {s['final_dir']} (last), {s['best_dir']} (best); metrics: {Path(s['out_dir']) / 'metrics.jsonl'}")
    print(f"chat with it: chatforge chat {s['best_dir']}")
    return 0
