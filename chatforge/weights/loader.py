"""Starting from someone else's weights: `chatforge import`, and loading a pretrained model to fine-tune or chat with.

A Hugging Face folder (GPT-2, Llama, Mistral, Qwen2, SmolLM2) already is a chatforge model folder, so importing one
means validating it through the same reader every command uses and writing it back in chatforge's own layout; a
GGUF file or a known name goes through gguf_import. `load_pretrained` (chat, generate, merge) and `init_model`
(training's `init:`) accept anything `resolve_model` does plus a LoRA adapter folder; the chat special tokens are
added only to a tokenizer that lacks them, so a chat model keeps its own template and vocabulary.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    import torch

    from chatforge.model.gpt import GPT
    from chatforge.tokenizer import Tokenizer

DTYPES = ("float32", "bfloat16", "float16")
# transformers' bookkeeping in generation_config.json; not generation settings
_GENERATION_META = ("transformers_version", "_from_model_config")


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer | None:
    """The folder's tokenizer; None when it ships none.

    Folders written by transformers usually hold tokenizer.json; older ones only vocab.json + merges.txt, which
    transformers converts into a fast tokenizer that chatforge then reads the same way.
    """
    from chatforge.tokenizer import Tokenizer

    folder = Path(folder)
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


def _generation_config(folder: Path, tokenizer: Tokenizer | None) -> dict:
    """The source's generation settings, stopping on its eos ids and on the tokenizer's end-of-turn tokens."""
    from chatforge.weights.folder import read_generation_config

    gen = {k: v for k, v in read_generation_config(folder).items() if k not in _GENERATION_META}
    eos = gen.get("eos_token_id")
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None:
        stops |= tokenizer.stop_ids
    if stops:
        gen["eos_token_id"] = sorted(stops)
    return gen


def _check_out(out: str | None) -> None:
    if not out:
        raise ChatforgeError("--out: required (the model folder to create)")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ChatforgeError(f"{out}: already exists and is not empty; choose another --out or remove it")


def import_command(src: str, out: str | None = None, dtype: str = "float32") -> None:
    """Convert a pretrained checkpoint into a chatforge model folder (weights, config, tokenizer, chat template).

    A Hugging Face folder can also be used by every command directly; importing re-saves it in chatforge's layout
    (one model.safetensors, tokenizer.json with the chat template) and checks it on the way.

    Args:
        src: a Hugging Face model folder (GPT-2, Llama, Mistral, Qwen2, SmolLM2), a .gguf file, or a known
            model name (smollm2-135m-instruct).
        out: the model folder to create (required); it must not exist yet or be empty.
        dtype: float32, bfloat16 or float16 for the saved weights.
    """
    import torch

    from chatforge.weights import gguf as gguf_import
    from chatforge.weights.folder import load_model, save_model

    if dtype not in DTYPES:
        raise ChatforgeError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    _check_out(out)
    path = Path(src).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        gguf_import.gguf_to_folder(str(path), out, dtype)
    elif not path.exists() and src in gguf_import.KNOWN_MODELS:
        gguf_import.gguf_to_folder(gguf_import.find_packaged_gguf(src), out, dtype)
    elif path.is_dir():
        if (path / "adapter_config.json").is_file():
            raise ChatforgeError(f"{src}: is a LoRA adapter, not a model; fold it into one with "
                                 f"`chatforge merge BASE {src} --out {out}`")
        model = load_model(path)
        tokenizer = load_tokenizer(path)
        save_model(model, tokenizer, out, _generation_config(path, tokenizer), dtype=getattr(torch, dtype))
    elif path.exists():
        raise ChatforgeError(f"{src}: not a model folder or .gguf file")
    else:
        raise ChatforgeError(f"{src}: no such file or folder, and not a known model name "
                             f"(known: {', '.join(sorted(gguf_import.KNOWN_MODELS))})")
    _print_summary(out)


def _print_summary(folder: str) -> None:
    from chatforge.weights.folder import read_config

    config = read_config(folder)
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        tok = "no tokenizer (the source has none; add one before chatting)"
    else:
        tok = (f"tokenizer of {tokenizer.vocab_size} tokens, "
               + ("chat template kept" if tokenizer.chat_template else "no chat template (a base model)"))
    print(f"imported {config.family}: {config.n_layer} layers, d_model {config.d_model}, "
          f"vocab {config.vocab_size}; {tok}")
    print(f"saved to {folder}")


# ---------------------------------------------------------------- loading to fine-tune or chat


def resize_vocab(model: GPT, vocab_size: int) -> None:
    """Grow the embedding (and an untied head) to vocab_size rows; new rows start at the mean of the old ones.

    The mean keeps the new tokens' logits ordinary at first, so the pretrained model's predictions for its own
    tokens do not change until training moves them.
    """
    import torch
    from torch import nn

    old = model.config.vocab_size
    if vocab_size <= old:
        return
    emb = model.model.embed_tokens
    new_emb = nn.Embedding(vocab_size, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
    with torch.no_grad():
        new_emb.weight[:old] = emb.weight
        new_emb.weight[old:] = emb.weight.mean(0)
    model.model.embed_tokens = new_emb
    if model.config.tie_embeddings:
        model.lm_head = nn.Linear(emb.embedding_dim, vocab_size, bias=False, device=emb.weight.device,
                                  dtype=emb.weight.dtype)
        model.lm_head.weight = new_emb.weight
    else:
        head = model.lm_head
        new_head = nn.Linear(head.in_features, vocab_size, bias=False, device=head.weight.device,
                             dtype=head.weight.dtype)
        with torch.no_grad():
            new_head.weight[:old] = head.weight
            new_head.weight[old:] = head.weight.mean(0)
        model.lm_head = new_head
    model.config.vocab_size = vocab_size


def ensure_chat_tokens(model: GPT, tokenizer: Tokenizer) -> list[int]:
    """Give a base tokenizer the ChatML tokens and the model rows for them; returns the new token ids.

    A tokenizer that can already render chats (a chat model's template and end-of-turn token) is left as it is.
    """
    if tokenizer.has_chat_tokens():
        return []
    before = set(tokenizer.hf.get_vocab(with_added_tokens=True).values())
    tokenizer.add_chat_tokens()
    new_ids = sorted(set(tokenizer.hf.get_vocab(with_added_tokens=True).values()) - before)
    resize_vocab(model, max(model.config.vocab_size, tokenizer.vocab_size))
    return new_ids


def _vocab(tokenizer: Tokenizer | None) -> dict[str, int] | None:
    return tokenizer.hf.get_vocab(with_added_tokens=True) if tokenizer is not None else None


def _new_token_ids(source_vocab: dict[str, int] | None, tokenizer: Tokenizer) -> list[int]:
    """Ids whose token the pretrained model never saw (added since, or a different token at that id)."""
    if source_vocab is None:
        return []
    seen = {i: t for t, i in source_vocab.items()}
    return sorted(i for t, i in _vocab(tokenizer).items() if seen.get(i) != t)


def _load(name_or_path: str, device, dtype) -> tuple[GPT, Tokenizer | None, str]:
    from chatforge.weights.folder import load_model
    from chatforge.weights.gguf import resolve_model
    from chatforge.weights.lora import load_adapter, resolve_adapter

    adapter = resolve_adapter(name_or_path)
    if adapter is not None:  # the base may itself be an adapter: load recursively
        base, adapter_folder = adapter
        model, base_tokenizer, _ = _load(base, device, dtype)
        model = load_adapter(model, adapter_folder, merge=True)
        return model, load_tokenizer(adapter_folder) or base_tokenizer, adapter_folder
    folder = resolve_model(name_or_path)
    return load_model(folder, device=device, dtype=dtype), load_tokenizer(folder), folder


def _remember_source(model: GPT, name_or_path: str, source_vocab: dict[str, int] | None,
                     tokenizer: Tokenizer) -> None:
    # what an adapter trained on this model names as its base: the user's path, or a known name as such
    path = Path(name_or_path).expanduser()
    model.name_or_path = str(path.resolve()) if path.exists() else name_or_path
    model.new_token_ids = _new_token_ids(source_vocab, tokenizer)


def load_pretrained(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    chat_tokens: bool = False) -> tuple[GPT, Tokenizer, str]:
    """(model, tokenizer, folder) for a model folder, .gguf file, known name or LoRA adapter folder.

    An adapter folder gives its base with the adapter merged in. With chat_tokens, a tokenizer lacking the chat
    special tokens gains them and the embeddings grow. The model remembers its source (model.name_or_path, which
    peft records as an adapter's base) and the ids it never saw (model.new_token_ids, trained by lora/freeze).
    """
    model, tokenizer, folder = _load(name_or_path, device, dtype)
    if tokenizer is None:
        raise ChatforgeError(f"{name_or_path}: the model folder has no tokenizer (tokenizer.json)")
    source = _vocab(tokenizer)
    if chat_tokens:
        ensure_chat_tokens(model, tokenizer)
    _remember_source(model, name_or_path, source, tokenizer)
    return model, tokenizer, folder


def init_model(name_or_path: str, tokenizer: Tokenizer, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> GPT:
    """The pretrained model to fine-tune with `tokenizer` (training's `init:`), its embeddings grown to fit it.

    For when the run's tokenizer is built separately (the init model's plus chat tokens, or cfg.tokenizer):
    the rows of ids the source never saw are listed in model.new_token_ids, so LoRA and freezing train them.
    """
    model, source, _ = _load(name_or_path, device, dtype)
    if tokenizer.vocab_size > model.config.vocab_size:
        resize_vocab(model, tokenizer.vocab_size)
    _remember_source(model, name_or_path, _vocab(source), tokenizer)
    return model


def init_tokenizer(name_or_path: str) -> Tokenizer:
    """The tokenizer a fine-tune of `name_or_path` starts from (an adapter's own, else its base's), without
    loading any weights."""
    from chatforge.weights.gguf import resolve_model
    from chatforge.weights.lora import resolve_adapter

    adapter = resolve_adapter(name_or_path)
    if adapter is not None:
        return load_tokenizer(adapter[1]) or init_tokenizer(adapter[0])
    tokenizer = load_tokenizer(resolve_model(name_or_path))
    if tokenizer is None:
        raise ChatforgeError(f"{name_or_path}: the model folder has no tokenizer (tokenizer.json)")
    return tokenizer


def load_generation_config(name_or_path: str) -> dict:
    """generation_config.json of a model, or of an adapter's base when the adapter folder has none."""
    from chatforge.weights.folder import read_generation_config
    from chatforge.weights.gguf import resolve_model
    from chatforge.weights.lora import resolve_adapter

    adapter = resolve_adapter(name_or_path)
    if adapter is not None:
        return read_generation_config(adapter[1]) or load_generation_config(adapter[0])
    return read_generation_config(resolve_model(name_or_path))
