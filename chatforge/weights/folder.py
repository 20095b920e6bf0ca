"""Model folders: the one model format, readable by transformers.

A folder holds config.json, model.safetensors (transformers' parameter names), generation_config.json and the
tokenizer files. Reading accepts what transformers writes too (sharded safetensors; pytorch_model.bin only through
torch.load(weights_only=True); a tokenizer as vocab.json + merges.txt), so any GPT-2 / Llama / Mistral / Qwen2 /
SmolLM2 folder works without a step. Writing goes through io.atomic_folder: a whole folder or none.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from chatforge.errors import ChatforgeError
from chatforge.io import atomic_folder, atomic_write_text, read_json
from chatforge.model.gpt import GPT, ModelConfig

if TYPE_CHECKING:
    from chatforge.tokenizer import Tokenizer

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2")
# transformers' bookkeeping in generation_config.json; not generation settings
_GENERATION_META = ("transformers_version", "_from_model_config")


# ---------------------------------------------------------------- config.json <-> ModelConfig

def config_to_hf(c: ModelConfig, special_ids: dict | None = None) -> dict:
    ids = {k: v for k, v in (special_ids or {}).items() if v is not None}
    if c.family == "gpt2":
        d = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
             "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head, "n_positions": c.max_seq_len,
             "n_ctx": c.max_seq_len, "n_inner": c.d_ff, "layer_norm_epsilon": c.norm_eps,
             "activation_function": {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu"}[c.activation],
             "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
             "initializer_range": c.init_std, "scale_attn_weights": True, "tie_word_embeddings": True}
        if c.norm != "layernorm" or c.positions != "learned" or c.mlp != "gelu" or not c.tie_embeddings:
            raise ChatforgeError("model: family gpt2 needs layernorm, learned positions, gelu MLP and tied embeddings")
        return c.extra | d | ids
    if c.norm != "rmsnorm" or c.positions != "rope" or c.mlp != "swiglu":
        raise ChatforgeError(f"model: family {c.family} needs rmsnorm, rope positions and a swiglu MLP")
    family = c.family
    if c.sliding_window and family == "llama":
        family = "mistral"  # transformers' Llama has no sliding window; Mistral is Llama with one
    if c.attn_bias and not c.attn_out_bias and family == "llama":
        family = "qwen2"  # q/k/v biases without an output bias is Qwen2's layout
    _check_family(c, family)
    d = {"architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                            "qwen2": "Qwen2ForCausalLM"}[family]],
         "model_type": family, "vocab_size": c.vocab_size, "hidden_size": c.d_model,
         "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
         "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim, "hidden_act": "silu",
         "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
         "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
         "tie_word_embeddings": c.tie_embeddings, "attention_dropout": c.dropout,
         "initializer_range": c.init_std}
    if family == "llama":
        d |= {"attention_bias": c.attn_bias, "mlp_bias": c.mlp_bias}
    elif family == "mistral":
        d |= {"sliding_window": c.sliding_window}
    else:
        d |= {"use_sliding_window": bool(c.sliding_window), "sliding_window": c.sliding_window,
              "max_window_layers": c.n_layer}
    return c.extra | d | ids


def _check_family(c: ModelConfig, family: str) -> None:
    if family == "llama" and (c.attn_bias != c.attn_out_bias):
        raise ChatforgeError("model: a llama-family model has biases on all or none of q/k/v/o")
    if family in ("mistral", "qwen2") and c.attn_out_bias:
        raise ChatforgeError(f"model: {family} has no attention output bias")
    if c.mlp_bias and family != "llama":
        raise ChatforgeError(f"model: {family} has no MLP bias")


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    mt = d.get("model_type")
    if mt not in SUPPORTED:
        raise ChatforgeError(f"{source}: unsupported architecture {mt!r} (supported: {', '.join(SUPPORTED)})")
    keep = {k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in d}
    if mt == "gpt2":
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(
            d.get("activation_function", "gelu_new"))
        if act is None:
            raise ChatforgeError(f"{source}: unsupported activation_function {d.get('activation_function')!r}")
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise ChatforgeError(f"{source}: GPT-2 attention variants (scale_attn_by_inverse_layer_idx) are not supported")
        return ModelConfig(family="gpt2", vocab_size=d["vocab_size"], n_layer=d["n_layer"], n_head=d["n_head"],
                           d_model=d["n_embd"], d_ff=d.get("n_inner") or 4 * d["n_embd"],
                           max_seq_len=d.get("n_positions", 1024), norm="layernorm",
                           norm_eps=d.get("layer_norm_epsilon", 1e-5), positions="learned", mlp="gelu",
                           activation=act, attn_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
                           extra=keep)
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ChatforgeError(f"{source}: unsupported rope scaling {rope_type!r}")
    if d.get("hidden_act", "silu") != "silu":
        raise ChatforgeError(f"{source}: unsupported hidden_act {d.get('hidden_act')!r}")
    window = None
    if mt == "mistral" or (mt == "qwen2" and d.get("use_sliding_window")):
        window = d.get("sliding_window")
    bias = bool(d.get("attention_bias", False)) if mt == "llama" else mt == "qwen2"
    n_head = d["num_attention_heads"]
    return ModelConfig(family=mt, vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=n_head,
                       n_kv_head=d.get("num_key_value_heads") or n_head, d_model=d["hidden_size"],
                       d_ff=d["intermediate_size"], head_dim=d.get("head_dim") or d["hidden_size"] // n_head,
                       max_seq_len=d.get("max_position_embeddings", 2048), norm="rmsnorm",
                       norm_eps=d.get("rms_norm_eps", 1e-6), positions="rope",
                       rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                       mlp="swiglu", activation="silu", attn_bias=bias, attn_out_bias=bias and mt == "llama",
                       mlp_bias=bool(d.get("mlp_bias", False)), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                       sliding_window=window, extra=keep)


# ---------------------------------------------------------------- state dict names

def _gpt2_to_hf(sd: dict, c: ModelConfig) -> dict:
    """chatforge names -> GPT2LMHeadModel names (Conv1D weights are stored transposed, q/k/v fused)."""
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.wpe.weight": sd["model.embed_positions.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"], "transformer.ln_f.bias": sd["model.norm.bias"]}
    for i in range(c.n_layer):
        p, h = f"model.layers.{i}.", f"transformer.h.{i}."
        a = p + "self_attn."
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"]
        out[h + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[h + "ln_2.bias"] = sd[p + "post_attention_layernorm.bias"]
        out[h + "attn.c_attn.weight"] = torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[a + f"{x}_proj.bias"] for x in "qkv"])
        out[h + "attn.c_proj.weight"], out[h + "attn.c_proj.bias"] = sd[a + "o_proj.weight"].t(), sd[a + "o_proj.bias"]
        out[h + "mlp.c_fc.weight"] = sd[p + "mlp.up_proj.weight"].t()
        out[h + "mlp.c_fc.bias"] = sd[p + "mlp.up_proj.bias"]
        out[h + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"].t()
        out[h + "mlp.c_proj.bias"] = sd[p + "mlp.down_proj.bias"]
    return {k: v.contiguous() for k, v in out.items()}


_GPT2_TOP = {"wte.weight": "model.embed_tokens.weight", "wpe.weight": "model.embed_positions.weight",
             "ln_f.weight": "model.norm.weight", "ln_f.bias": "model.norm.bias"}
_GPT2_BLOCK = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
               "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}  # and attn.c_attn: q, k and v fused


def _gpt2_from_hf(name: str, t: torch.Tensor, c: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One GPT2LMHeadModel tensor -> chatforge's (Conv1D weights transposed, c_attn split into q, k and v); a name
    GPT-2 does not use gives nothing."""
    name = name.removeprefix("transformer.")
    if name in _GPT2_TOP:
        return [(_GPT2_TOP[name], t)]
    layer, _, rest = name.removeprefix("h.").partition(".")
    module, _, kind = rest.rpartition(".")
    if not (name.startswith("h.") and layer.isdigit() and kind in ("weight", "bias")):
        return []
    p = f"model.layers.{layer}."
    if kind == "weight" and module.startswith(("attn.", "mlp.")):
        t = t.t()
    if module == "attn.c_attn":
        d = c.d_model
        return [(p + f"self_attn.{x}_proj.{kind}", t[j * d:(j + 1) * d].contiguous()) for j, x in enumerate("qkv")]
    return [(p + f"{_GPT2_BLOCK[module]}.{kind}", t.contiguous())] if module in _GPT2_BLOCK else []


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    if model.config.family == "gpt2":
        return _gpt2_to_hf(sd, model.config)
    return {k: v.contiguous() for k, v in sd.items()}


def state_dict_from_hf(hf: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(kv for name, t in hf.items() for kv in tensors_from_hf(name, t, c))


def tensors_from_hf(name: str, t: torch.Tensor, c: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One tensor of a transformers checkpoint as chatforge's (name, tensor) pairs: none for what chatforge does not
    keep (GPT-2's attention mask buffers, rotary caches, a tied head), several for GPT-2's fused q/k/v."""
    if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
        return []
    pairs = _gpt2_from_hf(name, t, c) if c.family == "gpt2" else [(name, t)]
    return [(k, v) for k, v in pairs if not (c.tie_embeddings and k == "lm_head.weight")]


# ---------------------------------------------------------------- reading and writing folders

def encrypted_file(folder: str | os.PathLike, name: str) -> bool:
    """Whether an encrypted model folder holds `name` (stored as NAME.cfenc by `chatforge encrypt`)."""
    from chatforge.privacy.crypto import SUFFIX

    return (Path(folder) / (name + SUFFIX)).is_file()


def is_encrypted_folder(folder: str | os.PathLike) -> bool:
    return encrypted_file(folder, "config.json")


def _read_encrypted(folder: Path, name: str, key) -> bytes | None:
    """File `name` of an encrypted folder, decrypted in memory only; None when the folder does not hold it."""
    from chatforge.privacy.crypto import read_file

    return read_file(str(folder), name, key) if encrypted_file(folder, name) else None


def _json_bytes(data: bytes, where: str) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"{where}:{getattr(e, 'lineno', 1)}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(value, dict):
        raise ChatforgeError(f"{where}:1: expected a JSON object")
    return value


def _read_encrypted_weights(folder: Path, key) -> dict[str, torch.Tensor]:
    """The weights of an encrypted folder, from decrypted bytes (safetensors.torch.load): nothing touches the disk."""
    import io

    from safetensors.torch import load

    def tensors(name: str) -> dict[str, torch.Tensor]:
        data = _read_encrypted(folder, name, key)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True) if name.endswith(".bin") \
                else load(data)
        except Exception as e:  # authenticated, so not tampered: written wrong before it was encrypted
            raise ChatforgeError(f"{folder / name}: cannot read weights ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None

    if encrypted_file(folder, "model.safetensors"):
        return tensors("model.safetensors")
    index = _read_encrypted(folder, "model.safetensors.index.json", key)
    if index is not None:
        shards = sorted(set(_json_bytes(index, str(folder / "model.safetensors.index.json"))["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out |= tensors(shard)
        return out
    if encrypted_file(folder, "pytorch_model.bin"):
        return tensors("pytorch_model.bin")
    raise ChatforgeError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                         f"(encrypted, .cfenc)")


def read_weights(folder: Path, key=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The folder's tensors; with a key (privacy.crypto.Key), an encrypted folder's, decrypted in memory.

    dtype: floating tensors come back in it, converted one tensor at a time as they are read, so loading an fp32
    folder in bf16 never holds the whole fp32 copy (peak memory: the bf16 model plus one fp32 tensor)."""
    return dict(iter_weights(folder, key, dtype))


def iter_weights(folder: Path, key=None, dtype: torch.dtype | None = None,
                 first: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """read_weights one tensor at a time (names in `first`, where the folder has them, come first), so a caller
    that keeps less than it reads (load_model quantizing) never holds the whole model."""
    from safetensors import safe_open

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def read_files(paths: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal current
        where = {}
        for path in paths:
            current = path
            with safe_open(str(path), framework="pt") as f:
                where |= {name: path for name in f.keys()}
        names = [n for n in first if n in where] + [n for n in where if n not in first]
        # one opening per tensor: a mapping of the file stays resident while it is open, so reading every tensor
        # through one opening would hold the whole file in memory beside the copies (fp32 SmolLM2: +513 MiB)
        for name in names:
            current = where[name]
            with safe_open(str(current), framework="pt") as f:
                tensor = cast(f.get_tensor(name))
            yield name, tensor

    if key is not None and is_encrypted_folder(folder):
        yield from ((k, cast(v)) for k, v in _read_encrypted_weights(Path(folder), key).items())
        return
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    current = folder  # the file being read, so an error names the corrupt shard rather than the folder
    try:
        if single.exists():
            yield from read_files([single])
            return
        if index.exists():
            current = index
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            yield from read_files([folder / shard for shard in shards])
            return
        if (folder / "pytorch_model.bin").exists():
            current = folder / "pytorch_model.bin"
            weights = torch.load(current, map_location="cpu", weights_only=True)
            yield from ((k, cast(v)) for k, v in weights.items())
            return
    except ChatforgeError:
        raise
    except Exception as e:  # corrupt, truncated, or a pickle holding more than tensors: name the file, no traceback
        why = ("it holds Python objects besides tensors; only plain tensors are loaded, nothing is unpickled"
               if type(e).__name__ == "UnpicklingError" else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        raise ChatforgeError(f"{current}: cannot read weights ({why})")
    raise ChatforgeError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_config(folder: str | os.PathLike, key=None) -> ModelConfig:
    path = Path(folder) / "config.json"
    if key is not None and is_encrypted_folder(folder):
        d = _json_bytes(_read_encrypted(Path(folder), "config.json", key), str(path))
    elif not path.exists():
        raise ChatforgeError(f"{folder}: not a model folder (no config.json)")
    else:
        d = read_json(path)
    try:
        return config_from_hf(d, str(path))
    except KeyError as e:
        raise ChatforgeError(f"{path}: missing field {e.args[0]!r}")


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, key=None, quantize: str | None = None) -> GPT:
    """Build the model from a folder; dtype None keeps fp32 (the dtype parity tests and training want).
    key: a privacy.crypto.Key for an encrypted folder (decrypted in memory only). quantize: a method that runs on
    torch's CPU kernels (model.quantize.on_cpu_kernels), applied to each Linear as soon as its weights are read, so
    the full-precision model is never resident (int8-wo SmolLM2-135M peaks below its fp32 weights' size)."""
    from chatforge.model.quantize import finish_loading, loading_quantizer, on_cpu_kernels

    folder = Path(folder)
    config = read_config(folder, key)
    if quantize is not None and not on_cpu_kernels(quantize, device):
        raise ValueError(f"load_model: {quantize!r} on {device} is applied after loading (model.quantize)")
    with torch.device("meta"):
        model = GPT(config)
    dtype = dtype or torch.float32
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    loaded = loading_quantizer(model, quantize) if quantize is not None else None
    seen, unexpected = set(), []
    # the embedding first: when it is also the (quantized) head, its float table is gone before the rest arrives
    first = ("model.embed_tokens.weight", "transformer.wte.weight", "wte.weight")
    for hf_name, tensor in iter_weights(folder, key, dtype, first):
        for name, value in tensors_from_hf(hf_name, tensor, config):
            if name not in expected:
                unexpected.append(name)
                continue
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            empty = module._parameters[leaf]
            if value.shape != empty.shape:
                source = name if name == hf_name else f"{name} (from {hf_name})"
                raise ChatforgeError(f"{folder}: weight {source} has shape {list(value.shape)} where config.json "
                                     f"gives {list(empty.shape)}")
            module.register_parameter(leaf, nn.Parameter(value.to(dtype), requires_grad=empty.requires_grad))
            seen.add(name)
            if loaded is not None:
                loaded(name)
        del tensor
    missing = sorted(expected - seen)
    if missing or unexpected:
        raise ChatforgeError(f"{folder}: weights do not match config.json (missing {missing[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
    if loaded is not None:
        finish_loading(model, quantize)
        return model.eval()
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


def save_model(model: GPT, tokenizer, folder: str | os.PathLike, generation_config: dict | None = None,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write a complete model folder (replacing one that is there) through io.atomic_folder: a kill never leaves
    half a folder, and the files get the usual permissions."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        ids = {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": tokenizer.eos_id,
               "pad_token_id": tokenizer.pad_id} if tokenizer is not None else {}
        hf_config = config_to_hf(model.config, ids)
        hf_config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        tensors = {k: v.to("cpu", dtype) for k, v in state_dict_to_hf(model).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gen = {"eos_token_id": sorted(tokenizer.stop_ids) if tokenizer is not None else None,
               "pad_token_id": ids.get("pad_token_id"), "bos_token_id": ids.get("bos_token_id")}
        gen = {k: v for k, v in (gen | (generation_config or {})).items() if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(str(tmp))
    return folder


def read_generation_config(folder: str | os.PathLike, tokenizer: Tokenizer | None = None, key=None) -> dict:
    """The folder's generation settings ({} without generation_config.json), without transformers' bookkeeping;
    with a tokenizer, eos_token_id lists its end-of-turn tokens too, so generation stops on every one of them."""
    path = Path(folder) / "generation_config.json"
    if key is not None and is_encrypted_folder(folder):
        data = _read_encrypted(Path(folder), "generation_config.json", key)
        raw = _json_bytes(data, str(path)) if data is not None else {}
    else:
        raw = read_json(path) if path.exists() else {}
    gen = {k: v for k, v in raw.items() if k not in _GENERATION_META}
    return with_stop_ids(gen, tokenizer) if tokenizer is not None else gen


def with_stop_ids(generation_config: dict, tokenizer: Tokenizer) -> dict:
    """A copy whose eos_token_id lists the tokenizer's end-of-turn tokens as well as the config's own."""
    eos = generation_config.get("eos_token_id")
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | tokenizer.stop_ids
    return generation_config | ({"eos_token_id": sorted(stops)} if stops else {})


def read_tokenizer(folder: str | os.PathLike, key=None) -> Tokenizer | None:
    """The folder's tokenizer; None when it ships none.

    Folders written by transformers usually hold tokenizer.json; older ones only vocab.json + merges.txt, which
    transformers converts into a fast tokenizer that chatforge then reads the same way. An encrypted folder (with
    its key) is read from memory and needs tokenizer.json (converting the older files writes them to disk).
    """
    from chatforge.tokenizer import Tokenizer

    folder = Path(folder)
    if key is not None and is_encrypted_folder(folder):
        spec = _read_encrypted(folder, "tokenizer.json", key)
        if spec is None:
            if any(encrypted_file(folder, f) for f in ("vocab.json", "tokenizer.model")):
                raise ChatforgeError(f"{folder}: an encrypted folder needs its tokenizer as tokenizer.json (convert "
                                     f"it with `chatforge import` before encrypting)")
            return None
        config = _read_encrypted(folder, "tokenizer_config.json", key)
        jinja = _read_encrypted(folder, "chat_template.jinja", key)
        return Tokenizer.from_strings(spec.decode("utf-8"), _json_bytes(config, str(folder / "tokenizer_config.json"))
                                      if config is not None else {}, jinja.decode("utf-8") if jinja else None,
                                      str(folder / "tokenizer.json"))
    if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return Tokenizer.load(str(folder))
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ChatforgeError(f"{folder}: cannot read the tokenizer ({reason})") from None
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        return Tokenizer.load(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(str(path), json.dumps(obj, indent=2, ensure_ascii=False))
