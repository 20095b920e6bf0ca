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
from collections import Counter
from pathlib import Path

import pytest

from chatforge.commands.data import prepare as prepare_command
from chatforge.data import load_dataset
from chatforge.data.builtin import builtin_sources, load_builtin
from chatforge.data.clean import clean_records, clean_text, split
from chatforge.data.formats import Header, detect_format, read_records, to_record
from chatforge.data.prepare import prepare
from chatforge.data.report import Report
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


def records_of(path: str, fmt: str | None = None, **options) -> list[tuple[str, dict]]:
    fmt = fmt or detect_format(path)
    return [(loc, to_record(raw, fmt, loc)) for loc, raw in read_records(path, fmt, **options)
            if not isinstance(raw, Header)]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([PYTHON, "-m", "chatforge.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


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


def test_a_records_user_survives_prepare_and_a_bad_one_names_the_line(tmp_path, monkeypatch):
    """`user` says whose record it is (DP training's per-user privacy unit); prepare keeps it on conversations and
    texts."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "u.jsonl", jsonl(conv("Hi", "Hello!") | {"user": "ann"}, {"text": "a note", "user": 42}))
    assert [r for _, r in records_of("u.jsonl")] == [conv("Hi", "Hello!") | {"user": "ann"},
                                                     {"text": "a note", "user": 42}]
    write(tmp_path, "bad.jsonl", jsonl(conv("Hi", "Hello!"), conv("Hi", "Hello!") | {"user": ["ann"]}))
    with pytest.raises(ChatforgeError, match=r"^bad\.jsonl:2: field 'user' must be a non-empty string or an "
                                             r"integer, got \['ann'\]$"):
        records_of("bad.jsonl")
    from chatforge.data.clean import clean_record

    assert clean_record(conv(" Hi ", "Hello!") | {"user": "ann"}).record == conv("Hi", "Hello!") | {"user": "ann"}


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
    ("Ｈｅｌｌｏ ﬁne №1 ½", "Ｈｅｌｌｏ ﬁne №1 ½"),  # NFC keeps full-width, ligature and compatibility forms
    ("e\u0301", "é"),  # composed
    ("zero\u200bwidth\u2060joiner\ufeffbom\u00adsoft", "zerowidthjoinerbomsoft"),
    ("abc \u202eevil\u202c \u2066iso\u2069 \u200emark\u200f", "abc evil iso mark"),  # bidi controls
    ("bell\x07 null\x00 esc\x1b[0m del\x7f", "bell null esc[0m del"),
    ("Hangul\u3164filler", "Hangulfiller"),
    ("lone \ud800 surrogate", "lone surrogate"),
    ("  a\t\tb   c  \n  d \u00a0 e\u3000f  ", "a b c\n d e\u3000f"),  # the ideographic space is CJK typography
    ("x\r\ny\rz\u2028w\x0cv", "x\ny\nz\nw\nv"),
    ("p1\n\n\n\n\np2\n \n \n\np3", "p1\n\np2\n\np3"),
    ("می\u200cخواهم", "می\u200cخواهم"),  # ZWNJ inside a Persian word is spelling
    ("👨\u200d👩\u200d👧", "👨\u200d👩\u200d👧"),  # ZWJ emoji sequence
    ("🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f", "🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"),  # England's flag
    ("\u200d stray \u200c", "stray"),
    ("\u200b \u200b", ""),
    ("plain ascii, nothing to do.", "plain ascii, nothing to do."),
    ("tab\tand  two", "tab and two"),
])
def test_clean_text(raw, expected):
    assert clean_text(raw) == expected


# Chinese, Japanese and full-width text as people type it.
CHINESE = "你好，请问：营业时间（周末）是几点？谢谢！「好的」……"
JAPANESE = "こんにちは。「営業時間」は何時ですか？　ｶﾀｶﾅ、ありがとう！"
FULLWIDTH = "型号ＡＢ１２３，价格￥１９９！"


def test_cleaning_keeps_cjk_punctuation_and_counts_each_rule():
    counts = Counter()
    assert clean_text(CHINESE, counts=counts) == CHINESE
    assert clean_text(JAPANESE, counts=counts) == JAPANESE  # half-width katakana too: NFC does not fold them
    assert clean_text(FULLWIDTH, counts=counts) == FULLWIDTH
    assert counts == Counter()
    # Full-width letters and digits become ASCII only when asked; the punctuation stays full-width.
    assert clean_text(FULLWIDTH, fullwidth_ascii=True, counts=counts) == "型号AB123，价格￥199！"
    assert counts == Counter({"fullwidth_ascii": 1})
    # NFKC is a choice, and it folds everything (the old behaviour).
    assert clean_text(CHINESE, "nfkc", counts=counts) == "你好,请问:营业时间(周末)是几点?谢谢!「好的」......"
    assert clean_text(JAPANESE, "nfkc") == "こんにちは。「営業時間」は何時ですか? カタカナ、ありがとう!"
    assert counts["nfkc"] == 1
    counts.clear()
    clean_text("a\u200bb\u202ec\x07d  e\r\nf e\u0301", counts=counts)
    assert counts == Counter({"invisible": 1, "bidi": 1, "control": 1, "spaces": 1, "line_breaks": 1, "nfc": 1})
    with pytest.raises(ChatforgeError, match="normalize: expected nfc or nfkc, got 'nfd'"):
        clean_text("x\u00e9", "nfd")


def test_prepare_keeps_chinese_punctuation_and_reports_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "zh.jsonl", jsonl(conv(CHINESE, "好的，周末是１０点到１８点。"), conv(JAPANESE, "はい、\u200b分かりました。")))
    report = prepare(["zh.jsonl"], out="out", val_fraction=0.0)
    train = [json.loads(line) for line in Path("out/train.jsonl").read_text("utf-8").splitlines()]
    assert train == [conv(CHINESE, "好的，周末是１０点到１８点。"), conv(JAPANESE, "はい、分かりました。")]
    assert report["cleaning"] == {"invisible": 1}
    assert report["languages"] == {
        "chinese": {"records": 1, "characters": len(CHINESE) + len("好的，周末是１０点到１８点。")},
        "japanese": {"records": 1, "characters": len(JAPANESE) + len("はい、分かりました。")},
    }
    folded = prepare(["zh.jsonl"], out="out2", val_fraction=0.0, normalize="nfkc", fullwidth_ascii=True)
    train = [json.loads(line) for line in Path("out2/train.jsonl").read_text("utf-8").splitlines()]
    assert train[0]["messages"][1]["content"] == "好的,周末是10点到18点。"
    assert folded["cleaning"] == {"invisible": 1, "nfkc": 3}  # NFKC folded the digits before fullwidth_ascii
    assert folded["settings"]["normalize"] == "nfkc" and folded["settings"]["fullwidth_ascii"] is True
    proc = cli("prepare", "zh.jsonl", "--out", "out3", "--normalize", "NFKD", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == "error: normalize: expected nfc or nfkc, got 'NFKD'\n"


def test_clean_records_drops_dedups_and_counts(tmp_path):
    report = Report()
    records = [
        ("a", conv("Hello", "Hi there")),
        ("a", conv("Hello ", "Hi\u200b there")),  # same after cleaning -> duplicate
        ("a", conv("Hello", "Hi there", "Anyone?")),  # trailing user turn removed -> then a duplicate
        ("b", conv("Q", "x" * 11)),  # over-long assistant turn: no exchange left
        ("b", conv("Q3", "A3", system="   ")),  # empty system prompt is just removed
        ("b", conv("Q4", "A4", system="s" * 11)),  # over-long system prompt drops the conversation
        ("c", {"text": "  some   text "}),
        ("c", {"text": "\u200b"}),
        ("c", {"text": "some text"}),
    ]
    kept = clean_records(records, report, max_turn_chars=10)
    assert kept == [conv("Hello", "Hi there"), conv("Q3", "A3"), {"text": "some text"}]
    assert report.read == 9 and report.kept == 3
    assert dict(report.dropped) == {"duplicate": 3, "too_long": 2, "empty": 1}
    assert dict(report.turns_dropped) == {"trailing_user_turn": 1}
    assert report.read == report.kept + sum(report.dropped.values())
    per_source = {k: (v["read"], v["kept"], dict(v["dropped"])) for k, v in report.sources.items()}
    assert per_source == {
        "a": (3, 1, {"duplicate": 2}),
        "b": (3, 1, {"too_long": 2}),
        "c": (3, 1, {"empty": 1, "duplicate": 1}),
    }
    assert report.dropped_examples == {
        "duplicate": ["a:record 2: same as a:record 1", "a:record 3: same as a:record 1",
                      "c:record 9: same as c:record 7"],
        "too_long": ["b:record 4: message 2 (assistant) has 11 characters (max_turn_chars 10)",
                     "b:record 6: message 1 (system) has 11 characters (max_turn_chars 10)"],
        "empty": ["c:record 8: empty after cleaning"],
    }


@pytest.mark.parametrize("position", [1, 2, 3, 4, 5, 6])
def test_one_rule_for_a_bad_turn_wherever_it_is(position):
    """A bad turn cuts the conversation just before it, in the middle as at the end; a user turn left without a
    reply goes too; nothing left -> dropped under the bad turn's reason."""
    turns = ["u1", "a1", "u2", "a2", "u3", "a3"]
    turns[position - 1] = "\u200b"  # empty after cleaning
    report = Report()
    kept = clean_records([("d.jsonl", conv(*turns))], report)
    exchanges = (position - 1) // 2  # complete user -> assistant exchanges before the bad turn
    if exchanges == 0:
        assert kept == [] and dict(report.dropped) == {"empty": 1}
        assert report.dropped_examples["empty"] == [
            f"d.jsonl:record 1: message {position} ({'user' if position % 2 else 'assistant'}) is empty after cleaning"]
    else:
        assert kept == [conv(*turns[: 2 * exchanges])]
        assert dict(report.turns_dropped) == {"empty": 6 - 2 * exchanges}
        assert report.turns_dropped_examples["empty"] == [
            f"d.jsonl:record 1: cut before message {position} ({'user' if position % 2 else 'assistant'}) "
            "is empty after cleaning"]


def test_prepare_names_the_records_it_drops(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "d.jsonl", jsonl(conv("q", "a"), conv(" ", "b"), conv("q2", "x" * 30), conv("q", "a"),
                                     conv("q3", "a3", "q4", "y" * 30)))
    report = prepare_command(["d.jsonl"], out="out", max_turn_chars=20, val_fraction=0.0)
    assert report["dropped"] == {"duplicate": 1, "empty": 1, "too_long": 1}
    assert report["dropped_examples"] == {
        "duplicate": ["d.jsonl:4: same as d.jsonl:1"],
        "empty": ["d.jsonl:2: message 1 (user) is empty after cleaning"],
        "too_long": ["d.jsonl:3: message 2 (assistant) has 30 characters (max_turn_chars 20)"],
    }
    assert report["turns_dropped"] == {"too_long": 2}
    assert report["turns_dropped_examples"] == {
        "too_long": ["d.jsonl:5: cut before message 4 (assistant) has 30 characters (max_turn_chars 20)"]}
    printed = capsys.readouterr().out
    assert "  empty (1; first 1 shown):\n    d.jsonl:2: message 1 (user) is empty after cleaning\n" in printed
    assert "turns removed from kept conversations: too_long 2\n    d.jsonl:5: cut before message 4" in printed


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
    report = prepare_command(["data"], out="out", val_fraction=0.25, seed=1)
    assert report["read"] == 20 and report["kept"] == 18 and report["dropped"] == {"duplicate": 2}
    assert report["train"] == 13 and report["val"] == 5  # round(18 * 0.25)
    assert report["sources"] == {
        os.path.join("data", "chats.jsonl"): {"format": "messages", "language": None, "read": 11, "kept": 10,
                                              "characters": 40, "dropped": {"duplicate": 1}},
        os.path.join("data", "sub", "more.csv"): {"format": "csv", "language": None, "read": 9, "kept": 8,
                                                  "characters": 48, "dropped": {"duplicate": 1}},
    }
    assert report["languages"] == {"other": {"records": 18, "characters": 88}}
    assert report["ignored_files"] == [{"path": os.path.join("data", "README.rst"), "reason": "unsupported file type"}]
    train = [json.loads(line) for line in Path("out/train.jsonl").read_text("utf-8").splitlines()]
    val = [json.loads(line) for line in Path("out/val.jsonl").read_text("utf-8").splitlines()]
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, convs))
    assert json.loads(Path("out/report.json").read_text("utf-8")) == report
    assert not [p for p in os.listdir("out") if p.endswith(".tmp")]
    out = capsys.readouterr().out
    assert "read 20 records from 2 source(s): kept 18 (train 13, val 5), dropped 2" in out
    # The prepared folder is read back as is; the raw folder in memory gives the same split.
    assert load_dataset("out")[:2] == (train, val)
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
        {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}, conv("c", "d")))
    write(tmp_path, "broken.yml", "conversations:\n- - a\n  - b: c: d\n")
    with pytest.raises(ChatforgeError, match=r"^mixed\.jsonl:2: invalid JSON"):
        prepare(["mixed.jsonl", "broken.yml"], out="out")
    report = prepare(["mixed.jsonl", "broken.yml"], out="out", skip_invalid=True)
    assert report["read"] == 5 and report["kept"] == 2 and report["dropped"] == {"invalid": 3}
    first, second, third = report["dropped_examples"]["invalid"]
    assert first == "mixed.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes)"
    assert second == ("mixed.jsonl:3: message 2 has role 'robot'; expected system, user or assistant "
                      "(or human, gpt, bot, chatgpt, model)")
    assert third.startswith("broken.yml:3: invalid YAML (mapping values are not allowed")


def test_csv_header_is_detected_not_trained_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "t.csv", "Customer,Agent\nhello,hi there\n")
    report = prepare_command(["t.csv"], out="out", val_fraction=0.0)
    assert Path("out/train.jsonl").read_text("utf-8") == jsonl(conv("hello", "hi there"))
    assert report["csv_headers"] == {"t.csv": {"columns": ["Customer", "Agent"], "decision": "detected"}}
    assert ("t.csv: first row looks like a header, not trained on (Customer, Agent); pass --csv-header no if it is "
            "a conversation") in capsys.readouterr().out
    # The user decides when the guess is wrong.
    prepare(["t.csv"], out="out", val_fraction=0.0, csv_header="no")
    assert Path("out/train.jsonl").read_text("utf-8") == jsonl(conv("Customer", "Agent"), conv("hello", "hi there"))
    # Headers in other words and languages; first rows that are data; and ones that may be either, which are read
    # as data (losing a real first exchange silently would be worse) and reported.
    for first, decision in [("用户问题,客服回答", "detected"), ("question,answer", "detected"),
                            ("user_message,bot_reply", "detected"), ("Kunde,Mitarbeiter", "doubt"),
                            ("Hi,Hello", "doubt"), ("q1,a1", "doubt"), ("Hi!,Hello.", None), ("What time is it?,Nine.", None)]:
        write(tmp_path, "h.csv", f"{first}\nWo ist mein Paket?,Es kommt morgen.\n你好，在吗？,在的，请问有什么可以帮您？\n")
        raw = list(read_records("h.csv"))
        assert [r.decision for _, r in raw if isinstance(r, Header)] == ([decision] if decision else []), first
        assert len(records_of("h.csv")) == (2 if decision == "detected" else 3), first
    report = prepare_command(["h.csv"], out="out2", csv_header="auto")
    assert report["csv_headers"] == {}
    write(tmp_path, "h.csv", "Kunde,Mitarbeiter\nWo ist mein Paket?,Es kommt morgen.\n")
    capsys.readouterr()
    prepare_command(["h.csv"], out="out2", val_fraction=0.0)
    assert ("h.csv: first row read as a conversation, though it may be a header (Kunde, Mitarbeiter); pass "
            "--csv-header yes if it is one") in capsys.readouterr().out


def test_csv_delimiter_and_columns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "semi.csv", "question;answer\nWie spät ist es?;Neun Uhr, genau.\nDanke;Bitte\n")
    assert records_of("semi.csv") == [("semi.csv:2", conv("Wie spät ist es?", "Neun Uhr, genau.")),
                                      ("semi.csv:3", conv("Danke", "Bitte"))]
    write(tmp_path, "pipe.txt.csv", "a|b\nc|d\n")
    assert [r for _, r in records_of("pipe.txt.csv")] == [conv("a", "b"), conv("c", "d")]
    from chatforge.data.formats import CsvOptions

    write(tmp_path, "comma.csv", "x;y,z\n")  # the guess is ',', the user says ';'
    assert [r for _, r in records_of("comma.csv", csv_options=CsvOptions(delimiter=";"))] == [conv("x", "y,z")]
    write(tmp_path, "wide.csv", "id,question,answer,score\n1,Where?,Here.,5\n2,When?,Now.,4\n")
    expected = [conv("Where?", "Here."), conv("When?", "Now.")]
    assert [r for _, r in records_of("wide.csv", csv_options=CsvOptions(columns="question,answer"))] == expected
    assert [r for _, r in records_of("wide.csv", csv_options=CsvOptions(columns=("2", "3")))] == expected
    report = prepare(["wide.csv"], out="out", csv_columns="Question, ANSWER", val_fraction=0.0)
    assert report["kept"] == 2 and report["csv_headers"]["wide.csv"] == {
        "columns": ["id", "question", "answer", "score"], "decision": "given"}
    proc = cli("prepare", "wide.csv", "--out", "o2", "--csv-columns", "3,2", "--csv-header", "no", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o2" / "train.jsonl").read_text("utf-8").count("\n") + \
        (tmp_path / "o2" / "val.jsonl").read_text("utf-8").count("\n") == 3  # the header row is a record now


def test_notes_beside_conversations_are_not_training_text(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "data/chats.jsonl", jsonl(conv("q1", "a1"), conv("q2", "a2")))
    write(tmp_path, "data/README.md", "# My shop's chats\n\nExported from the CRM.\n")
    write(tmp_path, "data/notes/NOTES.txt", "remember to remove the test dialogs\n")
    write(tmp_path, "data/logo.png", b"\x89PNG")
    report = prepare_command(["data"], out="out", val_fraction=0.0)
    assert report["kept"] == 2 and list(report["sources"]) == [os.path.join("data", "chats.jsonl")]
    text_reason = "plain text beside conversation files (pass --include-text to train on it)"
    assert report["ignored_files"] == [
        {"path": os.path.join("data", "logo.png"), "reason": "unsupported file type"},
        {"path": os.path.join("data", "README.md"), "reason": text_reason},
        {"path": os.path.join("data", "notes", "NOTES.txt"), "reason": text_reason},
    ]
    printed = capsys.readouterr().out
    assert f"ignored, {text_reason}: {os.path.join('data', 'README.md')}, " in printed
    assert "ignored, unsupported file type: " in printed
    assert prepare(["data"], out="out", val_fraction=0.0, include_text=True)["kept"] == 5  # 2 chats + 3 paragraphs
    assert prepare(["data/README.md", "data/chats.jsonl"], out="out", val_fraction=0.0)["kept"] == 4  # named: read
    write(tmp_path, "books/a.txt", "One.\n\nTwo.\n")  # a folder of plain text only is a text corpus
    assert prepare(["books"], out="out", val_fraction=0.0)["kept"] == 2


def test_skip_invalid_skips_a_stray_file_and_lists_it(tmp_path):
    write(tmp_path, "data/chats.jsonl", jsonl(conv("q1", "a1"), conv("q2", "a2")))
    write(tmp_path, "data/config.json", '{"a": 1}')
    write(tmp_path, "data/logo.png", b"\x89PNG")
    proc = cli("prepare", "data", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2 and "data/config.json: cannot tell the format" in proc.stderr
    assert "(or --skip-invalid to skip such files)" in proc.stderr
    proc = cli("prepare", "data", "--out", "out", "--skip-invalid", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text("utf-8"))
    assert report["kept"] == 2
    assert report["ignored_files"] == [
        {"path": "data/logo.png", "reason": "unsupported file type"},
        {"path": "data/config.json", "reason": "cannot tell the format from the first record (fields: 'a'); expected "
         "'messages', 'conversations' (ShareGPT), 'instruction'/'output' (Alpaca) or 'text'; pass --format"},
    ]
    assert "ignored, cannot tell the format" in proc.stdout and "data/config.json" in proc.stdout


def test_role_aliases_are_the_same_in_every_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = conv("Q", "A", "Q2", "A2", system="S")
    aliases = [("system", "human", "bot", "user", "gpt"), (" System", "USER", "model", "Human", "chatgpt")]
    for i, roles in enumerate(aliases):
        msgs = [{"role": r, "content": c} for r, c in zip(roles, ("S", "Q", "A", "Q2", "A2"))]
        write(tmp_path, f"m{i}.jsonl", jsonl({"messages": msgs}))
        write(tmp_path, f"s{i}.jsonl", jsonl({"conversations": [{"from": m["role"], "value": m["content"]}
                                                                 for m in msgs]}))
        assert [r for _, r in records_of(f"m{i}.jsonl")] == [expected]
        assert [r for _, r in records_of(f"s{i}.jsonl")] == [expected]


def test_encoding_option_reads_gbk_and_big5(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chats = [conv("你好，在吗？", "在的！请问有什么可以帮您？"), conv("营业时间？", "每天９点到２１点。")]
    write(tmp_path, "gbk.jsonl", jsonl(*chats).encode("gbk"))
    write(tmp_path, "gbk.csv", "用户,客服\n你好，在吗？,在的！请问有什么可以帮您？\n".encode("gbk"))
    write(tmp_path, "big5.txt", "繁體中文，沒問題。\n".encode("big5"))
    write(tmp_path, "utf16.jsonl", jsonl(*chats).encode("utf-16"))
    assert [r for _, r in records_of("gbk.jsonl", encoding="gbk")] == chats
    assert [r for _, r in records_of("gbk.csv", encoding="gbk")] == chats[:1]
    assert [r for _, r in records_of("big5.txt", encoding="big5")] == [{"text": "繁體中文，沒問題。"}]
    assert [r for _, r in records_of("utf16.jsonl", encoding="utf-16")] == chats
    proc = cli("prepare", "gbk.jsonl", "--out", "out", "--encoding", "gbk", "--val-fraction", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "train.jsonl").read_text("utf-8") == jsonl(*chats)


def test_builtin_corpus_english_and_chinese():
    en_train, en_val, en_report = load_dataset("builtin:english")
    zh_train, zh_val, zh_report = load_dataset("builtin:chinese")
    assert en_report["kept"] > 500 and zh_report["kept"] > 300
    for report in (en_report, zh_report):
        assert report["read"] == report["kept"] + sum(report["dropped"].values())
        assert report["train"] + report["val"] == report["kept"]
    # The corpus ships one malformed entry (a string where a list belongs): counted, never fatal.
    assert en_report["dropped"].get("invalid", 0) >= 1
    assert "builtin:english/trivia:record 14: a conversation must be a list of lines, got string" in \
        en_report["dropped_examples"]["invalid"]
    cjk = re.compile("[\u4e00-\u9fff]")
    assert sum(bool(cjk.search(m["content"])) for r in zh_train for m in r["messages"]) > 300
    assert not any(cjk.search(m["content"]) for r in en_train for m in r["messages"])
    # Chinese keeps its full-width punctuation (NFKC used to turn every ，into ,).
    zh_text = "".join(m["content"] for r in zh_train + zh_val for m in r["messages"])
    assert zh_text.count("，") > 40 and zh_text.count("？") > 5
    both = load_dataset("builtin:chatterbot")[2]
    assert both["kept"] == en_report["kept"] + zh_report["kept"]
    assert load_dataset("builtin:english,chinese")[2]["kept"] == both["kept"]
    assert both["languages"] == {"chinese": {"records": zh_report["kept"], "characters": 10681},
                                 "english": {"records": en_report["kept"], "characters": 89313}}
    one = load_builtin("builtin:chinese/greetings")
    assert len(one) == 25 and one[0] == conv("你好", "嗨")
    assert set(load_dataset("builtin:english/ai")[2]["sources"]) == {"builtin:english/ai"}


def test_builtin_means_every_corpus():
    names = [s.name for s in builtin_sources("builtin")]
    assert names == [s.name for s in builtin_sources("builtin:chatterbot")] + ["builtin:chitchat"]
    assert {s.language for s in builtin_sources("builtin")} == {"english", "chinese"}
    assert [s.name for s in builtin_sources("builtin:chitchat,chinese/ai,chitchat")] == \
        ["builtin:chitchat", "builtin:chinese/ai"]


def test_chitchat_turns_merge_consecutive_messages_of_one_sender():
    """The first conversation of the real data file: each sender's consecutive messages form one turn."""
    from chatforge.data.builtin import chitchat_raw

    (location, turns), = list(chitchat_raw(limit=1))
    assert location == "builtin:chitchat:record 1"
    assert len(turns) == 35
    assert turns[:4] == [
        "Hello\nHow are you doing today?",
        "whats up MD\nim doing good\nhow are you doing?",
        "Im alright, I just took a nap. But it was one of those naps that doesnt help anything. It just makes "
        "everything worse and you question all your life choices",
        "oh wow haha\nso you still feel tired huh?",
    ]


def test_chitchat_through_the_pipeline_on_a_slice(tmp_path):
    """A slice of chitchat as prepare reads it: a conversation nobody answered is dropped as no_reply, named."""
    from chatforge.data.builtin import chitchat_raw
    from chatforge.data.sources import Source, read_sources
    from chatforge.data.clean import clean, dedup

    report = Report()
    source = Source("builtin:chitchat", "chatterbot", None, "english", builtin=True,
                    reader=lambda: chitchat_raw(limit=20))
    kept = list(dedup(clean(read_sources([source], report), report), report))
    assert report.read == 20 and len(kept) + sum(report.dropped.values()) == 20
    assert report.dropped["no_reply"] == 9
    assert report.dropped_examples["no_reply"][0] == "builtin:chitchat:record 3: only one person wrote; nobody replied"
    assert kept[0].record["messages"][0] == {"role": "user", "content": "Hello\nHow are you doing today?"}
    assert all(r.record["messages"][-1]["role"] == "assistant" for r in kept)


# --------------------------------------------------------------------------------------------------------------
# Bad inputs: one line naming file:line and the reason. "…" in an expected message matches anything.

BAD_INPUTS = [
    # (id, files, command-line arguments after `prepare`, expected message)
    ("file-not-found", {}, ["nope.jsonl"], "nope.jsonl: file not found"),
    ("invalid-json-line", {"data.jsonl": jsonl(conv("a", "b"), conv("c", "d")) + '{"messages": [{"role": "user" "content": "x"}]}\n'},
     ["data.jsonl"], "data.jsonl:3: invalid JSON (Expecting ',' delimiter)"),
    ("not-utf8-jsonl", {"x.jsonl": jsonl(conv("a", "b")).encode() + b'{"messages": "\xff"}\n'},
     ["x.jsonl"], "x.jsonl:2: not valid UTF-8 (byte 0xff at column 15); if the file is in another encoding, pass it with --encoding (e.g. --encoding gbk for Simplified Chinese from Windows)"),
    ("missing-messages", {"data.jsonl": jsonl(conv("a", "b"), conv("c", "d"), conv("e", "f"), {"instruction": "q", "output": "a"})},
     ["data.jsonl"], "data.jsonl:4: missing field 'messages'"),
    ("unknown-role", {"data.jsonl": jsonl(conv("a", "b"), {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]})},
     ["data.jsonl"], "data.jsonl:2: message 2 has role 'robot'; expected system, user or assistant (or human, gpt, bot, chatgpt, model)"),
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
     ["s.jsonl"], "s.jsonl:1: message 2 has from 'robot'; expected system, user or assistant (or human, gpt, bot, chatgpt, model)"),
    ("sharegpt-missing-value", {"s.json": json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}])},
     ["s.json"], "s.json:record 1: message 2 missing field 'value'"),
    ("sharegpt-missing-conversations", {"s.jsonl": jsonl({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, {"messages": []})},
     ["s.jsonl"], "s.jsonl:2: missing field 'conversations'"),
    ("alpaca-missing-output", {"a.json": json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q2"}])},
     ["a.json"], "a.json:record 2: missing field 'output'"),
    ("alpaca-input-not-string", {"a.jsonl": jsonl({"instruction": "q", "input": 3, "output": "a"})},
     ["a.jsonl"], "a.jsonl:1: field 'input' must be a string, got number"),
    ("csv-three-columns", {"data.csv": "prompt,response\nhi,hello\nbye,see you\nq,a,extra\n"},
     ["data.csv"], "data.csv:4: expected 2 columns (prompt, response), got 3 (delimiter ','); choose two with --csv-columns USER,ASSISTANT"),
    ("csv-one-column", {"data.csv": "hi,hello\njust one\n"}, ["data.csv"],
     "data.csv:2: expected 2 columns (prompt, response), got 1 (delimiter ','); if the file uses another delimiter, pass --csv-delimiter"),
    ("csv-not-utf8", {"data.csv": b"hi,hello\nbad \xe9,x\n"}, ["data.csv"], "data.csv:2: not valid UTF-8; if the file is in another encoding, pass it with --encoding (e.g. --encoding gbk for Simplified Chinese from Windows)"),
    ("csv-column-name", {"data.csv": "question,answer\nhi,hello\n"}, ["data.csv", "--csv-columns", "question,reply"],
     "data.csv:1: no column named 'reply' in the header (columns: question, answer)"),
    ("csv-columns-one", {"data.csv": "hi,hello\n"}, ["data.csv", "--csv-columns", "2"],
     "csv_columns: expected two different columns USER,ASSISTANT (names from the header or 1-based numbers), got '2'"),
    ("csv-header-value", {"data.csv": "hi,hello\n"}, ["data.csv", "--csv-header", "maybe"], "csv_header: expected auto, yes or no, got 'maybe'"),
    ("csv-delimiter-long", {"data.csv": "hi,hello\n"}, ["data.csv", "--csv-delimiter", ";;"], "csv_delimiter: expected one character (or 'tab'), got ';;'"),
    ("text-not-utf8", {"t.txt": b"fine\n\nalso fine\n\nbad \xff here\n"}, ["t.txt"], "t.txt:5: not valid UTF-8; if the file is in another encoding, pass it with --encoding (e.g. --encoding gbk for Simplified Chinese from Windows)"),
    ("gbk-file", {"zh.jsonl": jsonl(conv("你好", "您好，请问有什么可以帮您？")).encode("gbk")}, ["zh.jsonl"],
     "zh.jsonl:1: not valid UTF-8 (byte 0xc4 at column 44); if the file is in another encoding, pass it with --encoding (e.g. --encoding gbk for Simplified Chinese from Windows)"),
    ("wrong-encoding", {"zh.jsonl": jsonl(conv("你好", "嗨")).encode("utf-8")}, ["zh.jsonl", "--encoding", "ascii"],
     "zh.jsonl:1: not valid ascii (byte 0xe4 at column 44)"),
    ("unknown-encoding", {"d.jsonl": jsonl(conv("a", "b"))}, ["d.jsonl", "--encoding", "klingon-8"],
     "unknown encoding 'klingon-8'; expected a Python codec name such as utf-8, gbk, gb18030, big5, shift_jis or cp1252"),
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
     ["x.yml"], "x.yml:2: not valid UTF-8 (byte 0xe9 at column 8); if the file is in another encoding, pass it with --encoding (e.g. --encoding gbk for Simplified Chinese from Windows)"),
    ("json-syntax", {"x.json": '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q2", "output": "a2",}\n]\n'},
     ["x.json"], "x.json:3: invalid JSON (Expecting property name enclosed in double quotes)"),
    ("json-not-utf8", {"x.json": b'[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "\xff", "output": "b"}\n]\n'},
     ["x.json"], "x.json:3: not valid UTF-8 (byte 0xff at column 20); if the file is in another encoding, pass it with --encoding (e.g. --encoding gbk for Simplified Chinese from Windows)"),
    ("unknown-extension", {"notes.docx": "hello"}, ["notes.docx"], "notes.docx: unknown file type '.docx'; expected one of …"),
    ("undetectable", {"x.jsonl": jsonl({"question": "q", "answer": "a"})},
     ["x.jsonl"], "x.jsonl: cannot tell the format from the first record (fields: 'question', 'answer'); …; pass --format"),
    ("empty-folder", {"empty/notes.rst": "x"}, ["empty"], "empty: no supported files in this folder (expected …)"),
    ("stray-json-in-folder", {"data/a.jsonl": jsonl(conv("a", "b")), "data/config.json": '{"a": 1}'}, ["data"],
     "data/config.json: cannot tell the format from the first record (fields: 'a'); …; pass --format (or --skip-invalid to skip such files)"),
    ("header-only-csv", {"t.csv": "Customer,Agent\n"}, ["t.csv"], "t.csv: no records left to use (read 0)"),
    ("unknown-language", {}, ["builtin:klingon"], "builtin:klingon: unknown corpus or language 'klingon'; available: chitchat, chatterbot, …chinese…english…"),
    ("unknown-category", {}, ["builtin:english/cooking"], "builtin:english/cooking: unknown category 'cooking' for english; available: ai, …"),
    ("unknown-format", {"d.jsonl": jsonl(conv("a", "b"))}, ["d.jsonl", "--format", "xml"],
     "unknown format 'xml'; expected one of messages, sharegpt, alpaca, chatterbot, csv, text, preference"),
    ("format-messages-on-yaml", {"x.yml": "conversations:\n- - a\n  - b\n"}, ["x.yml", "--format", "messages"],
     "x.yml: format 'messages' is read from JSON or JSONL files, not YAML"),
    ("wrong-format-override", {"d.jsonl": jsonl(conv("a", "b"))}, ["d.jsonl", "--format", "alpaca"], "d.jsonl:1: missing field 'instruction'"),
    ("val-fraction", {"d.jsonl": jsonl(conv("a", "b"))}, ["d.jsonl", "--val-fraction", "1.5"], "val_fraction must be in [0, 1), got 1.5"),
    ("max-turn-chars", {"d.jsonl": jsonl(conv("a", "b"))}, ["d.jsonl", "--max-turn-chars", "0"], "max_turn_chars must be at least 1, got 0"),
    ("normalize", {"d.jsonl": jsonl(conv("a", "b"))}, ["d.jsonl", "--normalize", "nfd"], "normalize: expected nfc or nfkc, got 'nfd'"),
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
