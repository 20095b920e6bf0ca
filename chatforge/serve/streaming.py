"""Streamed replies as server-sent events, in OpenAI's framing, built from the chunk models in schemas.py.

One loop (`events`) serves both endpoints: whatever deltas have arrived are rendered into chunks and written in one
send, then come the usage chunk (when asked for) and `data: [DONE]`, or an error event if the engine fails midway.
EventStream is the response that carries them and aborts the job when the client goes away.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable

from chatforge.serve import schemas
from chatforge.serve.errors import engine_error

DONE = "data: [DONE]\n\n"


def sse(model) -> str:
    """One server-sent event holding a response model as JSON."""
    return "data: " + schemas.to_json(model).decode("utf-8") + "\n\n"


async def events(job, render: Callable[[int, object], list[str]], usage_chunk: Callable[[int], object] | None
                 ) -> AsyncIterator[str]:
    """The stream loop both endpoints share: render(choice, delta) -> that delta's events, a batch's events sent
    together; then usage_chunk(completion tokens) if the client asked for usage, and [DONE]."""
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
        yield sse(engine_error(e)[1])
        return
    if usage_chunk is not None:
        yield sse(usage_chunk(completion_tokens))
    yield DONE


def chat_events(job, head: dict, n: int, prompt_tokens: int, include_usage: bool,
                with_logprobs: bool, calls: list | None = None) -> AsyncIterator[str]:
    """chat.completion.chunk events: a role chunk per choice, content chunks, a finish chunk per choice; with
    `calls` (serve/tools.py's CallStream per choice) tool calls go out as delta.tool_calls chunks."""
    usage = {"usage": None} if include_usage else {}  # as OpenAI: null in every chunk but the last, when asked for

    def chunk(index: int, delta: schemas.ChunkDelta, logprobs=None, finish=None) -> str:
        return sse(schemas.ChatCompletionChunk(**head, object="chat.completion.chunk", **usage, choices=[
            schemas.ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)]))

    def render(i: int, delta) -> list[str]:
        delta = calls[i].filter(delta) if calls else delta
        lp = schemas.ChoiceLogprobs.from_engine(delta.logprobs or []) if with_logprobs else None
        out = [chunk(i, schemas.ChunkDelta(content=delta.text), lp)] if delta.text or (lp and lp.content) else []
        out += [chunk(i, schemas.ChunkDelta(tool_calls=delta.tool_calls))] if getattr(delta, "tool_calls", None) else []
        return out + ([chunk(i, schemas.ChunkDelta(), None, delta.finish_reason)] if delta.finish_reason else [])

    def usage_chunk(completion_tokens: int):
        return schemas.ChatCompletionChunk(**head, object="chat.completion.chunk", choices=[],
                                           usage=schemas.Usage.of(prompt_tokens, completion_tokens,
                                                                  job.cached_tokens(n)))

    async def stream() -> AsyncIterator[str]:
        for i in range(n):
            yield chunk(i, schemas.ChunkDelta(role="assistant", content="", refusal=None))
        async for event in events(job, render, usage_chunk if include_usage else None):
            yield event

    return stream()


def completion_events(job, head: dict, prompt_tokens: int, include_usage: bool, logprobs: int | None,
                      offsets: list[int], per_prompt: int = 1) -> AsyncIterator[str]:
    """text_completion events; offsets[i]: characters before choice i's next token (its prompt, then its reply);
    per_prompt: the choices of each prompt (n), which share its cached tokens."""
    usage = {"usage": None} if include_usage else {}

    def render(i: int, delta) -> list[str]:
        lp = None
        if logprobs is not None:
            entries = delta.logprobs or []
            lp = schemas.CompletionLogprobs.from_engine(entries, [offsets[i]] * len(entries), bool(logprobs))
            offsets[i] += len(delta.text)
        if not (delta.text or delta.finish_reason or (lp and lp.tokens)):
            return []
        return [sse(schemas.CompletionChunk(**head, object="text_completion", **usage, choices=[
            schemas.CompletionChunkChoice(index=i, text=delta.text, logprobs=lp, finish_reason=delta.finish_reason)]))]

    def usage_chunk(completion_tokens: int):
        return schemas.CompletionChunk(**head, object="text_completion", choices=[],
                                       usage=schemas.Usage.of(prompt_tokens, completion_tokens,
                                                              job.cached_tokens(per_prompt)))

    return events(job, render, usage_chunk if include_usage else None)


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
