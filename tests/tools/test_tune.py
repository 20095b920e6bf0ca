"""`chatforge tune`: the search block, two worker processes sharing one SQLite study, resuming after a kill, and a
best.yaml that trains as it is."""

import os
import signal
import subprocess
import sys
import time

import pytest

from chatforge.commands.tools import tune_command
from chatforge.config import SearchChoice, SearchRange, load_config, load_train_yaml
from chatforge.errors import ChatforgeError

TINY = """\
search:
  lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}
  model.d_model: {{choices: [16, 32]}}
  warmup_steps: {{low: 0, high: 4}}
data: builtin:english/greetings
vocab_size: 300
model: {{preset: nano, n_layer: 1, d_model: 16, n_head: 2, n_kv_head: 1}}
seq_len: 32
batch_size: 4
max_steps: {steps}
eval_every: 2
eval_batches: 1
dtype: fp32
out_dir: {out}
"""


def write_config(tmp_path, steps=4):
    path = tmp_path / f"tune-{steps}.yaml"
    path.write_text(TINY.format(steps=steps, out=tmp_path / "runs" / "tiny"))
    return path


def study_trials(url, name="chatforge"):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=url).trials


def test_search_block_is_stripped_and_errors_keep_their_line(tmp_path):
    path = write_config(tmp_path)
    cfg, space = load_train_yaml(str(path))
    assert cfg.model["d_model"] == 16 and cfg.max_steps == 4
    assert space["lr"] == SearchRange(1e-4, 1e-2, log=True, step=None, integer=False)
    assert space["warmup_steps"].integer and space["model.d_model"] == SearchChoice([16, 32])
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("batch_size: 4", "batch_size: four"))
    with pytest.raises(ChatforgeError, match=rf"{bad}:9: batch_size"):  # line 9 in the user's file
        load_train_yaml(str(bad))
    bad.write_text(path.read_text().replace("warmup_steps: {low: 0, high: 4}", "warmup_step: {low: 0, high: 4}"))
    with pytest.raises(ChatforgeError, match="search.warmup_step: unknown config key"):
        load_train_yaml(str(bad))
    bad.write_text(path.read_text().replace("low: 0, high: 4", "low: 4, high: 4"))
    with pytest.raises(ChatforgeError, match="low < high"):
        load_train_yaml(str(bad))


@pytest.mark.slow
def test_two_workers_share_the_study_then_a_killed_search_resumes(tmp_path, capsys):
    cfg = write_config(tmp_path)
    out = tmp_path / "study"
    url = f"sqlite:///{out / 'optuna.db'}"
    assert tune_command(str(cfg), trials=4, workers=2, out=str(out), prune_after=10) == 0
    trials = study_trials(url)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(p.name for p in out.glob("trial-*")) == [f"trial-000{i}" for i in range(4)]
    assert len({(t.params["lr"], t.params["warmup_steps"]) for t in trials}) == 4  # workers did not replay each other
    assert "best: trial" in capsys.readouterr().out
    best = min(trials, key=lambda t: t.value)
    trained = load_config(str(out / "best.yaml"))  # a plain training config: search stripped, values applied
    assert trained.lr == best.params["lr"] and trained.model["d_model"] == best.params["model.d_model"]
    assert trained.warmup_steps == best.params["warmup_steps"] and trained.out_dir == str(out / "best-run")
    assert (out / "optimization_history.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "param_importances.png").exists()

    # a second search process on the same storage, killed in the middle of a trial
    slow = write_config(tmp_path, steps=100_000)  # a trial that cannot finish (nor be pruned) before the kill
    proc = subprocess.Popen([sys.executable, "-m", "chatforge.cli", "tune", str(slow), "--trials", "8",
                             "--out", str(out), "--prune-after", "1000"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=os.getcwd())
    deadline = time.time() + 60
    while time.time() < deadline and not any(t.state.name == "RUNNING" for t in study_trials(url)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = [t for t in study_trials(url) if t.state.name == "RUNNING"]
    assert [t.number for t in killed] == [4]

    # resume: the study continues its numbering and finishes exactly the missing trials
    assert tune_command(str(cfg), trials=6, out=str(out), prune_after=10) == 0
    trials = study_trials(url)
    numbers = sorted(t.number for t in trials)
    assert numbers == [0, 1, 2, 3, 4, 5, 6]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6 and {t.number for t in finished} == {0, 1, 2, 3, 5, 6}


def test_tune_needs_a_search_block(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text("max_steps: 3\n")
    with pytest.raises(ChatforgeError, match="no search: block"):
        tune_command(str(path), trials=1, out=str(tmp_path / "o"))


def test_a_trial_with_an_impossible_shape_fails_alone_with_one_line(tmp_path, capsys):
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("choices: [16, 32]", "choices: [17]"))  # 17 is not divisible by 2 heads
    with pytest.raises(ChatforgeError, match="no trial completed"):
        tune_command(str(path), trials=1, out=str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert "trial 0: failed: value model.d_model=17: model: d_model 17 is not divisible by n_head 2" in err
    assert "Traceback" not in err
