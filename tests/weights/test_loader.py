"""Pretrained models: `chatforge import` of folders transformers wrote, clear errors for bad input, the chat tokens a
base tokenizer gains, SmolLM2-135M-Instruct by name (logits against transformers' GGUF loader, a correct answer),
and every kind of chatforge folder loading back in transformers with the same logits and chat ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from chatforge.weights.folder import load_model
from chatforge.cli import main
from chatforge.tokenizer import Tokenizer

from conftest import CHAT, HF_CONFIGS, assert_transformers_agrees, base_tokenizer_folder, hf_folder, ids, max_diff


# ---------------------------------------------------------------- chatforge import of Hugging Face folders


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_import_hf_folder_keeps_logits_tokenizer_and_template(tmp_path, family, capsys):
    src, hf = hf_folder(tmp_path, family)
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 0
    assert "saved to" in capsys.readouterr().out
    ours = load_model(tmp_path / "out")
    x = ids(40, hf.config.vocab_size)
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) <= 1e-4
    # the chat template came along: the imported tokenizer renders what transformers renders from the source
    from transformers import AutoTokenizer

    source_ids = AutoTokenizer.from_pretrained(src).apply_chat_template(CHAT, add_generation_prompt=True,
                                                                        tokenize=True, return_dict=False)
    assert_transformers_agrees(tmp_path / "out", ours, tokenizer_ids=list(source_ids))


def test_hf_folder_is_usable_without_import(tmp_path):
    from chatforge.weights.loader import load

    src, hf = hf_folder(tmp_path, "qwen2")
    loaded = load(str(src))
    x = ids(20, hf.config.vocab_size)
    with torch.no_grad():
        assert max_diff(loaded.model(x), hf(x).logits) <= 1e-4
    assert loaded.tokenizer.has_chat_tokens() and loaded.new_token_ids == ()
    assert (loaded.folder, loaded.source) == (str(src), str(src.resolve()))
    assert not hasattr(loaded.model, "new_token_ids") and not hasattr(loaded.model, "name_or_path")


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_loading_in_bf16_converts_as_it_reads_and_equals_converting_after(tmp_path, shard):
    """Each tensor is cast as it is read (no whole fp32 copy in memory): the same weights as fp32 then .to(bf16)."""
    from chatforge.weights.folder import read_weights

    src, _ = hf_folder(tmp_path, "llama", **({"max_shard_size": shard} if shard else {}))
    fp32 = read_weights(src)
    bf16 = read_weights(src, dtype=torch.bfloat16)
    assert set(bf16) == set(fp32) and {v.dtype for v in bf16.values()} == {torch.bfloat16}
    assert all(torch.equal(bf16[k], v.to(torch.bfloat16)) for k, v in fp32.items())
    direct, after = load_model(src, dtype=torch.bfloat16), load_model(src).to(torch.bfloat16)
    assert {p.dtype for p in direct.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(direct.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), name


def test_import_sharded_safetensors(tmp_path):
    src, hf = hf_folder(tmp_path, "llama", max_shard_size="40KB")
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert len(shards) > 2 and (src / "model.safetensors.index.json").exists()
    assert main(["import", str(src), "--out", str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    ours = load_model(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    x = ids(30, hf.config.vocab_size)
    with torch.no_grad():  # bf16 storage: within bf16 rounding of the fp32 original
        assert max_diff(ours(x), hf(x).logits) <= 0.05


def test_import_pytorch_model_bin(tmp_path):
    # transformers 5 always writes safetensors (safe_serialization=False is ignored), so write the .bin by hand:
    # a pure tensor state dict, which is what torch.load(weights_only=True) accepts
    src, hf = hf_folder(tmp_path, "gpt2")
    sd = hf.state_dict()
    (src / "model.safetensors").unlink()
    torch.save({k: v.clone() for k, v in sd.items()}, src / "pytorch_model.bin")
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 0
    x = ids(30, hf.config.vocab_size)
    with torch.no_grad():
        assert max_diff(load_model(tmp_path / "out")(x), hf(x).logits) <= 1e-4


def test_import_converts_an_old_vocab_json_merges_txt_tokenizer(tmp_path):
    tok_folder = base_tokenizer_folder(tmp_path / "tok")
    base = Tokenizer.load(str(tok_folder))
    src, _ = hf_folder(tmp_path, "gpt2", tokenizer=base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    base.hf.model.save(str(src))  # vocab.json + merges.txt, as GPT-2 itself ships
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 0
    imported = Tokenizer.load(str(tmp_path / "out"))
    text = "Restart the router, then click settings!"
    assert imported.encode(text) == base.encode(text) and imported.decode(base.encode(text)) == text


class _NotATensor:  # a pickled object that weights_only=True must refuse to build
    pass


def test_pytorch_model_bin_with_objects_is_refused(tmp_path, capsys):
    src, _ = hf_folder(tmp_path, "gpt2")
    (src / "model.safetensors").unlink()
    torch.save({"x": _NotATensor()}, src / "pytorch_model.bin")  # a pickle that would build a Python object
    capsys.readouterr()  # drop what building the fixture printed
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pytorch_model.bin: cannot read weights" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_corrupt_safetensors_is_one_line_naming_the_file(tmp_path, capsys, sharded):
    src, _ = hf_folder(tmp_path, "llama", **({"max_shard_size": "40KB"} if sharded else {}))
    bad = sorted(src.glob("model-*.safetensors"))[1] if sharded else src / "model.safetensors"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated, as an interrupted download leaves it
    capsys.readouterr()  # drop what building the fixture printed
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {bad}: cannot read weights")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    from transformers import BertConfig

    src = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(src)
    capsys.readouterr()  # drop what building the fixture printed
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "config.json: unsupported architecture 'bert'" in err and "llama" in err


def test_import_refuses_to_overwrite_and_unknown_sources(tmp_path, capsys):
    src, _ = hf_folder(tmp_path, "qwen2")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["import", str(src), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert main(["import", "no-such-model", "--out", str(tmp_path / "o")]) == 2
    assert "not a model folder, LoRA adapter folder, .gguf file or known model name" in capsys.readouterr().err
    for command in (["import", str(src)], ["merge", str(src), str(src)]):  # one dtype vocabulary everywhere
        assert main([*command, "--out", str(tmp_path / "o"), "--dtype", "float8"]) == 2
        assert capsys.readouterr().err.strip() == "error: dtype: 'float8' is not one of fp32, bf16, fp16"
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- chat tokens for a base tokenizer


def test_base_tokenizer_gains_chat_tokens_and_model_keeps_its_predictions(tmp_path):
    from chatforge.weights.loader import load

    tok_folder = base_tokenizer_folder(tmp_path / "base-tok")
    base = Tokenizer.load(str(tok_folder))
    src, hf = hf_folder(tmp_path, "gpt2", tokenizer=base)
    assert not base.has_chat_tokens()
    v = base.vocab_size
    loaded = load(str(src), chat_tokens=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    assert tokenizer.has_chat_tokens() and tokenizer.vocab_size == v + 3
    assert loaded.new_token_ids == (v, v + 1, v + 2) and model.config.vocab_size == v + 3
    assert tokenizer.decode(tokenizer.render(CHAT[:2])[0]).startswith("<|im_start|>system\n")
    x = ids(20, v)
    with torch.no_grad():  # the pretrained model's own tokens predict as before
        assert max_diff(model(x)[..., :v], hf(x).logits) <= 1e-4
    # a chat model's tokenizer and template are kept as they are
    chat_src, _ = hf_folder(tmp_path, "llama")
    before = Tokenizer.load(str(chat_src))
    loaded = load(str(chat_src), chat_tokens=True)
    tokenizer = loaded.tokenizer
    assert loaded.new_token_ids == () and tokenizer.vocab_size == before.vocab_size
    assert tokenizer.chat_template == before.chat_template


# ---------------------------------------------------------------- SmolLM2-135M-Instruct by name


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    old = os.environ.get("CHATFORGE_CACHE")
    os.environ["CHATFORGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("CHATFORGE_CACHE")
    else:
        os.environ["CHATFORGE_CACHE"] = old


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loader(smollm2_cache):
    """End to end: the name -> converted, cached folder -> chatforge's own model, against transformers reading
    the same GGUF file (its loader dequantizes to fp32 as well)."""
    from transformers import AutoModelForCausalLM

    from chatforge.weights.gguf import find_packaged_gguf
    from chatforge.weights.loader import load

    loaded = load("smollm2-135m-instruct")
    model, tokenizer = loaded.model, loaded.tokenizer
    gguf = Path(find_packaged_gguf("smollm2-135m-instruct"))
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    prompt = tokenizer.render([{"role": "user", "content": "Write a haiku about a printer that never works, "
                                                           "then explain why printers jam so often."}],
                              add_generation_prompt=True)[0]
    prompt = (prompt * 2)[:64]
    assert len(prompt) == 64
    x = torch.tensor([prompt])
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) <= 1e-3
    assert loaded.source == "smollm2-135m-instruct"  # what an adapter trained on it names as its base


@pytest.mark.slow
def test_smollm2_answers_by_name(smollm2_cache):
    import chatforge

    bot = chatforge.load("smollm2-135m-instruct")
    reply = bot.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0.0,
                     max_new_tokens=20)
    assert "Paris" in reply


# ---------------------------------------------------------------- export: what training writes, transformers reads


def test_scratch_trained_folder_loads_in_transformers(tmp_path):
    from chatforge.config import load_config
    from chatforge.train.loop import train

    cfg = load_config(None, ["data=builtin:english/tech_support", f"out_dir={tmp_path / 'run'}", "vocab_size=300",
                             "model.preset=nano", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
                             "model.n_kv_head=1", "seq_len=64", "batch_size=4", "max_steps=2", "eval_every=2",
                             "dtype=fp32"])
    summary = train(cfg)
    final = Path(summary["final_dir"])
    assert_transformers_agrees(final, load_model(final))
