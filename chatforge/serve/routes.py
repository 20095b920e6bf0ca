"""The HTTP routes: each turns a request into engine work through app.state.service and answers with a model from
schemas.py (streamed through streaming.py). Importing this module imports FastAPI: app.create_app does it lazily.
"""

from __future__ import annotations

import html
from dataclasses import replace
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from chatforge.errors import ChatforgeError
from chatforge.serve import schemas, tools
from chatforge.serve.best_of import best_of_completion, by_logprob, candidates, checked
from chatforge.serve.errors import APIError, ClientGone, engine_error
from chatforge.serve.moderation import check_chat, check_texts
from chatforge.serve.streaming import EventStream, chat_events, completion_events

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

ERRORS = {code: {"model": schemas.ErrorResponse, "description": text} for code, text in (
    (400, "Invalid or unsupported parameters, or a prompt that does not fit the context"),
    (401, "Missing or wrong API key"), (404, "Unknown model"), (413, "Request body too large"),
    (429, "Too many requests in progress; retry later"))}


def _stream_doc(model, chunk: str) -> dict:
    return {200: {"model": model, "description": "The completion; with stream=true, server-sent events",
                  "content": {"text/event-stream": {"schema": schemas.event_stream_schema(chunk)}}}} | ERRORS


def _json(model, status: int = 200) -> Response:
    return Response(schemas.to_json(model), status_code=status, media_type="application/json")


def page_files(model_name: str) -> tuple[bytes, dict[str, tuple[bytes, str]]]:
    """The chat page, titled with the served model's name, and its static files: read once, at start-up."""
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    page = page.replace("<title>chatforge</title>", f"<title>{html.escape(model_name)} · chatforge</title>", 1)
    static = {name: ((STATIC_DIR / name).read_bytes(), ctype) for name, ctype in STATIC_FILES.items()}
    return page.encode("utf-8"), static


router = APIRouter()


# -- chat completions -------------------------------------------------------------------------------------------

@router.post("/v1/chat/completions", responses=_stream_doc(schemas.ChatCompletion, "ChatCompletionChunk"),
             response_model=None)
async def chat_completions(request: Request):
    service = request.app.state.service
    req = service.parse(service.ChatRequest, await request.body())
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "'max_tokens' and 'max_completion_tokens' disagree; send one of them.",
                       "max_completion_tokens", "invalid_request")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "'top_logprobs' requires 'logprobs' to be true.", "top_logprobs", "invalid_request")
    plan = tools.plan(req)  # messages, and what response_format / tools / tool_choice ask (serve/tools.py)
    refusal = check_chat(service, plan)  # the guard: user turns normalised, or the refusal (serve/moderation.py)
    try:
        prompt = await run_in_threadpool(plan.render, service.tokenizer)
    except ChatforgeError as e:  # the model's chat template refused the conversation (e.g. role order)
        raise APIError(400, f"The messages cannot be rendered by this model's chat template: {e}", "messages",
                       "invalid_request") from None
    n = req.n or 1
    max_new = service.budget(len(prompt), req.max_completion_tokens or req.max_tokens, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    k = n if refusal is not None else candidates(service, req, n, service.sampling(req, max_new, 0, None).temperature)
    params = [replace(service.sampling(req, max_new, i, logprobs), constraint=plan.constraint) for i in range(k)]
    if k > n:  # best-of: k candidates ranked by the reward model (serve/best_of.py)
        return await best_of_completion(service, request, plan, prompt, params, n, logprobs)
    job = service.submit([prompt] * n, params, refusal)
    head = service.head("chatcmpl-")
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStream(chat_events(job, head, n, len(prompt), usage, logprobs is not None, plan.streams(n)),
                           lambda: service.scheduler.abort(job))
    try:
        choices = await service.collect(job, request, n)
    except ClientGone:
        return Response(status_code=499)
    except Exception as e:
        status, error = engine_error(e)
        return _json(error, status)
    return _json(schemas.ChatCompletion(**head, object="chat.completion", choices=[
        schemas.ChatChoice(index=i, **plan.choice("".join(c.text), c.finish_reason),
                           logprobs=schemas.ChoiceLogprobs.from_engine(c.logprobs) if logprobs is not None else None)
        for i, c in enumerate(choices)],
        usage=schemas.Usage.of(len(prompt), sum(c.tokens for c in choices), job.cached_tokens(n))))


# -- legacy completions -----------------------------------------------------------------------------------------

@router.post("/v1/completions", responses=_stream_doc(schemas.Completion, "CompletionChunk"), response_model=None)
async def completions(request: Request):
    service = request.app.state.service
    req = service.parse(service.CompletionRequest, await request.body())
    n = req.n or 1
    texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    texts, refusal = check_texts(service, texts)
    if len(texts) * n > service.max_n:
        raise APIError(400, f"{len(texts)} prompts x n={n} asks for {len(texts) * n} completions; this server "
                            f"allows at most {service.max_n} per request.", "n", "invalid_request")
    # best_of: k candidates per prompt, the n most likely per token returned (serve/best_of.py)
    k = n if refusal is not None else checked(req, n, service.sampling(req, 16, 0, None).temperature)
    if len(texts) * k > service.max_n:
        raise APIError(400, f"{len(texts)} prompts x best_of={k} asks for {len(texts) * k} candidates; this server "
                            f"allows at most {service.max_n} per request.", "best_of", "invalid_request")
    tokenizer = service.tokenizer

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text)
        return [tokenizer.bos_id] + ids if tokenizer.bos_id is not None else ids

    prompts = await run_in_threadpool(lambda: [encode(t) for t in texts])
    if any(not p for p in prompts):
        raise APIError(400, "The prompt encodes to no tokens.", "prompt", "invalid_request")
    budgets = [service.budget(len(p), req.max_tokens or 16, "prompt") for p in prompts]
    pairs = [(p, max_new) for p, max_new in zip(prompts, budgets) for _ in range(k)]
    ranked_logprobs = req.logprobs if k == n else req.logprobs or 0  # candidates carry what ranks them
    params = [service.sampling(req, max_new, i, ranked_logprobs) for i, (_, max_new) in enumerate(pairs)]
    job = service.submit([p for p, _ in pairs], params, refusal)
    head = service.head("cmpl-")
    prompt_tokens = sum(map(len, prompts))
    offsets = [len(texts[i // k]) for i in range(len(params))]
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStream(completion_events(job, head, prompt_tokens, usage, req.logprobs, offsets, n),
                           lambda: service.scheduler.abort(job))
    try:
        choices = await service.collect(job, request, len(params))
    except ClientGone:
        return Response(status_code=499)
    except Exception as e:
        status, error = engine_error(e)
        return _json(error, status)
    kept = [j * k + i for j in range(len(texts)) for i in by_logprob(choices[j * k:(j + 1) * k])[:n]] \
        if k > n else list(range(len(choices)))
    return _json(schemas.Completion(**head, object="text_completion", choices=[
        schemas.CompletionChoice(index=i, text="".join(c.text), finish_reason=c.finish_reason, logprobs=(
            schemas.CompletionLogprobs.from_engine(c.logprobs, [offsets[j] + o for o in c.offsets], bool(req.logprobs))
            if req.logprobs is not None else None)) for i, j in enumerate(kept) for c in [choices[j]]],
        usage=schemas.Usage.of(prompt_tokens, sum(c.tokens for c in choices), job.cached_tokens(k))))


# -- models, health, the page -----------------------------------------------------------------------------------

@router.get("/v1/models", responses={200: {"model": schemas.ModelList, "description": "The served model"},
                                     401: ERRORS[401]}, response_model=None)
async def list_models(request: Request):
    return _json(schemas.ModelList(object="list", data=[request.app.state.service.card()]))


@router.get("/v1/models/{model_id:path}", responses={200: {"model": schemas.ModelCard, "description": "The model"},
                                                     401: ERRORS[401], 404: ERRORS[404]}, response_model=None)
async def get_model(request: Request, model_id: str):
    service = request.app.state.service
    service.check_model(model_id)
    return _json(service.card())


@router.get("/health", responses={200: {"model": schemas.Health, "description": "The server is up"}},
            response_model=None)
async def health(request: Request):
    from chatforge.generation.decode import is_compiled

    state = request.app.state
    return _json(schemas.Health(status="ok", compiled_decode=is_compiled(state.service.engine.model),
                                warmup_s=state.warmup_s))


@router.get("/", include_in_schema=False)
async def index(request: Request):
    return Response(request.app.state.page, media_type="text/html; charset=utf-8",
                    headers={"content-security-policy": PAGE_CSP, "cache-control": "no-cache"})


@router.get("/static/{name}", include_in_schema=False)
async def static_file(request: Request, name: str):
    static = request.app.state.static
    if name not in static:  # a fixed set of files, read at start-up: no path from a request touches the disk
        raise APIError(404, "Not found.", None, "not_found")
    data, ctype = static[name]
    return Response(data, media_type=ctype, headers={"cache-control": "no-cache"})
