"""`chatforge import`, `chatforge merge` and `chatforge export`: flags -> the one loader -> a model folder written by
save_model (or a GGUF file written by weights.gguf_export), and what was written, printed."""

from __future__ import annotations

from pathlib import Path

from chatforge.errors import ChatforgeError


def import_command(src: str, out: str | None = None, dtype: str = "fp32") -> None:
    """Convert a pretrained checkpoint into a chatforge model folder (weights, config, tokenizer, chat template).

    A Hugging Face folder can also be used by every command directly; importing re-saves it in chatforge's layout
    (one model.safetensors, tokenizer.json with the chat template) and checks it on the way.

    Args:
        src: a Hugging Face model folder (GPT-2, Llama, Mistral, Qwen2, SmolLM2), a .gguf file, a known model name
            (smollm2-135m-instruct), or a LoRA adapter folder (saved merged onto the base it names).
        out: the model folder to create (required); it must not exist yet or be empty.
        dtype: fp32, bf16 or fp16 for the saved weights.
    """
    import torch

    from chatforge.device import resolve_dtype
    from chatforge.io import check_new_folder
    from chatforge.weights.folder import save_model
    from chatforge.weights.gguf import gguf_to_folder
    from chatforge.weights.loader import load, resolve

    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    check_new_folder(out)
    resolved = resolve(src)
    if resolved.kind in ("known", "gguf"):  # straight into `out`: no detour through the cache
        gguf_to_folder(resolved.path, out, dtype)
    else:
        loaded = load(src, need_tokenizer=False)
        save_model(loaded.model, loaded.tokenizer, out, loaded.generation_config, dtype=torch_dtype)
    _print_summary(out)


def merge_command(base: str, adapter: str, out: str | None = None, dtype: str = "fp32") -> None:
    """Fold a LoRA adapter into its base model and save the result as a standalone model folder.

    Args:
        base: the base model: a model folder, .gguf file, known model name (smollm2-135m-instruct) or adapter folder.
        adapter: the adapter folder (adapter_config.json + adapter_model.safetensors), from chatforge or peft.
        out: the model folder to create (required); it must not exist yet or be empty.
        dtype: fp32, bf16 or fp16 for the saved weights.
    """
    import torch

    from chatforge.device import resolve_dtype
    from chatforge.io import check_new_folder
    from chatforge.weights.folder import save_model
    from chatforge.weights.loader import load, merge_adapter
    from chatforge.weights.lora import ADAPTER_CONFIG

    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    if not (Path(adapter) / ADAPTER_CONFIG).is_file():
        raise ChatforgeError(f"{adapter}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    check_new_folder(out)
    merged = merge_adapter(load(base), adapter)
    save_model(merged.model, merged.tokenizer, out, merged.generation_config, dtype=torch_dtype)
    print(f"merged {adapter} into {base}: {merged.model.num_params():,} parameters")
    print(f"saved to {out}")


def export_command(model: str, *, out: str, format: str = "gguf", quantize: str = "f16", key_file: str | None = None,
                   passphrase: bool = False) -> None:
    """Export a model as a GGUF file for llama.cpp, Ollama and other GGUF runtimes (tokenizer and chat template inside).

    Args:
        model: a model folder, .gguf file, known model name (smollm2-135m-instruct), LoRA adapter folder (merged
            onto its base first) or encrypted model folder (key from CHATFORGE_KEY).
        out: the .gguf file to write (replaced atomically if it exists).
        format: the output format; gguf is the one there is.
        quantize: f16 (what llama.cpp's converter writes), q8_0 (about half the size) or f32 (exact).
        key_file: key of an encrypted model folder (base64, mode 0600); default: CHATFORGE_KEY.
        passphrase: ask for the passphrase of an encrypted model folder instead of a key file.
    """
    from chatforge.commands.privacy import given_key
    from chatforge.weights.gguf_export import QUANTIZE, export_gguf
    from chatforge.weights.loader import load

    if format != "gguf":
        raise ChatforgeError(f"export: unknown --format {format!r} (use gguf)")
    if quantize not in QUANTIZE:  # before the weights are read
        raise ChatforgeError(f"export: unknown --quantize {quantize!r} (use {', '.join(QUANTIZE)})")
    loaded = load(model, dtype="fp32", key=given_key(key_file, passphrase))
    summary = export_gguf(loaded.model, loaded.tokenizer, out, quantize=quantize, name=Path(loaded.source).name)
    types = ", ".join(f"{n} {t}" for t, n in sorted(summary["tensor_types"].items()))
    print(f"exported {model} as GGUF ({summary['arch']}, {quantize}): {loaded.model.num_params():,} parameters, "
          f"{summary['tensors']} tensors ({types}), {summary['bytes'] / 2**20:.1f} MiB")
    print(f"saved to {out}")


def _print_summary(folder: str) -> None:
    from chatforge.weights.folder import read_config, read_tokenizer

    config = read_config(folder)
    tokenizer = read_tokenizer(folder)
    if tokenizer is None:
        tok = "no tokenizer (the source has none; add one before chatting)"
    else:
        tok = (f"tokenizer of {tokenizer.vocab_size} tokens, "
               + ("chat template kept" if tokenizer.chat_template else "no chat template (a base model)"))
    print(f"imported {config.family}: {config.n_layer} layers, d_model {config.d_model}, "
          f"vocab {config.vocab_size}; {tok}")
    print(f"saved to {folder}")
