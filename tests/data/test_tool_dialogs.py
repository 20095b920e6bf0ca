"""Tool-use training dialogs (examples/tools/train.jsonl's shape) through the data path: read with their `tools`,
rendered exactly as the server prompts (the tools in the prompt), and trained on the assistant's call and its final
reply but never on the tool's result."""

from __future__ import annotations

import json

import pytest
from conftest import make_tokenizer

from chatforge.data.pack import encode_record
from chatforge.data.prepare import load_dataset
from chatforge.errors import ChatforgeError
from chatforge.generation.tools import render_prompt
from chatforge.tokenizer import format_call

TOOLS = [{"type": "function", "function": {
    "name": "get_order_status", "description": "Where an order is",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]
DIALOG = [
    {"role": "system", "content": "You help customers."},
    {"role": "user", "content": "Where is order AB1234?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function", "function": {
        "name": "get_order_status", "arguments": '{"order_id": "AB1234"}'}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": '{"status": "shipped"}'},
    {"role": "assistant", "content": "Your order AB1234 has shipped."},
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _read(tmp_path, records: list[dict]) -> list[dict]:
    path = tmp_path / "dialogs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    train, val, _ = load_dataset(str(path), val_fraction=0.0)
    return train + val


def test_a_tool_dialog_trains_on_the_call_and_the_reply_not_the_tool_result(tmp_path, tok):
    (record,) = _read(tmp_path, [{"tools": TOOLS, "messages": DIALOG}])
    assert record["tools"] == TOOLS and record["messages"][2]["tool_calls"] == DIALOG[2]["tool_calls"]
    ids, mask = encode_record(record, tok, "assistant")
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    call = format_call("get_order_status", {"order_id": "AB1234"})
    assert trained == f"{call}<|im_end|>Your order AB1234 has shipped.<|im_end|>"
    assert '{"status": "shipped"}' in tok.decode(ids) and "shipped\"}" not in trained  # the result is context only
    # what the model is trained to answer after the tools and the question is the server's prompt, to the token
    prompt = render_prompt(tok, DIALOG[:2], TOOLS)
    assert ids[: len(prompt)] == prompt and mask[: len(prompt)] == [0] * len(prompt)
    assert "get_order_status" in tok.decode(prompt)  # the tool definitions are in the prompt
    follow_up = render_prompt(tok, DIALOG[:4], TOOLS)  # the turn after the tool message
    assert ids[: len(follow_up)] == follow_up and tok.decode(ids[len(follow_up):]).startswith("Your order")


def test_a_dialog_that_needs_no_tool_keeps_the_tools_in_its_prompt(tmp_path, tok):
    plain = [DIALOG[0], {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome!"}]
    (record,) = _read(tmp_path, [{"tools": TOOLS, "messages": plain}])
    ids, mask = encode_record(record, tok, "assistant")
    assert ids[: len(render_prompt(tok, plain[:2], TOOLS))] == render_prompt(tok, plain[:2], TOOLS)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "You're welcome!<|im_end|>"


def test_a_tool_result_without_a_call_is_refused_with_its_line(tmp_path):
    bad = [DIALOG[0], DIALOG[1], DIALOG[3], DIALOG[4]]
    with pytest.raises(ChatforgeError, match=r"dialogs.jsonl:1.*message 3 has role 'tool' but does not follow an "
                                             r"assistant tool call"):
        _read(tmp_path, [{"tools": TOOLS, "messages": bad}])
