"""The encrypted file format: bit-exact round trips, and every mutation refused with its one line (wrong key, a
flipped bit anywhere, truncation, dropped/reordered/appended chunks, an edited header); key sources; folders and
the commands."""

import base64
import io
import os
import re

import pytest

from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.privacy import crypto
from chatforge.privacy.crypto import (
    SUFFIX, Key, decrypt_bytes, decrypt_file, decrypt_path, encrypt_file, encrypt_path, is_encrypted,
    key_from_env, key_from_file, key_from_passphrase, read_file,
)

pytestmark = pytest.mark.usefixtures("no_network")  # nothing here may open a connection

CHUNK = 64
HEADER = 6 + 1 + 4 + 32 + 7 + 16  # key-encrypted files
FAST_ARGON = (64, 1, 1)  # tests only: 64 KiB, one pass


@pytest.fixture
def key():
    return Key(raw=bytes(range(32)))


def _encrypted(tmp_path, key, data: bytes, chunk: int = CHUNK) -> bytes:
    src, dst = tmp_path / "plain", tmp_path / "enc"
    src.write_bytes(data)
    if dst.exists():
        dst.unlink()
    encrypt_file(str(src), str(dst), key, chunk)
    return dst.read_bytes()


def _refused(tmp_path, key, blob: bytes) -> str:
    path = tmp_path / "mutated"
    path.write_bytes(blob)
    with pytest.raises(ChatforgeError) as e:
        decrypt_bytes(str(path), key)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17])
def test_round_trip_is_bit_exact(tmp_path, key, size):
    data = os.urandom(size)
    blob = _encrypted(tmp_path, key, data)
    chunks = max(1, -(-size // CHUNK))
    assert len(blob) == HEADER + size + 16 * chunks
    assert decrypt_bytes(str(tmp_path / "enc"), key) == data
    decrypt_file(str(tmp_path / "enc"), str(tmp_path / "back"), key)
    assert (tmp_path / "back").read_bytes() == data
    assert os.stat(tmp_path / "back").st_mode & 0o777 == 0o600


def test_same_plaintext_encrypts_differently(tmp_path, key):
    assert _encrypted(tmp_path, key, b"same") != _encrypted(tmp_path, key, b"same")


def test_wrong_key(tmp_path, key):
    blob = _encrypted(tmp_path, key, b"secret weights")
    assert _refused(tmp_path, Key(raw=b"\x01" * 32), blob).endswith(
        "wrong key, or the header was altered (the header check does not match)")


def test_every_flipped_bit_is_refused(tmp_path, key):
    data = os.urandom(3 * CHUNK + 10)
    blob = _encrypted(tmp_path, key, data)
    for byte in range(len(blob)):
        for bit in range(8):
            mutated = bytearray(blob)
            mutated[byte] ^= 1 << bit
            with pytest.raises(ChatforgeError):
                b"".join(crypto.iter_decrypt(io.BytesIO(mutated), key))


def test_header_edits_name_the_header(tmp_path, key):
    blob = _encrypted(tmp_path, key, os.urandom(100))
    for offset in range(6, HEADER):  # every header byte after the magic
        mutated = bytearray(blob)
        mutated[offset] ^= 0x80
        assert re.search(r"header was altered|encrypted with a passphrase", _refused(tmp_path, key, bytes(mutated)))
    assert _refused(tmp_path, key, b"XXXXXX" + blob[6:]).endswith("not a chatforge encrypted file (bad magic)")
    assert _refused(tmp_path, key, blob[:20]).endswith("truncated header")


def _chunks(blob: bytes) -> tuple[bytes, list[bytes]]:
    body = blob[HEADER:]
    return blob[:HEADER], [body[i: i + CHUNK + 16] for i in range(0, len(body), CHUNK + 16)]


def test_truncation_and_chunk_surgery(tmp_path, key):
    blob = _encrypted(tmp_path, key, os.urandom(4 * CHUNK))  # four full chunks, the last one marked last
    header, chunks = _chunks(blob)
    assert len(chunks) == 4
    assert _refused(tmp_path, key, header + b"".join(chunks[:3])).endswith(
        "truncated: the file ends after chunk 2, which is not its last chunk")
    assert _refused(tmp_path, key, header).endswith("truncated: no chunk after the header")
    assert _refused(tmp_path, key, blob[:-5]).endswith("chunk 3 failed authentication (the file was altered: a "
                                                        "changed byte, or chunks reordered, dropped or replaced)")
    assert _refused(tmp_path, key, blob[: HEADER + 4 * (CHUNK + 16) - CHUNK - 6]).endswith(
        "truncated inside chunk 3")
    assert "chunk 1 failed authentication" in _refused(tmp_path, key, header + chunks[0] + chunks[2] + chunks[3])
    assert "chunk 1 failed authentication" in _refused(
        tmp_path, key, header + chunks[0] + chunks[2] + chunks[1] + chunks[3])
    assert _refused(tmp_path, key, blob + chunks[0]).endswith("data appended after the last chunk (chunk 3)")
    assert _refused(tmp_path, key, blob + b"x").endswith("data appended after the last chunk (chunk 3)")
    # A chunk from another file under the same key: the per-file key and nonce prefix differ.
    other = _encrypted(tmp_path, key, os.urandom(4 * CHUNK))
    assert "chunk 0 failed" in _refused(tmp_path, key, header + _chunks(other)[1][0] + b"".join(chunks[1:]))
    # Another file's header over these chunks: the header check passes, chunk 0 does not.
    assert "chunk 0 failed" in _refused(tmp_path, key, other[:HEADER] + blob[HEADER:])


def test_a_failed_decryption_leaves_no_output(tmp_path, key):
    blob = bytearray(_encrypted(tmp_path, key, os.urandom(5 * CHUNK)))
    blob[-1] ^= 1
    (tmp_path / "bad").write_bytes(blob)
    with pytest.raises(ChatforgeError):
        decrypt_file(str(tmp_path / "bad"), str(tmp_path / "out"), key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "enc", "plain"]


def test_passphrase_with_argon2id_parameters_in_the_header(tmp_path):
    key = key_from_passphrase("correct horse", FAST_ARGON)
    blob = _encrypted(tmp_path, key, b"dataset")
    assert blob[6] == 1  # kdf: Argon2id
    assert decrypt_bytes(str(tmp_path / "enc"), key_from_passphrase("correct horse")) == b"dataset"
    assert _refused(tmp_path, key_from_passphrase("wrong horse"), blob).endswith(
        "wrong passphrase, or the header was altered (the header check does not match)")
    assert "encrypted with a passphrase" in _refused(tmp_path, Key(raw=b"k" * 32), blob)
    huge = bytearray(blob)
    memory_at = 6 + 1 + 4 + 32 + 7 + 16  # after the fixed fields and the Argon2id salt
    huge[memory_at: memory_at + 4] = (2**31).to_bytes(4, "big")  # memory KiB -> 2 TiB
    assert "Argon2id parameters out of range" in _refused(tmp_path, key, bytes(huge))
    assert repr(key) == "Key(passphrase)" and "horse" not in repr(key)


def test_key_sources(tmp_path, monkeypatch):
    raw = os.urandom(32)
    monkeypatch.setenv("CHATFORGE_KEY", base64.b64encode(raw).decode())
    assert key_from_env().raw == raw
    monkeypatch.setenv("CHATFORGE_KEY", base64.b64encode(raw[:16]).decode())
    with pytest.raises(ChatforgeError, match="a key must be 32 bytes, this one decodes to 16"):
        key_from_env()
    monkeypatch.setenv("CHATFORGE_KEY", "not base64!")
    with pytest.raises(ChatforgeError, match="^environment variable CHATFORGE_KEY: not base64$"):
        key_from_env()
    monkeypatch.delenv("CHATFORGE_KEY")
    with pytest.raises(ChatforgeError, match="no key: set CHATFORGE_KEY"):
        key_from_env()
    path = tmp_path / "key"
    crypto.write_key_file(str(path))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(key_from_file(str(path)).raw) == 32
    os.chmod(path, 0o644)
    with pytest.raises(ChatforgeError, match=r"key file is readable by others \(mode 0644\); run chmod 600"):
        key_from_file(str(path))
    with pytest.raises(ChatforgeError, match="already exists"):
        crypto.write_key_file(str(path))


def test_key_material_never_in_messages(tmp_path, monkeypatch):
    secret = base64.b64encode(b"\xaa" * 16).decode()  # 16 bytes: refused, and the value is not repeated
    monkeypatch.setenv("CHATFORGE_KEY", secret)
    with pytest.raises(ChatforgeError) as e:
        key_from_env()
    assert secret not in str(e.value)
    key = Key(raw=b"\xbb" * 32)
    assert "bb" not in repr(key).lower() and "\\xbb" not in repr(key)


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_folder_round_trip_and_read_file(tmp_path, key):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"n_layer": 2}')
    (model / "model.safetensors").write_bytes(os.urandom(1000))
    (model / "sub" / "notes.txt").write_text("hi")
    encrypt_path(str(model), str(tmp_path / "enc"), key, chunk_size=256)
    assert sorted(_tree(tmp_path / "enc")) == sorted(n + SUFFIX for n in _tree(model))
    assert is_encrypted(str(tmp_path / "enc")) and not is_encrypted(str(model))
    assert is_encrypted(str(tmp_path / "enc" / "config.json.cfenc"))
    assert read_file(str(tmp_path / "enc"), "config.json", key) == b'{"n_layer": 2}'
    with pytest.raises(ChatforgeError, match="file not found"):
        read_file(str(tmp_path / "enc"), "tokenizer.json", key)
    decrypt_path(str(tmp_path / "enc"), str(tmp_path / "back"), key)
    assert _tree(tmp_path / "back") == _tree(model)
    with pytest.raises(ChatforgeError, match="already exists"):
        encrypt_path(str(model), str(tmp_path / "enc"), key)


def test_folder_with_one_bad_file_writes_nothing(tmp_path, key):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("a", "b", "c"):
        (model / name).write_bytes(os.urandom(300))
    encrypt_path(str(model), str(tmp_path / "enc"), key, chunk_size=64)
    bad = tmp_path / "enc" / "c.cfenc"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(ChatforgeError, match="c.cfenc: chunk 4 failed authentication"):
        decrypt_path(str(tmp_path / "enc"), str(tmp_path / "back"), key)
    assert not (tmp_path / "back").exists()


def test_commands(tmp_path, monkeypatch, capsys):
    (tmp_path / "data.jsonl").write_text('{"messages": []}\n')
    key_path = tmp_path / "k"
    assert main(["keygen", str(key_path)]) == 0
    assert main(["encrypt", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "d.cfenc"),
                 "--key-file", str(key_path)]) == 0
    assert main(["decrypt", str(tmp_path / "d.cfenc"), "--out", str(tmp_path / "d.jsonl"),
                 "--key-file", str(key_path)]) == 0
    assert (tmp_path / "d.jsonl").read_text() == '{"messages": []}\n'
    capsys.readouterr()
    monkeypatch.setenv("CHATFORGE_KEY", base64.b64encode(b"\x02" * 32).decode())
    assert main(["decrypt", str(tmp_path / "d.cfenc"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'd.cfenc'}: wrong key, or the header was altered (the header check does " \
                  f"not match)\n"
    assert base64.b64encode(b"\x02" * 32).decode() not in err
    monkeypatch.setenv("CHATFORGE_PASSPHRASE", "pass phrase")
    monkeypatch.setattr(crypto, "ARGON2_MEMORY_KIB", 64)  # a fast Argon2id for the test
    assert main(["encrypt", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "p.cfenc"), "--passphrase"]) == 0
    assert main(["decrypt", str(tmp_path / "p.cfenc"), "--out", str(tmp_path / "p.jsonl"), "--passphrase"]) == 0
    assert (tmp_path / "p.jsonl").read_text() == '{"messages": []}\n'
