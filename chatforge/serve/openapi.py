"""The published OpenAPI schema: exactly what the server accepts and sends.

The request bodies are our own strict models (with this server's caps, so built per app) instead of FastAPI's
parameters, so FastAPI's 422 answers are removed; the streamed chunk models are added; each POST carries example
requests naming the served model; with an API key every route but /health is marked as needing it.
"""

from __future__ import annotations

BODIES = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest",
          "/v1/moderations": "ModerationRequest"}


def _examples(max_tokens_cap: int, max_n: int) -> dict[str, dict]:
    """Example requests per path (without `model`, added per app), small enough for any server's caps."""
    hi = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello!"}]
    few = min(16, max_tokens_cap)
    return {
        "/v1/chat/completions": {
            "simple": {"messages": hi, "max_tokens": few},
            "streamed": {"messages": hi, "max_tokens": few, "stream": True, "stream_options": {"include_usage": True},
                         "logprobs": True, "top_logprobs": 2},
            "sampled": {"messages": hi, "max_completion_tokens": few, "temperature": 0.8, "top_p": 0.95,
                        "n": min(2, max_n), "seed": 1, "stop": ["\n\n"], "presence_penalty": 0.5}},
        "/v1/completions": {
            "simple": {"prompt": "Once upon a time", "max_tokens": few, "logprobs": 2},
            "streamed": {"prompt": "Once upon a time", "max_tokens": few, "stream": True,
                         "stream_options": {"include_usage": True}, "logprobs": 1}}}


def build_openapi(app, service, api_key: str | None) -> dict:
    """The schema of `app` (cached on it after the first call)."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    from chatforge.serve import schemas
    from chatforge.serve.moderation import ModerationRequest

    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(service.ChatRequest, "validation"), (service.CompletionRequest, "validation"),
                                  (ModerationRequest, "validation"),
                                  (schemas.ChatCompletionChunk, "serialization"),
                                  (schemas.CompletionChunk, "serialization")],
                                 ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    examples = _examples(service.max_tokens_cap, service.max_n)
    for path, name in BODIES.items():
        schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{name}"},
            "examples": {key: {"value": {"model": service.model_name} | value}
                         for key, value in examples.get(path, {}).items()}}}}
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
