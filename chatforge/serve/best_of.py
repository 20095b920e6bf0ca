"""Best-of-N in the server (`chatforge serve --reward MODEL [--best-of N]`): chat completions sample best_of
candidates, the reward model ranks them, the n best are returned, best first.

The request field is OpenAI's legacy `best_of` (as vLLM also takes it on chat completions): best_of candidates
are sampled server-side and the n best returned; best_of must be at least n and at most the server's max n.
* Off unless the server has a reward model: then, as before, best_of is only accepted when it equals n.
* `--best-of N` is the default for requests that do not set best_of (max(N, n) candidates); it applies to
  non-streamed requests with sampling only: a greedy request (temperature 0) would get N identical candidates, and
  a streamed one could not be sent before every candidate is finished, so those are answered as sampled.
* best_of > n with stream=true is refused with a 400 (as OpenAI does), and so is best_of > n with temperature 0.
* The candidates are chosen by generation.best_of.rank, the one ranking for CLI and server: each goes through the
  server's output chain (guard + PII redaction) before it is scored, so a returned reply is filtered like every
  other one and a candidate the guard stopped ranks last. Logprobs are returned only for a reply the chain left
  as the model wrote it (as serve/moderation.py does).
* usage.completion_tokens counts the tokens of all best_of candidates: they were all generated (OpenAI bills
  best_of the same way).

Legacy completions take best_of as OpenAI defines it there, with or without a reward model: best_of candidates per
prompt, the n with the highest log probability per token returned (`by_logprob`), the same 400s for best_of < n,
streaming and temperature 0.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from chatforge.serve.errors import APIError


@dataclass
class Reranker:
    """The reward model a server ranks candidates with, and its --best-of default."""

    model: object
    tokenizer: object
    default: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)  # one scoring pass at a time (CPU threads)

    def rank(self, messages: list[dict], texts: list[str], finish_reasons: list, tokens: int, output):
        from chatforge.generation.best_of import rank

        with self.lock:
            return rank(self.model, self.tokenizer, messages, texts, finish_reasons, tokens, output)


def candidates(service, req, n: int, temperature: float) -> int:
    """How many candidates to sample for a chat request returning n choices (n: no ranking), or a 400."""
    ranker = getattr(service, "reranker", None)
    asked = req.best_of
    if ranker is None:
        if asked is not None and asked != n:
            raise APIError(400, f"Unsupported parameter: 'best_of': this server ranks no candidates (start it with "
                                f"--reward MODEL); best_of is only accepted when it equals n ({n}).",
                           "best_of", "invalid_request")
        return n
    if asked is None:
        return n if req.stream or temperature == 0 else max(ranker.default, n)
    return checked(req, n, temperature)


def checked(req, n: int, temperature: float) -> int:
    """The request's best_of (None: n), or the 400 that says why it cannot be served."""
    asked = req.best_of
    if asked is None:
        return n
    if asked < n:
        raise APIError(400, f"'best_of' ({asked}) must be at least 'n' ({n}): best_of candidates are sampled and "
                            f"the n best returned.", "best_of", "invalid_request")
    if asked > n and req.stream:
        raise APIError(400, f"'best_of' ({asked}) > n cannot be streamed: the best reply is known only once every "
                            f"candidate is finished; send stream=false.", "best_of", "invalid_request")
    if asked > n and temperature == 0:
        raise APIError(400, f"'best_of' ({asked}) > n needs sampling: with temperature 0 every candidate is the "
                            f"same reply.", "best_of", "invalid_request")
    return asked


def by_logprob(choices) -> list[int]:
    """Candidate indices, best first, as OpenAI's legacy best_of ranks: the highest mean log probability of the
    sampled tokens; a candidate the guard stopped, or one without log probabilities (no tokens, or text the output
    chain redacted, whose logprobs it withholds), ranks last; ties keep the earlier one."""
    def key(i: int):
        c = choices[i]
        lps = [e["logprob"] for e in c.logprobs]
        return c.finish_reason == "content_filter" or not lps, -(sum(lps) / len(lps)) if lps else 0.0, i

    return sorted(range(len(choices)), key=key)


async def best_of_completion(service, request, plan, prompt: list[int], params: list, n: int, logprobs):
    """The chat.completion of the n best of len(params) candidates (the route has checked the request)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    from chatforge.serve import schemas
    from chatforge.serve.errors import ClientGone, engine_error

    def _json(model, status: int = 200) -> Response:
        return Response(schemas.to_json(model), status_code=status, media_type="application/json")

    job = service.submit([prompt] * len(params), params, filtered=False)  # the chain runs in rank()
    try:
        results = await service.collect(job, request, len(params))
        texts = ["".join(c.text) for c in results]
        best = await run_in_threadpool(service.reranker.rank, plan.messages, texts,
                                       [c.finish_reason for c in results], sum(c.tokens for c in results),
                                       service.output)
    except ClientGone:
        return Response(status_code=499)
    except Exception as e:
        status, error = engine_error(e)
        return _json(error, status)

    def choice(j: int, i: int):
        lp = None
        if logprobs is not None:
            lp = schemas.ChoiceLogprobs.from_engine(results[i].logprobs if best.candidates[i] == texts[i] else [])
        return schemas.ChatChoice(index=j, **plan.choice(best.candidates[i], best.finish_reasons[i]), logprobs=lp)

    return _json(schemas.ChatCompletion(**service.head("chatcmpl-"), object="chat.completion",
                                        choices=[choice(j, i) for j, i in enumerate(best.order[:n])],
                                        usage=schemas.Usage.of(len(prompt), best.completion_tokens,
                                                               job.cached_tokens(len(params)))))
