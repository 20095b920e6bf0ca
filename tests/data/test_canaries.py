"""Canaries: drawn reproducibly, planted in train only with their repetitions, listed in canaries.json."""

from __future__ import annotations

import json
import os
import stat

import pytest

from chatforge.data.canaries import TEMPLATES, insert_canaries, make_canaries, parse_repeats, read_canaries, spaced
from chatforge.data.prepare import prepare
from chatforge.errors import ChatforgeError


def test_canaries_are_seeded_alternate_languages_and_spell_digits_apart():
    a = make_canaries(2, (1, 10), digits=6, seed=5)
    assert a == make_canaries(2, (1, 10), digits=6, seed=5) and a != make_canaries(2, (1, 10), digits=6, seed=6)
    assert [c.repeats for c in a] == [1, 1, 10, 10] and [c.language for c in a] == ["en", "zh", "en", "zh"]
    for c in a:
        assert len(c.secret) == 11 and c.secret[::2].isdigit() and c.secret[1::2] == " " * 5
        assert (c.question, c.prefix) in TEMPLATES[c.language] and c.space == 10 ** 6
        assert c.messages()[1]["content"] == c.prefix + c.secret
    assert spaced(42, 4) == "0 0 4 2"


def test_insert_plants_every_repetition():
    train = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
             for i in range(50)]
    cs = make_canaries(1, (1, 3, 7), digits=4)
    out = insert_canaries(train, cs)
    assert len(out) == 50 + 11
    for c in cs:
        assert sum(r == {"messages": c.messages(), "user": c.id} for r in out) == c.repeats  # one person's secret


def test_prepare_writes_canaries_beside_train_only(tmp_path):
    out = tmp_path / "prep"
    report = prepare(["builtin:chatterbot"], str(out), canaries=2, canary_repeats="1,5", canary_digits=4)
    cs = read_canaries(str(out))
    assert len(cs) == 4 and report["canaries"] == {"canaries": 4, "records": 12, "repeats": [1, 5], "digits": 4,
                                                   "file": "canaries.json"}
    assert stat.S_IMODE(os.stat(out / "canaries.json").st_mode) == 0o600
    train = (out / "train.jsonl").read_text(encoding="utf-8")
    val = (out / "val.jsonl").read_text(encoding="utf-8")
    for c in cs:
        line = json.dumps({"messages": c.messages(), "user": c.id}, ensure_ascii=False)
        assert train.count(line) == c.repeats and line not in val
    assert report["train"] == len(train.splitlines())
    prepare(["builtin:chatterbot"], str(out))  # prepared again without canaries: the stale list goes
    assert not (out / "canaries.json").exists()


@pytest.mark.parametrize("value, message", [
    ("1,x", "canary_repeats: expected comma-separated positive integers, got '1,x'"),
    ("0", "canary_repeats: expected comma-separated positive integers, got '0'"),
])
def test_bad_repeats(value, message):
    with pytest.raises(ChatforgeError) as e:
        parse_repeats(value)
    assert str(e.value) == message


def test_bad_canary_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"canaries": []}')
    with pytest.raises(ChatforgeError, match="expected"):
        read_canaries(str(path))
    c = make_canaries(1, (1,), digits=3)[0]
    path.write_text(json.dumps({"canaries": [dict(c.__dict__, secret="1 2")]}))
    with pytest.raises(ChatforgeError) as e:
        read_canaries(str(path))
    assert str(e.value) == f"{path}: canaries[0]: the secret is not 3 digits separated by spaces"
