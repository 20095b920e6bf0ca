"""Byte-level BPE tokenizer, the chat renderer and a UTF-8-safe streaming decoder.

`Tokenizer.render(messages)` is the one chat contract: it returns the token ids and the loss mask (assistant content
plus its closing end-of-turn token) that training, evaluation, generation prompts and the server all share. It renders
the conversation with the tokenizer's own Jinja chat template, the way transformers' `apply_chat_template` does, so
the ids match `AutoTokenizer.from_pretrained(folder).apply_chat_template(...)` by construction, for chatforge's
ChatML template and for a pretrained tokenizer's template alike. The mask is derived from character spans of the
rendered text, which only needs the template to be prefix-stable (rendering the first i messages gives a prefix of
rendering all of them).

Message content is always text: a special-token string such as "<|im_end|>" typed into a message is encoded as plain
characters, never as the control token, so data or a user cannot end a turn early or forge a role. That matches
transformers' `apply_chat_template(..., sanitize_control_tokens=True)`; for content without such strings (all normal
content) it is identical to the default `apply_chat_template`.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from chatforge.errors import ChatforgeError
from chatforge.io import read_json

if TYPE_CHECKING:
    import tokenizers

IM_START, IM_END, PAD, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|pad|>", "<|endoftext|>"
SPECIALS = [ENDOFTEXT, IM_START, IM_END, PAD]  # ids 0..3 in a chatforge-trained tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Private-use characters wrapped around control-token strings found in message content, so that the encoder can tell
# them from the control tokens the template writes itself (the same characters transformers uses for this).
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"
_TAG = re.compile("\U000f0002([0-9]+)\U000f0003")  # a message's index, put before its content to find it in one render
_TEMPLATE_KWARGS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys that chatforge writes itself or that would make transformers load something else.
_OWN_CONFIG_KEYS = {
    "tokenizer_class", "chat_template", "eos_token", "pad_token", "bos_token", "added_tokens_decoder",
    "clean_up_tokenization_spaces", "auto_map", "tokenizer_file", "name_or_path", "fast_tokenizer_files",
}


@lru_cache(maxsize=16)
def _compile_template(template: str):
    """Compile a chat template in a sandbox configured like transformers', so both render the same text."""
    import datetime

    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # Hub templates may mark assistant text with {% generation %}; we derive the mask ourselves, so it's a no-op.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatforgeError(f"chat template:{e.lineno}: {e.message}") from None


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ChatforgeError(f"messages: expected a list of {{role, content}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatforgeError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ChatforgeError(f"messages[{i}]: '{key}' must be a string, got {m.get(key)!r}")
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _mark(obj: Any, control_re: re.Pattern) -> Any:
    if isinstance(obj, str):
        obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
        return control_re.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, obj)
    if isinstance(obj, dict):
        return {k: _mark(v, control_re) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, control_re) for v in obj]
    return obj


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None



# -- tools: the Hermes/Qwen2.5 convention for templates that do not read `tools` (generation/tools.py parses calls) --

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


def uses_tools(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's chat template reads `tools` (then it renders them itself)."""
    return _reads_tools(tokenizer.chat_template or "")


@lru_cache(maxsize=16)
def _reads_tools(template: str) -> bool:
    import jinja2.meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        parsed = ImmutableSandboxedEnvironment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False  # the renderer reports the template's own error
    return "tools" in jinja2.meta.find_undeclared_variables(parsed)


def _arguments_object(call: dict, where: str) -> dict:
    """A call's arguments as an object (OpenAI sends a JSON string; templates expect a mapping)."""
    args = call.get("function", {}).get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ChatforgeError(f"{where}.function.arguments: not valid JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ChatforgeError(f"{where}.function.arguments: must be a JSON object")
    return args


def format_call(name: str, arguments: dict) -> str:
    """One call as the model writes it (and as tool_constraint allows it)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def tool_messages(messages: list[dict], tools: list[dict] | None, native: bool) -> list[dict]:
    """Messages ready for Tokenizer.render: for a `native` template, assistant calls with object arguments;
    otherwise rewritten in the Hermes convention (module docstring), which any chat template can render."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        m = dict(m)
        calls = m.get("tool_calls") or []
        if m.get("content") is None:
            m["content"] = ""
        if native:
            if calls:
                m["tool_calls"] = [{**c, "function": {**c["function"],
                                                      "arguments": _arguments_object(c, f"messages[{i}].tool_calls[{j}]")}}
                                   for j, c in enumerate(calls)]
            out.append(m)
            continue
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_responses"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_responses": True})
            continue
        if calls:
            blocks = [format_call(c["function"]["name"], _arguments_object(c, f"messages[{i}].tool_calls[{j}]"))
                      for j, c in enumerate(calls)]
            m = {"role": "assistant", "content": "\n".join(([m["content"]] if m["content"] else []) + blocks)}
        out.append({k: v for k, v in m.items() if k in ("role", "content")})
    out = [{k: v for k, v in m.items() if k != "_responses"} for m in out]
    if tools and not native:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        section = HERMES_SYSTEM.format(tools=listing)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": f"{out[0]['content']}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its chat template and named special tokens.

    Change the vocabulary through `add_chat_tokens` only: the encoding copies made in `_refresh` must follow it.
    """

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        chat_template: str,
        eos_token: str = IM_END,
        pad_token: str | None = PAD,
        bos_token: str | None = None,
        extra_config: dict | None = None,
    ):
        self.hf = hf
        self.chat_template = chat_template or ""
        self.eos_token = eos_token
        self.pad_token = pad_token if pad_token and hf.token_to_id(pad_token) is not None else eos_token
        self.bos_token = bos_token
        self.extra_config = dict(extra_config or {})
        self._refresh()

    def _refresh(self) -> None:
        """Recompute ids and the encoding copies after the vocabulary or special tokens change."""
        from tokenizers import Tokenizer as HFTokenizer

        self.eos_id = self._require_id(self.eos_token, "eos_token")
        self.pad_id = self._require_id(self.pad_token, "pad_token")
        self.bos_id = self.hf.token_to_id(self.bos_token) if self.bos_token else None
        added = self.hf.get_added_tokens_decoder()
        # <|im_end|> always ends a ChatML turn, even where eos is <|endoftext|> (Qwen-style base models)
        self.stop_ids = {self.eos_id} | {
            i for i in (self.hf.token_to_id(ENDOFTEXT), self.hf.token_to_id(IM_END)) if i is not None and i in added
        }
        # Copies without a post-processor, so offsets are raw character spans (GPT-2's ByteLevel post-processor
        # trims whitespace off them), and one that encodes special-token strings as plain text.
        spec = self.hf.to_str()
        post = self.hf.post_processor
        if post is None or (type(post).__name__ == "ByteLevel" and post.trim_offsets is False):
            self._enc = self.hf  # its post-processor changes nothing here: no ~20 MiB copy (SmolLM2's 49k tokens)
        else:
            self._enc = HFTokenizer.from_str(spec)
            self._enc.post_processor = None
        self._plain = HFTokenizer.from_str(spec)
        self._plain.post_processor = None
        self._plain.encode_special_tokens = True
        controls = sorted((t.content for t in added.values() if t.special), key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, controls)) or "(?!)")
        self._marked_re = re.compile(f"{_MARK_START}({self._control_re.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]")
        self._newline_ids = self._plain.encode("\n", add_special_tokens=False).ids

    def _require_id(self, token: str | None, field: str) -> int:
        i = self.hf.token_to_id(token) if token else None
        if i is None:
            raise ChatforgeError(f"tokenizer: {field} {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    # -- plain text ---------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Encode text as text: a special-token string in it becomes ordinary characters, never a control token."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)

    # -- chat ---------------------------------------------------------------------------------------------------

    def _template_kwargs(self) -> dict:
        values = {**self.extra_config, "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token}
        return {k: t for k in _TEMPLATE_KWARGS if (t := _token_text(values.get(k))) is not None}

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        import jinja2

        if not self.chat_template:
            raise ChatforgeError("tokenizer: no chat template (for a base tokenizer, call add_chat_tokens() first)")
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, tools=tools or None, documents=None, add_generation_prompt=add_generation_prompt,
                **self._template_kwargs(),
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatforgeError(f"chat template: {e}") from None

    def _with_tools(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
        """Messages and tools as the template gets them: a conversation that defines, calls or answers tools goes
        through tool_messages (native for a template that reads `tools`, else the Hermes rewrite), so training data,
        generation prompts and the server render tools one way."""
        if not tools and not any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool")
                                 for m in messages or []):
            return messages, None
        native = uses_tools(self)
        return tool_messages(messages, tools, native), tools if native else None

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False,
                    tools: list[dict] | None = None) -> str:
        """The conversation as the chat template writes it (what the model sees, before tokenization)."""
        messages, tools = self._with_tools(messages, tools)
        return self._render(_check_messages(messages), add_generation_prompt, tools)

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """Token ids and the loss mask: 1 on each assistant message's content and its closing end-of-turn token.

        The end-of-turn token is in the mask so the model learns to stop. `tools` (OpenAI function definitions) go
        to the template as transformers' apply_chat_template(tools=...) passes them (generation/tools.py); assistant
        `tool_calls` are trained like any assistant reply, `tool` results are context (not in the mask).
        """
        marked, tools, text = self._prepared(messages, tools, add_generation_prompt)
        ids, starts = self._encode_marked(text)
        spans = self._spans_in_one_render(marked, text, add_generation_prompt, tools)
        if spans is None:
            spans = self._spans_by_prefixes(marked, text, tools)
        return ids, self._token_mask(starts, spans)

    def render_content(self, messages: list[dict],
                       tools: list[dict] | None = None) -> tuple[list[int], list[int]] | None:
        """render(messages)'s ids with a mask on every message's content and its end-of-turn token (pretraining on
        dialogs: all the text, none of the role headers), from one render; None when the template changes the
        tagged content, and the caller probes the renderer message by message (data.pack)."""
        marked, tools, text = self._prepared(messages, tools, False)
        spans = self._spans_in_one_render(marked, text, False, tools, every_message=True)
        if spans is None:
            return None
        ids, starts = self._encode_marked(text)
        return ids, self._token_mask(starts, spans)

    def _prepared(self, messages: list[dict], tools: list[dict] | None,
                  add_generation_prompt: bool) -> tuple[list[dict], list[dict] | None, str]:
        """(messages and tools as the template gets them, control-token strings marked as text, the rendered text)."""
        messages, tools = self._with_tools(messages, tools)
        marked = _mark(_check_messages(messages), self._control_re)
        tools = _mark(tools, self._control_re) if tools else None  # a description cannot forge a control token
        return marked, tools, self._render(marked, add_generation_prompt, tools)

    @staticmethod
    def _token_mask(starts: list[int], spans: list[tuple[int, int]]) -> list[int]:
        """1 for each token whose start offset falls in one of the (sorted, disjoint) character spans."""
        if not spans:
            return [0] * len(starts)
        import numpy as np

        begins, ends = (np.array(side) for side in zip(*spans))
        at = np.asarray(starts)
        k = np.searchsorted(ends, at, side="right")  # the first span not ended before each token starts
        inside = k < len(spans)
        inside[inside] &= at[inside] >= begins[k[inside]]
        return inside.astype(np.int64).tolist()

    def _spans_in_one_render(self, marked: list[dict], text: str, add_generation_prompt: bool,
                             tools: list[dict] | None, every_message: bool = False) -> list[tuple[int, int]] | None:
        """Each assistant reply's [content start, end of its end-of-turn) in `text`, from one render with every
        message's index tagged before its content: linear in the conversation's length, where rendering every
        prefix was quadratic (a 384-message dialog took seconds). None when the template does not keep the tags as
        given (it trims, escapes or drops content), when the generation prompt does not end where the first or the
        last reply starts, or when a reply's end-of-turn is not before the next message: then the prefix renders
        decide (and name the problem). every_message: the span of every message, whatever its role."""
        replies = [i for i, m in enumerate(marked) if every_message or m["role"] == "assistant"]
        if not replies or not all(isinstance(m.get("content"), str) for m in marked):
            return None
        tagged = [{**m, "content": f"\U000f0002{i}\U000f0003{m['content']}"} for i, m in enumerate(marked)]
        rendered = self._render(tagged, add_generation_prompt, tools)
        found: dict[int, int] = {}
        pieces, pos, removed = [], 0, 0
        for m in _TAG.finditer(rendered):
            pieces.append(rendered[pos:m.start()])
            found.setdefault(int(m.group(1)), m.start() - removed)
            removed += m.end() - m.start()
            pos = m.end()
        pieces.append(rendered[pos:])
        if "".join(pieces) != text or sorted(found) != list(range(len(marked))):
            return None
        for i in set() if every_message else {replies[0], replies[-1]}:  # where the generation prompt ends
            if self._render(marked[:i], True, tools) != text[:found[i]]:
                return None
        spans = []
        for i in replies:
            try:
                end = self._end_of_turn(text, found[i], i)
            except ChatforgeError:
                return None
            if i + 1 < len(marked) and end > found[i + 1]:
                return None
            spans.append((found[i], end))
        return spans

    def _spans_by_prefixes(self, marked: list[dict], text: str, tools: list[dict] | None) -> list[tuple[int, int]]:
        """The spans from rendering the prefix before and through each reply (any prefix-stable template)."""
        spans = []
        for i, message in enumerate(marked):
            if message["role"] != "assistant":
                continue
            head = self._render(marked[:i], True, tools)
            upto = self._render(marked[: i + 1], False, tools)
            if not (upto.startswith(head) and text.startswith(upto)):
                raise ChatforgeError(
                    f"chat template is not prefix-stable: rendering messages[:{i}] with a generation prompt is not a "
                    f"prefix of rendering messages[:{i + 1}], so the assistant tokens of message {i} cannot be found"
                )
            spans.append((len(head), self._end_of_turn(upto, len(head), i)))
        return spans

    def _end_of_turn(self, text: str, start: int, index: int) -> int:
        """End of the first template-written end-of-turn token at or after `start`."""
        enders = [self.eos_token] + ([IM_END] if self.hf.token_to_id(IM_END) is not None else [])
        best = None
        for ender in enders:
            pos = text.find(ender, start)
            while pos > 0 and text[pos - 1] == _MARK_START:  # a marked copy typed into the content
                pos = text.find(ender, pos + 1)
            if pos >= 0 and (best is None or pos + len(ender) < best):
                best = pos + len(ender)
        if best is None:
            raise ChatforgeError(
                f"chat template does not close assistant message {index} with the end-of-turn token "
                f"{self.eos_token!r}, so the model could not learn to stop"
            )
        return best

    def _encode_marked(self, text: str) -> tuple[list[int], list[int]]:
        """Ids and each token's start offset in `text`, encoding marked control-token strings as plain text.

        Mirrors transformers' encoding of a sanitized chat (pieces after the first are encoded behind a newline that
        is then removed, so SentencePiece doesn't add its start-of-text space), so ids match it exactly.
        """
        first = self._enc.encode(text, add_special_tokens=False)
        if _MARK_START not in text and _MARK_END not in text:
            return first.ids, [s for s, _ in first.offsets]
        ids: list[int] = []
        starts: list[int] = []
        pos, piece_index = 0, 0
        for m in list(self._marked_re.finditer(text)) + [None]:
            end = m.start() if m else len(text)
            pieces = [(text[pos:end], pos, False)]
            if m and m.group(1):
                pieces.append((m.group(1), m.start(1), True))
            for piece, offset, as_text in pieces:
                if piece:
                    self._encode_piece(piece, offset, as_text, piece_index == 0, ids, starts)
                piece_index += 1
            pos = m.end() if m else end
        return ids, starts

    def _encode_piece(self, piece: str, offset: int, as_text: bool, first: bool, ids: list, starts: list) -> None:
        enc = self._plain if as_text else self._enc
        if not first:
            e = enc.encode("\n" + piece, add_special_tokens=False)
            n = len(self._newline_ids)
            if e.ids[:n] == self._newline_ids:
                ids.extend(e.ids[n:])
                starts.extend(offset + s - 1 for s, _ in e.offsets[n:])
                return
        e = enc.encode(piece, add_special_tokens=False)
        if as_text and self.hf.token_to_id(piece) in e.ids:
            raise ChatforgeError(f"tokenizer: cannot encode {piece!r} as text, it produces the control token")
        ids.extend(e.ids)
        starts.extend(offset + s for s, _ in e.offsets)

    def format_labels(self, ids: list[int], mask: list[int], color: bool = True) -> str:
        """The rendered conversation with the trained tokens highlighted, then a legend and the counts."""
        if len(ids) != len(mask):
            raise ValueError(f"{len(ids)} ids but {len(mask)} mask values")
        on, off = ("\033[32m", "\033[0m") if color else ("[[", "]]")
        runs: list[list] = []  # [mask value, text]
        stream = self.stream_decoder()
        for i, m in enumerate(mask):
            chunk = stream.push(ids[i])
            if runs and runs[-1][0] == m:
                runs[-1][1] += chunk
            else:
                runs.append([m, chunk])
        if runs:
            runs[-1][1] += stream.flush()
        body = "".join(on + t + off if m else t for m, t in runs if t)
        trained = sum(mask)
        share = 100.0 * trained / len(ids) if ids else 0.0
        legend = f"legend: {on}trained{off} tokens carry the loss; the rest is context only"
        return f"{body}\n{legend}\ntrained tokens: {trained} of {len(ids)} ({share:.1f}%)"

    # -- special tokens -----------------------------------------------------------------------------------------

    def has_chat_tokens(self) -> bool:
        """True when chats can be rendered: there is a chat template and its end-of-turn token is in the vocab."""
        return bool(self.chat_template) and self.hf.token_to_id(self.eos_token) is not None

    def add_chat_tokens(self) -> int:
        """Add the ChatML special tokens a base tokenizer (GPT-2) lacks; returns how many ids were added.

        The template and end-of-turn token switch to ChatML only when there was no template, so a pretrained chat
        model keeps its own. The caller resizes the embeddings by the returned count.
        """
        from tokenizers import AddedToken

        missing = [t for t in (IM_START, IM_END, PAD) if self.hf.token_to_id(t) is None]
        before = self.vocab_size
        self.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        if self.pad_token == self.eos_token:  # a pad that is also the stop token hides where turns end
            self.pad_token = PAD
        if not self.chat_template:
            self.chat_template = CHATML_TEMPLATE
            self.eos_token = IM_END
        self._refresh()
        return self.vocab_size - before

    # -- files --------------------------------------------------------------------------------------------------

    def save(self, folder: str) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json as transformers reads them."""
        from chatforge.io import atomic_write_text

        os.makedirs(folder, exist_ok=True)
        config = {k: v for k, v in self.extra_config.items() if k not in _OWN_CONFIG_KEYS}
        config.update({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.chat_template or None,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                         "single_word": t.single_word, "special": t.special}
                for i, t in sorted(self.hf.get_added_tokens_decoder().items())
            },
        })
        config = {k: v for k, v in config.items() if v is not None}
        special_map = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                         ("pad_token", self.pad_token)) if v is not None}
        atomic_write_text(os.path.join(folder, "tokenizer.json"), self.hf.to_str(pretty=True))
        config_text = json.dumps(config, indent=2, ensure_ascii=False)
        atomic_write_text(os.path.join(folder, "tokenizer_config.json"), config_text)
        atomic_write_text(os.path.join(folder, "special_tokens_map.json"), json.dumps(special_map, indent=2))
        jinja_file = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(jinja_file):  # transformers prefers this file over the config's template: keep them equal
            atomic_write_text(jinja_file, self.chat_template)

    @classmethod
    def load(cls, folder: str) -> Tokenizer:
        """Read a folder written by chatforge or by transformers' save_pretrained (tokenizer.json required)."""
        from tokenizers import Tokenizer as HFTokenizer

        tok_path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise ChatforgeError(f"{tok_path}: file not found (a tokenizer folder needs tokenizer.json)")
        config = read_json(os.path.join(folder, "tokenizer_config.json"))
        try:
            hf = HFTokenizer.from_file(tok_path)
        except Exception as e:  # the Rust parser raises a bare Exception with its own message
            raise ChatforgeError(f"{tok_path}: not a valid tokenizers file ({e})") from None
        jinja_file = os.path.join(folder, "chat_template.jinja")
        jinja = None
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                jinja = f.read()
        return cls._from_parts(hf, config, jinja)

    @classmethod
    def from_strings(cls, tokenizer_json: str, config: dict, chat_template: str | None = None,
                     where: str = "tokenizer.json") -> Tokenizer:
        """The same as `load`, from the files' contents held in memory (an encrypted model folder: no plaintext
        on disk). chat_template: chat_template.jinja's text, which wins over the config's, as in `load`."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust parser raises a bare Exception with its own message
            raise ChatforgeError(f"{where}: not a valid tokenizers file ({e})") from None
        return cls._from_parts(hf, config, chat_template)

    @classmethod
    def _from_parts(cls, hf, config: dict, jinja: str | None) -> Tokenizer:
        template = config.get("chat_template") or ""
        if isinstance(template, list):  # the older multi-template form: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or ""
        if jinja is not None:
            template = jinja
        eos = _token_text(config.get("eos_token"))
        if eos is None:
            eos = IM_END if hf.token_to_id(IM_END) is not None else ENDOFTEXT
        return cls(hf, template, eos_token=eos, pad_token=_token_text(config.get("pad_token")),
                   bos_token=_token_text(config.get("bos_token")), extra_config=config)


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins -> byte values (bytes that print as themselves keep their code point)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The raw bytes one token stands for (a piece of a UTF-8 character for byte tokens), as logprobs report them."""
    piece = tokenizer.hf.id_to_token(token_id)
    if piece is None:
        return b""
    if token_id in tokenizer.hf.get_added_tokens_decoder():  # added tokens are stored as their text
        return piece.encode()
    if type(tokenizer.hf.decoder).__name__ == "ByteLevel":
        table = _byte_level_table()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece byte fallback
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


class StreamDecoder:
    """Turns ids into text as they arrive, holding back a character until all of its bytes have arrived.

    It decodes a small window (the last emitted chunk's ids as context, plus the ids not yet emitted) rather than the
    whole history, so each push costs O(window); the context keeps decoders that treat the first token specially
    (SentencePiece's leading space) consistent, and the chunks concatenate to exactly `decode(all ids)`.
    """

    _MAX_PENDING = 8  # more held ids than any UTF-8 character needs means truly invalid bytes: emit them

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._decode = lambda ids: tokenizer.decode(ids, skip_special=skip_special)
        self._ids: list[int] = []
        self._read = 0  # ids before this index were emitted; ids before it are the context

    def push(self, token_id: int) -> str:
        """Newly completed text; '' while a character is still incomplete."""
        self._ids.append(token_id)
        context = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if not text.endswith("\ufffd"):
            return self._advance(len(self._ids), text[len(context):])
        if len(self._ids) - self._read < self._MAX_PENDING:
            return ""
        # Held too long to be one incomplete character: emit up to the longest clean prefix, or everything.
        for upto in range(len(self._ids) - 1, self._read, -1):
            clean = self._decode(self._ids[:upto])
            if not clean.endswith("\ufffd"):
                return self._advance(upto, clean[len(context):])
        return self._advance(len(self._ids), text[len(context):])

    def flush(self) -> str:
        """Whatever is left when generation ends. A character cut off by the end (max tokens, or end-of-turn in the
        middle of its bytes) is dropped rather than shown as U+FFFD: its bytes are not text yet (logprobs still report
        them). Bytes that could never form a character do come out as U+FFFD."""
        context = self._decode(self._ids[: self._read])
        chunk = self._decode(self._ids)[len(context):]
        if chunk.endswith("\ufffd"):
            pending = b"".join(token_bytes(self._tokenizer, i) for i in self._ids[self._read:])
            utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            utf8.decode(pending, final=False)
            if utf8.getstate()[0]:  # the bytes end in the start of a character: decode shows it as one U+FFFD
                chunk = chunk[:-1]
        self._ids, self._read = [], 0
        return chunk

    def _advance(self, upto: int, chunk: str) -> str:
        """Make ids[read:upto] the new context and keep ids[upto:] pending."""
        self._ids = self._ids[self._read:]
        self._read = upto - self._read
        return chunk


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, show_progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE with the ChatML specials at ids 0..3 and the ChatML template.

    Every byte is in the initial alphabet, so any text encodes losslessly, and there is no normalizer: the data
    cleaning step decides about Unicode normalization, not the tokenizer.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    floor = len(SPECIALS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= floor:
        raise ChatforgeError(f"vocab_size: must be more than {floor} (4 specials + 256 bytes), got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf, CHATML_TEMPLATE, eos_token=IM_END, pad_token=PAD, bos_token=None)


def record_texts(records: Iterable[dict]) -> Iterable[str]:
    """Every message content and plain text of dataset records: what a tokenizer is trained on."""
    for r in records:
        if "messages" in r:
            for m in r["messages"]:
                yield m["content"]
        elif "text" in r:
            yield r["text"]


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float | None:
    """UTF-8 bytes per token over the texts (higher compresses better); None when there is no text."""
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tokenizer.encode(text))
    return n_bytes / n_tokens if n_tokens else None
