"""Preference stages: the DPO loss against a hand computation, padding, the references, logged metrics, exact
resume, the reward model (Bradley–Terry, transformers parity, score), best-of-N and perturbation augmentation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.config import load_config
from chatforge.data.preference import encode_pairs
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.tokenizer import train_tokenizer
from chatforge.train.loop import train
from chatforge.train.preference import dpo_loss, make_pair_batch, reply_logps
from chatforge.train.run import read_metrics
from chatforge.weights.folder import save_model

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def pairs(n: int = 60) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 10, (i * 7 + 3) % 10
        good = f"{NUMBERS[a]} plus {NUMBERS[b]} is {a + b}."
        bad = "I do not know, go away." if i % 2 else f"{NUMBERS[a]} plus {NUMBERS[b]} is {a + b + 3}!!"
        out.append({"prompt": [{"role": "user", "content": f"What is {NUMBERS[a]} plus {NUMBERS[b]}? (#{i})"}],
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}]})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, model folder) of a tiny random Llama-style model."""
    texts = [m["content"] for p in pairs() for k in ("prompt", "chosen", "rejected") for m in p[k]]
    tok = train_tokenizer(texts * 3, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, d_model=32,
                            max_seq_len=128))
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_model(model, tok, folder)
    return tok, folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs()), encoding="utf-8")
    return path


def config(tmp: Path, data: Path, init: Path, name: str, **over):
    base = {"stage": "dpo", "data": str(data), "init": str(init), "val_fraction": 0.2, "out_dir": str(tmp / name),
            "seq_len": 64, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2, "max_steps": 8,
            "eval_every": 4, "eval_batches": 2, "save_every": 3, "dtype": "fp32", "num_threads": 1, "seed": 1,
            "dropout": 0.1, "beta": 0.5}
    return load_config(None, [f"{k}={v}" for k, v in (base | over).items()])


class Stop(Exception):
    pass


def stop_after(step: int, run) -> None:
    """Run training and kill it (an exception from the event hook) after `step` optimizer steps."""
    from chatforge.train.events import Stepped

    def on_event(event):
        if isinstance(event, Stepped) and event.row["step"] == step:
            raise Stop

    with pytest.raises(Stop):
        run(on_event)


def hand_logp(model, ids: list[int], mask: list[int]) -> float:
    """Summed log-prob of the masked tokens, one sequence at a time, by the definition."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
    return sum(float(logp[j - 1, ids[j]]) for j in range(1, len(ids)) if mask[j])


def test_dpo_loss_equals_a_hand_computed_value(tiny):
    tok, folder = tiny
    from chatforge.weights.folder import load_model

    policy, reference = load_model(folder), load_model(folder)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc = encode_pairs(pairs(4), tok, 128)
    batch = make_pair_batch(enc, [0, 1, 2], tok.pad_id)
    ref_c = [hand_logp(reference, enc.chosen[i].tolist(), enc.chosen_mask[i].tolist()) for i in range(3)]
    ref_r = [hand_logp(reference, enc.rejected[i].tolist(), enc.rejected_mask[i].tolist()) for i in range(3)]
    pol_c = [hand_logp(policy, enc.chosen[i].tolist(), enc.chosen_mask[i].tolist()) for i in range(3)]
    pol_r = [hand_logp(policy, enc.rejected[i].tolist(), enc.rejected_mask[i].tolist()) for i in range(3)]
    batch.ref = torch.tensor(list(zip(ref_c, ref_r)), dtype=torch.float64)
    beta, ls = 0.3, 0.1
    expected = 0.0
    for c, r, rc, rr in zip(pol_c, pol_r, ref_c, ref_r):
        z = beta * ((c - r) - (rc - rr))
        expected += -(1 - ls) * math.log(1 / (1 + math.exp(-z))) - ls * math.log(1 / (1 + math.exp(z)))
    got, _, _ = dpo_loss(policy, batch, torch.autocast("cpu", enabled=False), beta=beta, label_smoothing=ls)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)
    # IPO: per-token mean log-probs, squared distance to 1/(2 beta)
    n_c = [int(enc.chosen_mask[i][1:].sum()) for i in range(3)]
    n_r = [int(enc.rejected_mask[i][1:].sum()) for i in range(3)]
    ipo = sum(((c / a - r / b) - (rc / a - rr / b) - 1 / (2 * beta)) ** 2
              for c, r, rc, rr, a, b in zip(pol_c, pol_r, ref_c, ref_r, n_c, n_r))
    batch.stats.clear()
    got, _, _ = dpo_loss(policy, batch, torch.autocast("cpu", enabled=False), beta=beta, loss_type="ipo")
    assert float(got.detach()) == pytest.approx(ipo, rel=1e-5)
    # RPO: plus rpo_alpha x the chosen reply's per-token NLL
    batch.stats.clear()
    got, _, _ = dpo_loss(policy, batch, torch.autocast("cpu", enabled=False), beta=beta, rpo_alpha=0.5)
    sigmoid = sum(-math.log(1 / (1 + math.exp(-beta * ((c - r) - (rc - rr)))))
                  for c, r, rc, rr in zip(pol_c, pol_r, ref_c, ref_r))
    nll = sum(-c / a for c, a in zip(pol_c, n_c))
    assert float(got.detach()) == pytest.approx(sigmoid + 0.5 * nll, rel=1e-5)
    assert batch.stats["chosen_nll"] == pytest.approx(nll, rel=1e-5)
    # the metrics the step logs come from the same numbers
    assert batch.stats["pairs"] == 3
    rewards = [beta * (c - rc) > beta * (r - rr) for c, r, rc, rr in zip(pol_c, pol_r, ref_c, ref_r)]
    assert batch.stats["reward_acc"] == sum(rewards)


def test_padding_is_never_counted(tiny):
    tok, folder = tiny
    from chatforge.weights.folder import load_model

    model = load_model(folder)
    records = pairs(2)
    records[1]["chosen"][0]["content"] *= 4  # a much longer pair pads the first one
    enc = encode_pairs(records, tok, 128)
    off = torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        alone, n_alone = reply_logps(model, make_pair_batch(enc, [0], tok.pad_id), off)
        padded_batch = make_pair_batch(enc, [0, 1], tok.pad_id)
        together, n_together = reply_logps(model, padded_batch, off)
    assert padded_batch.input_ids.shape[1] > len(enc.chosen[0])
    assert torch.allclose(alone, together[[0, 2]], atol=1e-5)
    assert n_alone.tolist() == n_together[[0, 2]].tolist()
    assert float(alone[0]) == pytest.approx(hand_logp(model, enc.chosen[0].tolist(), enc.chosen_mask[0].tolist()),
                                            abs=1e-4)


@pytest.mark.parametrize("over", [{"lora.r": 4, "lora.dropout": 0.0}, {"reference": "precomputed"}],
                         ids=["lora-adapter-off", "full-precomputed"])
def test_dpo_resumes_bit_for_bit_and_logs_every_step(tmp_path, tiny, data, over):
    tok, folder = tiny
    full = train(config(tmp_path, data, folder, "full", **over))
    rows = read_metrics(Path(full["out_dir"]) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert {"loss", "reward_acc", "chosen_reward", "rejected_reward", "margin", "kl"} <= set(r)
        assert r["margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"], abs=1e-9)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # policy == reference at the start
    assert "val_reward_acc" in rows[3] and rows[3]["val_acc"] == rows[3]["val_reward_acc"]
    assert full["val_loss"] < math.log(2)
    if over.get("reference") == "precomputed":
        assert (Path(full["out_dir"]) / "reference_logps.safetensors").exists()
    stop_after(5, lambda on_event: train(config(tmp_path, data, folder, "cut", **over), on_event=on_event))
    resumed = train(config(tmp_path, data, folder, "cut", **over), resume=True)  # from the step-3 checkpoint
    assert resumed["steps"] == 8
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if "lora.r" in over else "model.safetensors"
    a = load_file(str(Path(full["final_dir"]) / name))
    b = load_file(str(Path(resumed["final_dir"]) / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = read_metrics(Path(resumed["out_dir"]) / "metrics.jsonl")
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]


def test_dpo_metrics_count_reply_tokens_not_pairs(tmp_path, tiny, data):
    """The loss is a mean over pairs, but trained_tokens (and trained_tok_s) count the reply tokens that carried it,
    chosen and rejected: one step over all 60 pairs trains every reply token the data report counted."""
    from chatforge.train.events import Started

    _, folder = tiny
    started = []
    out = train(config(tmp_path, data, folder, "count", val_fraction=0, batch_size=60, grad_accum=1, max_steps=1,
                       eval_every=1000, save_every=1000),
                on_event=lambda e: started.append(e) if isinstance(e, Started) else None)
    expected = started[0].info["data"]["trained_tokens"]
    row = read_metrics(Path(out["out_dir"]) / "metrics.jsonl")[0]
    assert expected > 2 * 60 and row["trained_tokens"] == out["trained_tokens"] == expected


def test_adapter_off_reference_is_the_base_model(tiny):
    """The LoRA reference is the model itself with its adapter switched off: no second copy, the base's numbers."""
    from chatforge.train.preference import reference_logps
    from chatforge.weights.folder import load_model
    from chatforge.weights.lora import apply_lora

    tok, folder = tiny
    base = load_model(folder)
    policy = apply_lora(load_model(folder), {"r": 4, "dropout": 0.0})
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    enc = encode_pairs(pairs(3), tok, 128)
    batch = make_pair_batch(enc, [0, 1, 2], tok.pad_id)
    off = torch.autocast("cpu", enabled=False)
    ref = reference_logps(policy, batch, "cpu", off, use_adapter_off=True)
    with torch.no_grad():
        expected, _ = reply_logps(base, batch, off)
        adapted, _ = reply_logps(policy, batch, off)
    assert torch.allclose(ref.float().t().reshape(-1), expected, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)  # the adapter is back on afterwards


def test_preference_config_errors(tmp_path, tiny, data):
    _, folder = tiny
    with pytest.raises(ChatforgeError, match=r"reference: adapter-off needs lora:"):
        config(tmp_path, data, folder, "x", reference="adapter-off")
    with pytest.raises(ChatforgeError, match=r"loss_type: must be one of sigmoid, ipo, got 'hinge'"):
        config(tmp_path, data, folder, "x", loss_type="hinge")
    with pytest.raises(ChatforgeError, match=r"label_smoothing: applies to loss_type sigmoid only"):
        config(tmp_path, data, folder, "x", loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ChatforgeError, match=r"beta: must be a positive number, got 0.0"):
        config(tmp_path, data, folder, "x", beta=0)
    with pytest.raises(ChatforgeError, match=r"rpo_alpha: must be a number >= 0, got -1.0"):
        config(tmp_path, data, folder, "x", rpo_alpha=-1)
    with pytest.raises(ChatforgeError, match=r"reference: frozen keeps a second copy"):
        train(config(tmp_path, data, folder, "y", reference="frozen", **{"lora.r": 4}))


# ---------------------------------------------------------------- reward model

def test_reward_model_trains_saves_and_matches_transformers(tmp_path, tiny, data):
    from chatforge.model.reward import score_conversations
    from chatforge.weights.reward import load_reward_model

    tok, folder = tiny
    s = train(config(tmp_path, data, folder, "rm", stage="reward", lr=3e-3, max_steps=40, eval_every=10,
                     dropout=0.0))
    rows = read_metrics(Path(s["out_dir"]) / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.1)
    assert s["val_acc"] >= 0.8 and rows[-1]["loss"] < 0.3
    model, rtok = load_reward_model(s["best_dir"])
    convs = [p["prompt"] + p[k] for p in pairs(4) for k in ("chosen", "rejected")]
    ours = score_conversations(model, rtok, convs)
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(s["best_dir"]).eval()
    with torch.no_grad():
        theirs = [float(hf(torch.tensor([rtok.render(c)[0]])).logits[0, 0]) for c in convs]
    assert ours == pytest.approx(theirs, abs=1e-4)
    return s


def test_reward_training_scores_what_inference_scores(tiny):
    """The Bradley–Terry loss reads the head where `score` reads it: at the sequence's own last token (its final
    end-of-turn token included), padded rows alike."""
    from chatforge.model.reward import attach_scalar_head, score_conversations
    from chatforge.train.preference import reward_scores
    from chatforge.weights.folder import load_model

    tok, folder = tiny
    model = load_model(folder).eval()
    torch.manual_seed(2)
    attach_scalar_head(model)
    records = pairs(3)
    records[2]["chosen"][0]["content"] *= 3  # pads the others
    enc = encode_pairs(records, tok, 128)
    with torch.no_grad():
        trained = reward_scores(model, make_pair_batch(enc, [0, 1, 2], tok.pad_id), torch.autocast("cpu",
                                                                                                   enabled=False))
    served = score_conversations(model, tok, [p["prompt"] + p[k] for k in ("chosen", "rejected") for p in records])
    assert trained.tolist() == pytest.approx(served, abs=1e-5)


def test_score_and_generate_best_of_commands(tmp_path, tiny, data, capsys):
    from chatforge.cli import main

    tok, folder = tiny
    s = train(config(tmp_path, data, folder, "rmc", stage="reward", lr=3e-3, max_steps=30, eval_every=10,
                     dropout=0.0))
    capsys.readouterr()
    assert main(["score", s["best_dir"], str(data)]) == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert len(lines) == 60 and set(lines[0]) == {"chosen", "rejected"}
    right = sum(r["chosen"] > r["rejected"] for r in lines)
    assert f"pair accuracy: {right / 60:.3f} ({right}/60)" in out.err and right >= 45
    main(["generate", str(folder), "--prompt", "What is two plus two?", "--best-of", "3", "--reward",
          s["best_dir"], "--seed", "1", "--max-new-tokens", "6", "--temperature", "1.0"])
    out = capsys.readouterr()
    assert out.err.count("score") == 3 and out.err.count("* [") == 1
    assert out.err.count("(finish: ") == 3 and "(3 candidates, " in out.err and "tokens generated in all)" in out.err
    assert main(["generate", str(folder), "--prompt", "Hi", "--best-of", "3"]) == 2
    assert "--best-of: needs --reward MODEL" in capsys.readouterr().err


def test_reward_model_with_lora_saves_merged(tmp_path, tiny, data):
    from chatforge.weights.reward import load_reward_model

    tok, folder = tiny
    s = train(config(tmp_path, data, folder, "rml", stage="reward", max_steps=3, eval_every=3,
                     **{"lora.r": 4, "lora.dropout": 0.0}))
    model, _ = load_reward_model(s["final_dir"])
    assert model.lm_head.out_features == 1


def test_best_of_n_returns_the_highest_scored_reply(tmp_path, tiny):
    from chatforge.generation.best_of import best_of_n
    from chatforge.generation.bot import Bot
    from chatforge.model.reward import attach_scalar_head, score_conversations
    from chatforge.weights.folder import load_model

    tok, folder = tiny
    bot = Bot(load_model(folder), tok)
    reward = load_model(folder)
    attach_scalar_head(reward)
    messages = [{"role": "user", "content": "What is two plus two?"}]
    best = best_of_n(bot, reward, tok, messages, n=4, max_new_tokens=8, temperature=1.0, seed=3)
    assert len(best.candidates) == 4 and best.reply in best.candidates
    scores = score_conversations(reward, tok, [messages + [{"role": "assistant", "content": c}]
                                               for c in best.candidates])
    assert best.scores == pytest.approx(scores, abs=1e-5)
    assert best.reply == best.candidates[int(np.argmax(scores))]


# ---------------------------------------------------------------- perturbation augmentation

def test_perturbation_is_seeded_per_epoch_and_only_touches_user_turns(tmp_path):
    from chatforge.train.augment import perturbed_records

    records = [{"messages": [{"role": "user", "content": "Hello there, how are you doing today?"},
                             {"role": "assistant", "content": "Fine, thanks for asking."}]}] * 20
    a = perturbed_records(records, 0.5, ("typo", "homoglyph"), seed=1, epoch=0)
    assert a == perturbed_records(records, 0.5, ("typo", "homoglyph"), seed=1, epoch=0)
    assert a != perturbed_records(records, 0.5, ("typo", "homoglyph"), seed=1, epoch=1)
    changed = sum(r["messages"][0]["content"] != records[0]["messages"][0]["content"] for r in a)
    assert 4 <= changed <= 16
    assert all(r["messages"][1] == records[0]["messages"][1] for r in a)


def test_sft_with_perturbation_resumes_bit_for_bit(tmp_path, tiny):
    tok, folder = tiny
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": p["prompt"] + p["chosen"]}) + "\n" for p in pairs(40)))
    over = {"stage": "sft", "perturbation.rate": 0.5, "perturbation.kinds": "[typo, zero_width]", "max_steps": 12,
            "batch_size": 8, "grad_accum": 1}
    full = train(config(tmp_path, path, folder, "pf", **over))
    stop_after(7, lambda on_event: train(config(tmp_path, path, folder, "pc", **over), on_event=on_event))
    resumed = train(config(tmp_path, path, folder, "pc", **over), resume=True)
    from safetensors.torch import load_file

    a = load_file(str(Path(full["final_dir"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["final_dir"]) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    clean = train(config(tmp_path, path, folder, "pn", **{k: v for k, v in over.items()
                                                           if not k.startswith("perturbation")}))
    rows_p = read_metrics(Path(full["out_dir"]) / "metrics.jsonl")
    rows_c = read_metrics(Path(clean["out_dir"]) / "metrics.jsonl")
    assert [r["loss"] for r in rows_p] != [r["loss"] for r in rows_c]
