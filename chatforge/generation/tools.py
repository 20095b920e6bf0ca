"""Tool calling: tool definitions into the prompt, a grammar for the calls, and the calls parsed back out.

Tools are OpenAI function definitions ({"type": "function", "function": {"name", "description", "parameters"}}).
A chat template that reads `tools` (Qwen2.5, Hermes, ...) gets them as transformers' apply_chat_template(tools=...)
passes them, with assistant `tool_calls` (arguments as objects) and `tool` messages as they are. A template that does
not (chatforge's ChatML, SmolLM2's) gets the same conversation rewritten in the Hermes/Qwen2.5 convention: the tool
signatures in the system message, earlier calls as `<tool_call>` blocks in assistant text and tool results as
`<tool_response>` blocks in a user turn. Either way the model answers a call as

    <tool_call>
    {"name": "get_order_status", "arguments": {"order_id": "A1234"}}
    </tool_call>

one block per call, separated by a newline. `tool_constraint` makes that certain: the function name is one of the
tools and the arguments follow its parameters schema (objects that do not say otherwise are closed, as OpenAI's
strict mode requires, so no argument the function does not declare is ever generated); with tool_choice "auto" the
reply is either plain text (which never contains "<tool_call>") or calls, with "none" only plain text.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chatforge.errors import ChatforgeError
from chatforge.generation.constraint import JSON_STYLE, Constraint

# The prompt side (the Hermes rewrite, CALL_OPEN/CALL_CLOSE) lives with the one renderer in chatforge.tokenizer.
from chatforge.tokenizer import CALL_CLOSE, CALL_OPEN

if TYPE_CHECKING:
    from chatforge.tokenizer import Tokenizer

_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names

def check_tools(tools: list[dict], where: str = "tools") -> list[dict]:
    """OpenAI tool definitions, checked: type "function", a valid unique name, parameters a JSON-schema object."""
    if not isinstance(tools, list) or not tools:
        raise ChatforgeError(f"{where}: expected a non-empty list of tool definitions")
    seen = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ChatforgeError(f"{where}[{i}]: expected {{\"type\": \"function\", \"function\": {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ChatforgeError(f"{where}[{i}].function.name: must be 1-64 letters, digits, _ or -, got {name!r}")
        if name in seen:
            raise ChatforgeError(f"{where}[{i}].function.name: {name!r} is defined twice")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise ChatforgeError(f"{where}[{i}].function.parameters: must be a JSON schema of type object")
    return tools


def _function(tool: dict) -> dict:
    return tool["function"]


def _parameters(tool: dict) -> dict:
    return _function(tool).get("parameters") or {"type": "object", "properties": {}}


# ------------------------------------------------------------------------------------------- the prompt

def render_prompt(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """Prompt ids (with the generation prompt) for a conversation that may define, call and answer tools."""
    return tokenizer.render(messages, add_generation_prompt=True, tools=tools)[0]


# ------------------------------------------------------------------------------------------- the grammar

def _closed(schema):
    """The schema with every object that has properties and says nothing about others closed to them."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def call_schema(tools: list[dict]) -> dict:
    """The JSON schema of one call: {"name": one tool's name, "arguments": that tool's parameters}."""
    branches = []
    for tool in tools:
        params = _closed(copy.deepcopy(_parameters(tool)))
        params.setdefault("type", "object")
        branches.append({"type": "object", "properties": {"name": {"const": _function(tool)["name"]},
                                                           "arguments": params},
                         "required": ["name", "arguments"], "additionalProperties": False})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def pick_tools(tools: list[dict], tool_choice) -> tuple[list[dict], str]:
    """(the tools a reply may call, "auto" | "required" | "none") for an OpenAI tool_choice."""
    if tool_choice is None:
        return tools, "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "required", "none"):
            raise ChatforgeError(f"tool_choice: must be auto, required, none or a named function, got {tool_choice!r}")
        return tools, tool_choice
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    chosen = [t for t in tools if _function(t)["name"] == name]
    if not chosen:
        known = ", ".join(_function(t)["name"] for t in tools)
        raise ChatforgeError(f"tool_choice: function {name!r} is not among the tools ({known})")
    return chosen, "required"


def tool_constraint(tools: list[dict], tool_choice="auto", parallel: bool = True) -> Constraint:
    """The grammar of a reply under tool_choice (module docstring); parallel: one or more calls, else exactly one."""
    tools, mode = pick_tools(check_tools(tools), tool_choice)
    schema = {"x-guidance": dict(JSON_STYLE), **call_schema(tools)}
    calls = 'call ("\\n" call)*' if parallel else "call"
    text = 'TEXT: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/'
    start = {"required": "calls", "auto": "TEXT | calls", "none": "TEXT"}[mode]
    grammar = "\n".join([f"start: {start}", f"calls: {calls}",
                         f'call: "{CALL_OPEN}\\n" args "\\n{CALL_CLOSE}"', f"args: %json {json.dumps(schema)}", text])
    return Constraint.lark(grammar, "tools")


# ------------------------------------------------------------------------------------------- the reply

@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def openai(self, index: int | None = None) -> dict:
        """As OpenAI returns it: arguments as a JSON string (with `index` in a streamed delta)."""
        out = {"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return out if index is None else {"index": index, **out}


@dataclass
class Reply:
    content: str | None  # the text outside the calls (None when there is none)
    calls: list[ToolCall]
    invalid: list[str]  # <tool_call> blocks that are not a JSON {"name", "arguments"} object (unconstrained output)


def parse_reply(text: str, tools: list[dict] | None = None) -> Reply:
    """Split generated text into content and tool calls; with `tools`, a call to an unknown name is invalid."""
    names = {_function(t)["name"] for t in tools} if tools else None
    calls, invalid = [], []
    for block in _CALL_RE.findall(text):
        try:
            data = json.loads(block)
        except json.JSONDecodeError:
            invalid.append(block)
            continue
        args = data.get("arguments", data.get("parameters")) if isinstance(data, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(args, dict) or (
                names is not None and data["name"] not in names):
            invalid.append(block)
            continue
        calls.append(ToolCall(data["name"], args))
    content = _CALL_RE.sub("", text).strip() if calls or invalid else text
    return Reply(content=content or None, calls=calls, invalid=invalid)
