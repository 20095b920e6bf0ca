"""The guard in the server: prompts checked before any work, replies filtered on their way out, /v1/moderations.

The chain is guard.output.OutputChain, the same one the CLI uses (guard reply check + PII redaction).
* A refused prompt is answered as a normal completion (streamed or not) whose content is the policy's refusal
  message and whose finish_reason is "content_filter", as OpenAI does; the model never sees it.
* Replies go through one ReplyFilter per choice (FilteredJob wraps the scheduler's job, so both endpoints and both
  the streamed and the whole answers share it). A reply the guard refuses mid-way ends there with finish_reason
  "content_filter": nothing of the flagged text is sent, and generation stops (the job is aborted once every
  choice has ended). Logprobs are held until a choice ends and dropped when its text was redacted or refused,
  since their tokens would spell what was removed.
* POST /v1/moderations answers in OpenAI's shape: {id, model, results: [{flagged, categories, category_scores}]}.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from chatforge.generation.engine import Delta
from chatforge.guard.output import CONTENT_FILTER
from chatforge.serve.errors import APIError

MODERATION_MODEL = "chatforge-guard"


class RefusedJob:
    """Stands where a scheduler job would for a refused prompt: each choice is the refusal message, then ends."""

    finished = True  # nothing to abort

    def cached_tokens(self, per_prompt: int = 1) -> int:
        return 0  # the model never saw the prompt

    def __init__(self, text: str, n: int, logprobs: bool):
        self.deltas = [(i, Delta(text, [], [] if logprobs else None, CONTENT_FILTER)) for i in range(n)]

    async def batches(self):
        yield list(self.deltas)

    async def stream(self):
        for item in self.deltas:
            yield item


class FilteredJob:
    """A scheduler Job whose deltas pass through one ReplyFilter per choice (attributes the scheduler reads and
    sets are the wrapped job's, so Scheduler.abort works on it unchanged)."""

    def __init__(self, job, chain, scheduler, tokenizer):
        object.__setattr__(self, "job", job)
        object.__setattr__(self, "scheduler", scheduler)
        # each choice's filter knows its prompt: PII the conversation holds may be repeated (a tool call's e-mail)
        contexts = {id(p): tokenizer.decode(p) for p in job.prompts}
        object.__setattr__(self, "filters", [chain.reply(contexts[id(p)]) for p in job.prompts])
        object.__setattr__(self, "ended", [False] * len(job.params))
        object.__setattr__(self, "held", [[] for _ in job.params])

    def __getattr__(self, name):
        return getattr(self.job, name)

    def __setattr__(self, name, value):
        setattr(self.job, name, value)

    def _filter(self, i: int, d: Delta) -> Delta:
        f = self.filters[i]
        text, finish = f.feed(d.text), d.finish_reason
        if f.stopped:
            finish = CONTENT_FILTER
        elif finish is not None:
            text += f.close()
            finish = CONTENT_FILTER if f.stopped else finish
        logprobs = d.logprobs
        if logprobs is not None or (finish is not None and self.held[i]):
            # held to the end: released only if the shown text is the model's own
            self.held[i].extend(logprobs or [])
            logprobs = [] if finish is None or f.redacted or f.stopped else self.held[i]
        if finish is not None:
            self.ended[i] = True
        return replace(d, text=text, logprobs=logprobs, finish_reason=finish)

    async def batches(self):
        async for batch in self.job.batches():
            out = [(i, self._filter(i, d)) for i, d in batch if not self.ended[i]]
            if all(self.ended):
                self.scheduler.abort(self.job)  # a refused choice stops generating (no-op once all finished)
            if out:
                yield out
            if all(self.ended):
                return

    async def stream(self):
        async for batch in self.batches():
            for item in batch:
                yield item


def guarded(service, job):
    """The job as the routes see it: filtered when the service has an active output chain."""
    chain = getattr(service, "output", None)
    return FilteredJob(job, chain, service.scheduler, service.tokenizer) if chain is not None and chain.active \
        else job


def check_chat(service, plan) -> object | None:
    """Normalise the user turns of a chat plan in place; the refusal Decision when the guard refuses one."""
    chain = getattr(service, "output", None)
    if chain is None:
        return None
    plan.messages, refusal = chain.check_messages(plan.messages)
    return refusal


def check_texts(service, texts: list[str]) -> tuple[list[str], object | None]:
    """(legacy completion prompts normalised, the refusal Decision if any prompt is refused)."""
    chain = getattr(service, "output", None)
    if chain is None or chain.guard is None:
        return texts, None
    out = []
    for text in texts:
        d = chain.check_prompt(text)
        if not d.allowed:
            return texts, d
        out.append(d.text)
    return out, None


# -- /v1/moderations --------------------------------------------------------------------------------------------

class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # as strict as the other request bodies

    input: str | Annotated[list[str], Field(min_length=1)] = Field(description="The text, or texts, to classify.")
    model: str | None = Field(None, description="Ignored: this server has one moderation model.")


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


router = APIRouter()


def _error_doc(text: str) -> dict:
    from chatforge.serve.schemas import ErrorResponse

    return {"model": ErrorResponse, "description": text}


@router.post("/v1/moderations", response_model=None, responses={
    200: {"model": ModerationResponse, "description": "One result per input"},
    400: _error_doc("Invalid input, or a server running without the guard"), 401: _error_doc("Missing or wrong API key"),
    413: _error_doc("Request body too large"), 429: _error_doc("Too many requests in progress; retry later")})
async def moderations(request: Request):
    from starlette.concurrency import run_in_threadpool

    from chatforge.serve.schemas import to_json

    service = request.app.state.service
    req = _parse(ModerationRequest, await request.body())
    chain = getattr(service, "output", None)
    if chain is None or chain.guard is None:
        raise APIError(400, "This server runs without the guard (--no-guard): moderation is off.", "input",
                       "invalid_request")
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts:
        raise APIError(400, "'input' must hold at least one text.", "input", "invalid_request")
    results = await run_in_threadpool(chain.guard.moderate, texts)
    body = ModerationResponse(id="modr-" + secrets.token_hex(12), model=MODERATION_MODEL,
                              results=[ModerationResult(**r) for r in results])
    return Response(to_json(body), media_type="application/json")


def _parse(model_cls, body: bytes):
    from pydantic import ValidationError

    from chatforge.serve.schemas import describe_validation_error

    try:
        return model_cls.model_validate_json(body)
    except ValidationError as e:
        message, param = describe_validation_error(e)
        raise APIError(400, message, param, "invalid_request") from None
