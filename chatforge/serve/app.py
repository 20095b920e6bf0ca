"""The server's app: an OpenAI-compatible API and a chat page over the one Engine, with continuous batching.

Routes: POST /v1/chat/completions, POST /v1/completions (both also streamed as server-sent events), GET /v1/models,
GET /v1/models/{id}, GET /health, and the chat page at / (static files shipped in the package; no build step).
Everything a client can get wrong is answered with OpenAI's error object and status: 400 invalid or unsupported
parameters and prompts that do not fit the context, 401 key, 404 model, 413 body, 429 queue full.

The pieces, each importable on its own:
  app.py        create_app (assembles the rest), the served model's name, ServerThread
  routes.py     the HTTP handlers
  service.py    what the handlers share: validation, prompt budget, sampling parameters, collecting a job
  streaming.py  server-sent events: the one stream loop, chunk framing, the EventStream response
  errors.py     APIError and the handlers that answer every failure with OpenAI's error object
  schemas.py    every request and response shape (documents the API and builds the responses)
  openapi.py    the published schema
  scheduler.py  one engine thread, bounded queue; security.py: API key, body cap, headers, loopback by default
The `chatforge serve` command itself is commands/serve.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from chatforge.errors import ChatforgeError

RUN_OUTPUTS = ("final", "best")  # the model folders training writes inside its run folder


def served_name(model: str) -> str:
    """The name a model is served as when --served-model-name is not given: what the user calls it.

    A training run's final/ or best/ folder is named for its run (runs/shop/final -> "shop", runs/shop/best ->
    "shop-best"), any other folder by its own name, a .gguf file by its stem, a known model name as itself.
    """
    path = Path(model.rstrip("/\\") or ".").expanduser()
    if path.suffix == ".gguf":
        return path.stem
    resolved = path.resolve() if path.exists() else path
    if resolved.name in RUN_OUTPUTS and resolved.parent.name:
        return resolved.parent.name + ("" if resolved.name == "final" else "-" + resolved.name)
    return resolved.name or "chatforge"


def check_limits(**limits: int) -> None:
    for name, value in limits.items():
        low = 0 if name in ("max_queue", "max_prompt_tokens") else 1
        if value < low:
            raise ChatforgeError(f"serve: --{name.replace('_', '-')} must be at least {low}, got {value}")


def check_best_of(best_of: int, max_n: int, has_reward: bool) -> None:
    if best_of > 1 and not has_reward:
        raise ChatforgeError("serve: --best-of needs --reward MODEL (a reward model folder, trained with stage: "
                             "reward)")
    if best_of > max_n:
        raise ChatforgeError(f"serve: --best-of ({best_of}) must be at most --max-n ({max_n}), the most sequences "
                             f"one request may ask for")


def create_app(bot_or_engine, *, model_name: str = "chatforge", api_key: str | None = None, max_queue: int = 64,
               max_tokens_cap: int = 4096, max_prompt_tokens: int = 0, max_n: int = 8,
               max_body_bytes: int = 1_000_000, cors_origin: list[str] | None = None, output=None,
               reward=None, best_of: int = 1):
    """The FastAPI app serving a Bot (or a bare Engine): routes, error handlers, auth and limits.

    api_key None: no authentication (keep it on loopback). The engine's max_batch_size sets the batch; max_queue
    more sequences may wait before requests are refused with 429. Unset request fields sample with the Bot's
    defaults (the model folder's generation_config.json), else the built-in ones. output: a guard.output.OutputChain
    (the guard on prompts and replies, PII redaction of replies, /v1/moderations); None: replies as generated.
    reward: (reward model, its tokenizer) ranking chat completions' best_of candidates (None: best_of off);
    best_of: the candidates a non-streamed sampled request gets when it does not set best_of (serve/best_of.py).
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    from chatforge.serve.errors import install_error_handlers
    from chatforge.serve.moderation import router as moderation_router
    from chatforge.serve.openapi import build_openapi
    from chatforge.serve.routes import page_files, router
    from chatforge.serve.scheduler import Scheduler
    from chatforge.serve.security import Guard
    from chatforge.serve.service import Service

    engine = getattr(bot_or_engine, "engine", bot_or_engine)
    tokenizer = getattr(bot_or_engine, "tokenizer", None) or engine.tokenizer
    check_limits(max_queue=max_queue, max_tokens_cap=max_tokens_cap, max_n=max_n, max_body_bytes=max_body_bytes,
                 max_prompt_tokens=max_prompt_tokens, best_of=best_of)
    check_best_of(best_of, max_n, reward is not None)
    scheduler = Scheduler(engine, engine.max_batch_size, max_queue)
    service = Service(engine, tokenizer, scheduler, model_name, max_tokens_cap, max_prompt_tokens, max_n,
                      getattr(bot_or_engine, "defaults", None) or {})

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await run_in_threadpool(scheduler.close)

    app = FastAPI(title="chatforge", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="OpenAI-compatible chat completions served by chatforge.")
    service.output = output
    if reward is not None:
        from chatforge.serve.best_of import Reranker

        service.reranker = Reranker(*reward, default=best_of)
    app.state.scheduler, app.state.service = scheduler, service
    app.state.warmup_s = getattr(bot_or_engine, "warmup_s", None)  # Bot.load(compile=True)'s warm-up, for /health
    app.state.page, app.state.static = page_files(model_name)
    app.include_router(router)
    app.include_router(moderation_router)
    install_error_handlers(app)
    app.openapi = lambda: build_openapi(app, service, api_key)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    if cors_origin:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origin), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    return app


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
