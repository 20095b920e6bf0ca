"""eval --robustness: clean vs perturbed user turns, scored on the same reply bytes."""

from __future__ import annotations

import torch

from chatforge.eval.robustness import robustness_eval
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.tokenizer import train_tokenizer
from chatforge.train.loss import evaluate_loss


def test_robustness_scores_the_same_replies_with_noisy_prompts():
    records = [{"messages": [{"role": "user", "content": f"Hello there, what is {i} plus {i}?"},
                             {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(12)]
    tok = train_tokenizer([m["content"] for r in records for m in r["messages"]] * 3, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=64)).eval()
    out = robustness_eval(model, tok, records, 64, 4, torch.device("cpu"), torch.float32, seed=1)
    clean = evaluate_loss(model, tok, records, 64, 4, "cpu", "fp32")
    assert out["clean_bpb"] == clean["bpb"] and out["clean_loss"] == clean["loss"]
    assert set(out["by_kind"]) == {"typo", "swap", "homoglyph", "zero_width", "casing", "whitespace"}
    assert out["perturbed_bpb"] != out["clean_bpb"]
    assert out["gap_bpb"] == out["perturbed_bpb"] - out["clean_bpb"]
    assert robustness_eval(model, tok, records, 64, 4, torch.device("cpu"), torch.float32, seed=1) == out
