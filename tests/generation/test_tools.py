"""Tool calling below the server: prompts (a template's own `tools` or the Hermes rewrite, both equal to
transformers' apply_chat_template), the call grammar under each tool_choice, and parsing replies."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from conftest import make_tokenizer

from chatforge.errors import ChatforgeError
from chatforge.generation.engine import Engine, SamplingParams
from chatforge.generation.tools import check_tools, parse_reply, render_prompt, tool_constraint
from chatforge.tokenizer import tool_messages, uses_tools
from chatforge.model.gpt import GPT, config_from_preset
from chatforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_order_status", "description": "Where an order is",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[A-Z][0-9]{4}$"}},
                       "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "book_table", "description": "Book a table",
        "parameters": {"type": "object", "properties": {
            "people": {"type": "integer", "minimum": 1, "maximum": 12},
            "time": {"type": "string", "enum": ["18:00", "19:00", "20:00"]}}, "required": ["people", "time"]}}},
]
ROUND_TRIP = [
    {"role": "system", "content": "You help customers."},
    {"role": "user", "content": "Where is order A1234?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_order_status", "arguments": '{"order_id": "A1234"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
]
# Qwen2.5's tool template, with its default system prompt left out: it reads `tools` and renders calls and responses.
QWEN_LIKE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def qwen_like(tok, tmp_path_factory):
    """The same vocabulary with a template that renders tools itself, saved and reloaded as a model folder has it."""
    folder = tmp_path_factory.mktemp("qwen_like")
    Tokenizer(tok.hf, QWEN_LIKE, eos_token=tok.eos_token, pad_token=tok.pad_token).save(str(folder))
    return str(folder)


def test_tools_reach_the_prompt_as_transformers_renders_them(tok, qwen_like):
    from transformers import AutoTokenizer

    native = Tokenizer.load(qwen_like)
    assert uses_tools(native) and not uses_tools(tok)
    hf = AutoTokenizer.from_pretrained(qwen_like)
    for messages in (ROUND_TRIP, ROUND_TRIP[1:2], ROUND_TRIP + [{"role": "tool", "content": "second"}]):
        hf_messages = [dict(m, tool_calls=[{**c, "function": {**c["function"],
                                                               "arguments": json.loads(c["function"]["arguments"])}}
                                           for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in messages]
        want = hf.apply_chat_template(hf_messages, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        assert render_prompt(native, messages, TOOLS) == list(want)
        # A template without tools support gets the conversation rewritten in the same convention: same tokens.
        assert render_prompt(tok, messages, TOOLS) == list(want)


def test_the_hermes_rewrite(tok):
    rewritten = tool_messages(ROUND_TRIP, TOOLS, native=False)
    assert [m["role"] for m in rewritten] == ["system", "user", "assistant", "user"]
    assert rewritten[0]["content"].startswith("You help customers.\n\n# Tools\n")
    assert json.dumps(TOOLS[1]) in rewritten[0]["content"]
    assert rewritten[2]["content"] == '<tool_call>\n{"name": "get_order_status", "arguments": {"order_id": "A1234"}}' \
                                      '\n</tool_call>'
    assert rewritten[3]["content"] == '<tool_response>\n{"status": "shipped"}\n</tool_response>'
    with pytest.raises(ChatforgeError, match=r"^messages\[2\]\.tool_calls\[0\]\.function\.arguments: not valid JSON"):
        tool_messages([*ROUND_TRIP[:2], {"role": "assistant", "content": "", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}], TOOLS, native=False)


def test_calls_follow_each_tool_choice(tok):
    torch.manual_seed(0)
    model = GPT(config_from_preset("nano", vocab_size=tok.vocab_size, max_seq_len=2048, n_layer=2, init_std=0.1))
    engine = Engine(model.eval(), tok, max_batch_size=8)
    prompt = render_prompt(tok, ROUND_TRIP[:2], TOOLS)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

    def replies(choice, parallel=False, n=8):
        c = tool_constraint(TOOLS, choice, parallel)
        params = [SamplingParams(temperature=1.0, top_p=1.0, seed=s, max_new_tokens=250, constraint=c) for s in range(n)]
        return [(out, parse_reply(out.text, TOOLS)) for out in engine.generate_batch([prompt] * n, params)]

    names = set()
    for out, reply in replies("required"):
        assert out.finish_reason == "stop" and not reply.invalid and reply.content is None and len(reply.calls) == 1
        call = reply.calls[0]
        names.add(call.name)
        jsonschema.validate(call.arguments, schemas[call.name])
        assert set(call.arguments) <= set(schemas[call.name]["properties"])  # objects are closed
    assert names == {"get_order_status", "book_table"}
    for _, reply in replies({"type": "function", "function": {"name": "book_table"}}):
        assert [c.name for c in reply.calls] == ["book_table"]
    for out, reply in replies("none", n=4):
        assert "<tool_call>" not in out.text and not reply.calls
    several = [len(r.calls) for out, r in replies("required", parallel=True) if out.finish_reason == "stop"]
    assert several and max(several) > 1
    with pytest.raises(ChatforgeError, match=r"^tool_choice: function 'nope' is not among the tools "
                                             r"\(get_order_status, book_table\)$"):
        tool_constraint(TOOLS, {"type": "function", "function": {"name": "nope"}})


def test_parse_reply():
    text = 'Let me check.\n<tool_call>\n{"name": "get_order_status", "arguments": {"order_id": "A1234"}}\n</tool_call>'
    reply = parse_reply(text, TOOLS)
    assert reply.content == "Let me check." and [(c.name, c.arguments) for c in reply.calls] == [
        ("get_order_status", {"order_id": "A1234"})]
    call = reply.calls[0].openai(index=0)
    assert call["id"].startswith("call_") and call["function"]["arguments"] == '{"order_id": "A1234"}'
    assert parse_reply("Plain answer.", TOOLS).content == "Plain answer."
    bad = parse_reply('<tool_call>\n{"name": "fly", "arguments": {}}\n</tool_call><tool_call>{oops</tool_call>', TOOLS)
    assert bad.calls == [] and bad.invalid == ['{"name": "fly", "arguments": {}}', "{oops"] and bad.content is None


def test_tool_definitions_are_checked():
    with pytest.raises(ChatforgeError, match=r"^tools\[0\]\.function\.name: must be 1-64 letters"):
        check_tools([{"type": "function", "function": {"name": "has space"}}])
    with pytest.raises(ChatforgeError, match=r"^tools\[1\]\.function\.name: 'f' is defined twice$"):
        check_tools([{"type": "function", "function": {"name": "f"}}] * 2)
    with pytest.raises(ChatforgeError, match=r"^tools: unsupported JSON schema feature: uniqueItems$"):
        tool_constraint([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}], "required")
