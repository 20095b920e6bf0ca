"""GGUF export: what `chatforge export` writes, `chatforge import`, transformers and llama.cpp read back.

Exactness first: every exported weight must come back as exactly the value its GGUF type holds (F32 as is, F16 and
Q8_0 as gguf-py's own round trip of the chatforge weight), so the logit error is nothing but that type's rounding.
Logit tolerances, relative to the largest logit: f32 0 (bit-equal), f16 2e-3, q8_0 3e-2 (measured on these tiny
models: about 3e-4 and 1e-2).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.weights.folder import load_model, read_tokenizer, save_model
from chatforge.weights.gguf_export import export_gguf, pre_tokenizer_name
from conftest import CHAT, FAMILIES, chat_tokenizer, ids, max_diff, random_family_model

pytestmark = pytest.mark.usefixtures("one_thread")

LOGIT_TOL = {"f32": 0.0, "f16": 2e-3, "q8_0": 3e-2}
# gpt2 at 1024 positions: transformers' GGUF loader ignores gpt2.context_length and builds 1024 positions
EXPORT_FAMILIES = {"llama": FAMILIES["llama-gqa"], "qwen2": FAMILIES["qwen2-bias"],
                   "gpt2": FAMILIES["gpt2"] | {"max_seq_len": 1024}}


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def model_of(family: str, tok) -> GPT:
    return random_family_model(EXPORT_FAMILIES[family] | {"vocab_size": tok.vocab_size})


def held_value(w: torch.Tensor, quantize: str) -> torch.Tensor:
    """What a GGUF tensor of this type holds for chatforge weight `w` (norms and biases stay F32)."""
    x = w.detach().float().numpy()
    if w.ndim == 1 or quantize == "f32":
        return torch.from_numpy(x.copy())
    if quantize == "f16":
        return torch.from_numpy(x.astype(np.float16).astype(np.float32))
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0).reshape(x.shape))


def export_via_cli(tmp_path: Path, model: GPT, tok, quantize: str, capsys) -> Path:
    folder = save_model(model, tok, tmp_path / f"src-{quantize}")
    path = tmp_path / f"m-{quantize}.gguf"
    assert main(["export", str(folder), "--out", str(path), "--quantize", quantize]) == 0
    assert f"saved to {path}" in capsys.readouterr().out
    return path


@pytest.mark.parametrize("quantize", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("family", list(EXPORT_FAMILIES))
def test_export_then_import_gives_the_weights_back_within_the_type(tmp_path, tok, family, quantize, capsys):
    model = model_of(family, tok)
    path = export_via_cli(tmp_path, model, tok, quantize, capsys)
    assert main(["import", str(path), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    got = dict(back.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(got[name], held_value(p, quantize)), name
    x = ids(24, tok.vocab_size)
    with torch.no_grad():
        want, have = model(x), back(x)
    assert max_diff(have, want) <= LOGIT_TOL[quantize] * want.abs().max().item()


def test_tensor_types_follow_llama_cpp(tmp_path, tok):
    """Norms F32, matrices Q8_0, and a matrix whose rows 32-value blocks do not divide falls back to F16."""
    model = random_family_model(FAMILIES["llama-gqa"] | {"vocab_size": tok.vocab_size, "d_ff": 80})
    summary = export_gguf(model, tok, tmp_path / "m.gguf", quantize="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.attn_norm.weight"] == Q.F32 and types["blk.0.attn_q.weight"] == Q.Q8_0
    assert types["blk.0.ffn_down.weight"] == Q.F16  # its rows are d_ff = 80 long
    assert types["blk.0.ffn_up.weight"] == Q.Q8_0 and types["output.weight"] == Q.Q8_0  # untied head
    assert summary == {"arch": "llama", "tensor_types": {"F32": 5, "Q8_0": 14, "F16": 2}, "tensors": 21,
                       "bytes": os.path.getsize(tmp_path / "m.gguf")}


@pytest.mark.parametrize("quantize", ["f32", "q8_0"])
@pytest.mark.parametrize("family", list(EXPORT_FAMILIES))
def test_transformers_gguf_loader_reads_the_export(tmp_path, tok, family, quantize):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = model_of(family, tok)
    export_gguf(model, tok, tmp_path / "m.gguf", quantize=quantize)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    x = ids(24, tok.vocab_size)
    with torch.no_grad():
        want = model(x)
        assert max_diff(hf(x).logits, want) <= max(1e-5, LOGIT_TOL[quantize] * want.abs().max().item())
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    got = theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(got) == tok.render(CHAT, add_generation_prompt=True)[0]


def test_tokenizer_chat_template_and_special_tokens_survive(tmp_path, tok):
    model = model_of("llama", tok)
    export_gguf(model, tok, tmp_path / "m.gguf", quantize="f16")
    meta = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert meta["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert meta["tokenizer.ggml.eos_token_id"].contents() == tok.eos_id == tok.hf.token_to_id("<|im_end|>")
    assert meta["tokenizer.ggml.eot_token_id"].contents() == tok.hf.token_to_id("<|endoftext|>")
    assert meta["tokenizer.ggml.padding_token_id"].contents() == tok.pad_id
    assert "tokenizer.ggml.bos_token_id" not in meta  # the chatforge tokenizer has none
    assert meta["tokenizer.chat_template"].contents() == tok.chat_template
    assert main(["import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    back = read_tokenizer(tmp_path / "back")
    assert back.chat_template == tok.chat_template
    assert (back.eos_id, back.pad_id, back.bos_id, back.stop_ids) == (tok.eos_id, tok.pad_id, None, tok.stop_ids)
    assert back.hf.get_vocab(with_added_tokens=True) == tok.hf.get_vocab(with_added_tokens=True)
    assert {i: (t.content, t.special) for i, t in back.hf.get_added_tokens_decoder().items()} == \
        {i: (t.content, t.special) for i, t in tok.hf.get_added_tokens_decoder().items()}
    assert back.render(CHAT, add_generation_prompt=True) == tok.render(CHAT, add_generation_prompt=True)
    text = "Restart the router: 12345 times, 你好! <|im_end|> it's done\n\n  ok"
    assert back.encode(text) == tok.encode(text)
    generation = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == sorted(tok.stop_ids)


def test_the_pre_tokenizer_is_named_by_how_it_splits(tok):
    from tokenizers import pre_tokenizers

    from chatforge.tokenizer import Tokenizer

    assert pre_tokenizer_name(tok) == "gpt-2"
    smol = Tokenizer.from_strings(tok.hf.to_str(), {"eos_token": "<|im_end|>"}, tok.chat_template)
    smol.hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert pre_tokenizer_name(smol) == "smollm"  # SmolLM2's own: every digit on its own, then GPT-2's regex
    smol.hf.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(ChatforgeError, match=r"^export: the tokenizer splits text like none of GGUF's byte-level "
                                             r"BPE pre-tokenizers \(gpt-2, smollm, llama-bpe, qwen2\); only such "
                                             r"tokenizers can be exported$"):
        pre_tokenizer_name(smol)


def test_an_adapter_folder_is_merged_and_an_encrypted_folder_read_in_memory(tmp_path, tok, monkeypatch, capsys):
    from chatforge.privacy import crypto
    from chatforge.weights.loader import load
    from chatforge.weights.lora import apply_lora, save_adapter

    base = save_model(model_of("llama", tok), tok, tmp_path / "base")
    loaded = load(str(base))
    peft_model = apply_lora(loaded.model, {"r": 4, "alpha": 16, "target_modules": "all-linear"},
                            base_name_or_path=loaded.source)
    with torch.no_grad():  # a non-zero update, so a forgotten merge shows
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter = save_adapter(peft_model, tmp_path / "adapter", tokenizer=tok)
    merged = load(str(adapter)).model
    assert main(["export", str(adapter), "--out", str(tmp_path / "a.gguf"), "--quantize", "f32"]) == 0
    assert main(["import", str(tmp_path / "a.gguf"), "--out", str(tmp_path / "a-back")]) == 0
    x = ids(16, tok.vocab_size)
    with torch.no_grad():
        assert max_diff(load_model(tmp_path / "a-back")(x), merged(x)) == 0.0
        assert max_diff(load(str(base)).model(x), merged(x)) > 1e-3

    key = crypto.Key(raw=crypto.generate_key())
    crypto.encrypt_path(str(base), str(tmp_path / "enc"), key)
    key_file = tmp_path / "k.key"
    key_file.write_text(base64.b64encode(key.raw).decode())
    os.chmod(key_file, 0o600)
    assert main(["export", str(tmp_path / "enc"), "--out", str(tmp_path / "e.gguf"), "--quantize", "f32",
                 "--key-file", str(key_file)]) == 0
    assert main(["export", str(base), "--out", str(tmp_path / "p.gguf"), "--quantize", "f32"]) == 0
    enc = {t.name: t.data for t in gguf.GGUFReader(str(tmp_path / "e.gguf")).tensors}
    plain = {t.name: t.data for t in gguf.GGUFReader(str(tmp_path / "p.gguf")).tensors}
    assert enc.keys() == plain.keys() and all(np.array_equal(enc[k], plain[k]) for k in plain)


def test_what_gguf_cannot_carry_is_refused_in_one_line(tmp_path, tok, capsys):
    window = random_family_model(FAMILIES["mistral-window"] | {"vocab_size": tok.vocab_size})
    with pytest.raises(ChatforgeError, match=r"^export: a sliding window of 8 tokens \(context 64\) cannot be "
                                             r"carried by GGUF's llama architecture$"):
        export_gguf(window, tok, tmp_path / "w.gguf")
    wide = random_family_model(FAMILIES["mistral-window"] | {"vocab_size": tok.vocab_size, "sliding_window": 64})
    assert export_gguf(wide, tok, tmp_path / "w.gguf", quantize="f32")["arch"] == "llama"  # a window as wide as
    # the context is no window at all
    small = GPT(ModelConfig(vocab_size=tok.vocab_size - 1, n_layer=1, n_head=2, d_model=64, max_seq_len=32))
    with pytest.raises(ChatforgeError, match=rf"^export: the tokenizer has ids up to {tok.vocab_size - 1} but the "
                                             rf"model only {tok.vocab_size - 1} embedding rows$"):
        export_gguf(small, tok, tmp_path / "s.gguf")
    folder = save_model(model_of("llama", tok), tok, tmp_path / "src")
    for flags, message in ((["--quantize", "q4_k"], "export: unknown --quantize 'q4_k' (use f32, f16, q8_0)"),
                           (["--format", "onnx"], "export: unknown --format 'onnx' (use gguf)")):
        assert main(["export", str(folder), "--out", str(tmp_path / "x.gguf")] + flags) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf.*"))


@pytest.mark.slow
def test_llama_cpp_gives_the_same_greedy_tokens(tmp_path):
    """A SmolLM2-shaped tiny model (llama, grouped-query attention, tied embeddings, ChatML) trained to say known
    replies: llama.cpp decodes the exported file greedily to the same tokens as chatforge's engine."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from conftest import CONVERSATIONS, make_tokenizer, memorized_model

    from chatforge.generation.engine import Engine, SamplingParams

    tok = make_tokenizer()
    model = memorized_model(tok)
    prompts = [tok.render(c[:-1], add_generation_prompt=True)[0] for c in CONVERSATIONS]
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    want = [c.token_ids for c in Engine(model, tok, max_batch_size=len(prompts)).generate_batch(prompts, params)]
    for quantize in ("f16", "q8_0"):
        path = tmp_path / f"m-{quantize}.gguf"
        export_gguf(model, tok, path, quantize=quantize)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)
        for prompt, expected in zip(prompts, want):
            got = []
            for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                got.append(t)
                if t in tok.stop_ids or len(got) == 40:
                    break
            assert got == expected, quantize
        assert llm.token_eos() == tok.eos_id
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
