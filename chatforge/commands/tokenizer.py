"""`chatforge tokenizer train` and `chatforge show-labels`: flags -> chatforge.tokenizer -> printed results."""

from __future__ import annotations

import os
import sys

from chatforge.errors import ChatforgeError


def tokenizer_train(
    *, data: str, out: str, vocab_size: int = 4096, min_frequency: int = 2, val_fraction: float = 0.1, seed: int = 0
) -> None:
    """Train a byte-level BPE tokenizer with ChatML special tokens and chat template on a dataset.

    Args:
        data: dataset path or builtin name (e.g. builtin:english), as accepted by `chatforge prepare`.
        out: folder to write tokenizer.json, tokenizer_config.json and special_tokens_map.json into.
        vocab_size: total vocabulary size, special tokens included (more than 260).
        min_frequency: a pair must occur at least this often to be merged.
        val_fraction: share of conversations held out to measure compression.
        seed: seed of the train/validation split.
    """
    from chatforge.data import load_dataset
    from chatforge.tokenizer import bytes_per_token, record_texts, train_tokenizer

    train, val, report = load_dataset(data, val_fraction, seed)
    dropped = sum(report.get("dropped", {}).values())
    print(f"data: read {report.get('read', len(train) + len(val))} records, kept {len(train) + len(val)} "
          f"(train {len(train)}, val {len(val)}), dropped {dropped}")
    tok = train_tokenizer(record_texts(train), vocab_size=vocab_size, min_frequency=min_frequency)
    tok.save(out)
    print(f"vocab size: {tok.vocab_size} (trained on {len(train)} records)")
    ratio = bytes_per_token(tok, record_texts(val))
    if ratio is not None:
        print(f"compression on validation ({len(val)} records): {ratio:.3f} bytes per token")
    else:
        print("compression on validation: n/a (empty validation split)")
    print(f"saved to {out}")


def use_color(color: bool | None, stream=None) -> bool:
    """Colour when asked (--color / --no-color), else only on a terminal and when NO_COLOR is not set."""
    if color is not None:
        return color
    stream = stream or sys.stdout
    return stream.isatty() and not os.environ.get("NO_COLOR")


def show_labels(
    model_or_tokenizer: str, data: str = "builtin:english", index: int = 0, color: bool | None = None
) -> None:
    """Print one rendered conversation with the tokens that carry the SFT loss highlighted.

    Args:
        model_or_tokenizer: a model or tokenizer folder (with tokenizer.json and tokenizer_config.json).
        data: dataset path or builtin name whose conversations to show.
        index: which conversation (0-based, in dataset order).
        color: highlight in ANSI green (--color) or wrap trained tokens in [[ ]] (--no-color); default: colour
            only on a terminal (and not when NO_COLOR is set), so pipes and files get plain text.
    """
    from chatforge.data import load_dataset
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.load(model_or_tokenizer)
    train, val, _report = load_dataset(data, 0.0, 0)  # no hold-out, so the index follows the data's order
    conversations = [r for r in list(train) + list(val) if "messages" in r]
    if not 0 <= index < len(conversations):
        raise ChatforgeError(f"{data}: index {index} out of range ({len(conversations)} conversations)")
    ids, mask = tok.render(conversations[index]["messages"])
    print(tok.format_labels(ids, mask, color=use_color(color)))
