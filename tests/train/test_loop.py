"""Training: the loss mask, accumulation, the schedule, configs, NaN stops, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.config import TrainConfig, load_config
from chatforge.commands.train import TrainProgress
from chatforge.data import load_dataset
from chatforge.data.pack import Batch, encode_records, make_batch, pack
from chatforge.device import autocast
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.tokenizer import IM_END, train_tokenizer
from chatforge.model.vocab import resize_vocab
from chatforge.train.events import Note
from chatforge.train.loop import train
from chatforge.train.loss import accumulate_gradients
from chatforge.train.optim import budget_progress, lr_at, schedule_progress, warmup_share
from chatforge.train.run import read_metrics
from conftest import resume_training, train_until_killed

ROOT = Path(__file__).resolve().parents[2]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_dataset(folder: Path, n: int = 90) -> Path:
    """Small arithmetic dialogs: enough structure that the loss falls within a few dozen steps."""
    path = folder / "dialogs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = i % 10, (i * 7 + 3) % 10
            msgs = [{"role": "user", "content": f"What is {NUMBERS[a]} plus {NUMBERS[b]}? (#{i})"},
                    {"role": "assistant", "content": f"{NUMBERS[a]} plus {NUMBERS[b]} is {a + b}."}]
            if i % 3 == 0:
                msgs += [{"role": "user", "content": "And times?"},
                         {"role": "assistant", "content": f"{NUMBERS[a]} times {NUMBERS[b]} is {a * b}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def tiny_config(tmp: Path, data: Path, name: str, **over) -> list[str]:
    base = {"stage": "sft", "data": str(data), "val_fraction": 0.15, "vocab_size": 300, "out_dir": str(tmp / name),
            "model.preset": "nano", "model.d_model": 64, "model.n_head": 2, "model.n_kv_head": 1,
            "model.n_layer": 2, "dropout": 0.1, "seq_len": 64, "batch_size": 4, "grad_accum": 2, "lr": 3e-3,
            "warmup_steps": 5, "max_steps": 60, "eval_every": 10, "eval_batches": 2, "save_every": 5,
            "dtype": "fp32", "num_threads": 1, "seed": 3, "log_every": 5}
    base |= over
    return [f"{k}={v}" for k, v in base.items()]


# ---------------------------------------------------------------- loss mask and accumulation

def test_sft_loss_mask_on_a_multi_turn_conversation():
    tok = train_tokenizer(["What is two plus two? It is four. And times? Also four."] * 5, vocab_size=300)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "It is four."},
                {"role": "user", "content": "And times?"},
                {"role": "assistant", "content": "Also four."}]
    enc = encode_records([{"messages": messages}], tok, "assistant", row_len=128, split_long=False)
    batch = make_batch(pack(enc, 127, tok.pad_id), np.arange(1))
    ids, _ = tok.render(messages)
    trained = batch.loss_mask[0].nonzero().flatten().tolist()
    # targets are shifted by one: the target at input position j is token j + 1 of the conversation
    expected = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.render(messages[:i], add_generation_prompt=True)[0])
            end = len(tok.render(messages[: i + 1])[0]) - 1  # the "\n" after <|im_end|> is not trained
            assert ids[end - 1] == tok.eos_id
            expected += list(range(start - 1, end - 1))
    assert trained == expected
    texts = [tok.decode(batch.targets[0, s:e].tolist()) for s, e in ((expected[0], expected[0] + 4),)]
    assert texts[0].startswith("It is")
    assert tok.decode(batch.targets[0][batch.loss_mask[0]].tolist()) == f"It is four.{IM_END}Also four.{IM_END}"


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches with 3 and 19 trained tokens give the gradient of one batch holding all 22."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=32))
    ids = torch.randint(0, 50, (2, 20))
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, 5:8] = True  # 3 trained tokens
    mask[1, 1:] = True  # 19
    big = Batch(ids, torch.roll(ids, -1, 1), mask, torch.zeros_like(ids), torch.arange(20).expand(2, 20))
    parts = [Batch(*(t[i:i + 1] for t in (big.input_ids, big.targets, big.loss_mask, big.doc_ids, big.position_ids)))
             for i in range(2)]
    assert [p.n_trained for p in parts] == [3, 19]
    ctx = autocast(torch.device("cpu"), torch.float32)
    loss_big, n_big = accumulate_gradients(model, [big], torch.device("cpu"), ctx)
    g_big = _grads(model)
    model.zero_grad()
    loss_acc, n_acc = accumulate_gradients(model, parts, torch.device("cpu"), ctx)
    g_acc = _grads(model)
    assert n_big == n_acc == 22
    assert abs(loss_big - loss_acc) < 1e-6
    assert torch.allclose(g_big, g_acc, atol=1e-6, rtol=0)
    # the per-micro-batch mean that this replaces would be off: it weights 3 tokens like 19
    model.zero_grad()
    for p in parts:
        accumulate_gradients(model, [p], torch.device("cpu"), ctx)
    assert not torch.allclose(g_big, _grads(model) / 2, atol=1e-4)


def test_ddp_all_reduces_once_per_step_not_per_micro_batch(tmp_path):
    """Under DDP the micro-batches before the last run in no_sync: one all-reduce per bucket per optimizer step
    (counted by a comm hook on a 1-process gloo group), and the same gradient as without DDP."""
    import torch.distributed as td
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=32))
    ids = torch.randint(0, 50, (3, 16))
    parts = [Batch(ids[i:i + 1], torch.roll(ids[i:i + 1], -1, 1), torch.ones(1, 16, dtype=torch.bool),
                   torch.zeros(1, 16, dtype=torch.long), torch.arange(16)[None]) for i in range(3)]
    ctx = autocast(torch.device("cpu"), torch.float32)
    accumulate_gradients(model, parts, torch.device("cpu"), ctx)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DDP(model, bucket_cap_mb=1000)  # one bucket
        calls = []

        def counting(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, counting)
        accumulate_gradients(ddp, parts, torch.device("cpu"), ctx)
        assert calls == [0]  # 3 micro-batches, one all-reduce
        assert torch.allclose(_grads(model), want, atol=1e-6, rtol=0)
    finally:
        td.destroy_process_group()


def test_lr_schedule_values():
    lr, low, warm = 1e-3, 1e-4, 10
    assert lr_at(0, 0.0, lr, low, warm, 0.1) == pytest.approx(1e-4)
    assert lr_at(4, 0.04, lr, low, warm, 0.1) == pytest.approx(5e-4)
    assert lr_at(9, 0.09, lr, low, warm, 0.1) == pytest.approx(1e-3)  # the last warm-up step trains at the peak
    assert lr_at(10, 0.1, lr, low, warm, 0.1) == pytest.approx(1e-3)  # the cosine starts at the peak
    assert lr_at(55, 0.55, lr, low, warm, 0.1) == pytest.approx((lr + low) / 2)  # half-way through the decay
    assert lr_at(100, 1.0, lr, low, warm, 0.1) == pytest.approx(low)
    assert lr_at(100, 1.7, lr, low, warm, 0.1) == pytest.approx(low)  # past the budget: stays at min_lr
    assert lr_at(10, 0.25, lr, low, 0) == pytest.approx(low + 0.5 * (lr - low) * (1 + math.cos(math.pi / 4)))
    values = [lr_at(s, s / 100, lr, low, warm, 0.1) for s in range(100)]
    assert max(values) == pytest.approx(values[9]) and values == sorted(values[:10]) + values[10:]
    assert all(a >= b for a, b in zip(values[9:], values[10:]))  # monotone decay after warm-up


def test_a_long_warm_up_reaches_the_peak_and_warns():
    """60 steps with 50 of warm-up: step 49 (and 50) train at the configured 3e-3; the old warm-up x whole-run
    cosine peaked at ~1e-3. More than half of the budget in warm-up is worth a warning."""
    cfg = TrainConfig(max_steps=60, warmup_steps=50, lr=3e-3, min_lr=1e-4)
    w = warmup_share(cfg)
    assert w == pytest.approx(50 / 60)
    lrs = [lr_at(s, schedule_progress(cfg, s, 0, 0.0), cfg.lr, cfg.final_min_lr, 50, w) for s in range(60)]
    assert lrs[49] == pytest.approx(3e-3) and lrs[50] == pytest.approx(3e-3) and max(lrs) == pytest.approx(3e-3)
    assert lrs[59] == pytest.approx(1e-4 + 0.5 * (3e-3 - 1e-4) * (1 + math.cos(math.pi * 0.9)))
    assert warmup_share(TrainConfig(max_steps=None, max_tokens=4096 * 100, batch_size=16, seq_len=256,
                                    warmup_steps=25)) == pytest.approx(0.25)
    assert warmup_share(TrainConfig(max_steps=None, max_time_s=60.0)) is None  # known only once it has run


def test_the_warm_up_warning_reaches_the_user_through_the_command_layer(tmp_path, capsys):
    data = write_dataset(tmp_path, n=30)
    events = []
    cfg = load_config(None, tiny_config(tmp_path, data, "warm", max_steps=8, warmup_steps=6, eval_every=8,
                                        save_every=8, grad_accum=1, sample_val_prompts=2))
    summary = train(cfg, on_event=events.append)
    _, val, _ = load_dataset(str(data), 0.15, 3)  # the run's own split: the samples ask its first validation questions
    assert [s["messages"] for s in summary["samples"]] == [r["messages"][:1] for r in val[:2]]
    saved = json.loads((tmp_path / "warm" / "samples.json").read_text())
    assert [s["reply"] for s in saved] == [s["reply"] for s in summary["samples"]]
    warning = ("warning: the warm-up (6 steps) takes 75% of the training budget, leaving the cosine decay little or "
               "nothing; lower warmup_steps or raise the budget")
    assert [e.text for e in events if isinstance(e, Note)] == [warning]
    assert capsys.readouterr().err == ""  # the library printed nothing
    rows = read_metrics(tmp_path / "warm" / "metrics.jsonl")
    assert rows[5]["lr"] == pytest.approx(3e-3) and summary["steps"] == 8
    progress = TrainProgress()
    progress(events[0])
    assert capsys.readouterr().err == warning + "\n"


def test_a_time_cap_stops_the_run_but_drives_the_schedule_only_as_the_sole_budget():
    both = TrainConfig(max_steps=100, max_time_s=10.0)
    assert schedule_progress(both, 25, 0, 9.0) == 0.25  # a busy machine does not change step 25's lr ...
    assert budget_progress(both, 25, 0, 10.0) == 1.0  # ... but the run stops at the cap
    alone = TrainConfig(max_steps=None, max_time_s=10.0)
    assert schedule_progress(alone, 25, 0, 5.0) == 0.5


def test_a_time_limit_stops_training_and_says_so_with_the_lr_of_a_step_budget(tmp_path, one_thread):
    data = write_dataset(tmp_path, n=30)
    summary = train(load_config(None, tiny_config(tmp_path, data, "clock", max_time_s=0.5)))
    assert summary["stop_reason"] == "time limit" and 0 < summary["steps"] < 60
    rows = [m for m in read_metrics(tmp_path / "clock" / "metrics.jsonl") if "lr" in m]
    assert [m["lr"] for m in rows] == pytest.approx([lr_at(m["step"] - 1, (m["step"] - 1) / 60, 3e-3, 3e-4, 5, 5 / 60)
                                                     for m in rows])


def test_validation_prompts_stop_at_the_first_user_turn():
    from chatforge.train.run import val_prompts

    records = [{"text": "plain"}, {"messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello"}]},
               {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]}]
    assert val_prompts(records, 0) == []
    assert val_prompts(records, 1) == [records[1]["messages"][:2]]
    assert val_prompts(records, 5) == [records[1]["messages"][:2], records[2]["messages"][:1]]


def test_an_out_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "taken").write_text("notes\n")
    for out, why in ((tmp_path / "taken", "out_dir is an existing file, not a folder; choose another out_dir"),
                     (tmp_path / "taken" / "run", "cannot create out_dir (Not a directory)")):
        r = subprocess.run([sys.executable, "-m", "chatforge.cli", "train", f"out_dir={out}"], capture_output=True,
                           text=True, cwd=ROOT)
        assert (r.returncode, r.stderr) == (2, f"error: {out}: {why}\n")


def test_resize_vocab_keeps_old_logits():
    torch.manual_seed(0)
    for tie in (True, False):
        model = GPT(ModelConfig(vocab_size=40, n_layer=1, n_head=2, d_model=16, tie_embeddings=tie)).eval()
        x = torch.randint(0, 40, (1, 7))
        before = model(x)
        resize_vocab(model, 43)
        after = model(x)
        assert after.shape[-1] == 43 and model.config.vocab_size == 43
        torch.testing.assert_close(after[..., :40], before)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie


# ---------------------------------------------------------------- runs

def _losses(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"], m.get("val_loss"), m["lr"]) for m in rows]


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
    """A run SIGKILLed mid-training and resumed logs the same losses at the same steps as an uninterrupted one."""
    data = write_dataset(tmp_path)
    killed_args = tiny_config(tmp_path, data, "killed")
    killed_at = train_until_killed(killed_args, tmp_path / "killed", step=10, timeout=120)
    assert 10 <= killed_at < 60

    # the uninterrupted reference, in this process
    ref = train(load_config(None, tiny_config(tmp_path, data, "ref")))
    assert ref["steps"] == 60

    resume_training(killed_args)
    got, want = _losses(tmp_path / "killed"), _losses(tmp_path / "ref")
    assert [g[0] for g in got] == list(range(1, 61))  # each step once, the redone ones replaced
    for g, w in zip(got, want):
        assert g[0] == w[0] and abs(g[1] - w[1]) <= 1e-6 and g[3] == w[3], (g, w)
        assert (g[2] is None) == (w[2] is None) and (g[2] is None or abs(g[2] - w[2]) <= 1e-6), (g, w)
    assert want[-1][1] < want[0][1] - 0.5  # it did learn something
    # the run layout other commands read
    out = tmp_path / "killed"
    for name in ("config.yaml", "data_report.json", "loss.png", "summary.json", "final/model.safetensors",
                 "best/model.safetensors", "tokenizer/tokenizer.json"):
        assert (out / name).exists(), name
    assert sorted(p.name for p in (out / "state").iterdir()) == ["latest.json", "step-0000060"]
    report = json.loads((out / "data_report.json").read_text())
    assert report["encoding"]["train"]["records"] == report["train"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from dataclasses import replace

    from chatforge.train.loss import STAGES, token_loss
    from chatforge.train.state import latest_state
    from chatforge.weights.folder import load_model

    data = write_dataset(tmp_path, n=40)
    cfg = load_config(None, tiny_config(tmp_path, data, "nan", max_steps=12, save_every=4, eval_every=4,
                                        grad_accum=1))
    calls = {"n": 0}

    def poisoned(model, batch, ctx):  # the 7th training step's loss becomes NaN
        loss, pred, targets = token_loss(model, batch, ctx)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 7:
                loss = loss * float("nan")
        return loss, pred, targets

    monkeypatch.setitem(STAGES, "sft", replace(STAGES["sft"], loss=poisoned))  # a stage's loss is a plug-in
    with pytest.raises(ChatforgeError) as err:
        train(cfg)
    state = tmp_path / "nan" / "state"
    assert str(err.value) == (f"step 7: loss is nan; stopped without updating the weights. Last good checkpoint: "
                              f"{state / 'step-0000004'} (try a lower lr or more warmup_steps)")
    assert latest_state(state) == state / "step-0000004"
    best = load_model(tmp_path / "nan" / "best")
    assert all(torch.isfinite(p).all() for p in best.parameters())
    steps = [json.loads(line)["step"] for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # the run continues from the good checkpoint
    monkeypatch.undo()
    summary = train(cfg, resume=True)
    assert summary["steps"] == 12 and math.isfinite(summary["val_loss"])


def _base_tokenizer(texts):
    """A GPT-2-style tokenizer: byte-level BPE with <|endoftext|> only, no chat template."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from chatforge.tokenizer import ENDOFTEXT, Tokenizer

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=[ENDOFTEXT],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(hf, "", eos_token=ENDOFTEXT, pad_token=None)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_from_a_base_model_adds_chat_tokens(tmp_path, mode):
    from safetensors.torch import load_file

    from chatforge.weights.folder import load_model, save_model

    data = write_dataset(tmp_path, n=30)
    texts = [m["content"] for line in data.read_text().splitlines() for m in json.loads(line)["messages"]]
    tok = _base_tokenizer(texts)
    assert not tok.has_chat_tokens()
    torch.manual_seed(0)
    base = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=128))
    save_model(base, tok, tmp_path / "base")
    over = {"init": str(tmp_path / "base"), "max_steps": 3, "eval_every": 3, "save_every": 3, "lr": 1e-2,
            "freeze_embeddings": True}
    if mode == "lora":
        over["lora.r"] = 4
    args = [a for a in tiny_config(tmp_path, data, mode, **over) if not a.startswith("model.")]
    summary = train(load_config(None, args))
    final = Path(summary["final_dir"])
    n_old = tok.vocab_size
    if mode == "full":
        model = load_model(final)
        assert model.config.vocab_size == n_old + 3  # <|im_start|>, <|im_end|>, <|pad|>
        emb, old = model.model.embed_tokens.weight, base.model.embed_tokens.weight
        assert torch.equal(emb[:n_old], old)  # frozen rows stay exactly as they were, weight decay included
        assert not torch.allclose(emb[n_old:], old.mean(0).expand(3, -1))  # the new rows trained
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    else:
        assert (final / "adapter_config.json").exists() and (final / "tokenizer.json").exists()
        weights = load_file(str(final / "adapter_model.safetensors"))
        assert any("lora_A" in k for k in weights)
    from chatforge.tokenizer import Tokenizer

    saved = Tokenizer.load(str(final))
    assert saved.has_chat_tokens() and saved.vocab_size == n_old + 3
