"""Replay (data/replay.py, the `replay:` config section): general dialogs mixed into fine-tuning come only from the
train split of their corpus, make up the asked share, are cut to end on a reply, and carry their origin."""

import json
from pathlib import Path

import pytest

from chatforge.config import ReplaySpec, load_config
from chatforge.data import load_dataset
from chatforge.data.replay import replay_members, replay_pool
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
    spec = ReplaySpec(data=general_file(tmp_path), share=0.25, max_messages=3, val_fraction=0.2, epochs=4)
    pool, per_epoch, report = replay_pool(domain(), {"kept": 30}, spec, seed=0)
    assert per_epoch == 10 and len(pool) == 40  # 10 of 40 = the 25% share, for 4 epochs
    assert report["replay"] == {"data": spec.data, "share": 0.25, "records_per_epoch": 10, "pool": 40,
                                "domain_records": 30, "max_messages": 3, "val_fraction": 0.2}
    assert report["kept"] == 30
    train, val, _ = load_dataset(spec.data, 0.2, 0)
    held_out = [r["messages"][:2] for r in val]
    assert len({str(r["messages"]) for r in pool}) == 40  # no dialog twice
    for r in pool:
        assert r["meta"] == {"replay": spec.data}
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]  # 3 messages cut back to a reply
        assert r["messages"] not in held_out
        assert any(t["messages"][:2] == r["messages"] for t in train)
    again, _, _ = replay_pool(domain(), None, spec, seed=0)
    assert again == pool  # seeded


def test_each_epoch_replays_dialogs_no_earlier_epoch_had_then_they_come_round():
    epochs = [replay_members(5, 7, 3, e) for e in range(4)]
    for m in epochs:
        assert list(m[:5]) == [0, 1, 2, 3, 4]  # every domain record, every epoch
    assert [list(m[5:]) for m in epochs] == [[5, 6, 7], [8, 9, 10], [11, 5, 6], [7, 8, 9]]  # the pool, wrapping
    assert list(replay_members(5, 0, 0, 3)) == [0, 1, 2, 3, 4]


def test_the_batch_stream_trains_each_epoch_on_its_members_only():
    import numpy as np

    from chatforge.data.pack import BatchStream, Encoded

    ids = [np.full(4, 10 + i, dtype=np.int32) for i in range(12)]  # record i is the token 10 + i, 4 times
    enc = Encoded(ids, [np.ones(4, dtype=np.uint8) for _ in ids], {})
    stream = BatchStream(enc, 3, 1, 0, seed=0, members=lambda e: replay_members(5, 7, 3, e))
    for epoch in range(3):
        seen = set()
        for _ in range(stream.rows_per_epoch()):
            seen |= set(stream.next().input_ids.flatten().tolist()) - {0}
        assert seen == {10 + i for i in replay_members(5, 7, 3, epoch)}


def test_replay_section_is_checked_where_it_is_set(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("init: x\nreplay:\n  share: 1.5\n")
    with pytest.raises(ChatforgeError, match=r"replay\.share: must be between 0 and 1 \(exclusive\), got 1\.5"):
        load_config(str(path), [])
    cfg = load_config(str(path), ["replay.share=0.3", "replay.data=builtin:chitchat"])
    assert cfg.replay == ReplaySpec(data="builtin:chitchat", share=0.3)
    with pytest.raises(ChatforgeError, match="replay.max_messages: must be at least 2"):
        load_config(str(path), ["replay.share=0.3", "replay.max_messages=1"])
    with pytest.raises(ChatforgeError, match="replay: stage dpo is not supported"):
        load_config(str(path), ["replay.share=0.3", "stage=dpo"])
    with pytest.raises(ChatforgeError, match="replay: cannot be used with perturbation"):
        load_config(str(path), ["replay.share=0.3", "perturbation.rate=0.1"])


def replay_args(tmp_path, name: str) -> dict:
    data = tmp_path / "domain.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in domain(40)))
    return {"stage": "sft", "data": str(data), "val_fraction": 0.1, "vocab_size": 300, "out_dir": str(tmp_path / name),
            "model.preset": "nano", "model.d_model": 32, "model.n_head": 2, "model.n_kv_head": 1,
            "model.n_layer": 1, "seq_len": 64, "batch_size": 4, "max_steps": 2, "warmup_steps": 1, "eval_every": 2,
            "dtype": "fp32", "num_threads": 1, "compile": False,
            "replay.data": general_file(tmp_path), "replay.share": 0.5, "replay.max_messages": 2}


def test_training_with_replay_trains_on_the_mix_and_reports_it(tmp_path):
    from chatforge.train.loop import train

    summary = train(load_config(None, [f"{k}={v}" for k, v in replay_args(tmp_path, "r").items()]))
    report = json.loads((tmp_path / "r" / "data_report.json").read_text())
    assert report["replay"]["records_per_epoch"] == report["replay"]["domain_records"] == 36  # half of an epoch
    assert report["replay"]["pool"] == 54  # the general file's whole train split (60 - 10%): < 32 epochs' worth
    assert report["encoding"]["train"]["conversations"] == 36 + 54
    assert summary["steps"] == 2


def test_the_training_loop_gives_each_epoch_its_own_replay_dialogs(tmp_path):
    """Every domain record in every epoch, and 36 of the 54 replay dialogs, the next 36 each epoch."""
    from chatforge.train.loop import set_up

    run, _ = set_up(load_config(None, [f"{k}={v}" for k, v in replay_args(tmp_path, "m").items()]), False, None,
                    lambda event: None)
    epochs = [run.stream.members(e) for e in range(3)]
    assert [len(m) for m in epochs] == [72, 72, 72]
    assert all(list(m[:36]) == list(range(36)) for m in epochs)
    assert [sorted(m[36:] - 36) for m in epochs] == [list(range(36)), list(range(18)) + list(range(36, 54)),
                                                     list(range(18, 54))]


class Stop(Exception):
    pass


def test_training_with_replay_resumes_bit_for_bit_across_epochs(tmp_path):
    """The epochs' changing replay dialogs depend on (seed, epoch) only: a run killed after a few epochs and resumed
    ends with the weights of the run that was never stopped."""
    from safetensors.torch import load_file

    from chatforge.train.events import Stepped
    from chatforge.train.loop import train
    from chatforge.train.run import read_metrics

    def cfg(name: str):
        over = replay_args(tmp_path, name) | {"max_steps": 24, "batch_size": 8, "eval_every": 100, "save_every": 4}
        return load_config(None, [f"{k}={v}" for k, v in over.items()])

    full = train(cfg("full"))
    epochs = [r["epoch"] for r in read_metrics(Path(full["out_dir"]) / "metrics.jsonl") if "epoch" in r]
    assert epochs[13] >= 2  # the cut below (step 14) falls past two epochs: the replay dialogs have changed

    def on_event(event):
        if isinstance(event, Stepped) and event.row["step"] == 14:
            raise Stop

    with pytest.raises(Stop):
        train(cfg("cut"), on_event=on_event)
    resumed = train(cfg("cut"), resume=True)
    a = load_file(f"{full['final_dir']}/model.safetensors")
    b = load_file(f"{resumed['final_dir']}/model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
