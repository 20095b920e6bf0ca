"""Speed features that a user relies on: the compile rule, the cached matmul peak, MFU and trained tokens/s in every
metrics row, the token loss (trained positions only eagerly, static shapes compiled), and LoRA's frozen base in bf16
with fp32 adapters and AdamW state."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from chatforge.config import load_config
from chatforge.data.pack import Batch
from chatforge.device import matmul_peak
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.train.loss import token_loss
from chatforge.train.speed import frozen_to, should_compile, training_flops_per_token


def test_compile_auto_is_on_where_it_pays():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert should_compile(load_config(None, ["compile=auto", "max_steps=3000"]), cpu)
    assert not should_compile(load_config(None, ["compile=auto", "max_steps=200"]), cpu)
    assert should_compile(load_config(None, ["compile=auto", "max_steps=200"]), cuda)
    assert not should_compile(load_config(None, ["compile=auto", "max_steps=5000", "lora.r=4"]), cpu)
    assert should_compile(load_config(None, ["compile=true", "max_steps=5"]), cpu)
    assert not should_compile(load_config(None, ["compile=false"]), cuda)


def test_the_matmul_peak_keeps_the_best_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path))
    first = matmul_peak(torch.device("cpu"), torch.float32)
    cached = json.loads((tmp_path / "matmul_peak.json").read_text())
    assert list(cached.values()) == [first] and first > 1e8
    # A busier moment measures less: the best stays; a better measurement replaces it.
    import chatforge.device as device

    for measured, expected in ((first / 2, first), (first * 3, first * 3), (first, first * 3)):
        monkeypatch.setattr(device, "measure_matmul_peak", lambda d, t, m=measured: m)
        assert matmul_peak(torch.device("cpu"), torch.float32) == expected
        assert list(json.loads((tmp_path / "matmul_peak.json").read_text()).values()) == [expected]


def test_the_token_loss_sums_only_trained_targets():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=16))
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.rand(2, 8) > 0.5
    batch = Batch(ids[:, :-1], ids[:, 1:], mask, torch.zeros(2, 8, dtype=torch.long),
                  torch.arange(8).expand(2, 8))
    ce, pred, targets = token_loss(model, batch, torch.autocast("cpu", enabled=False))
    logits = model(batch.input_ids)
    want = F.cross_entropy(logits[mask], batch.targets[mask], reduction="sum")
    torch.testing.assert_close(ce, want)
    assert pred is None and targets is None  # a training step picks nothing out (no host sync)
    with torch.no_grad():
        _, pred, targets = token_loss(model, batch, torch.autocast("cpu", enabled=False))
    assert torch.equal(targets, batch.targets[mask]) and torch.equal(pred, logits[mask].argmax(-1))


def test_eager_loss_takes_logits_at_trained_positions_only_and_matches_the_static_one(monkeypatch):
    """Eager, the head runs on the trained positions alone; under torch.compile (static shapes) on every position
    with the rest ignored. Both give the same loss and the same gradients."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=16))
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.rand(2, 8) > 0.6
    batch = Batch(ids[:, :-1], ids[:, 1:], mask, torch.zeros(2, 8, dtype=torch.long), torch.arange(8).expand(2, 8))
    off = torch.autocast("cpu", enabled=False)
    assert model(batch.input_ids, only=mask).shape == (1, int(mask.sum()), 50)
    torch.testing.assert_close(model(batch.input_ids, only=mask)[0], model(batch.input_ids)[mask])

    def loss_and_grads():
        model.zero_grad()
        ce = token_loss(model, batch, off)[0]
        ce.backward()
        return ce.detach(), [p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the path a compiled loss traces
    static = loss_and_grads()
    torch.testing.assert_close(eager[0], static[0])
    for g_eager, g_static in zip(eager[1], static[1]):
        torch.testing.assert_close(g_eager, g_static)


def test_lora_freezes_the_base_in_bf16_and_trains_fp32_adapters():
    from chatforge.train.optim import make_optimizer
    from chatforge.weights.lora import apply_lora

    torch.manual_seed(0)
    core = GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=32))
    model = apply_lora(core, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    moved = frozen_to(model, torch.bfloat16)
    assert moved == sum(p.numel() for p in model.parameters() if not p.requires_grad) > 0
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    cfg = load_config(None, ["lora.r=4"])
    opt = make_optimizer(model, cfg, torch.device("cpu"), core)
    ids = torch.randint(0, 64, (2, 17))
    batch = Batch(ids[:, :-1], ids[:, 1:], torch.ones(2, 16, dtype=torch.bool), torch.zeros(2, 16, dtype=torch.long),
                  torch.arange(16).expand(2, 16))
    ce, _, _ = token_loss(model, batch, torch.autocast("cpu", dtype=torch.bfloat16))
    ce.backward()
    opt.step()
    states = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
    assert states and all(t.dtype == torch.float32 for t in states)


def test_metrics_rows_carry_mfu_and_trained_tokens_per_second(tmp_path, monkeypatch, one_thread):
    from chatforge.train.loop import train
    from chatforge.train.run import read_metrics

    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": f"hello {i} there"}]}) + "\n"
                            for i in range(30)))
    cfg = load_config(None, [f"data={data}", f"out_dir={tmp_path / 'run'}", "val_fraction=0", "vocab_size=300",
                             "model.d_model=32", "model.n_head=2", "model.n_kv_head=1", "model.n_layer=1",
                             "seq_len=32", "batch_size=4", "max_steps=3", "warmup_steps=1", "dtype=fp32"])
    train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    peak = json.loads((tmp_path / "cache" / "matmul_peak.json").read_text())
    (peak,) = peak.values()
    core = GPT(ModelConfig(vocab_size=300, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=512))
    per_token = training_flops_per_token(core, 32, lora=False)
    for r in rows:
        assert 0 < r["trained_tokens"] < 4 * 32 and r["trained_tok_s"] < r["tok_s"]
        assert r["trained_tok_s"] / r["tok_s"] == pytest.approx(r["trained_tokens"] / (4 * 32), rel=0.02)
        assert r["mfu"] == pytest.approx(per_token * r["tok_s"] / peak, rel=0.02, abs=1e-4)
