"""`chatforge quickstart`: the whole path on the built-in corpus, on a budget small enough for the suite."""

import json

import pytest

from chatforge import load
from chatforge.cli import main
from chatforge.data import load_dataset
from chatforge.tools.quickstart import CORPUS, raw_protocol_test, split_dev


def test_dev_and_test_splits_are_disjoint_from_training():
    train_all, test, _ = load_dataset(CORPUS, 0.1, 0)  # chatterbot: plain "builtin" also holds chitchat
    train, dev = split_dev(train_all, 0.08, 0)
    key = lambda r: json.dumps(r["messages"], sort_keys=True, ensure_ascii=False)  # noqa: E731
    trained = {key(r) for r in train}
    assert not trained & {key(r) for r in test} and not trained & {key(r) for r in dev}
    assert (len(train), len(dev), len(test)) == (1129, 98, 136)
    assert split_dev(train_all, 0.08, 0) == (train, dev)  # the same seed gives the same split
    raw, duplicates = raw_protocol_test(0)
    assert (len(raw), duplicates) == (249, 115)  # the 1.62 reference's test set mostly repeats its training set


@pytest.mark.slow
def test_quickstart_trains_a_chat_model_that_replies_as_reported(tmp_path, capsys, one_thread):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--minutes", "1.5"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "quickstart.json").read_text(encoding="utf-8"))
    assert (result["test_records"], result["test_bytes"]) == (136, 13048)  # NFC keeps CJK punctuation (3 bytes)
    # the summary line quotes the final chat model's figure, not the pretrained stage's
    assert f"held-out bits per byte of the final chat model {result['test_bpb_dialog_final']:.3f}" in printed
    assert "DESIGN.md" not in printed and "ARCHITECTURE.md" in printed
    assert f"chatforge chat {out / 'final'}" in printed
    assert (out / "sft" / "report.html").exists() and (out / "pretrain" / "loss.png").exists()
    bot = load(str(out / "final"))
    for prompt, reply in result["samples"].items():  # the printed samples are what the saved model says
        assert bot.chat([{"role": "user", "content": prompt}], max_new_tokens=40, temperature=0.0) == reply
        assert "\ufffd" not in reply

    assert main(["quickstart", "--out", str(out), "--minutes", "1.5"]) == 2
    assert "holds an earlier quickstart; pass --overwrite" in capsys.readouterr().err
