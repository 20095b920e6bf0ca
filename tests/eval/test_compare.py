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


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    """The tiny model as a folder and the records as a conversations file, for the command."""
    import json

    from chatforge.weights.folder import save_model

    tok, model, _ = setup
    root = tmp_path_factory.mktemp("compare")
    data = root / "dialogs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return save_model(model, tok, root / "model"), data


def test_eval_compare_variants_prints_one_row_per_variant_against_bf16(saved, tmp_path, capsys):
    pytest.importorskip("torchao")
    import json

    from chatforge.cli import main

    folder, data = saved
    out = tmp_path / "cmp.json"
    assert main(["eval", str(folder), "--compare", "bf16,int8-wo,fp32", "--data", str(data), "--split", "all",
                 "--max-new-tokens", "8", "--out", str(out), "--dtype", "bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| variant | perplexity | ppl / bf16 | bits per byte | greedy agreement vs bf16 | "
                        "within 2% of bf16 |")
    assert [line.split(" | ")[0] for line in lines[2:6]] == ["| bf16 (reference)", "| bf16", "| int8-wo", "| fp32"]
    bf16_row = lines[3].split(" | ")
    assert bf16_row[2] == "1.0000" and bf16_row[4] == "1.000 (32 tokens)" and bf16_row[5] == "yes |"
    assert lines[-1].startswith(f"held out: {data} (all split), 4 conversations, ")
    result = json.loads(out.read_text())
    ref, same = result["reference"], result["candidates"]["bf16"]
    assert same["ppl"] == ref["ppl"] and same["greedy_agreement"] == 1.0 and same["ppl_change"] == 0.0
    assert set(result["candidates"]) == {"bf16", "int8-wo", "fp32"} and result["prompts"] == 4
    assert all(c["tokens"] == ref["tokens"] for c in result["candidates"].values())  # the very same records
    assert (tmp_path / "cmp.md").read_text() == "\n".join(lines) + "\n"


def test_compare_flag_tells_variants_from_a_model_and_names_a_typo(saved, tmp_path, capsys):
    from chatforge.cli import main
    from chatforge.eval.evaluate import variant_list

    folder, data = saved
    assert variant_list("bf16,int8-dyn") == ["bf16", "int8-dyn"]
    assert variant_list(str(folder)) is None and variant_list(None) is None
    assert variant_list("some/other-model") is None  # a model name: evaluated side by side, as before
    assert main(["eval", str(folder), "--compare", "bf16,int9", "--data", str(data)]) == 2
    assert capsys.readouterr().err.strip() == ("error: compare: unknown variant 'int9' (use fp32, bf16, fp16, "
                                               "int8-dyn, int8-wo, int4-wo)")


def test_eval_compare_takes_the_reference_from_dtype_and_quantizes_its_weights(saved, tmp_path, capsys):
    """On a CPU without native bf16 the reference is fp32 (bf16 matmuls are emulated there, ~100x slower): --dtype
    names it, and the quantized variants are made from its weights (int4-wo's layers return its dtype)."""
    import json

    from chatforge.cli import main

    folder, data = saved
    out = tmp_path / "cmp.json"
    assert main(["eval", str(folder), "--compare", "int4-wo", "--data", str(data), "--split", "all",
                 "--max-new-tokens", "8", "--out", str(out), "--dtype", "fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| variant | perplexity | ppl / fp32 |")
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| fp32 (reference)", "| int4-wo"]
    result = json.loads(out.read_text())
    assert result["reference_variant"] == "fp32" and 0 < result["candidates"]["int4-wo"]["greedy_agreement"] <= 1
