"""chatforge model -> GGUF file, so a fine-tuned bot runs in llama.cpp, Ollama and everything that reads GGUF.

Written with the `gguf` package's GGUFWriter, as llama.cpp's convert_hf_to_gguf.py writes it: llama.cpp's tensor
names, Llama's q/k rows permuted for its rope kernel, GPT-2's Conv1D layout (both through gguf.to_gguf, the same
mapping import undoes), norms and biases in F32 and matrices in the chosen type (a matrix whose rows Q8_0's 32-value
blocks do not divide stays F16, as llama.cpp does). The tokenizer travels as metadata: the byte-level BPE vocabulary
and merges, token types (special added tokens are control tokens), the pre-tokenizer's llama.cpp name (picked by
splitting probe texts the way the model's own tokenizer does), bos/eos/end-of-turn/padding ids and the chat template.

Families: llama (SmolLM2), mistral (as llama; only without an effective sliding window, which GGUF's llama lacks),
qwen2 and gpt2. Anything GGUF cannot carry faithfully is refused with one line rather than exported half right.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from chatforge.errors import ChatforgeError
from chatforge.io import atomic_path

if TYPE_CHECKING:
    from chatforge.model.gpt import GPT
    from chatforge.tokenizer import Tokenizer

QUANTIZE = ("f32", "f16", "q8_0")
_FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
_PRE_NAMES = ("gpt-2", "smollm", "llama-bpe", "qwen2")  # one llama.cpp name per distinct split, most common first
_PROBES = ["Hello world, how are you? I'll say THEY'RE done; we've seen it.", "12345 67890 3.14159 2024",
           "你好，世界！今天天气很好。", "  two  spaces\tand\ttabs\n\nnew lines\r\n", "def f(x):\n    return x**2  # ok\n",
           "naïve café — ÀÉÎ !!!\n\n...", "a1b22c333d4444"]
_CONTROL, _USER_DEFINED, _UNUSED, _NORMAL = 3, 4, 5, 1  # llama.cpp's token_type values


def _arch(model: GPT, hf_config: dict) -> str:
    c = model.config
    arch = _FAMILY_ARCH.get(hf_config["model_type"])
    if arch is None:
        raise ChatforgeError(f"export: family {hf_config['model_type']} has no GGUF architecture "
                             f"(supported: {', '.join(_FAMILY_ARCH)})")
    if c.sliding_window and c.sliding_window < c.max_seq_len:
        raise ChatforgeError(f"export: a sliding window of {c.sliding_window} tokens (context {c.max_seq_len}) "
                             f"cannot be carried by GGUF's {arch} architecture")
    if arch == "llama" and (c.attn_bias or c.mlp_bias):
        raise ChatforgeError("export: a llama-family model with attention or MLP biases has no GGUF architecture")
    if arch == "gpt2" and c.activation != "gelu_tanh":
        raise ChatforgeError(f"export: llama.cpp's gpt2 uses the tanh GELU; this model uses {c.activation!r}")
    return arch


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's tokenizer.ggml.pre name whose pre-tokenizer splits the probe texts exactly as `tokenizer`."""
    from chatforge.weights.gguf import byte_level_pre_tokenizer

    own = tokenizer.hf.pre_tokenizer
    if own is None:
        raise ChatforgeError("export: the tokenizer has no pre-tokenizer; GGUF carries byte-level BPE only")

    def splits(pre) -> list:
        return [[piece for piece, _ in pre.pre_tokenize_str(text)] for text in _PROBES]

    want = splits(own)
    for name in _PRE_NAMES:
        if splits(byte_level_pre_tokenizer(name)) == want:
            return name
    raise ChatforgeError(f"export: the tokenizer splits text like none of GGUF's byte-level BPE pre-tokenizers "
                         f"({', '.join(_PRE_NAMES)}); only such tokenizers can be exported")


def _add_tokenizer(w, tokenizer: Tokenizer, rows: int) -> None:
    """tokenizer.* metadata: every id below the embedding's row count gets a token (unused rows: [PADn])."""
    spec = json.loads(tokenizer.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ChatforgeError("export: GGUF's gpt2 tokenizer model needs a byte-level BPE tokenizer")
    pre = pre_tokenizer_name(tokenizer)
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= rows:
        raise ChatforgeError(f"export: the tokenizer has ids up to {max(vocab.values())} but the model only "
                             f"{rows} embedding rows")
    tokens, types = [f"[PAD{i}]" for i in range(rows)], [_UNUSED] * rows
    added = tokenizer.hf.get_added_tokens_decoder()
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = (_CONTROL if added[i].special else _USER_DEFINED) if i in added else _NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    others = sorted(tokenizer.stop_ids - {tokenizer.eos_id})
    if others:  # llama.cpp stops on eos, eot and eom; chatforge's import reads the same three back
        w.add_eot_token_id(others[0])
        if len(others) > 1:
            w.add_eom_token_id(others[1])
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(bool(tokenizer.extra_config.get("add_bos_token", False)) and tokenizer.bos_id is not None)
    w.add_add_eos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def _add_hparams(w, model: GPT, arch: str) -> None:
    c = model.config
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(c.norm_eps)
        return
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.n_head != c.d_model:  # llama.cpp assumes d_model / n_head unless told
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)


def _encode(values, quantize: str):
    """(data, raw_dtype, type name) for one tensor: 1-D ones (norms, biases) stay F32 as llama.cpp keeps them."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if values.ndim == 1 or quantize == "f32":
        return values.astype(np.float32), None, "F32"
    if quantize == "q8_0":
        try:
            return quants.quantize(values, T.Q8_0), T.Q8_0, "Q8_0"
        except quants.QuantError:  # rows not a multiple of 32: F16, as convert_hf_to_gguf falls back
            pass
    return values.astype(np.float16), None, "F16"


def export_gguf(model: GPT, tokenizer: Tokenizer, out: str | os.PathLike, *, quantize: str = "f16",
                name: str | None = None) -> dict:
    """Write `model` and `tokenizer` as one GGUF file at `out` (atomically: a kill leaves no partial file).

    quantize: f32, f16 (default; what llama.cpp's converter writes) or q8_0. Returns a summary: the GGUF
    architecture, how many tensors of each type, and the file's size in bytes.
    """
    import gguf
    import numpy as np

    from chatforge.weights.folder import config_to_hf, state_dict_to_hf
    from chatforge.weights.gguf import to_gguf

    if quantize not in QUANTIZE:
        raise ChatforgeError(f"export: unknown --quantize {quantize!r} (use {', '.join(QUANTIZE)})")
    if tokenizer is None:
        raise ChatforgeError("export: the model has no tokenizer; llama.cpp needs one inside the GGUF file")
    if getattr(model, "quantization", None):
        raise ChatforgeError("export: the model is quantized in memory; export its fp32/bf16 weights instead")
    c = model.config
    arch = _arch(model, config_to_hf(c))
    types: dict[str, int] = {}
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or "chatforge model")
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantize])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(w, model, arch)
        _add_tokenizer(w, tokenizer, c.vocab_size)
        for hf_name, tensor in state_dict_to_hf(model).items():
            values = tensor.detach().to("cpu").float().numpy()
            gguf_name, values = to_gguf(arch, hf_name, values, c.n_head, c.n_kv_head)
            data, raw_dtype, type_name = _encode(np.ascontiguousarray(values), quantize)
            w.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
            types[type_name] = types.get(type_name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"arch": arch, "tensor_types": types, "tensors": sum(types.values()), "bytes": os.path.getsize(out)}
