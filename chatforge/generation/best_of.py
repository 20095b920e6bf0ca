"""Best-of-N (rejection sampling): sample N replies, score each with a reward model, return the best.

The N samples are decoded together in one batch through the one engine (Bot.chat_batch); sample i uses seed
seed + i, so a seeded call returns the same N replies whatever else is batched. The reward model scores the whole
conversation with the reply appended, rendered by the one chat renderer as its training pairs were.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatforge.errors import ChatforgeError


@dataclass
class BestOf:
    reply: str  # the highest-scored candidate (the first of equal ones)
    candidates: list[str]
    scores: list[float]

    @property
    def best_index(self) -> int:
        return self.candidates.index(self.reply)


def best_of_n(bot, reward_model, reward_tokenizer, messages: list[dict], n: int = 4, seed: int | None = None,
              **sampling) -> BestOf:
    """The best of n sampled replies to `messages` by `reward_model` (a GPT with a scalar head)."""
    from chatforge.model.reward import score_conversations

    if n < 1:
        raise ChatforgeError(f"best-of: n must be at least 1, got {n}")
    if sampling.get("temperature", 1.0) == 0 and n > 1:
        raise ChatforgeError("best-of: temperature 0 gives n identical replies; sample with temperature > 0")
    requests = [bot.request(messages, **sampling, **({} if seed is None else {"seed": seed + i})) for i in range(n)]
    prompts, params = zip(*requests)
    candidates = [c.text for c in bot.engine.generate_batch(list(prompts), list(params))]
    scores = score_conversations(reward_model, reward_tokenizer,
                                 [list(messages) + [{"role": "assistant", "content": c}] for c in candidates])
    best = max(range(n), key=lambda i: (scores[i], -i))
    return BestOf(candidates[best], candidates, scores)
