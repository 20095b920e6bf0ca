"""Vocabulary surgery: growing a model's embeddings for tokens its tokenizer gained (the chat special tokens a base
model lacks, or a fine-tune's own tokenizer), so the pretrained model's predictions for its own tokens stay as they
were until training moves the new rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatforge.model.gpt import GPT
    from chatforge.tokenizer import Tokenizer


def resize_vocab(model: GPT, vocab_size: int) -> None:
    """Grow the embedding (and an untied head) to vocab_size rows; new rows start at the mean of the old ones.

    The mean keeps the new tokens' logits ordinary at first, so the pretrained model's predictions for its own
    tokens do not change until training moves them. A smaller vocab_size leaves the model as it is.
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
