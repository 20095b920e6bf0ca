"""compare: a model against itself costs nothing; int8 weights cost little and are measured, not assumed."""

from __future__ import annotations

import copy

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.eval.compare import compare, greedy_agreement, load_variant
from chatforge.model.gpt import GPT, config_from_preset
from chatforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["hello there how are you", "I am fine thank you", "the quick brown fox jumps over the lazy dog"] * 20
RECORDS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
           for q, a in [("hello there", "I am fine thank you"), ("how are you", "the quick brown fox"),
                        ("the lazy dog", "jumps over the fox"), ("thank you", "hello there")]]


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = GPT(config_from_preset("nano", vocab_size=tok.vocab_size, max_seq_len=128, n_layer=2, init_std=0.1))
    prompts = [tok.render(r["messages"][:1], add_generation_prompt=True)[0] for r in RECORDS]
    return tok, model.eval(), prompts


def test_a_model_compared_with_itself_agrees_fully(setup):
    tok, model, prompts = setup
    out = compare(model, {"same": copy.deepcopy(model)}, tok, RECORDS, prompts, seq_len=64, new_tokens=8)
    same = out["candidates"]["same"]
    assert same["greedy_agreement"] == 1.0 and same["agreement_tokens"] == out["prompts"] * 8 == 32
    assert same["ppl"] == pytest.approx(out["reference"]["ppl"], rel=1e-6) and abs(same["ppl_change"]) < 1e-6


def test_int8_costs_are_measured(setup):
    pytest.importorskip("torchao")
    from chatforge.model.quantize import quantize

    tok, model, prompts = setup
    q = quantize(copy.deepcopy(model), "int8-wo")
    out = compare(model, {"int8-wo": q}, tok, RECORDS, prompts, seq_len=64, new_tokens=8)["candidates"]["int8-wo"]
    assert abs(out["ppl_change"]) < 0.05 and out["greedy_agreement"] >= 0.8


def test_agreement_counts_each_position(setup):
    tok, model, prompts = setup
    with torch.inference_mode():
        first = int(model(torch.tensor([prompts[0]]))[0, -1].argmax())
    wrong = (first + 1) % tok.vocab_size
    assert greedy_agreement(model, prompts[:1], [[first]]) == (1.0, 1)
    assert greedy_agreement(model, prompts[:1], [[wrong]]) == (0.0, 1)


def test_unknown_variant_is_one_line():
    with pytest.raises(ChatforgeError, match=r"^compare: unknown variant 'int2' \(use fp32, bf16, fp16, int8-dyn, "
                                             r"int8-wo, int4-wo\)$"):
        load_variant("whatever", "int2")
