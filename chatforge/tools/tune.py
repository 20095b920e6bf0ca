"""Hyperparameter search: Optuna's TPE sampler and median pruner around the one training loop.

The search space lives in the training YAML under `search:`, keyed by the same dotted names as `chatforge train`
overrides, so a trial is just a training run with a few overrides:

    search:
      lr: {low: 1.0e-4, high: 3.0e-3, log: true}
      batch_size: {choices: [8, 16, 32]}
      warmup_steps: {low: 0, high: 100, step: 10}
      weight_decay: {low: 0.0, high: 0.2}
      dropout: {low: 0.0, high: 0.2}
      model.d_model: {choices: [96, 128, 192]}
      model.n_layer: {low: 2, high: 6}

config.load_train_yaml reads and types the `search:` block beside the TrainConfig, which stays the plain training
config; a trial's values reach it through the same validated path as command-line overrides. The study lives in
SQLite: several worker processes share it and a killed search resumes where it stopped (each trial reports its
validation loss at every evaluation, which is what the median pruner compares). Printing is the command layer's
(commands/tools.py): workers report each trial through on_trial.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from chatforge.config import SearchChoice, SearchRange, load_train_yaml
from chatforge.errors import ChatforgeError

HEARTBEAT_S = 5  # a RUNNING trial whose worker stops beating for GRACE_S is marked FAIL by the next worker
GRACE_S = 30


# ---------------------------------------------------------------- trials

def suggest(trial, space: dict[str, SearchRange | SearchChoice]) -> dict:
    """The trial's values for the search space, keyed by dotted config names."""
    params = {}
    for name, s in space.items():
        if isinstance(s, SearchChoice):
            params[name] = trial.suggest_categorical(name, s.choices)
        elif s.integer:
            params[name] = trial.suggest_int(name, s.low, s.high, step=s.step or 1, log=s.log)
        else:
            params[name] = trial.suggest_float(name, float(s.low), float(s.high), step=s.step, log=s.log)
    return params


# ---------------------------------------------------------------- study and workers

def _storage(url: str):
    import optuna

    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                      grace_period=GRACE_S)


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial prints its own one-line outcome instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run_worker(config: str, study_name: str, storage_url: str, n_trials: int, out: str, seed: int, worker: int,
               prune_after: int, threads: int | None, timeout_s: float | None = None, on_trial=None) -> None:
    """Run n_trials trials of the shared study in this process; on_trial(number, outcome, params, detail) hears of
    each: outcome "complete" (detail: val loss), "pruned" or "failed" (detail: the one-line reason)."""
    import optuna

    from chatforge.train.events import Evaluated
    from chatforge.train.loop import train

    _quiet_optuna()
    if threads:
        import torch

        torch.set_num_threads(threads)
    tell = on_trial or (lambda *a: None)
    storage = _storage(storage_url)
    probe = optuna.load_study(study_name=study_name, storage=storage)
    # A distinct, reproducible seed per worker and per resume, so parallel or resumed workers don't replay the
    # same random start-up points.
    sampler = optuna.samplers.TPESampler(seed=seed * 1000 + worker + 7919 * len(probe.trials))
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler,
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=prune_after))
    _cfg, space = load_train_yaml(config)

    def objective(trial) -> float:
        params = suggest(trial, space)
        run_dir = Path(out) / f"trial-{trial.number:04d}"
        fixed = {"out_dir": str(run_dir)} | ({"num_threads": threads} if threads else {})

        def on_event(event) -> None:
            if not isinstance(event, Evaluated):
                return
            # Reported against tokens seen, not steps, so trials with different batch sizes meet at equal budgets.
            row = event.row
            trial.report(row["val_loss"], row["tokens"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"val loss {row['val_loss']:.4f} after {row['tokens']:,} tokens is "
                                         "worse than the median of earlier trials")

        try:
            cfg, _ = load_train_yaml(config, values=params | fixed)
            summary = train(cfg, on_event=on_event)
        except optuna.TrialPruned:
            tell(trial.number, "pruned", params, None)
            raise
        except ChatforgeError as e:  # e.g. a d_model the heads do not divide: this trial fails, the study goes on
            tell(trial.number, "failed", params, str(e))
            trial.set_user_attr("error", str(e))
            return float("nan")  # Optuna records NaN as a failed trial, without a traceback
        for key in ("val_bpb", "tokens_per_s", "params"):
            trial.set_user_attr(key, summary[key])
        trial.set_user_attr("out_dir", str(run_dir))
        tell(trial.number, "complete", params, summary["val_loss"])
        return summary["val_loss"]

    study.optimize(objective, n_trials=n_trials, timeout=timeout_s, gc_after_trial=True)


def format_params(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def open_study(config: str, trials: int, study: str, storage: str | None, workers: int, out: str | None,
               seed: int, prune_after: int, timeout_s: float | None) -> dict:
    """Check the search, create (or reopen) the study; returns {"url", "out_dir", "done", "workers": the keyword
    arguments of run_worker for each worker that has trials to run}."""
    import optuna

    _quiet_optuna()
    base, space = load_train_yaml(config)
    if not space:
        raise ChatforgeError(f"{config}: no search: block (e.g. search: {{lr: {{low: 1e-4, high: 3e-3, log: true}}}})")
    if base.val_fraction <= 0:
        raise ChatforgeError(f"{config}: val_fraction must be > 0: trials are compared on validation loss")
    for flag, value in (("trials", trials), ("workers", workers)):
        if value < 1:
            raise ChatforgeError(f"tune: --{flag} must be at least 1, got {value}")
    out_dir = Path(out or f"{base.out_dir.rstrip('/')}-tune")
    out_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out_dir / 'optuna.db').resolve()}"
    st = optuna.create_study(study_name=study, storage=_storage(url), direction="minimize", load_if_exists=True)
    done = len(finished(st))
    remaining = max(trials - done, 0)
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    shares = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    args = [dict(config=config, study_name=study, storage_url=url, n_trials=n, out=str(out_dir), seed=seed,
                 worker=i, prune_after=prune_after, threads=threads, timeout_s=timeout_s)
            for i, n in enumerate(shares) if n]
    return {"url": url, "out_dir": out_dir, "done": done, "remaining": remaining, "workers": args}


# ---------------------------------------------------------------- results

def finished(study) -> list:
    import optuna

    return [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def write_best(study, config: str, out: Path) -> Path:
    """best.yaml: the base config with the best trial's values, ready for `chatforge train --config best.yaml`."""
    cfg, _ = load_train_yaml(config, values=study.best_trial.params | {"out_dir": str(out / "best-run")})
    path = out / "best.yaml"
    cfg.save(path)
    return path


def write_plots(study, out: Path) -> tuple[list[str], list[str]]:
    """(written, notes): optimization_history.png and param_importances.png (the latter needs two finished trials
    that differ); a note says why a plot was skipped."""
    from optuna.visualization import matplotlib as ovm

    from chatforge.plots import pyplot, save_figure

    pyplot()  # the Agg backend, before optuna touches matplotlib
    written, notes = [], []
    for name, fn in (("optimization_history.png", ovm.plot_optimization_history),
                     ("param_importances.png", ovm.plot_param_importances)):
        try:
            ax = fn(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few complete trials for importances
            notes.append(f"note: {name} skipped ({e})")
            continue
        fig = ax.figure
        fig.set_size_inches(7, 4)
        written.append(save_figure(fig, out / name))
    return written, notes


def trials_table(study) -> str:
    rows = ["| trial | state | val loss | val bpb | " + " | ".join(study.best_trial.params) + " |"]
    rows.append("|" + "---|" * (4 + len(study.best_trial.params)))
    key = lambda t: (t.value is None, t.value if t.value is not None else 0.0, t.number)  # noqa: E731
    for t in sorted(study.trials, key=key):
        loss = f"{t.value:.4f}" if t.value is not None else (
            f"({t.intermediate_values[max(t.intermediate_values)]:.4f})" if t.intermediate_values else "-")
        bpb = t.user_attrs.get("val_bpb")
        vals = [f"{t.params[k]:.3g}" if isinstance(t.params.get(k), float) else str(t.params.get(k, "-"))
                for k in study.best_trial.params]
        rows.append(f"| {t.number} | {t.state.name.lower()} | {loss} | {f'{bpb:.4f}' if bpb else '-'} | "
                    + " | ".join(vals) + " |")
    return "\n".join(rows)


def finish_study(config: str, study: str, url: str, out_dir: Path) -> dict:
    """best.yaml, the plots and tune.json once the workers are done; returns tune.json's content plus "table"
    and "notes"."""
    import optuna

    from chatforge.weights.folder import write_json

    st = optuna.load_study(study_name=study, storage=_storage(url))
    complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ChatforgeError(f"tune: no trial completed in study {study!r} (see the messages above)")
    best_yaml = write_best(st, config, out_dir)
    plots, notes = write_plots(st, out_dir)
    summary = {"study": study, "storage": url, "best_trial": st.best_trial.number, "best_value": st.best_value,
               "best_params": st.best_params, "best_yaml": str(best_yaml), "plots": plots,
               "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                           "user_attrs": t.user_attrs} for t in st.trials]}
    write_json(out_dir / "tune.json", summary)
    return summary | {"table": trials_table(st), "notes": notes}
