"""The planning and study commands: `size`, `tune`, `ablate`, `report`, `quickstart`. Flags -> library call ->
printed tables and lines (and the progress bars of the training runs they start)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from chatforge.commands.train import TrainProgress
from chatforge.errors import ChatforgeError
from chatforge.tools.ablate import VARIANTS


def size_command(config: str | None = None, params: str | None = None, batch_size: int | None = None,
                 seq_len: int | None = None, data: str | None = None, tokens: int | None = None,
                 minutes: float | None = None, hours: float | None = None, vocab_size: int = 4096,
                 trained_fraction: float = 1.0, probe: bool = True, probe_steps: int = 3, device: str = "auto",
                 dtype: str | None = None, out: str | None = None) -> int:
    """Plan a model size: parameters, FLOPs per token, training and inference memory, compute-optimal tokens and
    training time measured on this machine; with a dataset and/or a time budget, recommend a size.

    Args:
        config: a training YAML, a model folder or a preset name (default: nano); or use --params.
        params: a target parameter count such as 10M: the closest Llama-style shape is sized.
        batch_size: sequences per step (default: the YAML's, else 16).
        seq_len: tokens per row (default: the YAML's, else 256).
        data: a dataset (as for train) whose training tokens bound the recommendation.
        tokens: the dataset size in tokens, instead of --data.
        minutes: training time budget for the recommendation.
        hours: training time budget, in hours.
        vocab_size: vocabulary for presets and --params (a YAML or model folder brings its own).
        trained_fraction: share of positions carrying the loss (1 for pretraining; less for SFT's assistant tokens).
        probe: measure training throughput with a few real steps (otherwise no time estimates).
        probe_steps: timed steps per probe.
        device: where the probe runs (auto, cpu, cuda).
        dtype: auto, bf16 or fp32 (default: the YAML's, else auto).
        out: also write every number as JSON here.
    """
    from chatforge.tools.sizing import format_report, plan_size

    if minutes is not None and hours is not None:
        raise ChatforgeError("size: give --minutes or --hours, not both")
    seconds = minutes * 60 if minutes is not None else hours * 3600 if hours is not None else None
    result = plan_size(config, params, batch_size, seq_len, data, tokens, seconds, vocab_size, trained_fraction,
                       probe, probe_steps, device, dtype)
    print(format_report(result["name"], result, result.get("throughput")))
    if "data" in result:
        info = result["data"]
        print(f"\ndata {data}: {info['records']:,} training records -> {info['tokens']:,} tokens "
              f"({info['trained_tokens']:,} trained, encoded for {info['stage']}) with a {info['vocab_size']}-token "
              "vocabulary")
    rec = result.get("recommendation")
    if rec is not None:
        print(f"\nrecommended: {rec['preset']} — {rec['reason']}.")
        print(f"train it with: {suggested_train_command(config if result['train_yaml'] else None, data, rec)}")
    if out:
        from chatforge.weights.folder import write_json

        write_json(out, result)
    return 0


def suggested_train_command(config: str | None, data: str | None, rec: dict) -> str:
    """The `chatforge train` line that trains the recommended size on the data it was sized for."""
    parts = ["chatforge", "train"] + (["--config", config] if config else []) + ([f"data={data}"] if data else [])
    parts += [f"model.preset={rec['preset']}", "max_steps=null", "max_time_s=null", f"max_tokens={rec['max_tokens']}"]
    epochs = f" (about {rec['epochs']:.1f} epochs)" if rec["epochs"] else ""
    return " ".join(shlex.quote(p) for p in parts) + epochs


def _print_trial(number: int, outcome: str, params: dict, detail) -> None:
    from chatforge.tools.tune import format_params

    text = {"complete": lambda: f"val loss {detail:.4f} {format_params(params)}",
            "pruned": lambda: f"pruned {format_params(params)}", "failed": lambda: f"failed: {detail}"}[outcome]()
    print(f"trial {number}: {text}", file=sys.stderr, flush=True)


def tune_worker(argv: list[str]) -> None:
    """The entry point of a `tune --workers N` worker process (run_worker's arguments as JSON)."""
    import json

    from chatforge.tools.tune import run_worker

    run_worker(**json.loads(argv[0]), on_trial=_print_trial)


def tune_command(config: str, trials: int = 20, study: str = "chatforge", storage: str | None = None,
                 workers: int = 1, timeout_s: float | None = None, out: str | None = None, seed: int = 0,
                 prune_after: int = 4) -> int:
    """Search hyperparameters with Optuna (TPE sampler, median pruning on validation loss) over the `search:`
    block of a training YAML; writes best.yaml, the trials table and PNG plots.

    Args:
        config: training YAML with a search: block (see configs/tune-quickstart.yaml).
        trials: finished trials (complete or pruned) the study should hold; a resumed study runs only the rest.
        study: study name inside the storage.
        storage: Optuna storage URL (default: sqlite:///OUT/optuna.db).
        workers: worker processes sharing the storage (each gets an equal share of the CPU threads).
        timeout_s: stop starting new trials after this many seconds.
        out: folder for trials, best.yaml and plots (default: the config's out_dir + "-tune").
        seed: sampler seed (each worker and each resume derive their own from it).
        prune_after: trials that always run to the end before the median pruner starts pruning.
    """
    from chatforge.tools.tune import finish_study, format_params, open_study, run_worker

    plan = open_study(config, trials, study, storage, workers, out, seed, prune_after, timeout_s)
    print(f"study {study!r} in {plan['url']}: {plan['done']} finished trials, {plan['remaining']} to run with "
          f"{workers} worker(s)", file=sys.stderr)
    if len(plan["workers"]) == 1:
        run_worker(**plan["workers"][0], on_trial=_print_trial)
    elif plan["workers"]:
        _run_worker_processes(plan["workers"])
    s = finish_study(config, study, plan["url"], plan["out_dir"])
    for note in s["notes"]:
        print(note, file=sys.stderr)
    print(s["table"])
    print(f"\nbest: trial {s['best_trial']}, val loss {s['best_value']:.4f}, {format_params(s['best_params'])}")
    print(f"train it: chatforge train --config {s['best_yaml']}")
    return 0


def _run_worker_processes(args: list[dict]) -> None:
    import json
    import subprocess

    code = "import sys; from chatforge.commands.tools import tune_worker; tune_worker(sys.argv[1:])"
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(a)]) for a in args]
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:  # Ctrl-C: stop the workers too; their running trials are marked failed later
            if p.poll() is None:
                p.terminate()
    if any(codes):
        raise ChatforgeError(f"tune: a worker failed (exit codes {codes}); see its messages above")


def ablate_command(config: str | None = None, data: str | None = None, variants: list[str] = VARIANTS,
                   max_tokens: int = 1_000_000, out: str = "runs/ablate", window: int = 32, seed: int | None = None,
                   overwrite: bool = False, overrides: list[str] = ()) -> int:
    """Train multi-head, grouped-query, multi-query and sliding-window attention for the same token budget on the
    same data and compare parameters, tokens/s, validation bits-per-byte and KV-cache bytes per token.

    Args:
        config: base training YAML (default: the nano preset pretrained on the built-in corpus).
        data: dataset for every variant (default: the config's, else builtin).
        variants: which of mha, gqa, mqa, swa to train.
        max_tokens: training tokens per variant (the same budget for all).
        out: folder for the variants' runs, ablate.md, ablate.json and the PNGs.
        window: sliding-window size for swa.
        seed: seed for all variants (default: the config's).
        overwrite: replace earlier runs of these variants in out.
        overrides: more config changes for every variant, such as model.n_layer=2 seq_len=128.
    """
    from chatforge.tools.ablate import ablate, write_outputs

    extra = list(overrides) + ([f"data={data}"] if data else []) + ([f"seed={seed}"] if seed is not None else [])
    progress = TrainProgress()
    try:
        rows = ablate(config, list(variants), max_tokens, out, window, extra, overwrite, on_event=progress)
    finally:
        progress.close()
    res = write_outputs(rows, Path(out))
    print(res["table"])
    print(f"\nwrote {Path(out) / 'ablate.md'}, ablate.json and {', '.join(Path(p).name for p in res['plots'])}")
    return 0


def report_command(run_dir: str, run_eval: bool = False, max_samples: int = 100) -> int:
    """Write report.md and report.html for a run: config, data report, loss curves, evaluation table, sample
    dialogs, hardware and versions.

    Args:
        run_dir: a training run's out_dir (or a quickstart folder with pretrain/ and sft/ stages).
        run_eval: first evaluate the run's final model on its config's data (held-out split) into RUN_DIR/eval.json.
        max_samples: conversations evaluated with --run-eval.
    """
    from chatforge.tools.report import report

    md, page = report(run_dir, run_eval, max_samples)
    print(f"wrote {md} and {page}")
    return 0


def quickstart(out: str = "runs/quickstart", minutes: float = 9.0, overwrite: bool = False, seed: int = 0) -> int:
    """Train a small chat model on the built-in corpus (tokenizer, pretraining, SFT), report held-out bits-per-byte
    and sample replies.

    Args:
        out: folder for everything the quickstart writes (tokenizer/, pretrain/, sft/, final/, quickstart.json).
        minutes: wall-clock budget for the whole command, loading and evaluation included; the recipes' token and
            step budgets scale with it (written for 9), the clock only stops a slower machine early.
        overwrite: replace the runs of an earlier quickstart in `out`.
        seed: seed for the data split, initialisation and batches.
    """
    from chatforge.tools import quickstart as qs

    progress = TrainProgress()

    def show(event) -> None:
        if isinstance(event, qs.Said):
            progress.close()
            print(event.text, flush=True)
        else:
            progress(event)

    try:
        r = qs.quickstart(out, minutes, overwrite, seed, on_event=show)
    finally:
        progress.close()
    print("\n".join(qs.format_scores(r)))
    d = r["decoding"]
    print(f"\n== sample replies (temperature {d['temperature']}, top-p {d['top_p']}, repetition penalty "
          f"{d['repetition_penalty']}, seed {r['seed']}: the model folder's defaults)")
    for prompt, reply in r["samples"].items():
        print(f"> {prompt}\n{reply.strip()}\n")
    print(f"wrote {Path(out) / 'sft' / 'report.md'} and {Path(out) / 'sft' / 'report.html'}")
    threads = r["threads"]
    print(f"done in {r['wall_s']:.0f} s: {r['params']:,} parameters, pretraining at {r['pretrain_tokens_per_s']:,.0f} "
          f"tokens/s ({threads} thread{'s' if threads > 1 else ''}), held-out bits per byte of the final chat model "
          f"{r['test_bpb']:.3f}")
    print(f"\nchat with it:  chatforge chat {r['final_dir']}")
    return 0
