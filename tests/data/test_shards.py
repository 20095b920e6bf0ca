"""Data larger than memory: streaming prepare equals the in-memory pipeline, token shards hold exactly what
encode_records makes, training on shards draws the in-memory batches and resumes bit for bit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.config import load_config
from chatforge.data.pack import BatchStream, encode_records, iter_batches, pack, packed
from chatforge.data.prepare import build, prepare
from chatforge.data.shards import STAGE_ENCODING, ShardedEncoded, open_index
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import train_tokenizer
from conftest import resume_training, train_until_killed

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()


def write_corpus(path: Path, n: int = 400) -> Path:
    """Conversations with duplicates (i % 300), empty replies, whitespace to clean and an e-mail to scrub."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            k = i % 300
            words = " ".join(WORDS[(k * j) % len(WORDS)] for j in range(1, 2 + k % 9))
            msgs = [{"role": "user", "content": f"Tell me about {words}  #{k} (mail x{k}@example.com)"},
                    {"role": "assistant", "content": "" if k % 37 == 5 else f"{words.upper()} is number {k}."}]
            if k % 4 == 0:
                msgs += [{"role": "user", "content": "more?"}, {"role": "assistant", "content": words * 3}]
            f.write(json.dumps({"messages": msgs}) + "\n")
        f.write("{not json\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "chats.jsonl")


@pytest.fixture(scope="module")
def tok(corpus):
    lines = corpus.read_text().splitlines()[:-1]
    return train_tokenizer([m["content"] for line in lines for m in json.loads(line)["messages"]], vocab_size=400)


def _lines(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_prepare_writes_what_the_in_memory_pipeline_makes(tmp_path, corpus, workers):
    opts = dict(skip_invalid=True, scrub_pii="placeholder", val_fraction=0.2, seed=5)
    got = prepare([str(corpus)], str(tmp_path / "out"), workers=workers, **opts)
    from chatforge.data.prepare import PrepareOptions

    train, val, report = build([str(corpus)], PrepareOptions(**opts))
    assert (tmp_path / "out/train.jsonl").read_text() == _lines(train)
    assert (tmp_path / "out/val.jsonl").read_text() == _lines(val)
    want = report.to_dict()
    assert got == want  # every count, per reason and per file, and the examples ("... same as FILE:LINE")
    assert got["dropped"]["duplicate"] == 97 and got["dropped"]["invalid"] == 1 and got["pii"]["EMAIL"] > 300
    assert got["dropped_examples"]["duplicate"][0].endswith(f"same as {corpus}:1")
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]  # no spool left behind


def test_shards_hold_the_pieces_of_encode_records(tmp_path, corpus, tok):
    report = prepare([str(corpus)], str(tmp_path / "out"), skip_invalid=True, tokenizer=tok, shard_seq_len=24,
                     workers=0)
    from chatforge.data.prepare import PrepareOptions

    train, val, _ = build([str(corpus)], PrepareOptions(skip_invalid=True))
    index = open_index(str(tmp_path / "out"))
    assert index["dtype"] == "uint16" and index["stage"] == "sft" and index["seq_len"] == 24
    for split, records in (("train", train), ("val", val)):
        enc = encode_records(records, tok, "assistant", 25, False)
        shard = ShardedEncoded(str(tmp_path / "out"), index, split)
        assert len(shard) == len(enc.ids) and shard.stats == enc.stats
        assert enc.stats["truncated"] > 0  # the cut at seq_len + 1 is the one training makes
        for (ids, mask), want_ids, want_mask in zip(shard.pieces(range(len(shard))), enc.ids, enc.masks):
            assert ids.dtype == np.int32 and np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask)
        assert report["shards"][split]["records"] == len(records)
    # prepared again without a tokenizer: the shards no longer describe the files and go
    prepare([str(corpus)], str(tmp_path / "out"), skip_invalid=True, val_fraction=0.3)
    assert open_index(str(tmp_path / "out")) is None and not (tmp_path / "out/shards").exists()


def test_shards_split_into_several_files_and_pool_tokenizing_agree(tmp_path, corpus, tok, monkeypatch):
    from chatforge.data import shards
    from chatforge.data.shards import ShardBuilder

    monkeypatch.setattr(shards, "CHUNK_RECORDS", 50)  # chunks of 50 records, shards of ~3000 tokens

    records = [json.loads(line) for line in (open(corpus).readlines()[:-1])]
    index = {}
    for workers, name in ((0, "a"), (2, "b")):
        b = ShardBuilder(str(tmp_path / name), tok, "pretrain", 16, workers=workers, shard_tokens=3000)
        for r in records:
            b.add("train", json.dumps(r))
        index[name] = b.close()
    assert len(index["a"]["train"]["shards"]) > 2 and index["a"]["train"] == index["b"]["train"]
    enc = encode_records(records, tok, "all", 17, True)
    shard = ShardedEncoded(str(tmp_path / "b"), index["b"], "train")
    assert enc.stats["split"] > 0 and len(shard) == len(enc.ids)
    got = shard.pieces(np.random.default_rng(0).permutation(len(shard)))
    want = [(enc.ids[i], enc.masks[i]) for i in np.random.default_rng(0).permutation(len(shard))]
    assert all(np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(got, want))


def test_batches_from_shards_are_the_in_memory_batches(tmp_path, corpus, tok):
    prepare([str(corpus)], str(tmp_path / "out"), skip_invalid=True, tokenizer=tok, shard_seq_len=48, workers=0)
    from chatforge.data.prepare import load_dataset

    train, val, _ = load_dataset(str(tmp_path / "out"))
    index = open_index(str(tmp_path / "out"))
    enc = encode_records(train, tok, "assistant", 49, False)
    streams = [BatchStream(e, 48, 5, tok.pad_id, seed=7) for e in (enc, ShardedEncoded(str(tmp_path / "out"),
                                                                                        index, "train"))]
    n = 3 * streams[0].rows_per_epoch() // 5 + 2  # three epochs and a bit: reshuffled and repacked each
    for step in range(n):
        a, b = streams[0].next(), streams[1].next()
        for x, y in zip((a.input_ids, a.targets, a.loss_mask, a.doc_ids, a.position_ids),
                        (b.input_ids, b.targets, b.loss_mask, b.doc_ids, b.position_ids)):
            assert torch.equal(x, y), step
        if step == n // 2:  # a resumed stream continues with the same batches
            state = streams[1].state()
            streams[1] = BatchStream(ShardedEncoded(str(tmp_path / "out"), index, "train"), 48, 5, tok.pad_id, 7)
            streams[1].load_state(state)
    # evaluation rows: built per batch, the same as pack's
    val_enc = ShardedEncoded(str(tmp_path / "out"), index, "val")
    lazy = list(iter_batches(packed(val_enc, 48, tok.pad_id), 4))
    full = list(iter_batches(pack(encode_records(val, tok, "assistant", 49, False), 48, tok.pad_id), 4))
    assert len(lazy) == len(full) and all(torch.equal(x.input_ids, y.input_ids) and
                                          torch.equal(x.loss_mask, y.loss_mask) for x, y in zip(lazy, full))


def test_shard_stages_are_the_training_stages():
    from chatforge.train.loss import STAGES

    for name, (target, split_long) in STAGE_ENCODING.items():
        assert (STAGES[name].target, STAGES[name].split_long) == (target, split_long)


def test_encrypted_data_is_never_written_as_plaintext_shards(tmp_path, corpus, tok, monkeypatch):
    """Encrypted input (or --encrypt) with a tokenizer: refused in one line before anything is written; without a
    tokenizer it takes the in-memory path and every output stays encrypted."""
    import base64

    from chatforge.privacy.crypto import encrypt_bytes, generate_key, key_from_env

    monkeypatch.setenv("CHATFORGE_KEY", base64.b64encode(generate_key()).decode())
    secret = tmp_path / "chats.jsonl.cfenc"
    encrypt_bytes(corpus.read_bytes(), str(secret), key_from_env())
    message = ("prepare --tokenizer: token shards would hold the encrypted data in plaintext; drop --tokenizer "
               "(training reads encrypted data and tokenizes it in memory)")
    for inputs, encrypt in (([str(secret)], False), ([str(corpus)], True)):
        with pytest.raises(ChatforgeError) as e:
            prepare(inputs, str(tmp_path / "out"), skip_invalid=True, tokenizer=tok, encrypt=encrypt)
        assert str(e.value) == message
        assert not (tmp_path / "out").exists()
    report = prepare([str(secret)], str(tmp_path / "out"), skip_invalid=True)
    assert report["encrypted"] and sorted(os.listdir(tmp_path / "out")) == [
        "report.json.cfenc", "train.jsonl.cfenc", "val.jsonl.cfenc"]


# ---------------------------------------------------------------- training on shards

def _config(tmp: Path, data: Path, tokenizer: Path, name: str, **over) -> list[str]:
    base = {"stage": "sft", "data": str(data), "tokenizer": str(tokenizer), "out_dir": str(tmp / name),
            "model.preset": "nano", "model.d_model": 32, "model.n_head": 2, "model.n_kv_head": 1,
            "model.n_layer": 1, "dropout": 0.0, "seq_len": 48, "batch_size": 4, "grad_accum": 2, "lr": 3e-3,
            "warmup_steps": 3, "max_steps": 24, "eval_every": 8, "eval_batches": 2, "save_every": 4,
            "dtype": "fp32", "num_threads": 1, "seed": 3, "log_every": 4, "compile": False}
    return [f"{k}={v}" for k, v in (base | over).items()]


def _losses(out: Path) -> list[tuple]:
    from chatforge.train.run import read_metrics

    return [(m["step"], m["loss"], m.get("val_loss"), m["lr"]) for m in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus, tok):
    folder = tmp_path_factory.mktemp("prepared")
    tok.save(str(folder / "tok"))
    prepare([str(corpus)], str(folder / "data"), skip_invalid=True, tokenizer=tok, shard_seq_len=48, workers=0)
    return folder


def test_training_on_shards_equals_training_in_memory(tmp_path, prepared):
    from chatforge.data.prepare import load_dataset
    from chatforge.train.loop import train

    data, tokenizer = prepared / "data", prepared / "tok"
    events = []
    on_shards = train(load_config(None, _config(tmp_path, data, tokenizer, "shards", max_steps=8)),
                      on_event=events.append)
    in_memory = train(load_config(None, _config(tmp_path, data, tokenizer, "memory", max_steps=8)),
                      records=load_dataset(str(data)))
    assert on_shards["steps"] == in_memory["steps"] == 8
    assert _losses(tmp_path / "shards") == _losses(tmp_path / "memory")  # exactly: the same batches
    report = json.loads((tmp_path / "shards" / "data_report.json").read_text())
    assert report["shards"]["train"]["records"] == report["train"] and not any(
        "not used" in getattr(e, "text", "") for e in events)
    # shards of another seq_len are not used; the run says so and tokenizes in memory
    notes = []
    train(load_config(None, _config(tmp_path, data, tokenizer, "other", max_steps=1, seq_len=64)),
          on_event=notes.append)
    assert any("shards not used (made for stage sft and seq_len 48, this run is sft, 64)" in str(e) for e in notes)


@pytest.mark.slow
def test_exact_resume_after_sigkill_on_shards(tmp_path, prepared):
    """Killed mid-run and resumed on sharded data, the losses equal an uninterrupted run's at every step."""
    from chatforge.train.loop import train

    data, tokenizer = prepared / "data", prepared / "tok"
    args = _config(tmp_path, data, tokenizer, "killed")
    killed_at = train_until_killed(args, tmp_path / "killed", step=8)
    assert 8 <= killed_at < 24
    train(load_config(None, _config(tmp_path, data, tokenizer, "ref")))
    resume_training(args)
    got, want = _losses(tmp_path / "killed"), _losses(tmp_path / "ref")
    assert [g[0] for g in got] == list(range(1, 25))
    assert got == want  # bit for bit: the same floats
