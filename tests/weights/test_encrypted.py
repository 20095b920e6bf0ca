"""Encrypted model folders: loaded in memory only, the same tokens as the plain folder, one-line errors."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
import torch

from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.privacy import crypto

PROMPT = [{"role": "user", "content": "hello there"}]
GREEDY = dict(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(plain folder, encrypted folder, key): a tiny random model, encrypted file by file."""
    from chatforge.model.gpt import GPT, ModelConfig
    from chatforge.tokenizer import train_tokenizer
    from chatforge.weights.folder import save_model

    root = tmp_path_factory.mktemp("enc")
    tok = train_tokenizer(["hello there, how are you today?", "the weather is nice", "你好，今天天气很好"] * 5,
                          vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, max_seq_len=128))
    plain = root / "plain"
    save_model(model.eval(), tok, plain, generation_config={"do_sample": False})
    key = crypto.Key(raw=crypto.generate_key())
    crypto.encrypt_path(str(plain), str(root / "enc"), key, chunk_size=4096)
    return plain, root / "enc", key


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Fresh temp and cache folders, so a test can prove nothing was written there."""
    tmp, cache = tmp_path / "tmp", tmp_path / "cache"
    tmp.mkdir()
    cache.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("CHATFORGE_CACHE", str(cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return [tmp, cache]


def _markers(plain: Path) -> list[bytes]:
    """Byte strings that only plaintext of the model holds: each file's first 64 bytes."""
    return [p.read_bytes()[:64] for p in plain.iterdir() if p.stat().st_size >= 16]


def _no_plaintext(dirs: list[Path], plain: Path) -> None:
    markers = _markers(plain)
    for d in dirs:
        for p in d.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert not any(m in data for m in markers), f"plaintext of the model in {p}"


def test_encrypted_folder_is_only_ciphertext(folders):
    plain, enc, _ = folders
    names = sorted(p.name for p in enc.iterdir())
    assert names == sorted(p.name + ".cfenc" for p in plain.iterdir())
    _no_plaintext([enc], plain)


def test_bot_load_gives_the_same_tokens_and_writes_no_plaintext(folders, isolated, monkeypatch):
    from chatforge.generation.bot import Bot
    from chatforge.weights.loader import load, resolve

    plain, enc, key = folders
    assert resolve(enc).encrypted and resolve(enc).kind == "folder"
    ref = Bot.load(str(plain))
    got = Bot.load(str(enc), key=key)
    ids, params = ref.request(PROMPT, **GREEDY)
    want = ref.engine.generate_batch([ids], params)[0]
    have = got.engine.generate_batch([got.request(PROMPT, **GREEDY)[0]], got.request(PROMPT, **GREEDY)[1])[0]
    assert have.token_ids == want.token_ids and len(want.token_ids) > 0
    assert got.defaults == ref.defaults  # generation_config.json read from the encrypted copy too
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, got.model.state_dict()[k])
    # quantized while read, from memory as from the plain folder
    q_plain, q_enc = load(str(plain), quantize="int8-wo").model, load(str(enc), key=key, quantize="int8-wo").model
    assert q_enc.quantization == "int8-wo" and q_plain.state_dict().keys() == q_enc.state_dict().keys()
    assert all(torch.equal(v, q_enc.state_dict()[k]) for k, v in q_plain.state_dict().items())
    # the key from the environment, as commands default to
    monkeypatch.setenv("CHATFORGE_KEY", base64.b64encode(key.raw).decode())
    assert load(str(enc)).tokenizer.encode("hello there") == ref.tokenizer.encode("hello there")
    _no_plaintext(isolated + [enc], plain)


def test_generate_command_on_an_encrypted_folder(folders, isolated, tmp_path, capsys):
    plain, enc, key = folders
    key_file = tmp_path / "model.key"
    key_file.write_text(base64.b64encode(key.raw).decode())
    os.chmod(key_file, 0o600)
    args = ["--prompt", "hello there", "--temperature", "0", "--max-new-tokens", "12", "--no-guard",
            "--no-redact-pii"]
    assert main(["generate", str(plain)] + args) == 0
    want = capsys.readouterr().out
    assert main(["generate", str(enc), "--key-file", str(key_file)] + args) == 0
    assert capsys.readouterr().out == want
    _no_plaintext(isolated + [enc], plain)


def test_wrong_key_missing_key_and_tampering_are_one_line_errors(folders, tmp_path, monkeypatch):
    import shutil

    from chatforge.weights.loader import load

    plain, enc, key = folders
    monkeypatch.delenv("CHATFORGE_KEY", raising=False)
    with pytest.raises(ChatforgeError, match="no key: set CHATFORGE_KEY"):
        load(str(enc))
    with pytest.raises(ChatforgeError, match=r"\.json\.cfenc: wrong key, or the header was altered"):
        load(str(enc), key=crypto.Key(raw=crypto.generate_key()))
    bad = tmp_path / "bad"
    shutil.copytree(enc, bad)
    weights = bad / "model.safetensors.cfenc"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ChatforgeError) as e:
        load(str(bad), key=key)
    assert "model.safetensors.cfenc" in str(e.value) and "\n" not in str(e.value)


def test_encrypted_gguf_or_file_is_refused(folders, tmp_path):
    from chatforge.weights.loader import resolve

    _, _, key = folders
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 64)
    crypto.encrypt_path(str(src), str(tmp_path / "m.enc"), key)
    with pytest.raises(ChatforgeError, match="an encrypted file is not a model"):
        resolve(tmp_path / "m.enc")
