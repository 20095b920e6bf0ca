"""Readers for the input formats, format detection, and conversion to the canonical record.

A canonical record is {"messages": [{"role", "content"}, ...]} (a conversation) or {"text": str} (plain text for
pretraining). Readers yield each raw record with its location ("file:line" or "file:record N") and never stop at a
bad record: they yield an `Invalid` marker instead, so that `to_record` is the one place that turns any problem into
ChatforgeError("<location>: <reason>") — which the caller either raises or, with --skip-invalid, counts. A CSV reader
also yields the header row it skipped as a `Header`, so the caller can report that decision.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple

from chatforge.errors import ChatforgeError

FORMATS = ("messages", "sharegpt", "alpaca", "chatterbot", "csv", "text", "preference")  # preference: data/preference.py
JSONL_EXTS = (".jsonl", ".ndjson")
JSON_EXTS = (".json",)
YAML_EXTS = (".yml", ".yaml")
CSV_EXTS = (".csv", ".tsv")
TEXT_EXTS = (".txt", ".text", ".md")
SUPPORTED_EXTS = JSONL_EXTS + JSON_EXTS + YAML_EXTS + CSV_EXTS + TEXT_EXTS

ROLES = ("system", "user", "assistant")
# The names other tools give the roles, accepted in every format (case and surrounding spaces do not matter).
ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "chatgpt": "assistant", "model": "assistant",
}
_ROLE_CHOICES = "system, user or assistant (or human, gpt, bot, chatgpt, model)"
# Words that name a party or a field: a first CSV row whose every cell is made of them is a header.
CSV_HEADER_WORDS = {
    "prompt", "response", "question", "answer", "input", "output", "user", "assistant", "instruction", "query",
    "reply", "completion", "message", "text", "customer", "agent", "client", "human", "bot", "chatbot", "support",
    "staff", "speaker", "system", "context", "utterance", "request", "q", "a", "from", "to", "role", "content",
    "conversation", "dialog", "dialogue", "turn", "id", "source", "target", "src", "tgt", "label", "model", "ai",
    "visitor", "operator", "representative", "rep", "employee", "service", "buyer", "seller", "shopper", "person",
    "patient", "doctor", "student", "teacher", "tutor", "learner", "interviewer", "interviewee", "caller", "reply",
    "inquiry", "enquiry", "ask", "asker", "answerer", "sender", "recipient", "gpt", "prompts", "responses",
    "questions", "answers", "inputs", "outputs", "messages", "replies", "and", "of", "the",
    # other fields a CSV export carries beside the two texts
    "score", "rating", "category", "topic", "intent", "language", "lang", "date", "time", "timestamp", "name",
    "title", "tag", "tags", "index", "no", "number", "num", "type", "kind", "note", "notes", "comment", "count",
    "status", "session", "thread", "channel", "subject", "uuid", "key",
    "问题", "回答", "答案", "问", "答", "用户", "客户", "顾客", "客服", "助手", "机器人", "提问", "回复", "输入", "输出",
    "对话", "内容", "角色", "用户问题", "客服回答", "用户输入", "助手回答", "系统",
}

_BOM = "\ufeff"
_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")  # what undecodable bytes become under errors="surrogateescape"


class Invalid(NamedTuple):
    """A record the reader could not parse; `to_record` raises it as an error."""

    reason: str


class Skip(NamedTuple):
    """A raw record a reader drops by a rule of its source (not an error): counted under `reason`, never fatal."""

    reason: str
    detail: str


class Item(NamedTuple):
    """A canonical record and where it came from, as it flows through prepare's steps (so drops can be named)."""

    source: str  # the source's name, as in the report
    location: str  # "file:line" or "file:record N"
    record: dict
    canonical: bytes | None = None  # the record's canonical JSON, once de-duplication has computed it


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _show(value: Any, limit: int = 40) -> str:
    """A short one-line rendering of a user's value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    """JSON-speak type name (what the user wrote, not Python's name for it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def check_format(fmt: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise ChatforgeError(f"unknown format {_show(fmt)}; expected one of {', '.join(FORMATS)}")


def check_readable(path: str, name: str | None = None) -> None:
    """Fail early, in one line, for a path that is not a readable file."""
    name = name or path
    if not os.path.exists(path):
        raise ChatforgeError(f"{name}: file not found")
    if os.path.isdir(path):
        raise ChatforgeError(f"{name}: is a folder, expected a file")
    if not os.access(path, os.R_OK):
        raise ChatforgeError(f"{name}: permission denied")


def _read_bytes(path: str, name: str, data: bytes | None = None) -> bytes:
    """The file's bytes; `data` when given (an encrypted file's plaintext, decrypted in memory: see data/sources.py)."""
    if data is not None:
        return data
    check_readable(path, name)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ChatforgeError(f"{name}: cannot read ({e.strerror})") from None


def check_encoding(encoding: str) -> str:
    """The codec's canonical name ("utf-8", "gbk", ...), or a one-line error for an unknown one."""
    try:
        return codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise ChatforgeError(f"unknown encoding {_show(encoding)}; expected a Python codec name such as "
                             "utf-8, gbk, gb18030, big5, shift_jis or cp1252") from None


def _not_decodable(encoding: str, detail: str = "") -> str:
    """The reason for text that does not decode; for UTF-8 it says how to read a file in another encoding."""
    if codecs.lookup(encoding).name in ("utf-8", "utf-8-sig"):
        return (f"not valid UTF-8{detail}; if the file is in another encoding, pass it with --encoding "
                "(e.g. --encoding gbk for Simplified Chinese from Windows)")
    return f"not valid {encoding}{detail}"


def _decode_error(data: bytes, err: UnicodeDecodeError, encoding: str) -> tuple[int, str]:
    """(line, reason) for the first byte that does not decode."""
    line_start = data.rfind(b"\n", 0, err.start) + 1
    column = len(data[line_start:err.start].decode(encoding, "replace")) + 1
    line = data.count(b"\n", 0, err.start) + 1
    return line, _not_decodable(encoding, f" (byte 0x{data[err.start]:02x} at column {column})")


def _decode_strict(data: bytes, name: str, encoding: str = "utf-8") -> str | tuple[str, Invalid]:
    """The text, or (location, Invalid) for the first undecodable byte."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line, reason = _decode_error(data, e, encoding)
        return f"{name}:{line}", Invalid(reason)
    return text[1:] if text.startswith(_BOM) else text


def _ascii_compatible(encoding: str) -> bool:
    """Newlines are single 0x0a bytes (UTF-8, GBK, Big5, Shift-JIS, cp125x; not UTF-16): a file splits into lines
    before decoding."""
    try:
        return "\n a".encode(encoding) == b"\n a"
    except (UnicodeError, LookupError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# Detection


def _first_json_value(text: str) -> Any:
    """The first record of a JSON array / object / JSONL text, or None when nothing parses."""
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if text[i : i + 1] == "[":
        j = i + 1
        while j < len(text) and text[j].isspace():
            j += 1
        try:
            return decoder.raw_decode(text, j)[0]
        except json.JSONDecodeError:
            return None
    try:
        return decoder.raw_decode(text, i)[0]
    except json.JSONDecodeError:
        pass
    for line in text.split("\n")[:1000]:  # JSONL whose first line is broken: detect from the first good one
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def _format_of(first: Any, name: str) -> str:
    if isinstance(first, dict):
        if "chosen" in first or "rejected" in first:  # a preference pair (prompt/messages + chosen + rejected)
            return "preference"
        if "messages" in first:
            return "messages"
        if "conversations" in first:
            conv = first["conversations"]
            if isinstance(conv, list) and conv and isinstance(conv[0], list):
                return "chatterbot"
            return "sharegpt"
        if "instruction" in first:
            return "alpaca"
        if "text" in first:
            return "text"
        fields = ", ".join(_show(k) for k in list(first)[:6]) or "none"
        raise ChatforgeError(
            f"{name}: cannot tell the format from the first record (fields: {fields}); expected 'messages', "
            "'conversations' (ShareGPT), 'instruction'/'output' (Alpaca) or 'text'; pass --format"
        )
    raise ChatforgeError(f"{name}: cannot tell the format: the first record is a {_kind(first)}, expected an object")


def detect_format(path: str, name: str | None = None, data: bytes | None = None) -> str:
    """The format of a file: by extension, then for JSON/JSONL by the fields of the first record (of `data`, the
    file's bytes, when given)."""
    name = name or path
    if data is None:
        check_readable(path, name)
    ext = _ext(path)
    if ext in YAML_EXTS:
        return "chatterbot"
    if ext in CSV_EXTS:
        return "csv"
    if ext in TEXT_EXTS:
        return "text"
    if ext in JSONL_EXTS + JSON_EXTS:
        if data is not None:
            head, complete = data, True
        else:
            with open(path, "rb") as f:
                head = f.read(1 << 20)
                complete = not f.read(1)
        first = _first_json_value(head.decode("utf-8", "replace").lstrip(_BOM))
        if first is None and not complete:  # the first record may be longer than the peek
            first = _first_json_value(_read_bytes(path, name).decode("utf-8", "replace").lstrip(_BOM))
        # Unparsable: call it "messages" and let the reader report the exact line that is broken.
        return "messages" if first is None else _format_of(first, name)
    raise ChatforgeError(
        f"{name}: unknown file type '{ext or '(no extension)'}'; expected one of {', '.join(SUPPORTED_EXTS)}"
        " (or pass --format)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Readers: (location, raw record), bad records as Invalid


def _jsonl_records(
    lines: Iterable[tuple[int, bytes | str]], name: str, encoding: str = "utf-8"
) -> Iterator[tuple[str, Any]]:
    for lineno, raw in lines:
        loc = f"{name}:{lineno}"
        if isinstance(raw, bytes):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                yield loc, Invalid(_decode_error(raw, e, encoding)[1])
                continue
        else:
            line = raw
        if lineno == 1:
            line = line.lstrip(_BOM)
        if not line.strip():
            continue
        try:
            yield loc, json.loads(line)
        except json.JSONDecodeError as e:
            yield loc, Invalid(f"invalid JSON ({e.msg})")


def _read_jsonl(path: str, name: str, encoding: str = "utf-8", data: bytes | None = None) -> Iterator[tuple[str, Any]]:
    if data is None:
        check_readable(path, name)
    if not _ascii_compatible(encoding):  # UTF-16 and the like: decode first, then split
        text = _decode_strict(_read_bytes(path, name, data), name, encoding)
        if isinstance(text, tuple):
            yield text
        else:
            yield from _jsonl_records(enumerate(text.split("\n"), 1), name)
        return
    if data is not None:
        yield from _jsonl_records(enumerate(io.BytesIO(data), 1), name, encoding)
        return
    try:
        with open(path, "rb") as f:
            yield from _jsonl_records(enumerate(f, 1), name, encoding)
    except OSError as e:
        raise ChatforgeError(f"{name}: cannot read ({e.strerror})") from None


def _read_json(path: str, name: str, encoding: str = "utf-8", data: bytes | None = None) -> Iterator[tuple[str, Any]]:
    """A JSON array of records, a single record, or JSONL that happens to be named .json."""
    text = _decode_strict(_read_bytes(path, name, data), name, encoding)
    if isinstance(text, tuple):
        yield text
        return
    if not text.strip():
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _jsonl_records(enumerate(text.split("\n"), 1), name)
        else:
            yield f"{name}:{e.lineno}", Invalid(f"invalid JSON ({e.msg})")
        return
    if isinstance(doc, list):
        for i, record in enumerate(doc, 1):
            yield f"{name}:record {i}", record
    else:
        yield f"{name}:record 1", doc


def _read_yaml(path: str, name: str, encoding: str = "utf-8", data: bytes | None = None) -> Iterator[tuple[str, Any]]:
    """chatterbot-corpus YAML: `conversations: [[prompt, reply, ...], ...]`.

    Read with the base loader, which keeps every scalar a string: `- 1984` stays "1984", `- yes` stays "yes".
    """
    import yaml

    text = _decode_strict(_read_bytes(path, name, data), name, encoding)
    if isinstance(text, tuple):
        yield text
        return
    try:
        doc = yaml.load(text, Loader=getattr(yaml, "CBaseLoader", yaml.BaseLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        yield (f"{name}:{mark.line + 1}" if mark else name), Invalid(f"invalid YAML ({problem})")
        return
    if doc is None or doc == "":
        return
    if isinstance(doc, dict):
        if "conversations" not in doc:
            yield name, Invalid(
                "missing field 'conversations' (chatterbot-corpus format: conversations: [[prompt, reply, ...], ...])"
            )
            return
        doc = doc["conversations"]
    if not isinstance(doc, list):
        yield name, Invalid(f"'conversations' must be a list of conversations, got {_kind(doc)}")
        return
    for i, conversation in enumerate(doc, 1):
        yield f"{name}:record {i}", conversation


def _decode_lenient(data: bytes, encoding: str = "utf-8") -> str:
    """Decode keeping bad bytes as surrogate escapes, so one bad record does not hide the rest of the file."""
    text = data.decode(encoding, "surrogateescape")
    return text[1:] if text.startswith(_BOM) else text


@dataclass(frozen=True)
class CsvOptions:
    """How a CSV file is read. Every field has an automatic default, and each can be set when the guess is wrong.

    delimiter: None = tab for .tsv, else sniffed among , ; tab |.
    header: "auto" (a first row that names the columns is a header), "yes" or "no".
    columns: the (user, assistant) columns, by header name or 1-based number; None = a file of exactly two columns.
    """

    delimiter: str | None = None
    header: str = "auto"
    columns: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        delimiter = {"tab": "\t", "\\t": "\t"}.get(self.delimiter, self.delimiter) if self.delimiter else None
        if delimiter is not None and len(delimiter) != 1:
            raise ChatforgeError(f"csv_delimiter: expected one character (or 'tab'), got {_show(self.delimiter)}")
        object.__setattr__(self, "delimiter", delimiter)
        if self.header not in ("auto", "yes", "no"):
            raise ChatforgeError(f"csv_header: expected auto, yes or no, got {_show(self.header)}")
        columns = self.columns
        if isinstance(columns, str):
            columns = tuple(c.strip() for c in columns.split(","))
        if columns is not None:
            columns = tuple(str(c).strip() for c in columns)
            if len(columns) != 2 or not all(columns) or columns[0].lower() == columns[1].lower():
                raise ChatforgeError(f"csv_columns: expected two different columns USER,ASSISTANT (names from the "
                                     f"header or 1-based numbers), got {_show(self.columns)}")
            if self.header == "no" and not all(c.isdigit() for c in columns):
                raise ChatforgeError("csv_columns: column names need a header; pass numbers with --csv-header no")
            if any(c.isdigit() and int(c) < 1 for c in columns):
                raise ChatforgeError(f"csv_columns: column numbers start at 1, got {_show(self.columns)}")
        object.__setattr__(self, "columns", columns)


class Header(NamedTuple):
    """What the CSV reader decided about a first row, for the report: the user sees every guess."""

    cells: list[str]
    decision: str  # "given" (the user said it is a header), "detected" (skipped as a header), or "doubt" (read as
    # a conversation, though it looks like a header)


_WORD_SEPARATORS = re.compile(r"[\W_]+")
_TITLE = re.compile(r"[^\W\d_][\w '/&()-]{0,39}")


def _is_header_cell(cell: str) -> bool:
    """Made of header words only: "Customer", "user_message", "Question / Answer", "回答" (not "q10")."""
    words = [w for w in _WORD_SEPARATORS.split(cell.lower()) if w]
    return bool(words) and all(w in CSV_HEADER_WORDS for w in words)


def _title_like(cell: str) -> bool:
    """Short words naming a column ("Kunde", "Customer question"), not a sentence."""
    cell = cell.strip()
    return bool(_TITLE.fullmatch(cell)) and len(cell.split()) <= 3


def looks_like_header(first: list[str], rows: list[list[str]]) -> str | None:
    """Is the first CSV row a header? "yes" when every cell names a party or a field (Customer, Agent, question,
    回答); "maybe" when, in csv.Sniffer's manner, the row differs in kind from the rows below it (short titles
    above columns of sentences: "Kunde,Mitarbeiter", but also "Hi,Hello"); else None. Only "yes" is skipped:
    a "maybe" is read as data and reported, since guessing wrong would silently lose a real first exchange."""
    if not first or not all(c.strip() for c in first):
        return None
    if all(_is_header_cell(c) for c in first):
        return "yes"
    if not rows or not all(_title_like(c) for c in first):
        return None
    for i in range(len(first)):
        below = [r[i] for r in rows if len(r) > i]
        if not below or sum(map(_title_like, below)) * 2 >= len(below):
            return None
    return "maybe"


def sniff_delimiter(sample: str) -> str:
    """The delimiter of a CSV sample among , ; tab | (csv.Sniffer); "," when it cannot tell."""
    sample = sample[: sample.rfind("\n") + 1] or sample  # whole lines only
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _csv_rows(text: str, delimiter: str, name: str) -> Iterator[tuple[int, list[str] | Invalid]]:
    """(starting line, cells) for every non-empty row; a quoted cell may span lines."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, Invalid(f"invalid CSV ({e})")
            continue
        if row:
            yield start, row


def _column_index(column: str, header: list[str] | None, name: str) -> int:
    if column.isdigit():
        return int(column) - 1
    names = [c.strip().lower() for c in header or []]
    if column.lower() not in names:
        shown = ", ".join(c.strip() for c in header or []) or "none"
        raise ChatforgeError(f"{name}:1: no column named {_show(column)} in the header (columns: {shown})")
    return names.index(column.lower())


def _read_csv(path: str, name: str, encoding: str, options: CsvOptions,
              data: bytes | None = None) -> Iterator[tuple[str, Any]]:
    text = _decode_lenient(_read_bytes(path, name, data), encoding)
    delimiter = options.delimiter or ("\t" if _ext(path) == ".tsv" else sniff_delimiter(text[: 1 << 16]))
    rows = _csv_rows(text, delimiter, name)
    head = [next(rows, None) for _ in range(51)]  # the first row and a sample to judge it by
    head = [r for r in head if r is not None]
    header: list[str] | None = None
    if head and not isinstance(head[0][1], Invalid):
        first = head[0][1]
        sample = [r for _, r in head[1:] if not isinstance(r, Invalid)]
        named = options.columns is not None and not all(c.isdigit() for c in options.columns)
        guess = looks_like_header(first, sample) if options.header == "auto" and not named else None
        if options.header == "yes" or named or guess == "yes":
            header = first
            head = head[1:]
            yield f"{name}:1", Header(first, "detected" if guess else "given")
        elif guess == "maybe":
            yield f"{name}:1", Header(first, "doubt")
    picks = None
    if options.columns is not None:
        picks = [_column_index(c, header, name) for c in options.columns]
    needed = 2 if picks is None else max(picks) + 1
    for start, row in (*head, *rows):
        loc = f"{name}:{start}"
        if isinstance(row, Invalid):
            yield loc, row
        elif any(_SURROGATE_ESCAPE.search(c) for c in row):
            yield loc, Invalid(_not_decodable(encoding))
        elif len(row) < needed or (picks is None and len(row) > 2):
            expected = "2 columns (prompt, response)" if picks is None else f"at least {needed} columns"
            advice = ("choose two with --csv-columns USER,ASSISTANT" if len(row) > needed
                      else "if the file uses another delimiter, pass --csv-delimiter")
            yield loc, Invalid(f"expected {expected}, got {len(row)} (delimiter {_show(delimiter)}); {advice}")
        else:
            yield loc, row if picks is None else [row[picks[0]], row[picks[1]]]


def _read_text(path: str, name: str, encoding: str = "utf-8", data: bytes | None = None) -> Iterator[tuple[str, Any]]:
    """Plain text: each block of lines separated by a blank line is one record (a paragraph or document)."""
    block: list[str] = []
    start = 0
    lines = _decode_lenient(_read_bytes(path, name, data), encoding).split("\n")
    for lineno, line in enumerate(lines + [""], 1):
        line = line.rstrip("\r")
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
            continue
        if block:
            text = "\n".join(block)
            block = []
            if _SURROGATE_ESCAPE.search(text):
                yield f"{name}:{start}", Invalid(_not_decodable(encoding))
            else:
                yield f"{name}:{start}", text


def read_records(
    path: str, fmt: str | None = None, *, name: str | None = None, encoding: str = "utf-8",
    csv_options: CsvOptions | None = None, data: bytes | None = None,
) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw record) for every record of one file; `name` is how the file is shown in locations.
    `data`: the file's bytes, read instead of `path` (which then only gives the extension): an encrypted file's
    plaintext, decrypted in memory.

    The container follows the format and the extension: chatterbot is YAML (or JSON), csv is CSV (tab-separated
    for .tsv, else the sniffed delimiter; a header row is yielded as `Header`), text is blank-line-separated blocks
    unless the file is JSON/JSONL ({"text": ...} records); the conversation formats read .jsonl/.ndjson line by
    line and anything else as JSON (falling back to JSONL).
    """
    name = name or path
    check_format(fmt)
    check_encoding(encoding)
    if data is None:
        check_readable(path, name)
    fmt = fmt or detect_format(path, name, data)
    ext = _ext(path)
    if fmt == "chatterbot":  # YAML, or JSON (which YAML reads too)
        yield from _read_yaml(path, name, encoding, data)
    elif fmt == "csv":
        yield from _read_csv(path, name, encoding, csv_options or CsvOptions(), data)
    elif fmt == "text" and ext not in JSON_EXTS + JSONL_EXTS:
        yield from _read_text(path, name, encoding, data)
    elif ext in YAML_EXTS:
        raise ChatforgeError(f"{name}: format '{fmt}' is read from JSON or JSONL files, not YAML")
    elif ext in JSONL_EXTS:
        yield from _read_jsonl(path, name, encoding, data)
    else:
        yield from _read_json(path, name, encoding, data)


# ---------------------------------------------------------------------------------------------------------------
# Conversion to the canonical record


def _fail(location: str, reason: str):
    raise ChatforgeError(f"{location}: {reason}")


def _object(raw: Any, location: str) -> dict:
    if not isinstance(raw, dict):
        _fail(location, f"expected an object, got {_kind(raw)}")
    return raw


def _string_field(obj: dict, key: str, location: str, required: bool = True) -> str:
    if key not in obj or (not required and obj[key] is None):
        if required:
            _fail(location, f"missing field '{key}'")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        _fail(location, f"field '{key}' must be a string, got {_kind(value)}")
    return value


def _content(value: Any, n: int, location: str) -> str:
    """Message content: a string, or OpenAI's list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                _fail(location, f"message {n} has a content part of type {_show(kind)}; only text is supported")
            texts.append(part["text"])
        return "".join(texts)
    if value is None:
        _fail(location, f"message {n} has no text content (content is null)")
    _fail(location, f"message {n} content must be a string, got {_kind(value)}")


def check_roles(messages: list[dict], location: str, first_number: int = 1) -> None:
    """Optional leading system, then user/assistant alternating from user, with at least one assistant turn."""
    if not messages:
        _fail(location, "the conversation has no messages")
    start = 1 if messages[0]["role"] == "system" else 0
    for i in range(start, len(messages)):
        role, n = messages[i]["role"], i + first_number
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role == expected:
            continue
        if role == "system":
            _fail(location, f"message {n} has role 'system'; only the first message may be system")
        if i == start:
            _fail(location, f"message {n} has role {_show(role)}; "
                            "a conversation starts with user (after an optional system)")
        _fail(location, f"message {n} has role {_show(role)}; "
                        f"expected {expected} (roles must alternate user/assistant)")
    if len(messages) - start < 2:
        _fail(location, "no assistant message; a conversation needs at least one user -> assistant exchange")


def _role(value: Any, n: int, field: str, location: str) -> str:
    """The canonical role of a message's role/from value, accepting the same aliases in every format."""
    role = ROLE_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None
    if role is None:
        _fail(location, f"message {n} has {field} {_show(value)}; expected {_ROLE_CHOICES}")
    return role


def _from_messages(raw: Any, location: str) -> dict:
    obj = _object(raw, location)
    if "messages" not in obj:
        if "text" in obj:  # a prepared file may mix conversations and plain text
            return _from_text(obj, location)
        _fail(location, "missing field 'messages'")
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        _fail(location, f"field 'messages' must be a list, got {_kind(msgs)}")
    tools = obj.get("tools")  # OpenAI tool definitions, rendered into the prompt as the server does
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        _fail(location, f"field 'tools' must be a list of tool definitions, got {_kind(tools)}")
    out = []
    for n, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            _fail(location, f"message {n} must be an object with 'role' and 'content', got {_kind(m)}")
        for key in ("role", "content"):
            if key not in m:
                _fail(location, f"message {n} missing field '{key}'")
        if m["role"] == "tool" or m.get("tool_calls"):
            out.append(_tool_turn(m, n, location))
            continue
        role = _role(m["role"], n, "role", location)
        out.append({"role": role, "content": _content(m["content"], n, location)})
    check_roles(tool_free(out, location), location)
    record = {"messages": out} | ({"tools": tools} if tools else {}) | _user(obj, location)
    meta = obj.get("meta")  # provenance of an augmented copy (data/augment.py), kept for prepare's split
    return record | {"meta": meta} if isinstance(meta, dict) else record


def _user(obj: dict, location: str) -> dict:
    """{"user": id} when the record names whose it is (a string or an integer): DP training's privacy unit can
    be the user (every record of one user together) rather than the record."""
    user = obj.get("user")
    if user is None:
        return {}
    if isinstance(user, bool) or not isinstance(user, (str, int)) or user == "":
        _fail(location, f"field 'user' must be a non-empty string or an integer, got {_show(user)}")
    return {"user": user}


def _tool_turn(m: dict, n: int, location: str) -> dict:
    """An assistant message with OpenAI `tool_calls` (content may be empty) or a `tool` result, kept as sent."""
    if m["role"] == "tool":
        return {"role": "tool", "content": _content(m["content"], n, location)} | (
            {"tool_call_id": m["tool_call_id"]} if isinstance(m.get("tool_call_id"), str) else {})
    if _role(m["role"], n, "role", location) != "assistant":
        _fail(location, f"message {n} has tool_calls but role {_show(m['role'])}; only assistant messages call tools")
    calls = m["tool_calls"]
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                              and isinstance(c["function"].get("name"), str) for c in calls):
        _fail(location, f"message {n} tool_calls must be a list of {{\"function\": {{\"name\", \"arguments\"}}}}")
    content = "" if m["content"] is None else _content(m["content"], n, location)
    return {"role": "assistant", "content": content, "tool_calls": calls}


def tool_free(messages: list[dict], location: str) -> list[dict]:
    """The conversation without its tool round trips (an assistant call and the `tool` results after it), the
    user/assistant alternation check_roles holds; a `tool` result must follow a call."""
    for n, m in enumerate(messages, 1):
        after = messages[n - 2] if n > 1 else {}
        if m["role"] == "tool" and not (after.get("tool_calls") or after.get("role") == "tool"):
            _fail(location, f"message {n} has role 'tool' but does not follow an assistant tool call")
    return [m for m in messages if m["role"] != "tool" and not m.get("tool_calls")]


def _from_sharegpt(raw: Any, location: str) -> dict:
    obj = _object(raw, location)
    if "conversations" not in obj:
        _fail(location, "missing field 'conversations'")
    turns = obj["conversations"]
    if not isinstance(turns, list):
        _fail(location, f"field 'conversations' must be a list, got {_kind(turns)}")
    out = []
    system = _string_field(obj, "system", location, required=False)
    if system:
        out.append({"role": "system", "content": system})
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            _fail(location, f"message {n} must be an object with 'from' and 'value', got {_kind(turn)}")
        sender = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if sender is None:
            _fail(location, f"message {n} missing field 'from'")
        if "value" not in turn and "content" not in turn:
            _fail(location, f"message {n} missing field 'value'")
        role = _role(sender, n, "from", location)
        if not isinstance(value, str):
            _fail(location, f"message {n} value must be a string, got {_kind(value)}")
        out.append({"role": role, "content": value})
    check_roles(out, location, first_number=0 if system else 1)
    return {"messages": out}


def _from_alpaca(raw: Any, location: str) -> dict:
    obj = _object(raw, location)
    instruction = _string_field(obj, "instruction", location)
    extra = _string_field(obj, "input", location, required=False)
    output = _string_field(obj, "output", location)
    system = _string_field(obj, "system", location, required=False)
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def _from_chatterbot(raw: Any, location: str) -> dict:
    if not isinstance(raw, list):
        _fail(location, f"a conversation must be a list of lines, got {_kind(raw)}")
    if not raw:
        _fail(location, "empty conversation")
    for n, line in enumerate(raw, 1):
        if not isinstance(line, str):
            _fail(location, f"entry {n} must be text, got {_kind(line)}")
    if len(raw) < 2:
        _fail(location, "no assistant message; a conversation needs a prompt and a reply")
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": line} for i, line in enumerate(raw)]}


def _from_csv(raw: Any, location: str) -> dict:
    if not isinstance(raw, list) or len(raw) != 2:  # the reader checks the columns; this guards other callers
        got = len(raw) if isinstance(raw, list) else _kind(raw)
        _fail(location, f"expected 2 columns (prompt, response), got {got}")
    return {"messages": [{"role": "user", "content": raw[0]}, {"role": "assistant", "content": raw[1]}]}


def _from_text(raw: Any, location: str) -> dict:
    if isinstance(raw, str):
        return {"text": raw}
    obj = _object(raw, location)
    return {"text": _string_field(obj, "text", location)} | _user(obj, location)


_CONVERTERS = {
    "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
    "chatterbot": _from_chatterbot, "csv": _from_csv, "text": _from_text,
}


def to_record(raw: Any, fmt: str, location: str) -> dict:
    """Validate one raw record and convert it to the canonical record, or raise ChatforgeError naming where/why."""
    if isinstance(raw, Invalid):
        _fail(location, raw.reason)
    check_format(fmt)
    return _CONVERTERS[fmt](raw, location)
