"""The data layer: every input format, detection, cleaning, de-duplication, the split, the report, the built-in
corpus, and every bad-input path of `chatforge prepare` (one line naming file:line and the reason, exit code 2)."""

from __future__ import annotations

import json
import os
import random
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.data import load_dataset
from chatforge.data.builtin import load_builtin
from chatforge.data.clean import Report, clean_records, clean_text, split
from chatforge.data.formats import detect_format, read_records, to_record
from chatforge.data.prepare import prepare
from chatforge.errors import ChatforgeError
from chatforge.io import atomic_path, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable


def write(folder: Path, name: str, content: str | bytes) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return str(path)


def jsonl(*records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def conv(*turns: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"messages": msgs}


def records_of(path: str, fmt: str | None = None) -> list[tuple[str, dict]]:
    fmt = fmt or detect_format(path)
    return [(loc, to_record(raw, fmt, loc)) for loc, raw in read_records(path, fmt)]


# --------------------------------------------------------------------------------------------------------------
# Formats


def test_messages_jsonl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = "\ufeff" + jsonl(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}], "id": 7},
    ) + "\n   \n" + jsonl(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Two "}, {"type": "text", "text": "parts"}]},
                      {"role": "assistant", "content": "ok"}]}
    )
    write(tmp_path, "chat.jsonl", text)
    assert detect_format("chat.jsonl") == "messages"
    assert records_of("chat.jsonl") == [
        ("chat.jsonl:1", conv("Hi", "Hello!", system="Be brief.")),
        ("chat.jsonl:4", conv("Two parts", "ok")),
    ]


def test_sharegpt_json_and_jsonl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = [
        {"id": "a", "system": "You are kind.", "conversations": [
            {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
            {"from": "user", "value": "Q2"}, {"from": "chatgpt", "value": "A2"}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "Human", "value": "Q"},
                           {"from": "bot", "value": "A"}]},
    ]
    write(tmp_path, "sg.json", json.dumps(data, indent=2))
    write(tmp_path, "sg.jsonl", jsonl(*data))
    expected = [conv("Q1", "A1", "Q2", "A2", system="You are kind."), conv("Q", "A", system="S")]
    assert detect_format("sg.json") == detect_format("sg.jsonl") == "sharegpt"
    assert records_of("sg.json") == [("sg.json:record 1", expected[0]), ("sg.json:record 2", expected[1])]
    assert records_of("sg.jsonl") == [("sg.jsonl:1", expected[0]), ("sg.jsonl:2", expected[1])]


def test_alpaca(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Add.", "output": "2", "system": "You are a calculator."},
    ]
    write(tmp_path, "al.json", json.dumps(data))
    assert detect_format("al.json") == "alpaca"
    assert [r for _, r in records_of("al.json")] == [
        conv("Translate to French.\n\ncat", "chat"),
        conv("Say hi.", "Hi!"),
        conv("Add.", "2", system="You are a calculator."),
    ]


def test_chatterbot_yaml_keeps_scalars_as_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "bot.yml", "categories:\n- demo\nconversations:\n- - When?\n  - 1984\n"
                               "- - Really?\n  - yes\n  - Sure?\n- - 你好\n  - 嗨\n")
    assert detect_format("bot.yml") == "chatterbot"
    assert records_of("bot.yml") == [
        ("bot.yml:record 1", conv("When?", "1984")),
        ("bot.yml:record 2", conv("Really?", "yes", "Sure?")),  # the trailing user turn goes in cleaning
        ("bot.yml:record 3", conv("你好", "嗨")),
    ]


def test_csv_and_tsv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "qa.csv", 'prompt,response\r\nHi,Hello\r\n\r\n"Two\nlines","Yes, two"\r\nBye,See you\r\n')
    assert detect_format("qa.csv") == "csv"
    assert records_of("qa.csv") == [
        ("qa.csv:2", conv("Hi", "Hello")),
        ("qa.csv:4", conv("Two\nlines", "Yes, two")),
        ("qa.csv:6", conv("Bye", "See you")),
    ]
    write(tmp_path, "qa.tsv", "Hi, you\tHello, there\n")
    assert records_of("qa.tsv") == [("qa.tsv:1", conv("Hi, you", "Hello, there"))]


def test_plain_text_blocks_and_text_jsonl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "book.txt", "First paragraph\ncontinues.\n\n\n  \nSecond one.\r\n")
    assert detect_format("book.txt") == "text"
    assert records_of("book.txt") == [
        ("book.txt:1", {"text": "First paragraph\ncontinues."}),
        ("book.txt:6", {"text": "Second one."}),
    ]
    write(tmp_path, "corpus.jsonl", jsonl({"text": "a doc"}, {"text": "another"}))
    assert detect_format("corpus.jsonl") == "text"
    assert [r for _, r in records_of("corpus.jsonl")] == [{"text": "a doc"}, {"text": "another"}]


def test_format_override_and_json_named_jsonl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "lines.json", jsonl(conv("a", "b"), conv("c", "d")))  # JSONL that is named .json
    assert records_of("lines.json") == [("lines.json:1", conv("a", "b")), ("lines.json:2", conv("c", "d"))]
    write(tmp_path, "notes.log", "Just some text.\n")
    assert records_of("notes.log", "text") == [("notes.log:1", {"text": "Just some text."})]


@pytest.mark.parametrize("name,content,expected", [
    ("a.jsonl", jsonl(conv("q", "a")), "messages"),
    ("a.ndjson", jsonl(conv("q", "a")), "messages"),
    ("a.json", json.dumps([conv("q", "a")], indent=1), "messages"),
    ("a.json", json.dumps(conv("q", "a")), "messages"),
    ("a.jsonl", jsonl({"conversations": [{"from": "human", "value": "q"}]}), "sharegpt"),
    ("a.json", json.dumps([{"instruction": "q", "output": "a"}]), "alpaca"),
    ("a.json", json.dumps({"conversations": [["q", "a"]]}), "chatterbot"),
    ("a.jsonl", "{broken\n" + jsonl({"instruction": "q", "output": "a"}), "alpaca"),
    ("a.jsonl", "{broken\n", "messages"),  # unparsable: the reader reports the line
    ("a.yaml", "conversations: []\n", "chatterbot"),
    ("a.CSV", "q,a\n", "csv"),
    ("a.md", "# hi\n", "text"),
])
def test_detect_format(tmp_path, name, content, expected):
    assert detect_format(write(tmp_path, name, content)) == expected


# --------------------------------------------------------------------------------------------------------------
# Cleaning


@pytest.mark.parametrize("raw,expected", [
    ("Ｈｅｌｌｏ ﬁne №1 ½", "Hello fine No1 1⁄2"),  # NFKC: full-width, ligature, compatibility forms
    ("e\u0301", "é"),  # composed
    ("zero\u200bwidth\u2060joiner\ufeffbom\u00adsoft", "zerowidthjoinerbomsoft"),
    ("abc \u202eevil\u202c \u2066iso\u2069 \u200emark\u200f", "abc evil iso mark"),  # bidi controls
    ("bell\x07 null\x00 esc\x1b[0m del\x7f", "bell null esc[0m del"),
    ("Hangul\u3164filler", "Hangulfiller"),
    ("lone \ud800 surrogate", "lone surrogate"),
    ("  a\t\tb   c  \n  d \u00a0 e\u3000f  ", "a b c\n d e f"),
    ("x\r\ny\rz\u2028w\x0cv", "x\ny\nz\nw\nv"),
    ("p1\n\n\n\n\np2\n \n \n\np3", "p1\n\np2\n\np3"),
    ("می\u200cخواهم", "می\u200cخواهم"),  # ZWNJ inside a Persian word is spelling
    ("👨\u200d👩\u200d👧", "👨\u200d👩\u200d👧"),  # ZWJ emoji sequence
    ("\u200d stray \u200c", "stray"),
    ("\u200b \u200b", ""),
    ("你好，世界！", "你好,世界!"),  # NFKC maps full-width punctuation
])
def test_clean_text(raw, expected):
    assert clean_text(raw) == expected


def test_clean_records_drops_dedups_and_counts(tmp_path):
    report = Report()
    records = [
        ("a", conv("Hello", "Hi there")),
        ("a", conv("Hello ", "Hi\u200b there")),  # same after cleaning -> duplicate
        ("a", conv("Hello", "Hi there", "Anyone?")),  # trailing user turn removed -> then a duplicate
        ("b", conv("Q", "x" * 11)),  # over-long assistant turn: nothing left
        ("b", conv("Q", "A", "\u200b", "B")),  # empty user turn in the middle breaks alternation
        ("b", conv("Q", "A", "Q2", " ")),  # empty last reply: falls back to the first exchange
        ("b", conv("Q3", "A3", system="   ")),  # empty system prompt is just removed
        ("b", conv("Q4", "A4", system="s" * 11)),  # over-long system prompt drops the conversation
        ("c", {"text": "  some   text "}),
        ("c", {"text": "\u200b"}),
        ("c", {"text": "some text"}),
    ]
    kept = clean_records(records, report, max_turn_chars=10)
    assert kept == [conv("Hello", "Hi there"), conv("Q", "A"), conv("Q3", "A3"), {"text": "some text"}]
    assert report.read == 11 and report.kept == 4
    assert dict(report.dropped) == {"duplicate": 3, "too_long": 2, "empty": 2}
    assert dict(report.turns_dropped) == {"empty": 2, "trailing_user_turn": 1}
    assert report.read == report.kept + sum(report.dropped.values())
    per_source = {k: (v["read"], v["kept"], dict(v["dropped"])) for k, v in report.sources.items()}
    assert per_source == {
        "a": (3, 1, {"duplicate": 2}),
        "b": (5, 2, {"too_long": 2, "empty": 1}),
        "c": (3, 1, {"empty": 1, "duplicate": 1}),
    }


def test_split_is_deterministic_disjoint_and_order_free():
    records = [conv(f"question {i}", f"answer {i}") for i in range(200)]
    train, val = split(records, 0.1, seed=3)
    assert len(val) == 20 and len(train) == 180
    keys = lambda rs: {json.dumps(r) for r in rs}  # noqa: E731
    assert keys(train).isdisjoint(keys(val)) and keys(train) | keys(val) == keys(records)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = split(shuffled, 0.1, seed=3)
    assert keys(val2) == keys(val) and keys(train2) == keys(train)
    assert [r for r in records if json.dumps(r) in keys(train)] == train  # input order kept
    assert keys(split(records, 0.1, seed=4)[1]) != keys(val)
    assert split(records[:2], 0.01, seed=0)[1] != [] and len(split(records[:2], 0.99, seed=0)[0]) == 1
    assert split(records[:1], 0.5, seed=0) == (records[:1], [])
    assert split(records, 0.0, seed=0) == (records, [])


# --------------------------------------------------------------------------------------------------------------
# prepare / load_dataset


def test_prepare_folder_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    convs = [conv(f"q{i}", f"a{i}") for i in range(18)]
    write(tmp_path, "data/chats.jsonl", jsonl(*convs[:10], convs[0]))
    write(tmp_path, "data/sub/more.csv", "".join(f"q{i},a{i}\n" for i in range(10, 18)) + "q0,a0\n")
    write(tmp_path, "data/README.rst", "not data")
    write(tmp_path, "data/.hidden.jsonl", "{broken")
    report = prepare(["data"], out="out", val_fraction=0.25, seed=1)
    assert report["read"] == 20 and report["kept"] == 18 and report["dropped"] == {"duplicate": 2}
    assert report["train"] == 13 and report["val"] == 5  # round(18 * 0.25)
    assert report["sources"] == {
        os.path.join("data", "chats.jsonl"): {"format": "messages", "read": 11, "kept": 10, "dropped": {"duplicate": 1}},
        os.path.join("data", "sub", "more.csv"): {"format": "csv", "read": 9, "kept": 8, "dropped": {"duplicate": 1}},
    }
    assert report["ignored_files"] == [os.path.join("data", "README.rst")]
    train = [json.loads(line) for line in Path("out/train.jsonl").read_text("utf-8").splitlines()]
    val = [json.loads(line) for line in Path("out/val.jsonl").read_text("utf-8").splitlines()]
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, convs))
    assert json.loads(Path("out/report.json").read_text("utf-8")) == report
    assert not [p for p in os.listdir("out") if p.endswith(".tmp")]
    out = capsys.readouterr().out
    assert "read 20 records from 2 source(s): kept 18 (train 13, val 5), dropped 2" in out
    # The prepared folder is read back as is; the raw folder in memory gives the same split.
    assert load_dataset("out") [:2] == (train, val)
    assert load_dataset("data", val_fraction=0.25, seed=1)[:2] == (train, val)
    # A prepared folder given to prepare again is re-read from its train/val files only.
    again = prepare(["out"], out="out2", val_fraction=0.25, seed=1)
    assert again["kept"] == 18 and again["dropped"] == {}
    # An output folder inside the input folder is not read back as input on the next run.
    assert prepare(["data"], out="data/prepared", val_fraction=0.25, seed=1)["read"] == 20
    assert prepare(["data"], out="data/prepared", val_fraction=0.25, seed=1)["read"] == 20


def test_prepare_writes_unicode_unescaped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "zh.jsonl", jsonl(conv("你好", "嗨"), conv("再见", "拜拜")))
    prepare(["zh.jsonl"], out="out", val_fraction=0.0)
    assert Path("out/train.jsonl").read_text("utf-8").splitlines()[0] == (
        '{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨"}]}'
    )
    assert Path("out/val.jsonl").read_text("utf-8") == ""


def test_skip_invalid_counts_instead_of_stopping(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "mixed.jsonl", jsonl(conv("a", "b")) + "{oops\n" + jsonl(
        {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, conv("c", "d")))
    write(tmp_path, "broken.yml", "conversations:\n- - a\n  - b: c: d\n")
    with pytest.raises(ChatforgeError, match=r"^mixed\.jsonl:2: invalid JSON"):
        prepare(["mixed.jsonl", "broken.yml"], out="out")
    report = prepare(["mixed.jsonl", "broken.yml"], out="out", skip_invalid=True)
    assert report["read"] == 5 and report["kept"] == 2 and report["dropped"] == {"invalid": 3}
    first, second, third = report["invalid_examples"]
    assert first == "mixed.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes)"
    assert second == "mixed.jsonl:3: message 2 has role 'bot'; expected user or assistant"
    assert third.startswith("broken.yml:3: invalid YAML (mapping values are not allowed")


def test_builtin_corpus_english_and_chinese():
    en_train, en_val, en_report = load_dataset("builtin:english")
    zh_train, zh_val, zh_report = load_dataset("builtin:chinese")
    assert en_report["kept"] > 500 and zh_report["kept"] > 300
    for report in (en_report, zh_report):
        assert report["read"] == report["kept"] + sum(report["dropped"].values())
        assert report["train"] + report["val"] == report["kept"]
    # The corpus ships one malformed entry (a string where a list belongs): counted, never fatal.
    assert en_report["dropped"].get("invalid", 0) >= 1
    assert "builtin:english/trivia:record 14: a conversation must be a list of lines, got string" in en_report["invalid_examples"]
    cjk = re.compile("[\u4e00-\u9fff]")
    assert sum(bool(cjk.search(m["content"])) for r in zh_train for m in r["messages"]) > 300
    assert not any(cjk.search(m["content"]) for r in en_train for m in r["messages"])
    both = load_dataset("builtin")[2]
    assert both["kept"] == en_report["kept"] + zh_report["kept"]
    assert load_dataset("builtin:english,chinese")[2]["kept"] == both["kept"]
    one = load_builtin("builtin:chinese/greetings")
    assert len(one) == 25 and one[0] == conv("你好", "嗨")
    assert set(load_dataset("builtin:english/ai")[2]["sources"]) == {"builtin:english/ai"}


# --------------------------------------------------------------------------------------------------------------
# Bad inputs: one line naming file:line and the reason. "…" in an expected message matches anything.

BAD_INPUTS = [
    # (id, files, command-line arguments after `prepare`, expected message)
    ("file-not-found", {}, ["nope.jsonl"], "nope.jsonl: file not found"),
    ("invalid-json-line", {"data.jsonl": jsonl(conv("a", "b"), conv("c", "d")) + '{"messages": [{"role": "user" "content": "x"}]}\n'},
     ["data.jsonl"], "data.jsonl:3: invalid JSON (Expecting ',' delimiter)"),
    ("not-utf8-jsonl", {"x.jsonl": jsonl(conv("a", "b")).encode() + b'{"messages": "\xff"}\n'},
     ["x.jsonl"], "x.jsonl:2: not valid UTF-8 (byte 0xff at column 15)"),
    ("missing-messages", {"data.jsonl": jsonl(conv("a", "b"), conv("c", "d"), conv("e", "f"), {"instruction": "q", "output": "a"})},
     ["data.jsonl"], "data.jsonl:4: missing field 'messages'"),
    ("unknown-role", {"data.jsonl": jsonl(conv("a", "b"), {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]})},
     ["data.jsonl"], "data.jsonl:2: message 2 has role 'bot'; expected user or assistant"),
    ("roles-not-alternating", {"d.jsonl": jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})},
     ["d.jsonl"], "d.jsonl:1: message 2 has role 'user'; expected assistant (roles must alternate user/assistant)"),
    ("starts-with-assistant", {"d.jsonl": jsonl({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]})},
     ["d.jsonl"], "d.jsonl:1: message 1 has role 'assistant'; a conversation starts with user (after an optional system)"),
    ("late-system", {"d.jsonl": jsonl({"messages": [*conv("a", "b")["messages"], {"role": "system", "content": "s"}]})},
     ["d.jsonl"], "d.jsonl:1: message 3 has role 'system'; only the first message may be system"),
    ("no-assistant", {"d.jsonl": jsonl({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "b"}]})},
     ["d.jsonl"], "d.jsonl:1: no assistant message; a conversation needs at least one user -> assistant exchange"),
    ("empty-messages", {"d.jsonl": jsonl({"messages": []})}, ["d.jsonl"], "d.jsonl:1: the conversation has no messages"),
    ("content-not-string", {"d.jsonl": jsonl({"messages": [{"role": "user", "content": 5}]})},
     ["d.jsonl"], "d.jsonl:1: message 1 content must be a string, got number"),
    ("content-null", {"d.jsonl": jsonl({"messages": [{"role": "user", "content": None}]})},
     ["d.jsonl"], "d.jsonl:1: message 1 has no text content (content is null)"),
    ("image-part", {"d.jsonl": jsonl({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})},
     ["d.jsonl"], "d.jsonl:1: message 1 has a content part of type 'image_url'; only text is supported"),
    ("missing-content", {"d.jsonl": jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]})},
     ["d.jsonl"], "d.jsonl:1: message 2 missing field 'content'"),
    ("message-not-object", {"d.jsonl": jsonl({"messages": ["hi", "there"]})},
     ["d.jsonl"], "d.jsonl:1: message 1 must be an object with 'role' and 'content', got string"),
    ("messages-not-list", {"d.jsonl": jsonl({"messages": "hi"})},
     ["d.jsonl"], "d.jsonl:1: field 'messages' must be a list, got string"),
    ("record-not-object", {"d.jsonl": jsonl(conv("a", "b"), ["a", "b"])},
     ["d.jsonl"], "d.jsonl:2: expected an object, got list"),
    ("sharegpt-unknown-from", {"s.jsonl": jsonl({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]})},
     ["s.jsonl"], "s.jsonl:1: message 2 has from 'robot'; expected human, gpt or system"),
    ("sharegpt-missing-value", {"s.json": json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}])},
     ["s.json"], "s.json:record 1: message 2 missing field 'value'"),
    ("sharegpt-missing-conversations", {"s.jsonl": jsonl({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, {"messages": []})},
     ["s.jsonl"], "s.jsonl:2: missing field 'conversations'"),
    ("alpaca-missing-output", {"a.json": json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q2"}])},
     ["a.json"], "a.json:record 2: missing field 'output'"),
    ("alpaca-input-not-string", {"a.jsonl": jsonl({"instruction": "q", "input": 3, "output": "a"})},
     ["a.jsonl"], "a.jsonl:1: field 'input' must be a string, got number"),
    ("csv-three-columns", {"data.csv": "prompt,response\nhi,hello\nbye,see you\nq,a,extra\n"},
     ["data.csv"], "data.csv:4: expected 2 columns (prompt, response), got 3"),
    ("csv-one-column", {"data.csv": "hi,hello\njust one\n"}, ["data.csv"], "data.csv:2: expected 2 columns (prompt, response), got 1"),
    ("csv-not-utf8", {"data.csv": b"hi,hello\nbad \xe9,x\n"}, ["data.csv"], "data.csv:2: not valid UTF-8"),
    ("text-not-utf8", {"t.txt": b"fine\n\nalso fine\n\nbad \xff here\n"}, ["t.txt"], "t.txt:5: not valid UTF-8"),
    ("yaml-invalid", {"x.yml": "conversations:\n- - a\n  - b\n- - c: d: e\n"},
     ["x.yml"], "x.yml:4: invalid YAML (mapping values are not allowed …)"),
    ("yaml-missing-conversations", {"x.yml": "categories:\n- a\n"},
     ["x.yml"], "x.yml: missing field 'conversations' (chatterbot-corpus format: …)"),
    ("yaml-conversation-not-list", {"x.yml": "conversations:\n- - a\n  - b\n- just text\n"},
     ["x.yml"], "x.yml:record 2: a conversation must be a list of lines, got string"),
    ("yaml-one-line", {"x.yml": "conversations:\n- - lonely\n"},
     ["x.yml"], "x.yml:record 1: no assistant message; a conversation needs a prompt and a reply"),
    ("yaml-nested-entry", {"x.yml": "conversations:\n- - [a, b]\n  - c\n"},
     ["x.yml"], "x.yml:record 1: entry 1 must be text, got list"),
    ("yaml-not-utf8", {"x.yml": b"conversations:\n- - caf\xe9\n  - b\n"},
     ["x.yml"], "x.yml:2: not valid UTF-8 (byte 0xe9 at column 8)"),
    ("json-syntax", {"x.json": '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q2", "output": "a2",}\n]\n'},
     ["x.json"], "x.json:3: invalid JSON (Expecting property name enclosed in double quotes)"),
    ("json-not-utf8", {"x.json": b'[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "\xff", "output": "b"}\n]\n'},
     ["x.json"], "x.json:3: not valid UTF-8 (byte 0xff at column 20)"),
    ("unknown-extension", {"notes.docx": "hello"}, ["notes.docx"], "notes.docx: unknown file type '.docx'; expected one of …"),
    ("undetectable", {"x.jsonl": jsonl({"question": "q", "answer": "a"})},
     ["x.jsonl"], "x.jsonl: cannot tell the format from the first record (fields: 'question', 'answer'); …; pass --format"),
    ("empty-folder", {"empty/notes.rst": "x"}, ["empty"], "empty: no supported files in this folder (expected …)"),
    ("unknown-language", {}, ["builtin:klingon"], "builtin:klingon: unknown language 'klingon'; available: …chinese…english…"),
    ("unknown-category", {}, ["builtin:english/cooking"], "builtin:english/cooking: unknown category 'cooking' for english; available: ai, …"),
    ("unknown-format", {"d.jsonl": jsonl(conv("a", "b"))}, ["d.jsonl", "--format", "xml"],
     "unknown format 'xml'; expected one of messages, sharegpt, alpaca, chatterbot, csv, text"),
    ("format-messages-on-yaml", {"x.yml": "conversations:\n- - a\n  - b\n"}, ["x.yml", "--format", "messages"],
     "x.yml: format 'messages' is read from JSON or JSONL files, not YAML"),
    ("wrong-format-override", {"d.jsonl": jsonl(conv("a", "b"))}, ["d.jsonl", "--format", "alpaca"], "d.jsonl:1: missing field 'instruction'"),
    ("val-fraction", {"d.jsonl": jsonl(conv("a", "b"))}, ["d.jsonl", "--val-fraction", "1.5"], "val_fraction must be in [0, 1), got 1.5"),
    ("max-turn-chars", {"d.jsonl": jsonl(conv("a", "b"))}, ["d.jsonl", "--max-turn-chars", "0"], "max_turn_chars must be at least 1, got 0"),
    ("nothing-left", {"d.jsonl": jsonl(conv(" ", "\u200b"), conv("q", "a" * 50))}, ["d.jsonl", "--max-turn-chars", "10"],
     "d.jsonl: no records left to use (read 2; dropped: empty 1, too_long 1)"),
    ("empty-file", {"d.jsonl": ""}, ["d.jsonl"], "d.jsonl: no records left to use (read 0)"),
    ("out-is-a-file", {"d.jsonl": jsonl(conv("a", "b")), "taken": "x"}, ["d.jsonl", "--out", "taken"], "taken: exists and is not a folder"),
    ("no-out", {"d.jsonl": jsonl(conv("a", "b"))}, ["d.jsonl", "--out", ""], "prepare: no output folder given; pass --out DIR"),
]


def _setup(tmp_path: Path, files: dict) -> None:
    for name, content in files.items():
        write(tmp_path, name, content)


def _matches(message: str, expected: str) -> bool:
    return re.fullmatch(".*".join(map(re.escape, expected.split("…"))), message) is not None


def _api_kwargs(args: list[str]) -> dict:
    """The CLI arguments as prepare()'s keyword arguments (the CLI maps them the same way)."""
    kwargs: dict = {"inputs": [], "out": "out"}
    it = iter(args)
    for arg in it:
        if arg.startswith("--"):
            key = arg[2:].replace("-", "_")
            value = next(it)
            kwargs[key] = float(value) if key == "val_fraction" else int(value) if key in ("seed", "max_turn_chars") else value
        else:
            kwargs["inputs"].append(arg)
    return kwargs


@pytest.mark.parametrize("files,args,expected", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_api(tmp_path, monkeypatch, files, args, expected):
    monkeypatch.chdir(tmp_path)
    _setup(tmp_path, files)
    with pytest.raises(ChatforgeError) as info:
        prepare(**_api_kwargs(args))
    assert _matches(str(info.value), expected), str(info.value)
    assert "\n" not in str(info.value)
    assert not os.path.exists("out")  # nothing half-written


@pytest.mark.parametrize("files,args,expected", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_cli(tmp_path, files, args, expected):
    _setup(tmp_path, files)
    if "--out" not in args:
        args = [*args, "--out", "out"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([PYTHON, "-m", "chatforge.cli", "prepare", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert _matches(lines[0].removeprefix("error: "), expected), lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_skip_invalid_succeeds_and_reports(tmp_path):
    write(tmp_path, "d.jsonl", jsonl(conv("a", "b"), conv("c", "d")) + "{bad\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([PYTHON, "-m", "chatforge.cli", "prepare", "d.jsonl", "--out", "out", "--skip-invalid"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "dropped: invalid 1" in proc.stdout and "d.jsonl:3: invalid JSON" in proc.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text("utf-8"))
    assert (report["read"], report["kept"], report["dropped"]) == (3, 2, {"invalid": 1})


# --------------------------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "f.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two ✓")
    assert target.read_text("utf-8") == "two ✓"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text("utf-8") == "two ✓"
    assert os.listdir(target.parent) == ["f.json"]
