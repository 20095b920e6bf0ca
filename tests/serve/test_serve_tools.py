"""Structured output and tool calling through the official `openai` client, on a tiny random model: validity must come
from constrained decoding, not from the model."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from serve_support import CORPUS, REPLIES, serve

ORDER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_order_status", "description": "Where a customer's order is.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"}},
                       "required": ["order_id"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_opening_hours", "description": "A store's opening hours on a day.",
        "parameters": {"type": "object", "properties": {"day": {"enum": ["monday", "sunday"]}}, "required": ["day"]}}},
]
ASK = [{"role": "user", "content": "Where is my order AB1234?"}]
SCHEMAS = [
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 5}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["name", "age"], "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "绿色"]}, "tags": {
        "type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 3}},
     "required": ["colour", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"p": {"type": "number", "minimum": 0.5, "maximum": 2.5},
                                      "q": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 7}},
     "required": ["p", "q"], "additionalProperties": False},
]


class Item(BaseModel):
    sku: Literal["apple", "bread"]
    quantity: int = Field(ge=1, le=9)


class Order(BaseModel):
    order_id: str = Field(max_length=6)
    items: list[Item] = Field(max_length=2)
    gift: bool


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tokenizer like the serve tests' and a random model whose context fits the tools' system prompt."""
    import torch

    from chatforge.model.gpt import GPT, ModelConfig
    from chatforge.tokenizer import train_tokenizer
    from chatforge.weights.folder import save_model

    tok = train_tokenizer(CORPUS + [t for pair in REPLIES.items() for t in pair], vocab_size=300, min_frequency=2)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=2048)
    path = tmp_path_factory.mktemp("tools") / "random"
    save_model(GPT(config).eval(), tok, path)
    return str(path)


@pytest.fixture(scope="module")
def server(folder):
    with serve(folder, max_tokens_cap=400) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_parse_gives_a_pydantic_object(client):
    r = client.beta.chat.completions.parse(model="tiny", messages=ASK, response_format=Order, max_tokens=300,
                                           temperature=1.0, seed=1)
    order = r.choices[0].message.parsed
    assert isinstance(order, Order) and r.choices[0].finish_reason == "stop"
    assert Order.model_validate_json(r.choices[0].message.content) == order


def test_every_output_validates(client):
    for i, schema in enumerate(SCHEMAS):
        r = client.chat.completions.create(model="tiny", messages=ASK, n=4, temperature=1.0, seed=i, max_tokens=300,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": f"s{i}", "schema": schema, "strict": True}})
        for choice in r.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schema)
    r = client.chat.completions.create(model="tiny", messages=ASK, n=2, temperature=1.0, seed=5, max_tokens=300,
                                       response_format={"type": "json_object"})
    assert all(isinstance(json.loads(c.message.content), dict) for c in r.choices if c.finish_reason == "stop")


def test_tool_round_trip(client):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=ORDER_TOOLS, max_tokens=200, seed=3,
                                           tool_choice={"type": "function", "function": {"name": "get_order_status"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_order_status"
    jsonschema.validate(json.loads(call.function.arguments), ORDER_TOOLS[0]["function"]["parameters"])

    answer = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"status": "shipped"})}
    history = ASK + [choice.message.model_dump(exclude_none=True), answer]
    second = client.chat.completions.create(model="tiny", messages=history, tools=ORDER_TOOLS, tool_choice="none",
                                            max_tokens=20, seed=3)
    reply = second.choices[0]
    assert reply.message.tool_calls is None and reply.message.content and "<tool_call>" not in reply.message.content
    assert reply.finish_reason in ("stop", "length")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + len(call.function.arguments) // 4


def test_streamed_tool_calls_reassemble(client):
    kw = dict(model="tiny", messages=ASK, tools=ORDER_TOOLS, tool_choice="required", max_tokens=300, seed=11,
              temperature=1.0)
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        assert not delta.content
        for d in delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            c["id"] += d.id or ""
            c["name"] += d.function.name or ""
            c["arguments"] += d.function.arguments or ""
        finishes.append(chunk.choices[0].finish_reason)
    assert [f for f in finishes if f] == ["tool_calls"]
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_parallel_tool_calls_false_makes_one_call(client):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=ORDER_TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=300, seed=seed, temperature=1.0)
        assert len(r.choices[0].message.tool_calls) == 1


def test_refusals_name_the_problem(server):
    def refuse(body: dict) -> dict:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": ASK, **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]

    e = refuse({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}})
    assert e["message"] == ("Invalid value for 'response_format.json_schema.schema': unsupported JSON schema feature: "
                            "uniqueItems.") and e["param"] == "response_format.json_schema.schema"
    e = refuse({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}})
    assert e["message"].endswith("unsatisfiable schema: minimum (5) is greater than maximum (1).")
    e = refuse({"tools": ORDER_TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}})
    assert e["message"] == ("Invalid value for 'tool_choice': function 'fly' is not among the tools "
                            "(get_order_status, get_opening_hours).") and e["param"] == "tool_choice"
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "format": "email", "not": {"const": "a"}}}}}}
    assert refuse({"tools": [bad_tool]})["message"] == "Invalid value for 'tools': unsupported JSON schema feature: not."
    assert refuse({"tool_choice": "required"})["param"] == "tool_choice"
    e = refuse({"messages": [{"role": "tool", "content": "42"}]})
    assert e["message"] == "Missing required parameter: 'messages[0].tool_call_id'."
    assert refuse({"functions": [{"name": "f"}]})["param"] == "functions"
