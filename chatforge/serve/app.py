"""`chatforge serve`: an OpenAI-compatible API and a chat page over the one Engine, with continuous batching.

Routes: POST /v1/chat/completions, POST /v1/completions (both also streamed as server-sent events), GET /v1/models,
GET /v1/models/{id}, GET /health, and the chat page at / (static files shipped in the package; no build step).
Everything a client can get wrong is answered with OpenAI's error object and status: 400 invalid or unsupported
parameters and prompts that do not fit the context, 401 key, 404 model, 413 body, 429 queue full.
Generation goes through serve/scheduler.py (one engine thread, bounded queue); auth, body cap and headers through
serve/security.py; request/response shapes are in serve/schemas.py.
"""

import asyncio
import functools
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.errors import ChatforgeError

log = logging.getLogger("chatforge.serve")

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for log(0): JSON has no -Infinity


class APIError(Exception):
    """A request the server refuses, with the status and OpenAI error fields to answer it with."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}


def _json(obj, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(obj, ensure_ascii=False).encode("utf-8"), status_code=status,
                    media_type="application/json", headers=headers)


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None):
    from starlette.responses import Response

    from chatforge.serve.security import error_payload

    return Response(error_payload(status, message, type_, param, code), status_code=status,
                    media_type="application/json", headers=headers)


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


@dataclass
class Choice:
    """What one choice accumulated: text pieces, logprob entries, token count and how it ended."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # characters of reply before each logprob entry's token
    length: int = 0
    tokens: int = 0
    finish_reason: str | None = None


def _clean_logprob(entry: dict) -> dict:
    """An engine logprob entry as OpenAI writes it (finite numbers only)."""
    def lp(x: float) -> float:
        return x if x > LOGPROB_FLOOR else LOGPROB_FLOOR

    return {"token": entry["token"], "logprob": lp(entry["logprob"]), "bytes": entry.get("bytes"),
            "top_logprobs": [{"token": t["token"], "logprob": lp(t["logprob"]), "bytes": t.get("bytes")}
                             for t in entry.get("top_logprobs", [])]}


def _legacy_logprobs(entries: list[dict], offsets: list[int], with_top: bool) -> dict:
    """Logprob entries in the /v1/completions shape; offsets: where each token's text starts (in prompt + reply)."""
    entries = [_clean_logprob(e) for e in entries]
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries] if with_top
            else None, "text_offset": list(offsets)}


@functools.lru_cache(maxsize=1)
def _event_stream_class():
    """Defined on first use so that importing this module does not import starlette."""
    import anyio
    from starlette.responses import Response

    class EventStream(Response):
        """A server-sent-event response that notices a client going away even while no token is being sent.

        on_close runs however the stream ends (finished, client gone, server stopping), so the engine stops
        generating for a reader that is no longer there.
        """

        def __init__(self, events, on_close):
            self.status_code, self.background = 200, None
            self.events, self.on_close = events, on_close
            self.init_headers({"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                               "x-accel-buffering": "no"})

        async def __call__(self, scope, receive, send) -> None:
            try:
                async with anyio.create_task_group() as tg:
                    async def stream() -> None:
                        try:
                            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                            async for event in self.events:
                                await send({"type": "http.response.body", "body": event.encode("utf-8"),
                                            "more_body": True})
                            await send({"type": "http.response.body", "body": b"", "more_body": False})
                        except OSError:
                            pass  # the client hung up mid-send
                        tg.cancel_scope.cancel()

                    async def watch() -> None:
                        while (await receive())["type"] != "http.disconnect":
                            pass
                        tg.cancel_scope.cancel()

                    tg.start_soon(stream)
                    tg.start_soon(watch)
            finally:
                self.on_close()
                await self.events.aclose()

    return EventStream


def EventStream(events, on_close):  # noqa: N802 - reads as the class it builds
    return _event_stream_class()(events, on_close)


class Service:
    """Request handling shared by the routes: validation, prompt budget, sampling params, response shaping."""

    def __init__(self, engine, tokenizer, scheduler, model_name: str, max_tokens_cap: int, max_prompt_tokens: int,
                 max_n: int, stop_token_ids: list[int]):
        self.engine, self.tokenizer, self.scheduler = engine, tokenizer, scheduler
        self.model_name = model_name
        self.max_tokens_cap, self.max_prompt_tokens, self.max_n = max_tokens_cap, max_prompt_tokens, max_n
        self.stop_token_ids = list(stop_token_ids)
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
        if req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.model_name}'.",
                           "model", "model_not_found")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true.", "stream_options",
                           "invalid_request")
        return req

    def budget(self, prompt_len: int, requested: int | None, what: str) -> int:
        """max_new_tokens for a prompt, or a 400 that gives the numbers when it cannot fit."""
        ctx = self.engine.context_length
        if self.max_prompt_tokens and prompt_len > self.max_prompt_tokens:
            raise APIError(400, f"The prompt has {prompt_len} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens} prompt tokens.", what, "context_length_exceeded")
        if requested is None:
            room = ctx - prompt_len
            if room < 1:
                raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {what} "
                                    f"resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
                               what, "context_length_exceeded")
            return min(self.max_tokens_cap, room)
        if prompt_len + requested > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
                                f"completion). Please reduce the length of the {what} or completion.",
                           what, "context_length_exceeded")
        return requested

    def sampling(self, req, max_new: int, index: int, logprobs: int | None):
        from chatforge.generation.engine import SamplingParams

        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0.0:  # nucleus of zero mass keeps just the most likely token: greedy
            temperature, top_p = 0.0, 1.0
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                              presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0, stop=stop,
                              stop_token_ids=list(self.stop_token_ids),
                              seed=None if req.seed is None else req.seed + index, logprobs=logprobs)

    def submit(self, prompts: list[list[int]], params: list):
        from chatforge.serve.scheduler import QueueFull

        try:
            return self.scheduler.submit(prompts, params)
        except QueueFull as e:
            raise APIError(429, str(e), None, "rate_limit_exceeded", "rate_limit_exceeded",
                           {"retry-after": "1"}) from None

    # -- collecting a job ---------------------------------------------------------------------------------------

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

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def head(self, object_: str, prefix: str) -> dict:
        return {"id": prefix + secrets.token_hex(12), "object": object_, "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": self.fingerprint}


class ClientGone(Exception):
    """The client disconnected before its reply was ready; nothing is sent."""


def _engine_error(e: Exception) -> dict:
    if isinstance(e, ChatforgeError):
        return {"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": None}}
    log.exception("generation failed", exc_info=e)
    return {"error": {"message": "The server had an error while generating the reply.", "type": "server_error",
                      "param": None, "code": None}}


def _check_limits(**limits: int) -> None:
    for name, value in limits.items():
        low = 0 if name in ("max_queue", "max_prompt_tokens") else 1
        if value < low:
            raise ChatforgeError(f"serve: --{name.replace('_', '-')} must be at least {low}, got {value}")


# ------------------------------------------------------------------------------------------------ the routes

def create_app(bot_or_engine, *, model_name: str = "chatforge", api_key: str | None = None, max_queue: int = 64,
               max_tokens_cap: int = 4096, max_prompt_tokens: int = 0, max_n: int = 8,
               max_body_bytes: int = 1_000_000, cors_origin: list[str] | None = None):
    """The FastAPI app serving a Bot (or a bare Engine): routes, error handlers, auth and limits.

    api_key None: no authentication (keep it on loopback). The engine's max_batch_size sets the batch; max_queue
    more sequences may wait before requests are refused with 429.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import Response

    from chatforge.serve import schemas
    from chatforge.serve.scheduler import Scheduler
    from chatforge.serve.security import Guard

    engine = getattr(bot_or_engine, "engine", bot_or_engine)
    tokenizer = getattr(bot_or_engine, "tokenizer", None) or engine.tokenizer
    defaults = getattr(bot_or_engine, "defaults", None) or {}
    _check_limits(max_queue=max_queue, max_tokens_cap=max_tokens_cap, max_n=max_n, max_body_bytes=max_body_bytes,
                  max_prompt_tokens=max_prompt_tokens)
    scheduler = Scheduler(engine, engine.max_batch_size, max_queue)
    service = Service(engine, tokenizer, scheduler, model_name, max_tokens_cap, max_prompt_tokens, max_n,
                      defaults.get("stop_token_ids", []))
    ChatRequest, CompletionRequest = schemas.build_request_models(max_tokens_cap, max_n)
    page = (STATIC_DIR / "index.html").read_bytes()
    static = {name: ((STATIC_DIR / name).read_bytes(), ctype) for name, ctype in STATIC_FILES.items()}

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await run_in_threadpool(scheduler.close)

    app = FastAPI(title="chatforge", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="OpenAI-compatible chat completions served by chatforge.")
    app.state.scheduler = scheduler
    app.state.service = service

    errors = {code: {"model": schemas.ErrorResponse, "description": text} for code, text in (
        (400, "Invalid or unsupported parameters, or a prompt that does not fit the context"),
        (401, "Missing or wrong API key"), (404, "Unknown model"), (413, "Request body too large"),
        (429, "Too many requests in progress; retry later"))}

    def body_doc(name: str, examples: dict) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{name}"},
            "examples": {key: {"value": {"model": model_name} | value} for key, value in examples.items()}}}}}

    hi = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello!"}]
    chat_examples = {
        "simple": {"messages": hi, "max_tokens": min(16, max_tokens_cap)},
        "streamed": {"messages": hi, "max_tokens": min(16, max_tokens_cap), "stream": True,
                     "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2},
        "sampled": {"messages": hi, "max_completion_tokens": min(16, max_tokens_cap), "temperature": 0.8,
                    "top_p": 0.95, "n": min(2, max_n), "seed": 1, "stop": ["\n\n"], "presence_penalty": 0.5}}
    completion_examples = {
        "simple": {"prompt": "Once upon a time", "max_tokens": min(16, max_tokens_cap), "logprobs": 2},
        "streamed": {"prompt": "Once upon a time", "max_tokens": min(16, max_tokens_cap), "stream": True,
                     "stream_options": {"include_usage": True}, "logprobs": 1}}

    def stream_doc(model, chunk: str) -> dict:
        return {200: {"model": model, "description": "The completion; with stream=true, server-sent events",
                      "content": {"text/event-stream": {"schema": schemas.event_stream_schema(chunk)}}}} | errors

    # -- chat completions -------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", openapi_extra=body_doc("ChatCompletionRequest", chat_examples),
              responses=stream_doc(schemas.ChatCompletion, "ChatCompletionChunk"), response_model=None)
    async def chat_completions(request: Request):
        req = service.parse(ChatRequest, await request.body())
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "'max_tokens' and 'max_completion_tokens' disagree; send one of them.",
                           "max_completion_tokens", "invalid_request")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "'top_logprobs' requires 'logprobs' to be true.", "top_logprobs", "invalid_request")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)}
                    for m in req.messages]
        try:
            prompt, _ = await run_in_threadpool(tokenizer.render, messages, True)
        except ChatforgeError as e:  # the model's chat template refused the conversation (e.g. role order)
            raise APIError(400, f"The messages cannot be rendered by this model's chat template: {e}", "messages",
                           "invalid_request") from None
        n = req.n or 1
        max_new = service.budget(len(prompt), req.max_completion_tokens or req.max_tokens, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = [service.sampling(req, max_new, i, logprobs) for i in range(n)]
        job = service.submit([prompt] * n, params)
        head = service.head("chat.completion", "chatcmpl-")
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(chat_events(job, head, n, len(prompt), usage, logprobs is not None),
                               lambda: scheduler.abort(job))
        try:
            choices = await service.collect(job, request, n)
        except ClientGone:
            return Response(status_code=499)
        except Exception as e:
            return _json(_engine_error(e), 400 if isinstance(e, ChatforgeError) else 500)
        return _json(head | {"choices": [
            {"index": i, "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
             "logprobs": {"content": [_clean_logprob(e) for e in c.logprobs], "refusal": None}
             if logprobs is not None else None,
             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": service.usage(len(prompt), sum(c.tokens for c in choices))})

    async def chat_events(job, head: dict, n: int, prompt_tokens: int, include_usage: bool, with_logprobs: bool):
        head = head | {"object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, delta: dict, logprobs=None, finish=None) -> str:
            return _sse(head | {"choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": finish}]} | extra)

        def render(i: int, delta) -> list[str]:
            lp = {"content": [_clean_logprob(e) for e in delta.logprobs or []], "refusal": None} \
                if with_logprobs else None
            out = [chunk(i, {"content": delta.text}, lp)] if delta.text or (lp and lp["content"]) else []
            return out + ([chunk(i, {}, None, delta.finish_reason)] if delta.finish_reason else [])

        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": "", "refusal": None})
        async for event in sse_events(job, head, prompt_tokens, include_usage, render):
            yield event

    async def sse_events(job, head: dict, prompt_tokens: int, include_usage: bool, render):
        """The stream loop both endpoints share: render(i, delta) -> that delta's chunks, a batch's chunks sent
        together; then the usage chunk (if asked for) and [DONE], or an error chunk if the engine fails."""
        completion_tokens = 0
        try:
            async for batch in job.batches():
                out = []
                for i, delta in batch:
                    completion_tokens += len(delta.token_ids)
                    out += render(i, delta)
                if out:
                    yield "".join(out)
        except Exception as e:
            yield _sse(_engine_error(e))
            return
        if include_usage:
            yield _sse(head | {"choices": [], "usage": service.usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"

    # -- legacy completions -----------------------------------------------------------------------------------

    @app.post("/v1/completions", openapi_extra=body_doc("CompletionRequest", completion_examples),
              responses=stream_doc(schemas.Completion, "CompletionChunk"), response_model=None)
    async def completions(request: Request):
        req = service.parse(CompletionRequest, await request.body())
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise APIError(400, f"Unsupported parameter: 'best_of': {schemas.UNSUPPORTED['best_of']} ({n}).",
                           "best_of", "invalid_request")
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if len(texts) * n > service.max_n:
            raise APIError(400, f"{len(texts)} prompts x n={n} asks for {len(texts) * n} completions; this server "
                                f"allows at most {service.max_n} per request.", "n", "invalid_request")

        def encode(text: str) -> list[int]:
            ids = tokenizer.encode(text)
            return [tokenizer.bos_id] + ids if tokenizer.bos_id is not None else ids

        prompts = await run_in_threadpool(lambda: [encode(t) for t in texts])
        if any(not p for p in prompts):
            raise APIError(400, "The prompt encodes to no tokens.", "prompt", "invalid_request")
        budgets = [service.budget(len(p), req.max_tokens or 16, "prompt") for p in prompts]
        all_prompts, params = [], []
        for p, max_new in zip(prompts, budgets):
            for j in range(n):
                all_prompts.append(p)
                params.append(service.sampling(req, max_new, len(params), req.logprobs))
        job = service.submit(all_prompts, params)
        head = service.head("text_completion", "cmpl-")
        prompt_tokens = sum(map(len, prompts))
        offsets = [len(texts[i // n]) for i in range(len(params))]
        with_top = bool(req.logprobs)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(completion_events(job, head, prompt_tokens, usage, req.logprobs, offsets),
                               lambda: scheduler.abort(job))
        try:
            choices = await service.collect(job, request, len(params))
        except ClientGone:
            return Response(status_code=499)
        except Exception as e:
            return _json(_engine_error(e), 400 if isinstance(e, ChatforgeError) else 500)
        return _json(head | {"choices": [
            {"index": i, "text": "".join(c.text), "finish_reason": c.finish_reason,
             "logprobs": _legacy_logprobs(c.logprobs, [offsets[i] + o for o in c.offsets], with_top)
             if req.logprobs is not None else None}
            for i, c in enumerate(choices)], "usage": service.usage(prompt_tokens, sum(c.tokens for c in choices))})

    async def completion_events(job, head: dict, prompt_tokens: int, include_usage: bool, logprobs, offsets):
        extra = {"usage": None} if include_usage else {}

        def render(i: int, delta) -> list[str]:
            lp = None
            if logprobs is not None:
                entries = delta.logprobs or []
                lp = _legacy_logprobs(entries, [offsets[i]] * len(entries), bool(logprobs))
                offsets[i] += len(delta.text)
            if not (delta.text or delta.finish_reason or (lp and lp["tokens"])):
                return []
            return [_sse(head | {"choices": [{"index": i, "text": delta.text, "logprobs": lp,
                                              "finish_reason": delta.finish_reason}]} | extra)]

        async for event in sse_events(job, head, prompt_tokens, include_usage, render):
            yield event

    # -- models, health, the page -----------------------------------------------------------------------------

    def card() -> dict:
        return {"id": model_name, "object": "model", "created": service.created, "owned_by": "chatforge",
                "context_length": engine.context_length}

    @app.get("/v1/models", responses={200: {"model": schemas.ModelList, "description": "The served model"},
                                      401: errors[401]}, response_model=None)
    async def list_models():
        return _json({"object": "list", "data": [card()]})

    @app.get("/v1/models/{model_id:path}", responses={200: {"model": schemas.ModelCard, "description": "The model"},
                                                      401: errors[401], 404: errors[404]}, response_model=None)
    async def get_model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{model_name}'.",
                           "model", "model_not_found")
        return _json(card())

    @app.get("/health", responses={200: {"model": schemas.Health, "description": "The server is up"}},
             response_model=None)
    async def health():
        return _json({"status": "ok"})

    @app.get("/", include_in_schema=False)
    async def index():
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": PAGE_CSP, "cache-control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in static:  # a fixed set of files, read at start-up: no path from a request touches the disk
            raise APIError(404, "Not found.", None, "not_found")
        data, ctype = static[name]
        return Response(data, media_type=ctype, headers={"cache-control": "no-cache"})

    # -- errors -----------------------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return _error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        messages = {404: "Unknown URL; see /openapi.json for the API.", 405: "Method not allowed for this URL."}
        return _error_response(e.status_code, messages.get(e.status_code, str(e.detail)), "invalid_request_error",
                               None, {404: "not_found", 405: "method_not_allowed"}.get(e.status_code),
                               getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(400, f"Invalid value for '{param}': {first.get('msg', 'invalid')}.",
                               "invalid_request_error", param, "invalid_request")

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):
        log.exception("unhandled error", exc_info=e)
        return _error_response(500, "The server had an error processing your request.", "server_error")

    # -- the OpenAPI schema: our strict request models, no FastAPI 422s ----------------------------------------

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(ChatRequest, "validation"), (CompletionRequest, "validation"),
                                      (schemas.ChatCompletionChunk, "serialization"),
                                      (schemas.CompletionChunk, "serialization")],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(name, None)
        if api_key:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for route, path in schema["paths"].items():
                if route != "/health":
                    for op in path.values():
                        op["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    if cors_origin:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origin), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    return app


# ------------------------------------------------------------------------------------------------ running it

class ServerThread:
    """Run an app with uvicorn in a background thread on a loopback port (tests, benchmarks, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                  allow_insecure_public: bool = False, max_batch_size: int = 8, max_queue: int = 64,
                  max_tokens_cap: int = 4096, max_prompt_tokens: int = 0, max_n: int = 8,
                  max_body_bytes: int = 1_000_000, served_model_name: str | None = None,
                  cors_origin: list[str] | None = None, device: str = "auto", dtype: str | None = None) -> int:
    """Serve a model with an OpenAI-compatible API (/v1/chat/completions, /v1/completions) and a chat page at /.

    Requests that arrive together are decoded together (continuous batching). Without an API key the server only
    listens on loopback.

    Args:
        model: model folder, .gguf file or known model name.
        host: address to listen on; anything but loopback needs an API key (or --allow-insecure-public).
        port: TCP port.
        api_key: require 'Authorization: Bearer KEY' on every endpoint but /health and the page's files; prefer the
            CHATFORGE_API_KEY environment variable (a command line is visible to other users of the machine).
        allow_insecure_public: listen on a non-loopback address without an API key (anyone who can reach it can use it).
        max_batch_size: sequences decoded together.
        max_queue: sequences that may wait for a slot beyond the batch; more are refused with 429.
        max_tokens_cap: the most tokens one reply may ask for (max_tokens).
        max_prompt_tokens: the most prompt tokens a request may send (0: the model's context length).
        max_n: the most choices (n) one request may ask for.
        max_body_bytes: the largest request body accepted (413 beyond).
        served_model_name: the model id clients send; unset: the model folder's name.
        cors_origin: browser origins allowed to call the API from other sites (CORS is off without it).
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: fp32, bf16 or fp16; unset: fp32 on CPU, bf16 on a GPU that supports it.
    """
    from chatforge.serve.security import check_bind

    key = api_key or os.environ.get("CHATFORGE_API_KEY") or None
    check_bind(host, key, allow_insecure_public)  # before anything slow: a refusal should be instant
    if not 0 <= port <= 65535:
        raise ChatforgeError(f"serve: --port must be 0..65535, got {port}")
    _check_limits(max_batch_size=max_batch_size, max_queue=max_queue, max_tokens_cap=max_tokens_cap, max_n=max_n,
                  max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens)

    import uvicorn

    from chatforge.generation.bot import Bot

    bot = Bot.load(model, device=device, dtype=dtype, max_batch_size=max_batch_size)
    name = served_model_name or Path(model.rstrip("/")).name or "chatforge"
    app = create_app(bot, model_name=name, api_key=key, max_queue=max_queue, max_tokens_cap=max_tokens_cap,
                     max_prompt_tokens=max_prompt_tokens, max_n=max_n, max_body_bytes=max_body_bytes,
                     cors_origin=cors_origin)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name!r} on http://{shown}:{port}/ (chat page at /, API at /v1; "
          f"API key {'required' if key else 'off'}; batch {max_batch_size}, queue {max_queue})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False, server_header=False,
                timeout_graceful_shutdown=5)
    return 0
