"""Structured output and tool calling in /v1/chat/completions, as OpenAI defines them, on constrained decoding.

`response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
constrains the reply to JSON (valid under the schema); `tools` put the function definitions into the prompt through
the model's chat template (generation/tools.py) and constrain the reply by `tool_choice` ("auto", "none", "required"
or a named function) and `parallel_tool_calls` (default true: one or more calls). A reply made of calls comes back
as `message.tool_calls` (ids "call_...", arguments a JSON string) with finish_reason "tool_calls"; streamed, as
`delta.tool_calls` chunks, each call whole once its block is complete. `tool` messages (the client's results) and
assistant messages with tool_calls are accepted back. A schema feature the grammar engine cannot enforce, or an
unsatisfiable schema, is a 400 naming it: a reply that silently ignored part of a schema would be worse.

The request and response parts are pydantic models in serve/tool_schemas.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from chatforge.errors import ChatforgeError
from chatforge.serve.errors import APIError
from chatforge.serve.tool_schemas import ToolCall, ToolCallDelta


# -- a request's plan -------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a chat request asks beyond plain text: the tools for the prompt, the constraint, how to read replies."""

    messages: list[dict]
    tools: list[dict] | None = None
    constraint: Any = None  # a generation.constraint.Constraint
    calls: bool = False  # replies may hold tool calls (parse them)

    def render(self, tokenizer) -> list[int]:
        from chatforge.generation.tools import render_prompt

        return render_prompt(tokenizer, self.messages, self.tools)  # plain chats too: tool messages may come back

    def choice(self, text: str, finish_reason: str) -> dict:
        """A whole reply's `message` and `finish_reason`: tool calls split out of the text when there are any."""
        from chatforge.serve.schemas import AssistantMessage

        if self.calls:
            from chatforge.generation.tools import parse_reply

            reply = parse_reply(text, self.tools)
            if reply.calls:
                calls = [ToolCall(**c.openai()) for c in reply.calls]
                return {"message": AssistantMessage(role="assistant", content=reply.content, tool_calls=calls),
                        "finish_reason": "tool_calls" if finish_reason == "stop" else finish_reason}
        return {"message": AssistantMessage(role="assistant", content=text), "finish_reason": finish_reason}

    def streams(self, n: int) -> list[CallStream] | None:
        """One CallStream per choice when replies may hold calls, else None (text streams as it comes)."""
        return [CallStream(self) for _ in range(n)] if self.calls else None


def _content(message) -> str | None:
    c = message.content
    return c if c is None or isinstance(c, str) else "\n".join(p.text for p in c)


def chat_messages(messages) -> list[dict]:
    """The request's messages as the renderer takes them (developer is system; calls and tool results kept)."""
    out = []
    for i, m in enumerate(messages):
        content = _content(m)
        d: dict = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.role == "assistant" and m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        elif content is None:  # the schema lets only an assistant turn leave out its content, and only beside calls
            raise APIError(400, f"Missing required parameter: 'messages[{i}].content'.", f"messages[{i}].content",
                           "invalid_request")
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def plan(req) -> Plan:
    """The plan of a validated ChatCompletionRequest, or a 400 naming what cannot be done."""
    from chatforge.generation.constraint import Constraint
    from chatforge.generation.tools import tool_constraint

    messages = chat_messages(req.messages)
    fmt = req.response_format
    if req.tools and fmt is not None and fmt.type != "text":
        raise APIError(400, "Unsupported parameter: 'response_format': a JSON response format together with 'tools' "
                            "is not supported (constrain the reply or call tools).", "response_format",
                       "invalid_request")
    if req.tools:
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel) else req.tool_choice
        parallel = True if req.parallel_tool_calls is None else req.parallel_tool_calls
        try:
            constraint = tool_constraint(tools, choice or "auto", parallel)
        except ChatforgeError as e:
            param = "tool_choice" if str(e).startswith("tool_choice") else "tools"
            raise APIError(400, f"Invalid value for '{param}': {str(e).split(': ', 1)[1]}.", param,
                           "invalid_request") from None
        return Plan(messages, tools, constraint, calls=choice != "none")
    if req.tool_choice not in (None, "none"):
        raise APIError(400, "Invalid value for 'tool_choice': only allowed when 'tools' are given.", "tool_choice",
                       "invalid_request")
    if fmt is None or fmt.type == "text":
        return Plan(messages)
    try:
        if fmt.type == "json_object":
            return Plan(messages, constraint=Constraint.json_object())
        schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
        return Plan(messages, constraint=Constraint.json_schema(schema, "response_format.json_schema.schema"))
    except ChatforgeError as e:
        param = "response_format.json_schema.schema"
        raise APIError(400, f"Invalid value for '{param}': {str(e).split(': ', 1)[1]}.", param,
                       "invalid_request") from None


# -- streaming --------------------------------------------------------------------------------------------------

@dataclass
class StreamDelta:
    """An engine Delta after CallStream: `text` is the content to send, `tool_calls` the calls completed in it."""

    text: str
    token_ids: list[int]
    logprobs: list[dict] | None
    finish_reason: str | None
    tool_calls: list[ToolCallDelta] | None


class CallStream:
    """One choice's streamed text turned into content and tool-call deltas.

    Text that could still become "<tool_call>" is held back; inside a block nothing is sent until its closing tag,
    then the whole call goes out as one delta.tool_calls entry (clients concatenate `arguments` pieces, and one
    piece is a valid sequence of them).
    """

    def __init__(self, plan: Plan):
        self.plan, self.buffer, self.count = plan, "", 0

    def filter(self, delta) -> StreamDelta:
        """The engine's delta as it is sent: held-back text out, completed calls in, finish "tool_calls"."""
        final = delta.finish_reason is not None
        content, calls = self.push(delta.text, final)
        finish = delta.finish_reason
        if finish == "stop" and self.count:
            finish = "tool_calls"
        return StreamDelta(content, delta.token_ids, delta.logprobs, finish, calls or None)

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """(content to send, calls completed) after `text`; final: the reply ended, release what is held."""
        from chatforge.generation.tools import parse_reply
        from chatforge.tokenizer import CALL_CLOSE, CALL_OPEN

        self.buffer += text
        content, calls = "", []
        while self.buffer:
            start = self.buffer.find(CALL_OPEN)
            if start < 0:
                keep = _partial_suffix(self.buffer, CALL_OPEN) if not final else 0
                cut = len(self.buffer) - keep
                content += self.buffer[:cut]
                self.buffer = self.buffer[cut:]
                break
            content += self.buffer[:start]
            self.buffer = self.buffer[start:]
            end = self.buffer.find(CALL_CLOSE)
            if end < 0:
                if final:
                    content += self.buffer
                    self.buffer = ""
                break
            block, self.buffer = self.buffer[:end + len(CALL_CLOSE)], self.buffer[end + len(CALL_CLOSE):]
            for call in parse_reply(block, self.plan.tools).calls:
                calls.append(ToolCallDelta(index=self.count, **call.openai()))
                self.count += 1
        if self.count and not content.strip():  # the newlines between calls are not content
            content = ""
        return content, calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
