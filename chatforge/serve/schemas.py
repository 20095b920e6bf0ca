"""The API's request and response shapes, as OpenAI defines them, and OpenAI-style errors for invalid requests.

Each shape is defined once: the models below document the API (the OpenAPI schema) and the server builds every
response from them (`to_json`), so what is documented is what is sent.

Requests are validated strictly (JSON types as written, unknown fields refused) so that the published OpenAPI schema
is exactly what the server accepts (tools and response formats: serve/tools.py). Parameters OpenAI defines but this
server cannot honour (legacy functions, logit bias, audio...) are declared as "null only": the schema documents them, and a request that
uses one gets a 400 naming it instead of a reply that silently ignored it. The caps (max_tokens, n) are part of the
schema too, so request models are built per app.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_serializer

from chatforge.serve.tool_schemas import ResponseFormat, ToolCall, ToolCallDelta, ToolCallIn, ToolChoice, ToolDef

# Parameters OpenAI defines that this server refuses (unless absent/null/neutral), and why.
UNSUPPORTED: dict[str, str] = {
    "functions": "the legacy 'functions' parameter is not supported (use 'tools')",
    "function_call": "the legacy 'function_call' parameter is not supported (use 'tool_choice')",
    "logit_bias": "logit_bias is not supported (only an empty object is accepted)",
    "audio": "audio output is not supported",
    "modalities": "only the \"text\" modality is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model has no reasoning settings",
    "web_search_options": "web search is not supported",
    "store": "stored completions are not supported (only false is accepted)",
    "metadata": "metadata is only used with stored completions, which are not supported",
    "echo": "echo is not supported (only false is accepted)",
    "suffix": "suffix (insertion) is not supported",
}
MAX_STOP = 4  # as OpenAI
MAX_STOP_CHARS = 256
INT64 = 2**63
LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for log(0): JSON has no -Infinity


def _valid_unicode(s: str) -> str:
    """Refuse lone surrogates: they cannot be tokenized or written back as UTF-8."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an unpaired surrogate (not valid Unicode)") from None
    return s


Text = Annotated[str, AfterValidator(_valid_unicode)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_valid_unicode)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None
Temperature = Annotated[float, Field(ge=0.0, le=2.0)] | None
TopP = Annotated[float, Field(ge=0.0, le=1.0)] | None
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)] | None


def _integral(v):
    """JSON Schema's integer includes 5.0 (JSON has one number type); strict pydantic alone would refuse it."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def integer(**bounds):
    """An int field with these bounds in its schema that also takes integral floats."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


def _bool_only(v):
    """Literal[False] alone takes 0 and 0.0 (they equal False in Python); JSON Schema's const false does not."""
    if not isinstance(v, bool):
        raise ValueError("must be a boolean")
    return v


OnlyFalse = Annotated[Literal[False], BeforeValidator(_bool_only)] | None
Seed = integer(ge=-INT64, lt=INT64) | None
Empty = Annotated[dict[str, float], Field(max_length=0)] | None


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TextPart(Strict):
    type: Literal["text"]
    text: Text


Content = Text | list[TextPart]


class SystemMessage(Strict):
    role: Literal["system", "developer"]  # developer is OpenAI's newer name for system
    content: Content


class UserMessage(Strict):
    role: Literal["user"]
    content: Content


class AssistantTurn(Strict):
    """An earlier assistant turn sent back: text, tool calls, or both (neither is refused in serve/tools.py)."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}}]})

    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCallIn] | None = None


class ToolMessage(Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: Text


# One model per role, as in OpenAI's own schema: what each role needs is in the published schema, not only in a 400.
Message = Annotated[SystemMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]
ROLES = ("system", "developer", "user", "assistant", "tool")


class StreamOptions(Strict):
    include_usage: bool | None = None


def build_request_models(max_tokens_cap: int, max_n: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """(ChatCompletionRequest, CompletionRequest) with this server's caps in their schema."""
    MaxTokens = integer(ge=1, le=max_tokens_cap) | None
    N = integer(ge=1, le=max_n) | None

    class Sampling(Strict):
        """The generation parameters both endpoints take."""

        model: Text | None = None  # optional, as with Ollama and llama.cpp: this server has one model
        max_tokens: MaxTokens = None
        temperature: Temperature = None
        top_p: TopP = None
        n: N = None
        stream: bool | None = None
        stream_options: StreamOptions | None = None
        stop: Stop = None
        seed: Seed = None
        presence_penalty: Penalty = None
        frequency_penalty: Penalty = None

    class ChatCompletionRequest(Sampling):
        messages: Annotated[list[Message], Field(min_length=1)]
        max_completion_tokens: MaxTokens = None
        logprobs: bool | None = None
        top_logprobs: integer(ge=0, le=20) | None = None
        user: Text | None = None
        safety_identifier: Text | None = None
        service_tier: Literal["auto", "default"] | None = None
        # Declared so the schema documents them; anything but null/neutral is refused with a 400 naming it.
        tools: Annotated[list[ToolDef], Field(min_length=1, max_length=128)] | None = None
        tool_choice: ToolChoice | None = None
        functions: None = None
        function_call: None = None
        parallel_tool_calls: bool | None = None
        response_format: ResponseFormat | None = None
        logit_bias: Empty = None
        audio: None = None
        modalities: list[Literal["text"]] | None = None
        prediction: None = None
        reasoning_effort: None = None
        web_search_options: None = None
        store: OnlyFalse = None
        metadata: Annotated[dict[str, str], Field(max_length=0)] | None = None
        best_of: N = None  # candidates ranked by the server's reward model (serve/best_of.py)

    class CompletionRequest(Sampling):
        prompt: Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)] | Annotated[
            list[Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]],
            Field(min_length=1, max_length=max_n)]
        logprobs: integer(ge=0, le=5) | None = None
        user: Text | None = None
        best_of: N = None  # candidates ranked by log probability per token (serve/best_of.py)
        echo: OnlyFalse = None
        suffix: None = None
        logit_bias: Empty = None

    return ChatCompletionRequest, CompletionRequest


# -------------------------------------------------------------------------------- responses

def to_json(model: BaseModel) -> bytes:
    """A response body: compact UTF-8 JSON of the model."""
    return model.__pydantic_serializer__.to_json(model)


def _finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose keys came from the prefix cache (not prefilled again)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]

    @classmethod
    def from_engine(cls, entry: dict) -> TokenLogprob:
        """An engine logprob entry as OpenAI writes it (finite numbers only)."""
        return cls(token=entry["token"], logprob=_finite(entry["logprob"]), bytes=entry.get("bytes"),
                   top_logprobs=[TopLogprob(token=t["token"], logprob=_finite(t["logprob"]), bytes=t.get("bytes"))
                                 for t in entry.get("top_logprobs", [])])


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None

    @classmethod
    def from_engine(cls, entries: list[dict]) -> ChoiceLogprobs:
        return cls(content=[TokenLogprob.from_engine(e) for e in entries])


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None  # sent only when the reply calls tools

    @model_serializer(mode="wrap")
    def _calls_when_made(self, handler):
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    """Only the fields a chunk sets are sent: the first carries the role, the next ones content, the last nothing."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler):
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


class _UsageWhenAsked(BaseModel):
    """A chunk carries `usage` (null until the last) only when the client asked for it with include_usage."""

    @model_serializer(mode="wrap")
    def _usage_when_set(self, handler):
        data = handler(self)
        if "usage" not in self.model_fields_set:
            data.pop("usage", None)
        return data


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None


class ChatCompletionChunk(_UsageWhenAsked):
    """One server-sent event of a streamed chat completion; the last (with include_usage) has choices [] and usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]

    @classmethod
    def from_engine(cls, entries: list[dict], offsets: list[int], with_top: bool) -> CompletionLogprobs:
        """The /v1/completions shape; offsets: where each token's text starts (in prompt + reply)."""
        entries = [TokenLogprob.from_engine(e) for e in entries]
        return cls(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                   top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries] if with_top else None,
                   text_offset=list(offsets))


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "content_filter"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "content_filter"] | None


class CompletionChunk(_UsageWhenAsked):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int  # not in OpenAI's object (clients ignore it): prompt + reply tokens the model can take


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    compiled_decode: bool  # serve --compile: the decode step runs compiled
    warmup_s: float | None  # seconds its warm-up took at start-up (None: not compiled)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody

    @classmethod
    def of(cls, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> ErrorResponse:
        return cls(error=ErrorBody(message=message, type=type_, param=param, code=code))

    def to_json(self) -> bytes:
        # ASCII-escaped: an error may quote user input (even a lone surrogate), which must never make it fail to encode
        return json.dumps(self.model_dump()).encode()


def event_stream_schema(chunk: str) -> dict:
    """One server-sent event (OpenAPI 3.1 style: the schema describes each event): `data:` is a JSON chunk, an error
    object if generation failed midway, or the final "[DONE]"."""
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"},
        "data": {"anyOf": [{"const": "[DONE]"}, {
            "type": "string", "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"},
                                        {"$ref": "#/components/schemas/ErrorResponse"}]}}]}}}


# -------------------------------------------------------------------------------- validation errors -> 400

def _param(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content', dropping pydantic's union-branch tags."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif any(c in part for c in "[]-(,") or part in ("str", "int", "float", "bool", "none"):
            continue  # e.g. 'list[TextPart]', 'function-after[...]': which branch of a union was tried
        elif part in ROLES and i >= 2 and loc[i - 2] == "messages" and isinstance(loc[i - 1], int):
            continue  # the role tag of messages[i]'s per-role model
        else:
            out += ("." if out else "") + part
    return out


def _short(value) -> str:
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "int_type", "int_parsing"}


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the most telling error in a pydantic ValidationError."""
    errors = err.errors(include_url=False)
    # Of a union's failed branches, the one that got furthest names the real problem (content[0].type, not content);
    # of equally far ones, the branch of the type that was sent (five stop strings: a too-long list, not "a string").
    e = max(errors, key=lambda x: (len(x["loc"]), not x["type"].endswith("_type")))
    kind, loc = e["type"], tuple(e["loc"])
    param = _param(loc) or None
    top = loc[0] if loc and isinstance(loc[0], str) else None
    if kind == "json_invalid":
        return ("We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
                "HTTP library correctly. The OpenAI API expects a JSON payload.)"), None
    if kind in ("model_type", "model_attributes_type") and not loc:
        return "The request body must be a JSON object.", None
    if top in UNSUPPORTED and kind not in _BOUNDS:
        return f"Unsupported parameter: '{top}': {UNSUPPORTED[top]}.", top
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        param = f"{param}.role"
        if kind == "union_tag_not_found":
            return f"Missing required parameter: '{param}'.", param
        return (f"Invalid value for '{param}': {_short(e['ctx'].get('tag'))} is not one of "
                f"{', '.join(repr(r) for r in ROLES)}."), param
    if kind == "literal_error" and param and param.endswith(".type") and ".content[" in param:
        return (f"Invalid value for '{param}': only text content parts are supported, got "
                f"{_short(e.get('input'))}."), param
    if kind == "too_long" and "max_length" in e.get("ctx", {}):
        what = "stop strings" if top == "stop" else "items"
        return f"Invalid value for '{param}': at most {e['ctx']['max_length']} {what}, got " \
               f"{e['ctx'].get('actual_length', 'more')}.", param
    msg = e["msg"].removeprefix("Value error, ")
    return f"Invalid value for '{param}': {msg}.", param
