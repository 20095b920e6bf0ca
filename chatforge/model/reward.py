"""A reward model: the one GPT with its output layer replaced by a scalar head, scoring a whole conversation.

transformers' *ForSequenceClassification models (what TRL's RewardTrainer trains) are the same thing: the
backbone, a bias-free `score` Linear(d_model, 1) instead of the language-model head, and the value at the last
token as the score. Replacing `lm_head` keeps the one forward pass: the model's "logits" are the scores.
"""

from __future__ import annotations

import torch
from torch import nn

from chatforge.errors import ChatforgeError


def attach_scalar_head(model, weight: torch.Tensor | None = None) -> None:
    """Replace model.lm_head by a scalar head (initialised as transformers does, normal(0, init_std), unless
    `weight` (1, d_model) is given). The model's config is unchanged: the backbone stays loadable as it was."""
    head = nn.Linear(model.config.d_model, 1, bias=False, device=model.model.embed_tokens.weight.device)
    if weight is not None:
        if tuple(weight.shape) != (1, model.config.d_model):
            raise ChatforgeError(f"reward model: score.weight has shape {tuple(weight.shape)}, expected "
                                 f"(1, {model.config.d_model})")
        with torch.no_grad():
            head.weight.copy_(weight)
    else:
        nn.init.normal_(head.weight, mean=0.0, std=model.config.init_std)
    model.lm_head = head


def is_reward_model(model) -> bool:
    head = getattr(model, "lm_head", None)
    return isinstance(head, nn.Linear) and head.out_features == 1


def score_ids(model, rows: list[list[int]], pad_id: int = 0) -> list[float]:
    """The score of each token sequence (the head at its last token), right-padded into one batch."""
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    last = torch.tensor([len(r) - 1 for r in rows], device=device)
    with torch.no_grad():
        out = model(ids.to(device), logits_at=last)
    return out[:, 0, 0].float().tolist()


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """Scores of whole conversations (each ending with the assistant reply to rate), rendered by the one chat
    renderer exactly as training rendered its pairs."""
    if not is_reward_model(model):
        raise ChatforgeError("reward model: this model has no scalar head (train one with stage: reward)")
    was_training = model.training
    model.eval()
    try:
        scores: list[float] = []
        for start in range(0, len(conversations), batch_size):
            rows = [tokenizer.render(c)[0] for c in conversations[start:start + batch_size]]
            scores += score_ids(model, rows, tokenizer.pad_id)
        return scores
    finally:
        model.train(was_training)
