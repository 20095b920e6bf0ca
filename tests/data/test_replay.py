"""Replay (data/replay.py, the `replay:` config section): general dialogs mixed into fine-tuning come only from the
train split of their corpus, make up the asked share, are cut to end on a reply, and carry their origin."""

import json

import pytest

from chatforge.config import ReplaySpec, load_config
from chatforge.data import load_dataset
from chatforge.data.replay import mix_replay
from chatforge.errors import ChatforgeError


def general_file(tmp_path, n=60) -> str:
    rows = [{"messages": [{"role": "user", "content": f"hello number {i}, how was your day?"},
                          {"role": "assistant", "content": f"fine, thanks, it was day {i}."},
                          {"role": "user", "content": f"what did you do on day {i}?"},
                          {"role": "assistant", "content": f"I read book {i}."},
                          {"role": "user", "content": "nice!"}]} for i in range(n)]
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def domain(n=30) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


def test_replay_share_comes_from_the_train_split_only_and_ends_on_a_reply(tmp_path):
    spec = ReplaySpec(data=general_file(tmp_path), share=0.25, max_messages=3, val_fraction=0.2)
    mixed, report = mix_replay(domain(), {"kept": 30}, spec, seed=0)
    extra = [r for r in mixed if "meta" in r]
    assert len(mixed) == 40 and len(extra) == 10  # 10 of 40 = the 25% share
    assert report["replay"] == {"data": spec.data, "share": 0.25, "records": 10, "domain_records": 30,
                                "max_messages": 3, "val_fraction": 0.2}
    assert report["kept"] == 30
    train, val, _ = load_dataset(spec.data, 0.2, 0)
    held_out = [r["messages"][:2] for r in val]
    for r in extra:
        assert r["meta"] == {"replay": spec.data}
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]  # 3 messages cut back to a reply
        assert r["messages"] not in held_out
        assert any(t["messages"][:2] == r["messages"] for t in train)
    assert [r for r in mixed if "meta" not in r] != domain()  # shuffled in among the domain records ...
    assert sorted(str(r) for r in mixed if "meta" not in r) == sorted(str(r) for r in domain())  # ... all kept
    again, _ = mix_replay(domain(), None, spec, seed=0)
    assert again == mixed  # seeded


def test_replay_section_is_checked_where_it_is_set(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("init: x\nreplay:\n  share: 1.5\n")
    with pytest.raises(ChatforgeError, match=r"replay\.share: must be between 0 and 1 \(exclusive\), got 1\.5"):
        load_config(str(path), [])
    cfg = load_config(str(path), ["replay.share=0.3", "replay.data=builtin:chitchat"])
    assert cfg.replay == ReplaySpec(data="builtin:chitchat", share=0.3)
    with pytest.raises(ChatforgeError, match="replay.max_messages: must be at least 2"):
        load_config(str(path), ["replay.share=0.3", "replay.max_messages=1"])


def test_training_with_replay_trains_on_the_mix_and_reports_it(tmp_path):
    from chatforge.train.loop import train

    data = tmp_path / "domain.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in domain(40)))
    args = {"stage": "sft", "data": str(data), "val_fraction": 0.1, "vocab_size": 300, "out_dir": str(tmp_path / "r"),
            "model.preset": "nano", "model.d_model": 32, "model.n_head": 2, "model.n_kv_head": 1,
            "model.n_layer": 1, "seq_len": 64, "batch_size": 4, "max_steps": 2, "warmup_steps": 1, "eval_every": 2,
            "dtype": "fp32", "num_threads": 1, "compile": False,
            "replay.data": general_file(tmp_path), "replay.share": 0.5, "replay.max_messages": 2}
    summary = train(load_config(None, [f"{k}={v}" for k, v in args.items()]))
    report = json.loads((tmp_path / "r" / "data_report.json").read_text())
    assert report["replay"]["records"] == report["replay"]["domain_records"] == 36  # half of the 72 trained on
    assert summary["steps"] == 2
