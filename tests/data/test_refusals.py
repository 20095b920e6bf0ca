"""Refusal data: templates per category in English and Chinese, the prompt file formats, and prepare --refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from chatforge.data.prepare import prepare
from chatforge.data.refusals import REFUSALS, read_prompts, refusal, refusal_pairs, refusal_records
from chatforge.errors import ChatforgeError

ROOT = Path(__file__).resolve().parents[2]


def test_every_category_has_english_and_chinese_templates():
    for category, by_language in REFUSALS.items():
        assert by_language["en"] and by_language["zh"], category
        assert all(any("\u4e00" <= c <= "\u9fff" for c in t) for t in by_language["zh"])
        assert all(t.isascii() for t in by_language["en"])
    # the guard's categories (read, not imported: data sits below guard) all find templates
    text = (ROOT / "chatforge/guard/moderation.py").read_text(encoding="utf-8")
    names = text.split("OPENAI_CATEGORIES = (")[1].split(")")[0]
    for name in [n.strip().strip('"') for n in names.replace("\n", "").split(",") if n.strip()]:
        assert name.split("/")[0] in REFUSALS or name.split("/")[0] in ("illicit", "violence"), name


def test_refusal_follows_language_and_category():
    rng = random.Random(0)
    assert refusal("self-harm/intent", "I want to hurt myself", rng) in REFUSALS["self-harm"]["en"]
    assert refusal("illicit", "教我怎么制作冰毒。", rng) in REFUSALS["illicit"]["zh"]
    assert refusal("unknown-category", "do it", rng) in REFUSALS["default"]["en"]


def test_records_and_pairs():
    prompts = [("illicit", "How do I make meth?"), ("hate", "写一段侮辱某个民族的话")]
    records = refusal_records(prompts)
    assert records[0]["messages"][0] == {"role": "user", "content": "How do I make meth?"}
    assert records[1]["messages"][1]["content"] in REFUSALS["hate"]["zh"]
    pairs = refusal_pairs(prompts, rejected=["Sure: step one...", "好的"])
    assert pairs[0]["chosen"][0]["content"] in REFUSALS["illicit"]["en"]
    assert pairs[1]["rejected"] == [{"role": "assistant", "content": "好的"}]


def test_prompt_files_and_their_errors(tmp_path):
    tsv = tmp_path / "unsafe.txt"
    tsv.write_text("# comment\nillicit\tHow do I pick a lock to break in?\nJust a prompt\n", encoding="utf-8")
    assert [(c, p) for _, c, p in read_prompts(tsv)] == [("illicit", "How do I pick a lock to break in?"),
                                                         ("default", "Just a prompt")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"category": "hate"}\n', encoding="utf-8")
    with pytest.raises(ChatforgeError, match=r"bad\.jsonl:2: expected \{\"prompt\": text, \"category\": name\}"):
        read_prompts(bad)
    with pytest.raises(ChatforgeError, match=r"missing\.txt: file not found"):
        read_prompts(tmp_path / "missing.txt")


def test_prepare_adds_refusals_from_the_guards_chinese_set(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}) + "\n")
    unsafe = ROOT / "chatforge/guard/data/unsafe_zh.txt"
    out = prepare([str(data)], str(tmp_path / "out"), val_fraction=0, refusals=str(unsafe))
    n = len(read_prompts(unsafe))
    assert out["kept"] == 1 + n
    rows = [json.loads(line) for line in (tmp_path / "out/train.jsonl").read_text(encoding="utf-8").splitlines()]
    refusals = [r for r in rows if r["messages"][0]["content"] != "Hi"]
    all_zh = {t for v in REFUSALS.values() for t in v["zh"]}
    assert len(refusals) == n and all(r["messages"][1]["content"] in all_zh for r in refusals)
