"""The API's request and response shapes, as OpenAI defines them, and OpenAI-style errors for invalid requests.

Requests are validated strictly (JSON types as written, unknown fields refused) so that the published OpenAPI schema
is exactly what the server accepts. Parameters OpenAI defines but this server cannot honour (tools, JSON-schema
response formats, logit bias, audio...) are declared as "null only": the schema documents them, and a request that
uses one gets a 400 naming it instead of a reply that silently ignored it. The caps (max_tokens, n) are part of the
schema too, so request models are built per app.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

# Parameters OpenAI defines that this server refuses (unless absent/null/neutral), and why.
UNSUPPORTED: dict[str, str] = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported (only \"none\" is accepted)",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "response_format": "only {\"type\": \"text\"} is supported (no JSON mode or JSON schema)",
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
    "best_of": "best_of is only accepted when it equals n",
}
MAX_STOP = 4  # as OpenAI
MAX_STOP_CHARS = 256
INT64 = 2**63


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
Seed = Annotated[int, Field(ge=-INT64, lt=INT64)] | None
Empty = Annotated[dict[str, float], Field(max_length=0)] | None


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]  # developer is OpenAI's newer name for system
    content: Text | list[TextPart]


class StreamOptions(Strict):
    include_usage: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text"]


def build_request_models(max_tokens_cap: int, max_n: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """(ChatCompletionRequest, CompletionRequest) with this server's caps in their schema."""
    MaxTokens = Annotated[int, Field(ge=1, le=max_tokens_cap)] | None
    N = Annotated[int, Field(ge=1, le=max_n)] | None

    class Sampling(Strict):
        """The generation parameters both endpoints take."""

        model: Text
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
        top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
        user: Text | None = None
        safety_identifier: Text | None = None
        service_tier: Literal["auto", "default"] | None = None
        # Declared so the schema documents them; anything but null/neutral is refused with a 400 naming it.
        tools: None = None
        tool_choice: Literal["none"] | None = None
        functions: None = None
        function_call: None = None
        parallel_tool_calls: None = None
        response_format: ResponseFormat | None = None
        logit_bias: Empty = None
        audio: None = None
        modalities: list[Literal["text"]] | None = None
        prediction: None = None
        reasoning_effort: None = None
        web_search_options: None = None
        store: Literal[False] | None = None
        metadata: Annotated[dict[str, str], Field(max_length=0)] | None = None

    class CompletionRequest(Sampling):
        prompt: Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)] | Annotated[
            list[Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]],
            Field(min_length=1, max_length=max_n)]
        logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
        user: Text | None = None
        best_of: N = None
        echo: Literal[False] | None = None
        suffix: None = None
        logit_bias: Empty = None

    return ChatCompletionRequest, CompletionRequest


# -------------------------------------------------------------------------------- responses (for the schema)

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
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


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


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
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(BaseModel):
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


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


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
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif any(c in part for c in "[]-(,") or part in ("str", "int", "float", "bool", "none"):
            continue  # e.g. 'list[TextPart]', 'function-after[...]': which branch of a union was tried
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
    # Of a union's failed branches, the one that got furthest names the real problem (content[0].type, not content).
    e = max(errors, key=lambda x: len(x["loc"]))
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
    if kind == "literal_error" and param and param.endswith(".type") and ".content[" in param:
        return (f"Invalid value for '{param}': only text content parts are supported, got "
                f"{_short(e.get('input'))}."), param
    msg = e["msg"].removeprefix("Value error, ")
    return f"Invalid value for '{param}': {msg}.", param
