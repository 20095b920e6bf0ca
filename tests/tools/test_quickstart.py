"""`chatforge quickstart`: the whole path on the built-in corpus, on a budget small enough for the suite."""

import json
import math

import pytest

from chatforge import load
from chatforge.cli import main
from chatforge.data import load_dataset
from chatforge.tools import quickstart as qs


def test_dev_and_test_splits_are_disjoint_from_training_and_chinese_is_weighted():
    train_all, test, _ = load_dataset(qs.CORPUS, 0.1, 0)  # chitchat + chatterbot English and Chinese
    train, dev = qs.split_dev(train_all, qs.DEV_FRACTION, 0)
    key = lambda r: json.dumps(r["messages"], sort_keys=True, ensure_ascii=False)  # noqa: E731
    trained = {key(r) for r in train}
    assert not trained & {key(r) for r in test} and not trained & {key(r) for r in dev}
    assert (len(train), len(dev), len(test)) == (4687, 145, 537)
    assert qs.split_dev(train_all, qs.DEV_FRACTION, 0) == (train, dev)  # the same seed gives the same split
    weighted, n_chinese = qs.weight_chinese(train)
    assert n_chinese == sum(map(qs.is_chinese, train)) == 409 and sum(map(qs.is_chinese, test)) == 47
    assert len(weighted) == len(train) + 409 * (qs.ZH_WEIGHT - 1) and weighted[: len(train)] == train


def test_test_conversations_are_scored_in_pieces_that_keep_every_turn_in_order():
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(37)]
    record = {"messages": turns}
    parts = qs.pieces(record, 16)
    assert [len(p["messages"]) for p in parts] == [16, 16, 5]
    assert [m for p in parts for m in p["messages"]] == turns and all(p["messages"][0]["role"] == "user" for p in parts)
    assert qs.pieces({"messages": turns[:4]}, 16) == [{"messages": turns[:4]}]


@pytest.mark.slow
def test_quickstart_trains_a_chat_model_that_replies_as_reported(tmp_path, capsys, one_thread):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--minutes", "4"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "quickstart.json").read_text(encoding="utf-8"))
    assert (result["test_records"], result["test_records_chinese"]) == (537, 47)
    assert (result["test_bytes_english"], result["test_bytes_chinese"]) == (1054576, 4225)  # NFC keeps CJK punctuation
    step = 8 * 256  # the pretraining recipe's batch x seq_len: the budget is reached in whole steps
    assert result["pretrain_tokens"] <= math.ceil(round(600_000 * 4 / 9) / step) * step  # scaled to --minutes
    # the summary line quotes the final chat model's figure
    assert f"held-out bits per byte of the final chat model {result['test_bpb']:.3f}" in printed
    assert "English" in printed and "Chinese" in printed and "character-level GPT" in printed
    assert f"chatforge chat {out / 'final'}" in printed
    assert (out / "sft" / "report.html").exists() and (out / "pretrain" / "loss.png").exists()
    bot = load(str(out / "final"))
    assert {k: bot.defaults[k] for k in result["decoding"]} == result["decoding"]  # chat decodes as the samples did
    for i, (prompt, reply) in enumerate(result["samples"].items()):  # the printed samples: what the saved model says
        assert bot.chat([{"role": "user", "content": prompt}], max_new_tokens=40, seed=i) == reply

    assert main(["quickstart", "--out", str(out), "--minutes", "4"]) == 2
    assert "holds an earlier quickstart; pass --overwrite" in capsys.readouterr().err
