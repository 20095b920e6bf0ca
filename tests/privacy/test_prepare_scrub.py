"""`chatforge prepare --scrub-pii`: texts scrubbed after cleaning and before de-duplication, counts per type in the
report, pseudonyms consistent within the dataset."""

import json

import pytest

from chatforge.data.prepare import prepare
from chatforge.errors import ChatforgeError

pytestmark = pytest.mark.usefixtures("no_network")  # nothing here may open a connection


def _write(path, texts):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                            for u, a in texts))


def _records(folder):
    return [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]


def test_placeholders_counts_and_dedup(tmp_path):
    _write(tmp_path / "in.jsonl", [("mail a.b@example.com or 13812345678", "noted 13812345678"),
                                   ("mail c.d@example.com or 13812345678", "noted 13812345678"),
                                   ("no personal data here", "fine")])
    report = prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), scrub_pii="placeholder", val_fraction=0)
    assert report["pii"] == {"EMAIL": 2, "PHONE": 4}
    assert report["dropped"] == {"duplicate": 1}  # the two differed only in the e-mail address
    assert _records(tmp_path / "out")[0]["messages"] == [
        {"role": "user", "content": "mail <EMAIL> or <PHONE>"}, {"role": "assistant", "content": "noted <PHONE>"}]


def test_pseudonyms_consistent_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_PII_KEY", "a2V5a2V5a2V5a2V5a2V5a2V5")  # 18 bytes
    _write(tmp_path / "in.jsonl", [("call 13812345678", "ok"), ("again +86 138 1234 5678", "ok")])
    prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "a"), scrub_pii="pseudonym", val_fraction=0)
    prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "b"), scrub_pii="pseudonym", val_fraction=0)
    a = [r["messages"][0]["content"].split()[-1] for r in _records(tmp_path / "a")]
    assert a[0] == a[1] and a[0].startswith("<PHONE_")
    assert _records(tmp_path / "a") == _records(tmp_path / "b")  # same key, same pseudonyms
    assert "a2V5" not in (tmp_path / "a" / "report.json").read_text()


def test_no_scrub_by_default_and_bad_mode(tmp_path):
    _write(tmp_path / "in.jsonl", [("mail a.b@example.com", "ok")])
    report = prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), val_fraction=0)
    assert report["pii"] == {} and "a.b@example.com" in (tmp_path / "out" / "train.jsonl").read_text()
    with pytest.raises(ChatforgeError, match="^scrub_pii: expected placeholder or pseudonym, got 'hash'$"):
        prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "o2"), scrub_pii="hash")
