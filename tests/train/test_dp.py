"""Differentially private training: per-sample gradients, the accountant's epsilon, micro-batches, refusals."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.config import load_config
from chatforge.data.pack import Encoded
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.train.loop import train
from chatforge.train.run import read_metrics

opacus = pytest.importorskip("opacus")

from chatforge.train.dp import PoissonStream, encode_units, group_by_unit, row_losses, unit_chunks  # noqa: E402

from tests.train.test_loop import tiny_config, write_dataset  # noqa: E402


def _records(n: int, lengths=(7, 12, 5, 9)):
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 50, lengths[i % len(lengths)]).astype(np.int32) for i in range(n)]
    masks = [np.r_[0, np.ones(len(i) - 1)].astype(np.uint8) for i in ids]
    return Encoded(ids, masks, {})


@pytest.mark.parametrize("tied", [True, False])
def test_per_sample_gradients_equal_an_explicit_loop(tied):
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=32,
                            tie_embeddings=tied)).train()
    stream = PoissonStream(_records(4), 16, 0, 1.0, 0)
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    per_row, _ = row_losses(module, stream.batch(np.arange(4)), contextlib.nullcontext())
    per_row.mean().backward()
    samples = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    module.disable_hooks()
    for i in range(4):  # each record alone, cut to its own length: the gradient of its own mean token loss
        model.zero_grad()
        loss, _ = row_losses(model, stream.batch(np.array([i])), contextlib.nullcontext())
        loss.sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(samples[name][i], p.grad, atol=1e-5, rtol=0, msg=f"{name} record {i}")


def test_poisson_draws_depend_on_seed_and_step_only():
    a, b = PoissonStream(_records(200), 16, 0, 0.1, 3), PoissonStream(_records(200), 16, 0, 0.1, 3)
    first = [a.draw() for _ in range(5)]
    b.load_state({"draws": 2})
    assert [x.tolist() for x in first[2:]] == [b.draw().tolist() for _ in range(3)]
    sizes = [len(a.draw()) for _ in range(300)]
    assert abs(np.mean(sizes) - 20) < 1.0 and np.std(sizes) > 2  # Poisson: varying sizes around q * N


def test_private_rows_hold_one_record_each_never_packed():
    """The privacy unit is one conversation: DP-SGD's rows are never packed across records (packing is what the
    plain stream does), so each per-sample gradient is one record's, cut to seq_len + 1 at most."""
    enc = _records(40)
    stream = PoissonStream(enc, 16, 0, 0.5, 0)
    assert len(stream) == 40 and stream.rows.doc.max() == 0  # document 0 of its row, or padding (-1)
    for r, ids in enumerate(enc.ids):
        assert stream.rows.tokens[r, :len(ids)].tolist() == ids.tolist()
        assert (stream.rows.doc[r, len(ids):] == -1).all()


def _run(tmp: Path, name: str, *extra: str) -> Path:
    data = write_dataset(tmp, 120)
    cfg = load_config(None, tiny_config(tmp, data, name, max_steps=6, val_fraction=0.0, warmup_steps=1,
                                        save_every=100, dropout=0.0) + list(extra))
    train(cfg)
    return tmp / name


def test_epsilon_is_the_accountants_in_metrics_and_privacy_json(tmp_path):
    from opacus.accountants import PRVAccountant, RDPAccountant

    out = _run(tmp_path, "dp", "privacy.noise_multiplier=1.1", "privacy.max_grad_norm=0.5")
    report = json.loads((out / "final" / "privacy.json").read_text())
    n, q, delta = report["records"], report["sample_rate"], report["delta"]
    assert (n, q, delta) == (120, 8 / 120, 1 / 120)  # 120 dialogs, none held out; batch 4 x accumulation 2
    accountant = RDPAccountant()
    for row in read_metrics(out / "metrics.jsonl"):
        accountant.step(noise_multiplier=1.1, sample_rate=q)
        assert row["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=0.01)
        assert row["grad_norm"] is None  # per-record clipping replaces the global clip
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=0.01)
    assert json.loads((out / "summary.json").read_text())["privacy"]["steps"] == 6
    prv = PRVAccountant()
    for _ in range(6):
        prv.step(noise_multiplier=1.1, sample_rate=q)
    assert prv.get_epsilon(delta) <= report["epsilon"] * 1.05  # RDP is the looser bound, never far off


def test_target_epsilon_is_spent_by_the_planned_steps(tmp_path):
    from opacus.accountants import RDPAccountant

    out = _run(tmp_path, "eps", "privacy.target_epsilon=4", "privacy.delta=1e-3")
    report = json.loads((out / "final" / "privacy.json").read_text())
    accountant = RDPAccountant()
    for _ in range(6):
        accountant.step(noise_multiplier=report["noise_multiplier"], sample_rate=report["sample_rate"])
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(1e-3), rel=0.01)
    assert 4 * 0.99 <= report["epsilon"] <= 4.0 + 0.01


@pytest.mark.slow
def test_micro_batches_give_the_gradient_of_the_whole_draw(tmp_path):
    """batch_size 4 x grad_accum 1 and batch_size 1 x grad_accum 4 draw the same records (same q, seed) and, with
    negligible noise, train the same weights: noise is added once per step, not per micro-batch."""
    from safetensors.torch import load_file

    a = _run(tmp_path, "a", "privacy.noise_multiplier=1e-9", "batch_size=4", "grad_accum=1")
    b = _run(tmp_path, "b", "privacy.noise_multiplier=1e-9", "batch_size=1", "grad_accum=4")
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("over, message", [
    (["privacy.max_grad_norm=1.0"],
     "override 'privacy.max_grad_norm=1.0': privacy: give exactly one of target_epsilon and noise_multiplier"),
    (["privacy.target_epsilon=8", "privacy.noise_multiplier=1"],
     "override 'privacy.noise_multiplier=1': privacy: give exactly one of target_epsilon and noise_multiplier"),
    (["privacy.noise_multiplier=1", "stage=dpo", "init=x"],
     "override 'privacy.noise_multiplier=1': privacy: stage dpo is not supported (pretrain and sft are: their loss is a sum over each "
     "record's own tokens)"),
    (["privacy.noise_multiplier=1", "compile=true"], "override 'compile=true': compile: cannot be used with privacy: "
     "a compiled model hides the layers whose per-sample gradients Opacus computes"),
    (["privacy.noise_multiplier=1", "gradient_checkpointing=true"], "override 'gradient_checkpointing=true': "
     "gradient_checkpointing: cannot be used with privacy: it re-runs the forward pass inside backward, which "
     "Opacus's per-sample hooks cannot follow"),
    (["privacy.noise_multiplier=1", "replay.share=0.2"], "override 'replay.share=0.2': replay: cannot be used with "
     "privacy: replay dialogs drawn anew each epoch are not the records the accountant counts"),
    (["privacy.target_epsilon=8", "max_steps=null", "max_time_s=60"], "override 'privacy.target_epsilon=8': "
     "privacy.target_epsilon: needs max_steps or max_tokens: the noise is calibrated to the number of steps, which a "
     "time budget does not fix"),
    (["privacy.noise_multiplier=-1"], "override 'privacy.noise_multiplier=-1': privacy.noise_multiplier: must be a "
     "positive number, got -1.0"),
    (["privacy.noise_multiplier=1", "privacy.accountant=gdp"], "override 'privacy.accountant=gdp': "
     "privacy.accountant: must be rdp or prv, got 'gdp'"),
    (["privacy.noise_multiplier=1", "privacy.unit=person"], "override 'privacy.unit=person': "
     "privacy.unit: must be record or user, got 'person'"),
])
def test_config_refusals(over, message):
    with pytest.raises(ChatforgeError) as e:
        load_config(None, over)
    assert str(e.value) == message


def test_yaml_privacy_errors_name_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 10\nprivacy:\n  target_epsilon: 8\n  clipping: fancy\n")
    with pytest.raises(ChatforgeError, match=r"c\.yaml:4: privacy\.clipping: must be flat or ghost, got 'fancy'"):
        load_config(str(path))
    path.write_text("max_steps: 10\nprivacy:\n  target_epsilon: 8\n  epsilon: 3\n")
    with pytest.raises(ChatforgeError, match=r"c\.yaml:4: privacy\.epsilon: unknown field \(did you mean "
                                             r"'target_epsilon'\?\)"):
        load_config(str(path))


@pytest.mark.parametrize("over, message", [
    (["privacy.clipping=ghost"], "privacy: clipping ghost is not offered: chatforge computes each record's whole "
     "per-sample gradient and clips that (nor could it clip this model's tied embeddings: the input embedding is "
     "the output layer, and ghost clipping computes each layer's per-sample norm apart); use clipping: flat"),
    (["privacy.clipping=ghost", "model.tie_embeddings=false"], "privacy: clipping ghost is not offered: chatforge "
     "computes each record's whole per-sample gradient and clips that; use clipping: flat"),
    (["batch_size=64"], "privacy: batch_size x grad_accum (128) is more than the 102 training records; the sample "
     "rate would exceed 1"),
    (["stage=pretrain", "seq_len=16"], "privacy: 102 training records are longer than seq_len (16 tokens); "
     "pretraining splits such a record across rows, each clipped apart, so one record would count as several "
     "privacy units; raise seq_len or shorten the records"),
])
def test_run_refusals(tmp_path, over, message):
    data = write_dataset(tmp_path, 120)
    cfg = load_config(None, tiny_config(tmp_path, data, "r", max_steps=2) + ["privacy.noise_multiplier=1"] + over)
    with pytest.raises(ChatforgeError) as e:
        train(cfg)
    assert str(e.value) == message


# ---------------------------------------------------------------- the user as the privacy unit

def test_a_users_records_are_clipped_as_one_gradient():
    """unit: user — the gradient clipped is the sum of the user's records' gradients (an explicit loop), so a
    user with three records moves the model no more than one with one record."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_seq_len=32)).train()
    units = np.array([0, 0, 0, 1])
    stream = PoissonStream(_records(4), 16, 0, 1.0, 0, units)
    explicit = []
    for i in range(4):
        model.zero_grad()
        loss, _ = row_losses(model, stream.batch(np.array([i])), contextlib.nullcontext())
        loss.sum().backward()
        explicit.append({n: p.grad.clone() for n, p in model.named_parameters()})
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    per_row, _ = row_losses(module, stream.batch(np.arange(4)), contextlib.nullcontext())
    per_row.mean().backward()
    group_by_unit(list(model.parameters()), units)
    users = [{n: sum(explicit[i][n] for i in rows) for n in explicit[0]} for rows in ([0, 1, 2], [3])]
    for name, p in model.named_parameters():
        assert p.grad_sample.shape[0] == 2
        for u in range(2):
            torch.testing.assert_close(p.grad_sample[u], users[u][name], atol=1e-5, rtol=0, msg=f"{name} user {u}")
    # clipped per user: with a tiny max_grad_norm and no noise, the step is the mean of two unit-norm directions
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1e-3,
                      expected_batch_size=2, loss_reduction="mean")
    opt.pre_step()
    norm = lambda g: torch.sqrt(sum((v ** 2).sum() for v in g.values()))  # noqa: E731
    for name, p in model.named_parameters():
        want = sum(users[u][name] * (1e-3 / norm(users[u])) for u in range(2)) / 2
        torch.testing.assert_close(p.grad, want, atol=1e-7, rtol=1e-3, msg=name)


def test_user_draws_take_all_of_a_users_rows_and_micro_batches_never_split_one():
    units = np.repeat(np.arange(50), np.arange(50) % 4 + 1)  # users with 1 to 4 records
    stream = PoissonStream(_records(len(units)), 16, 0, 0.2, 1, units)
    for _ in range(20):
        index = stream.draw()
        drawn = set(units[index].tolist())
        assert sorted(index.tolist()) == sorted(np.flatnonzero(np.isin(units, list(drawn))).tolist())
        chunks = unit_chunks(index, units[index], 3)
        assert np.concatenate(chunks).tolist() == index.tolist()
        for c in chunks:  # at most 3 rows unless one user alone has more; no user in two chunks
            assert len(c) <= 3 or len(set(units[c].tolist())) == 1
        seen = [set(units[c].tolist()) for c in chunks]
        assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
    sizes = [len(set(units[stream.draw()].tolist())) for _ in range(300)]
    assert abs(np.mean(sizes) - 10) < 1.0  # q * U users per draw, not q * records
    one = PoissonStream(_records(30), 16, 0, 0.3, 5)  # without units: every record its own, draws as before
    each = PoissonStream(_records(30), 16, 0, 0.3, 5, np.arange(30))
    assert [one.draw().tolist() for _ in range(5)] == [each.draw().tolist() for _ in range(5)]


def test_units_group_records_by_user_and_a_record_without_one_stands_alone():
    records = [{"text": "a", "user": "ann"}, {"text": "b"}, {"text": "c", "user": 7}, {"text": "d", "user": "ann"},
               {"text": "e", "user": "gone"}, {"text": "f"}]
    encode = lambda rs: Encoded([np.array([ord(r["text"])] * 2) for r in rs if r["text"] != "e"], [], {"n": len(rs)})  # noqa: E731
    enc, units = encode_units(records, "user", encode)
    assert [chr(int(i[0])) for i in enc.ids] == ["a", "d", "b", "c", "f"]  # grouped in order of first appearance
    assert units.tolist() == [0, 0, 1, 2, 3] and enc.stats == {"n": 6}  # "gone" encoded to nothing: no unit


def test_user_unit_run_reports_users_and_records(tmp_path):
    path = write_dataset(tmp_path, 120)
    lines = [json.loads(line) | {"user": f"u{i % 30}"} for i, line in enumerate(path.read_text().splitlines())]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = load_config(None, tiny_config(tmp_path, path, "users", max_steps=3, val_fraction=0.0, warmup_steps=1,
                                        save_every=100, dropout=0.0) + ["privacy.noise_multiplier=1",
                                                                        "privacy.unit=user"])
    train(cfg)
    report = json.loads((tmp_path / "users" / "final" / "privacy.json").read_text())
    assert (report["units"], report["records"], report["sample_rate"], report["delta"]) == (30, 120, 8 / 30, 1 / 30)
    assert report["privacy_unit"].startswith("one user")
