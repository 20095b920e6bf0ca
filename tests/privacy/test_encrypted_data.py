"""Encrypted datasets: prepare reads encrypted inputs and writes encrypted outputs, training reads an encrypted
prepared folder, both in memory only; the same records and the same trained weights as from plaintext."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from chatforge.cli import main
from chatforge.config import load_config
from chatforge.data import load_dataset
from chatforge.data.prepare import prepare
from chatforge.errors import ChatforgeError
from chatforge.privacy import crypto

pytestmark = pytest.mark.usefixtures("no_network")

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def dialogs(n: int = 60) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 10, (i * 7 + 3) % 10
        out.append({"messages": [{"role": "user", "content": f"What is {NUMBERS[a]} plus {NUMBERS[b]}? (#{i})"},
                                 {"role": "assistant", "content": f"{NUMBERS[a]} plus {NUMBERS[b]} is {a + b}."}]})
    return out


# Strings only the plaintext of the data holds (a whole user turn, with its record number).
MARKERS = [f"plus {NUMBERS[(i * 7 + 3) % 10]}? (#{i})".encode() for i in range(0, 60, 7)]


@pytest.fixture
def key(monkeypatch) -> crypto.Key:
    k = crypto.Key(raw=crypto.generate_key())
    monkeypatch.setenv(crypto.KEY_ENV, base64.b64encode(k.raw).decode())
    monkeypatch.delenv(crypto.PASSPHRASE_ENV, raising=False)
    return k


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """A fresh temp folder, so a test can show nothing was written there."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture
def raw(tmp_path, key) -> tuple[Path, Path]:
    """(a plain folder holding dialogs.jsonl, the same folder encrypted by `chatforge encrypt`)."""
    plain = tmp_path / "raw"
    plain.mkdir()
    (plain / "dialogs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dialogs()), encoding="utf-8")
    crypto.encrypt_path(str(plain), str(tmp_path / "raw.enc"), key, chunk_size=1024)
    return plain, tmp_path / "raw.enc"


def no_plaintext(*folders: Path) -> None:
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert not any(m in data for m in MARKERS), f"plaintext of the data in {p}"


def test_prepare_reads_encrypted_inputs_and_writes_encrypted_outputs(raw, key, tmp_path, isolated):
    plain, enc = raw
    want = prepare([str(plain)], str(tmp_path / "p"), val_fraction=0.2, canaries=1, canary_repeats="2")
    got = prepare([str(enc)], str(tmp_path / "e"), val_fraction=0.2, canaries=1, canary_repeats="2")
    assert got["encrypted"] is True and "encrypted" not in want
    assert sorted(os.listdir(tmp_path / "e")) == ["canaries.json.cfenc", "report.json.cfenc", "train.jsonl.cfenc",
                                                   "val.jsonl.cfenc"]
    for name in ("train.jsonl", "val.jsonl", "canaries.json"):
        assert crypto.decrypt_bytes(str(tmp_path / "e" / (name + ".cfenc")), key) == \
            (tmp_path / "p" / name).read_bytes()
    assert os.stat(tmp_path / "e" / "canaries.json.cfenc").st_mode & 0o777 == 0o600
    assert (got["train"], got["val"], got["kept"]) == (want["train"], want["val"], want["kept"])
    # one encrypted file named on the command line, its format told from NAME of NAME.cfenc
    single = prepare([str(enc / "dialogs.jsonl.cfenc")], str(tmp_path / "s"), val_fraction=0.2)
    prepare([str(plain / "dialogs.jsonl")], str(tmp_path / "q"), val_fraction=0.2)
    assert crypto.decrypt_bytes(str(tmp_path / "s" / "train.jsonl.cfenc"), key) == \
        (tmp_path / "q" / "train.jsonl").read_bytes()
    assert single["sources"][str(enc / "dialogs.jsonl.cfenc")]["format"] == "messages"
    # and the audit reads the encrypted canaries beside the data
    from chatforge.data.canaries import read_canaries

    assert read_canaries(str(tmp_path / "e")) == read_canaries(str(tmp_path / "p"))
    no_plaintext(tmp_path / "e", tmp_path / "s", enc, isolated)


def test_prepare_encrypt_flag_and_a_prepared_folder_read_back(raw, key, tmp_path):
    plain, _ = raw
    prepare([str(plain)], str(tmp_path / "p"), val_fraction=0.2)
    prepare([str(plain)], str(tmp_path / "e"), val_fraction=0.2, encrypt=True)
    assert load_dataset(str(tmp_path / "e"))[:2] == load_dataset(str(tmp_path / "p"))[:2]
    # a folder that `chatforge encrypt` made of a plain prepared folder reads the same
    crypto.encrypt_path(str(tmp_path / "p"), str(tmp_path / "p.enc"), key)
    train, val, report = load_dataset(str(tmp_path / "p.enc"))
    assert (train, val) == load_dataset(str(tmp_path / "p"))[:2] and report["train"] == len(train)
    # re-preparing in place leaves one version of each file, not a stale plaintext beside the ciphertext
    prepare([str(plain)], str(tmp_path / "p"), val_fraction=0.2, encrypt=True)
    assert sorted(os.listdir(tmp_path / "p")) == ["report.json.cfenc", "train.jsonl.cfenc", "val.jsonl.cfenc"]


def tiny(data: Path, out: Path) -> list[str]:
    cfg = {"stage": "sft", "data": str(data), "vocab_size": 300, "out_dir": str(out), "model.preset": "nano",
           "model.d_model": 32, "model.n_head": 2, "model.n_kv_head": 1, "model.n_layer": 1, "seq_len": 48,
           "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "max_steps": 6, "eval_every": 3, "eval_batches": 1,
           "save_every": 3, "dtype": "fp32", "num_threads": 1, "seed": 3, "log_every": 3, "compile": "false"}
    return [f"{k}={v}" for k, v in cfg.items()]


def test_prepare_then_train_from_encrypted_data_matches_plaintext(raw, key, tmp_path, isolated, one_thread):
    """The round trip: prepare from encrypted files, train on the encrypted prepared folder; the weights and the
    validation loss equal those of the same run on plaintext, and no plaintext is left in the run folder or tmp."""
    from safetensors.torch import load_file

    from chatforge.train.loop import train

    plain, enc = raw
    prepare([str(plain)], str(tmp_path / "p"), val_fraction=0.2)
    prepare([str(enc)], str(tmp_path / "e"), val_fraction=0.2)
    want = train(load_config(None, tiny(tmp_path / "p", tmp_path / "run-p")))
    got = train(load_config(None, tiny(tmp_path / "e", tmp_path / "run-e")))
    assert got["val_loss"] == want["val_loss"] and got["steps"] == want["steps"] == 6
    a = load_file(str(tmp_path / "run-p" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "run-e" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    no_plaintext(tmp_path / "run-e", tmp_path / "e", isolated)
    # the markers are there to find: the plain run's sources hold them
    with pytest.raises(AssertionError):
        no_plaintext(tmp_path / "p")


def test_a_wrong_or_missing_key_is_one_line_and_exit_2(raw, tmp_path, monkeypatch, capsys):
    _, enc = raw
    assert main(["prepare", str(enc), "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    monkeypatch.setenv(crypto.KEY_ENV, base64.b64encode(crypto.generate_key()).decode())
    assert main(["prepare", str(enc), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("dialogs.jsonl.cfenc: wrong key, or the header was altered (the header check does not match)")
    assert "\n" not in err and not (tmp_path / "x").exists()
    assert main(["train", f"data={tmp_path / 'e'}", f"out_dir={tmp_path / 'run'}", "max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.jsonl.cfenc: wrong key" in err and "\n" not in err
    key_file = tmp_path / "other.key"
    crypto.write_key_file(str(key_file))
    assert main(["prepare", str(enc), "--out", str(tmp_path / "x"), "--key-file", str(key_file)]) == 2
    assert "wrong key" in capsys.readouterr().err
    monkeypatch.delenv(crypto.KEY_ENV)
    with pytest.raises(ChatforgeError, match="no key: set CHATFORGE_KEY"):
        load_dataset(str(tmp_path / "e"))


def test_a_passphrase_from_the_environment_reads_data_without_flags(raw, tmp_path, monkeypatch):
    plain, _ = raw
    monkeypatch.delenv(crypto.KEY_ENV)
    monkeypatch.setenv(crypto.PASSPHRASE_ENV, "correct horse battery staple")
    fast = crypto.key_from_passphrase("correct horse battery staple", argon2=(64, 1, 1))
    crypto.encrypt_path(str(plain), str(tmp_path / "pp.enc"), fast)
    assert load_dataset(str(tmp_path / "pp.enc"), 0.2)[:2] == load_dataset(str(plain), 0.2)[:2]
