"""What the routes share: request validation, the prompt budget, sampling parameters, submitting and collecting.

One Service per app (app.state.service). Sampling follows the one sampling-defaults rule (SamplingParams): a request
field left out takes the model folder's generation_config.json value (the Bot's defaults), else the built-in
default, as in the CLI and Python.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass, field

from chatforge.serve.errors import APIError, ClientGone


@dataclass
class Choice:
    """What one choice accumulated: text pieces, logprob entries, token count and how it ended."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # characters of reply before each logprob entry's token
    length: int = 0
    tokens: int = 0
    finish_reason: str | None = None


class Service:
    """Request handling shared by the routes, over one engine (through the scheduler) and one served model name."""

    def __init__(self, engine, tokenizer, scheduler, model_name: str, max_tokens_cap: int, max_prompt_tokens: int,
                 max_n: int, defaults: dict):
        from chatforge.serve.schemas import build_request_models

        self.engine, self.tokenizer, self.scheduler = engine, tokenizer, scheduler
        self.model_name = model_name
        self.max_tokens_cap, self.max_prompt_tokens, self.max_n = max_tokens_cap, max_prompt_tokens, max_n
        self.defaults = dict(defaults)  # the model's sampling defaults (Bot.defaults)
        self.output = None  # guard.output.OutputChain: prompt checks, reply filter (serve/moderation.py)
        self.reranker = None  # serve.best_of.Reranker: the reward model behind best_of (None: best_of off)
        self.ChatRequest, self.CompletionRequest = build_request_models(max_tokens_cap, max_n)
        self.created = int(time.time())
        config = getattr(getattr(engine, "model", None), "config", None)
        digest = hashlib.sha256(f"{model_name}|{config}|{getattr(engine, 'dtype', '')}".encode()).hexdigest()
        self.fingerprint = "fp_" + digest[:10]

    # -- validation ---------------------------------------------------------------------------------------------

    def parse(self, model_cls, body: bytes):
        from pydantic import ValidationError

        from chatforge.serve.schemas import describe_validation_error

        try:
            req = model_cls.model_validate_json(body)
        except ValidationError as e:
            message, param = describe_validation_error(e)
            raise APIError(400, message, param, "invalid_request") from None
        if req.model is not None:  # optional: this server has one model
            self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true.", "stream_options",
                           "invalid_request")
        return req

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           "model", "model_not_found")

    def budget(self, prompt_len: int, requested: int | None, what: str) -> int:
        """max_new_tokens for a prompt (unset: what the context has left, up to the cap), or a 400 with the numbers."""
        from chatforge.generation.engine import ContextLengthError, reply_budget

        if self.max_prompt_tokens and prompt_len > self.max_prompt_tokens:
            raise APIError(400, f"The prompt has {prompt_len} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens} prompt tokens.", what, "context_length_exceeded")
        try:
            max_new = reply_budget(prompt_len, requested, self.engine.context_length)
        except ContextLengthError as e:
            raise APIError(400, str(e), what, "context_length_exceeded") from None
        return min(self.max_tokens_cap, max_new) if requested is None else max_new

    def sampling(self, req, max_new: int, index: int, logprobs: int | None):
        """The SamplingParams of choice `index`: the request's fields, then the model's defaults, then built-in."""
        from chatforge.generation.engine import SamplingParams

        given = {"temperature": req.temperature, "top_p": req.top_p, "presence_penalty": req.presence_penalty,
                 "frequency_penalty": req.frequency_penalty}
        fields = {k: v for k, v in given.items() if v is not None}
        if req.top_p == 0.0:  # a nucleus of zero mass keeps just the most likely token: greedy
            fields |= {"temperature": 0.0, "top_p": 1.0}
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        fields |= {"max_new_tokens": max_new, "stop": stop, "logprobs": logprobs,
                   "seed": None if req.seed is None else req.seed + index}
        return SamplingParams(**(self.defaults | fields))

    # -- running a job ------------------------------------------------------------------------------------------

    def submit(self, prompts: list[list[int]], params: list, refusal=None, filtered: bool = True):
        """The job for these sequences: filtered by the output chain (filtered=False: the caller filters, as
        best-of-N does); a refused prompt's canned answer instead."""
        from chatforge.serve.moderation import RefusedJob, guarded
        from chatforge.serve.scheduler import QueueFull

        if refusal is not None:
            return RefusedJob(refusal.text, len(params), params[0].logprobs is not None if params else False)
        try:
            job = self.scheduler.submit(prompts, params)
            return guarded(self, job) if filtered else job
        except QueueFull as e:
            raise APIError(429, str(e), None, "rate_limit_exceeded", "rate_limit_exceeded",
                           {"retry-after": "1"}) from None

    async def collect(self, job, request, n: int) -> list[Choice]:
        """Every choice's result; if the client disconnects first, abort the job and raise ClientGone."""
        choices = [Choice() for _ in range(n)]

        async def gather() -> None:
            async for i, delta in job.stream():
                c = choices[i]
                c.logprobs.extend(delta.logprobs or [])
                c.offsets.extend([c.length] * len(delta.logprobs or []))
                c.text.append(delta.text)
                c.length += len(delta.text)
                c.tokens += len(delta.token_ids)
                if delta.finish_reason:
                    c.finish_reason = delta.finish_reason

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
        gone = True
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            gone = not work.done()
        finally:
            watch.cancel()
            if gone:  # the client left (or this handler was cancelled): stop generating for nobody
                work.cancel()
                self.scheduler.abort(job)
        if gone:
            raise ClientGone()
        work.result()  # re-raise what the engine raised
        return choices

    # -- what every response carries ----------------------------------------------------------------------------

    def head(self, prefix: str) -> dict:
        """The fields every completion and chunk of one response share."""
        return {"id": prefix + secrets.token_hex(12), "created": int(time.time()), "model": self.model_name,
                "system_fingerprint": self.fingerprint}

    def card(self):
        from chatforge.serve.schemas import ModelCard

        return ModelCard(id=self.model_name, object="model", created=self.created, owned_by="chatforge",
                         context_length=self.engine.context_length)
