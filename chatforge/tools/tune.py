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

`search:` is stripped before the rest reaches load_config, so TrainConfig stays the plain training config. The study
lives in SQLite: several worker processes share it and a killed search resumes where it stopped (each trial reports
its validation loss at every evaluation, which is what the median pruner compares).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

from chatforge.errors import ChatforgeError

HEARTBEAT_S = 5  # a RUNNING trial whose worker stops beating for GRACE_S is marked FAIL by the next worker
GRACE_S = 30


# ---------------------------------------------------------------- the YAML with a search block

def _search_line_range(text: str) -> tuple[int, int] | None:
    """0-based (first, last) lines of the top-level `search:` entry, or None."""
    import yaml

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return None
    if not isinstance(root, yaml.MappingNode):
        return None
    for k, v in root.value:
        if k.value == "search":
            end = v.end_mark.line - (1 if v.end_mark.column == 0 else 0)
            return k.start_mark.line, max(end, k.start_mark.line)
    return None


def load_train_yaml(path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple:
    """(TrainConfig, search dict or None) from a training YAML that may carry a `search:` block.

    The block's lines are blanked in a temporary copy, so load_config's errors keep pointing at the right line; the
    copy's name in an error is replaced by the user's file name.
    """
    import yaml

    from chatforge.config import load_config

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ChatforgeError(f"{path}: config file not found")
    span = _search_line_range(text)
    search = None
    if span is not None:
        search = (yaml.safe_load(text) or {}).get("search")
        lines = text.splitlines()
        for i in range(span[0], span[1] + 1):
            lines[i] = ""
        text = "\n".join(lines) + "\n"
    fd, tmp = tempfile.mkstemp(suffix=".yaml", prefix="chatforge-tune-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            cfg = load_config(tmp, list(overrides))
        except ChatforgeError as e:
            raise ChatforgeError(str(e).replace(tmp, path)) from None
    finally:
        os.unlink(tmp)
    if span is not None:
        search = parse_search(search, f"{path}:{span[0] + 1}")
    return cfg, search


def parse_search(search, where: str) -> dict[str, dict]:
    """Validate the search block: name -> {"low","high","log","step"} or {"choices"}."""
    import dataclasses

    from chatforge.config import TrainConfig

    if not isinstance(search, dict) or not search:
        raise ChatforgeError(f"{where}: search: expected a mapping of config keys to ranges, e.g. "
                             "lr: {low: 1e-4, high: 3e-3, log: true}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for name, spec in search.items():
        top = str(name).split(".")[0]
        if top not in known:
            raise ChatforgeError(f"{where}: search.{name}: unknown config key {top!r}")
        if not isinstance(spec, dict):
            raise ChatforgeError(f"{where}: search.{name}: expected {{low, high}} or {{choices: [...]}}, got {spec!r}")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"] or set(spec) - {"choices"}:
                raise ChatforgeError(f"{where}: search.{name}: choices must be a non-empty list (and alone)")
            out[name] = {"choices": spec["choices"]}
            continue
        extra = set(spec) - {"low", "high", "log", "step"}
        if extra or "low" not in spec or "high" not in spec:
            raise ChatforgeError(f"{where}: search.{name}: expected keys low, high (and optionally log, step), "
                                 f"got {sorted(spec)}")
        try:
            low, high = (float(spec[k]) if isinstance(spec[k], str) else spec[k] for k in ("low", "high"))
        except ValueError:
            raise ChatforgeError(f"{where}: search.{name}: low and high must be numbers")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (low, high)) or not low < high:
            raise ChatforgeError(f"{where}: search.{name}: need numbers low < high, got {spec['low']!r}, {spec['high']!r}")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise ChatforgeError(f"{where}: search.{name}: a log range needs low > 0")
        step = spec.get("step")
        is_int = isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int))
        out[name] = {"low": low, "high": high, "log": log, "step": step, "int": is_int}
    return out


def suggest(trial, space: dict[str, dict]) -> dict:
    params = {}
    for name, s in space.items():
        if "choices" in s:
            params[name] = trial.suggest_categorical(name, s["choices"])
        elif s["int"]:
            params[name] = trial.suggest_int(name, s["low"], s["high"], step=s["step"] or 1, log=s["log"])
        else:
            params[name] = trial.suggest_float(name, float(s["low"]), float(s["high"]), step=s["step"], log=s["log"])
    return params


def _override(name: str, value) -> str:
    import json

    return f"{name}={json.dumps(value)}"  # JSON is YAML: numbers, strings and lists read back as they were


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
               prune_after: int, threads: int | None, timeout_s: float | None = None) -> None:
    """Run n_trials trials of the shared study in this process."""
    import optuna

    from chatforge.train.loop import train

    _quiet_optuna()
    if threads:
        import torch

        torch.set_num_threads(threads)
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
        overrides = [_override(k, v) for k, v in params.items()] + [f"out_dir={run_dir}"]
        if threads:
            overrides.append(f"num_threads={threads}")

        def on_eval(step: int, metrics: dict) -> None:
            # Reported against tokens seen, not steps, so trials with different batch sizes meet at equal budgets.
            trial.report(metrics["val_loss"], metrics["tokens"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"val loss {metrics['val_loss']:.4f} after {metrics['tokens']:,} tokens is "
                                         "worse than the median of earlier trials")

        try:
            cfg, _ = load_train_yaml(config, overrides)
            summary = train(cfg, on_eval=on_eval, progress=False)
        except optuna.TrialPruned:
            print(f"trial {trial.number}: pruned {_fmt(params)}", file=sys.stderr, flush=True)
            raise
        except ChatforgeError as e:  # e.g. a d_model the heads do not divide: this trial fails, the study goes on
            print(f"trial {trial.number}: failed: {e}", file=sys.stderr, flush=True)
            trial.set_user_attr("error", str(e))
            return float("nan")  # Optuna records NaN as a failed trial, without a traceback
        trial.set_user_attr("val_bpb", summary["val_bpb"])
        trial.set_user_attr("tokens_per_s", summary["tokens_per_s"])
        trial.set_user_attr("params", summary["params"])
        trial.set_user_attr("out_dir", str(run_dir))
        print(f"trial {trial.number}: val loss {summary['val_loss']:.4f} {_fmt(params)}", file=sys.stderr,
              flush=True)
        return summary["val_loss"]

    study.optimize(objective, n_trials=n_trials, timeout=timeout_s, gc_after_trial=True)


def _fmt(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _worker_main(argv: list[str]) -> None:
    import json

    run_worker(**json.loads(argv[0]))


# ---------------------------------------------------------------- results

def finished(study) -> list:
    import optuna

    return [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def write_best(study, config: str, out: Path) -> Path:
    """best.yaml: the base config with the best trial's values, ready for `chatforge train --config best.yaml`."""
    best = study.best_trial
    overrides = [_override(k, v) for k, v in best.params.items()] + [f"out_dir={out / 'best-run'}"]
    cfg, _ = load_train_yaml(config, overrides)
    path = out / "best.yaml"
    cfg.save(path)
    return path


def write_plots(study, out: Path) -> list[str]:
    """optimization_history.png and param_importances.png (the latter needs two finished trials that differ)."""
    from optuna.visualization import matplotlib as ovm

    from chatforge.plots import pyplot, save_figure

    pyplot()  # the Agg backend, before optuna touches matplotlib
    written = []
    for name, fn in (("optimization_history.png", ovm.plot_optimization_history),
                     ("param_importances.png", ovm.plot_param_importances)):
        try:
            ax = fn(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few complete trials for importances
            print(f"note: {name} skipped ({e})", file=sys.stderr)
            continue
        fig = ax.figure
        fig.set_size_inches(7, 4)
        written.append(save_figure(fig, out / name))
    return written


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
    import json
    import subprocess

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
    remaining = trials - done
    print(f"study {study!r} in {url}: {done} finished trials, {max(remaining, 0)} to run with {workers} worker(s)",
          file=sys.stderr)
    if remaining > 0:
        threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
        shares = [remaining // workers + (i < remaining % workers) for i in range(workers)]
        args = [dict(config=config, study_name=study, storage_url=url, n_trials=n, out=str(out_dir), seed=seed,
                     worker=i, prune_after=prune_after, threads=threads, timeout_s=timeout_s)
                for i, n in enumerate(shares) if n]
        if len(args) == 1:
            run_worker(**args[0])
        else:
            code = "import sys; from chatforge.tools.tune import _worker_main; _worker_main(sys.argv[1:])"
            procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(a)]) for a in args]
            try:
                codes = [p.wait() for p in procs]
            finally:
                for p in procs:  # Ctrl-C: stop the workers too; their running trials are marked failed later
                    if p.poll() is None:
                        p.terminate()
            if any(codes):
                raise ChatforgeError(f"tune: a worker failed (exit codes {codes}); see its messages above")
    st = optuna.load_study(study_name=study, storage=_storage(url))
    complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ChatforgeError(f"tune: no trial completed in study {study!r} (see the messages above)")
    best_yaml = write_best(st, config, out_dir)
    plots = write_plots(st, out_dir)
    table = trials_table(st)
    summary = {"study": study, "storage": url, "best_trial": st.best_trial.number, "best_value": st.best_value,
               "best_params": st.best_params, "best_yaml": str(best_yaml), "plots": plots,
               "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                           "user_attrs": t.user_attrs} for t in st.trials]}
    from chatforge.weights.folder import write_json

    write_json(out_dir / "tune.json", summary)
    print(table)
    print(f"\nbest: trial {st.best_trial.number}, val loss {st.best_value:.4f}, {_fmt(st.best_params)}")
    print(f"train it: chatforge train --config {best_yaml}")
    return 0
