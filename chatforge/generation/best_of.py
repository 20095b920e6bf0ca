"""Best-of-N (rejection sampling): sample N replies, score each with a reward model, return the best.

`rank` is the one place a reply is chosen, for the CLI (`best_of_n`, generate --best-of) and the server alike:
each candidate first goes through the output chain (guard.output.OutputChain: the guard's reply check and PII
redaction), so the reward model scores what a user would be shown and the chosen reply is never an unfiltered one;
a candidate the guard stopped ranks below every candidate it let through; equal scores keep the earlier one.
The chain is passed in (anything with `filter_text(text, context) -> (text, finish_reason or None)`): this layer sits
below guard/.

`best_of_n` decodes the N samples together in one batch through the one engine; sample i uses seed seed + i, so a
seeded call returns the same N replies whatever else is batched. The reward model scores the whole conversation
with the reply appended, rendered by the one chat renderer as its training pairs were.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatforge.errors import ChatforgeError


@dataclass
class BestOf:
    candidates: list[str]  # every candidate as shown (after the output chain), in sampling order
    scores: list[float]  # the reward model's score of each shown candidate
    finish_reasons: list[str | None]  # "content_filter" where the guard stopped a candidate
    order: list[int]  # candidate indices, best first
    completion_tokens: int  # tokens generated for all candidates together (what the N samples cost)

    @property
    def best_index(self) -> int:
        return self.order[0]

    @property
    def reply(self) -> str:
        return self.candidates[self.order[0]]

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[self.order[0]]


def rank(reward_model, reward_tokenizer, messages: list[dict], texts: list[str],
         finish_reasons: list[str | None] | None = None, completion_tokens: int = 0, output=None) -> BestOf:
    """The candidates `texts` (replies to `messages`) filtered by `output`, scored and ordered best first."""
    from chatforge.model.reward import score_conversations

    if not texts:
        raise ChatforgeError("best-of: no candidates to rank")
    finish = list(finish_reasons) if finish_reasons is not None else [None] * len(texts)
    shown = list(texts)
    if output is not None:
        context = "\n".join(m["content"] for m in messages if isinstance(m.get("content"), str))  # PII it may repeat
        for i, text in enumerate(texts):
            shown[i], stopped = output.filter_text(text, context)
            finish[i] = stopped or finish[i]
    scores = score_conversations(reward_model, reward_tokenizer,
                                 [list(messages) + [{"role": "assistant", "content": c}] for c in shown])
    order = sorted(range(len(shown)), key=lambda i: (finish[i] == "content_filter", -scores[i], i))
    return BestOf(shown, scores, finish, order, completion_tokens)


def best_of_n(bot, reward_model, reward_tokenizer, messages: list[dict], n: int = 4, seed: int | None = None,
              output=None, **sampling) -> BestOf:
    """The best of n sampled replies to `messages` by `reward_model` (a GPT with a scalar head), each candidate
    filtered by `output` (a guard.output.OutputChain; None: replies as generated)."""
    if n < 1:
        raise ChatforgeError(f"best-of: n must be at least 1, got {n}")
    requests = [bot.request(messages, **sampling, **({} if seed is None else {"seed": seed + i})) for i in range(n)]
    prompts, params = zip(*requests)
    if n > 1 and params[0].temperature == 0:
        raise ChatforgeError("best-of: temperature 0 gives n identical replies; sample with temperature > 0")
    results = bot.engine.generate_batch(list(prompts), list(params))
    return rank(reward_model, reward_tokenizer, messages, [c.text for c in results],
                [c.finish_reason for c in results], sum(c.completion_tokens for c in results), output)
