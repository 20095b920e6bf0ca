"""Files encrypted at rest: a streaming AEAD format (AES-256-GCM in chunks, the STREAM construction) and key sources.

Layout of an encrypted file (all integers big-endian):

    header  magic "CFENC" + version 1 (6 bytes) | kdf (1: 0 = a 32-byte key, 1 = a passphrase through Argon2id)
            | chunk size (4) | HKDF salt (32) | nonce prefix (7)
            | kdf 1 only: Argon2id salt (16), memory KiB (4), iterations (4), lanes (4)
            | header check (16): HMAC-SHA256 of everything before it
    chunks  AES-256-GCM(plaintext chunk) + its 16-byte tag, every chunk `chunk size` bytes of plaintext but the
            last (0 to chunk size); nonce = prefix (7) || chunk index (4) || 1 if last else 0 (1); the whole
            header is the associated data of every chunk.

The per-file keys come from HKDF-SHA256 over the master key with the header's random salt, so no (key, nonce) pair
ever repeats across files. As in Tink's AesGcmHkdfStreaming and in age, the index in the nonce catches reordered and
dropped chunks, the last-chunk flag catches truncation at a chunk boundary and appended chunks, and the header as
associated data catches an edited header; the header check, keyed by the master key, tells a wrong key apart from
damaged chunks before anything is decrypted. Decryption streams and returns nothing unauthenticated: a chunk is
only released once its tag is verified, and `decrypt_file` writes through a temporary file that is removed unless
the whole file verified, so a damaged file never leaves partial plaintext behind.

A folder is encrypted file by file, each one beside its name with the suffix `.cfenc`: a loader can then decrypt
config.json without reading the weights, and each file streams on its own. Names and sizes are not hidden.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from chatforge.errors import ChatforgeError
from chatforge.io import atomic_path, fsync_path

MAGIC = b"CFENC\x01"
SUFFIX = ".cfenc"
KEY_ENV = "CHATFORGE_KEY"  # base64 of 32 random bytes
PASSPHRASE_ENV = "CHATFORGE_PASSPHRASE"
DEFAULT_CHUNK = 256 * 1024
MAX_CHUNK = 64 * 1024 * 1024
TAG = 16
_KDF_KEY, _KDF_ARGON2ID = 0, 1
_FIXED = struct.Struct(">6sBI32s7s")  # magic, kdf, chunk size, salt, nonce prefix
_ARGON = struct.Struct(">16sIII")  # salt, memory KiB, iterations, lanes
_CHECK = 16
# Argon2id (RFC 9106's second recommended setting); what a header may ask for is capped, so that an edited
# header cannot make decryption allocate gigabytes.
ARGON2_MEMORY_KIB, ARGON2_ITERATIONS, ARGON2_LANES = 64 * 1024, 3, 4
_ARGON2_MAX_MEMORY_KIB, _ARGON2_MAX_ITERATIONS = 4 * 1024 * 1024, 64


@dataclass(frozen=True, repr=False)
class Key:
    """A master key (32 bytes) or a passphrase with the Argon2id cost to encrypt with. Never printed."""

    raw: bytes | None = None
    passphrase: bytes | None = None
    argon2: tuple[int, int, int] = (ARGON2_MEMORY_KIB, ARGON2_ITERATIONS, ARGON2_LANES)  # memory KiB, passes, lanes

    def __repr__(self) -> str:
        return "Key(passphrase)" if self.passphrase is not None else "Key(32 bytes)"


def generate_key() -> bytes:
    return os.urandom(32)


def _decode_key(text: str | bytes, where: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, TypeError):
        raise ChatforgeError(f"{where}: not base64") from None
    if len(raw) != 32:
        raise ChatforgeError(f"{where}: a key must be 32 bytes, this one decodes to {len(raw)}")
    return raw


def key_from_env(var: str = KEY_ENV) -> Key:
    """The key in environment variable `var` (base64 of 32 bytes)."""
    value = os.environ.get(var)
    if not value:
        raise ChatforgeError(f"no key: set {var} (base64 of 32 bytes), or give a key file or a passphrase")
    return Key(raw=_decode_key(value, f"environment variable {var}"))


def key_from_file(path: str) -> Key:
    """The key in a file (base64 text, or 32 raw bytes); refused unless only its owner can read it (mode 0600/0400)."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read(1024)
    except OSError as e:
        raise ChatforgeError(f"{path}: cannot read the key file ({e.strerror or e})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ChatforgeError(f"{path}: key file is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                             f"run chmod 600 {path}")
    return Key(raw=data if len(data) == 32 else _decode_key(data, path))


def key_from_passphrase(passphrase: str | bytes, argon2: tuple[int, int, int] | None = None) -> Key:
    """A passphrase, stretched with Argon2id (the parameters used are stored in each file's header)."""
    if isinstance(passphrase, str):
        passphrase = passphrase.encode("utf-8")
    if not passphrase:
        raise ChatforgeError("the passphrase is empty")
    return Key(passphrase=passphrase, argon2=argon2 or (ARGON2_MEMORY_KIB, ARGON2_ITERATIONS, ARGON2_LANES))


def write_key_file(path: str) -> None:
    """A new random key, base64, in a file only its owner can read; refuses to overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ChatforgeError(f"{path}: already exists; a key file is never overwritten") from None
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(generate_key()) + b"\n")
        f.flush()
        os.fsync(f.fileno())


def resolve_key(key_file: str | None = None, passphrase: str | None = None, env: str = KEY_ENV) -> Key:
    """The key a command was given: a key file, else a passphrase, else the environment variable `env`, else
    CHATFORGE_PASSPHRASE (so a command with no key flags, such as `chatforge train`, can read either kind)."""
    if key_file and passphrase is not None:
        raise ChatforgeError("give a key file or a passphrase, not both")
    if key_file:
        return key_from_file(key_file)
    if passphrase is not None:
        return key_from_passphrase(passphrase)
    if not os.environ.get(env) and os.environ.get(PASSPHRASE_ENV):
        return key_from_passphrase(os.environ[PASSPHRASE_ENV])
    return key_from_env(env)


# ---------------------------------------------------------------- the format


@dataclass(frozen=True)
class _Header:
    raw: bytes  # the whole header, check included: the associated data of every chunk
    kdf: int
    chunk: int
    salt: bytes
    prefix: bytes
    argon2: tuple[bytes, int, int, int] | None


def _argon2id(passphrase: bytes, salt: bytes, memory: int, iterations: int, lanes: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    return Argon2id(salt=salt, length=32, iterations=iterations, lanes=lanes, memory_cost=memory).derive(passphrase)


def _subkeys(master: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """(AES-256-GCM key, header-check key) of one file."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=b"chatforge stream v1").derive(master)
    return okm[:32], okm[32:]


def _master(key: Key, argon2: tuple[bytes, int, int, int] | None, name: str) -> bytes:
    if argon2 is None:
        if key.raw is None:
            raise ChatforgeError(f"{name}: encrypted with a key, not a passphrase; give the key file or set {KEY_ENV}")
        return key.raw
    if key.passphrase is None:
        raise ChatforgeError(f"{name}: encrypted with a passphrase; give the passphrase, not a key")
    return _argon2id(key.passphrase, *argon2)


def _new_header(key: Key, chunk: int) -> tuple[_Header, bytes]:
    """A fresh header for `key` and the file's AES key."""
    if not 16 <= chunk <= MAX_CHUNK:
        raise ChatforgeError(f"chunk size must be 16 bytes to {MAX_CHUNK // 2**20} MiB, got {chunk}")
    salt, prefix = os.urandom(32), os.urandom(7)
    argon2 = None
    body = _FIXED.pack(MAGIC, _KDF_KEY if key.raw is not None else _KDF_ARGON2ID, chunk, salt, prefix)
    if key.raw is None:
        argon2 = (os.urandom(16), *key.argon2)
        body += _ARGON.pack(*argon2)
    aead_key, check_key = _subkeys(_master(key, argon2, "new file"), salt)
    raw = body + hmac.new(check_key, body, hashlib.sha256).digest()[:_CHECK]
    return _Header(raw, body[6], chunk, salt, prefix, argon2), aead_key


def _read_header(f: BinaryIO, key: Key, name: str) -> tuple[_Header, bytes]:
    """The header of an open file, checked against `key`, and the file's AES key."""
    fixed = f.read(_FIXED.size)
    if fixed[:6] != MAGIC and not (len(fixed) < 6 and MAGIC.startswith(fixed)):
        raise ChatforgeError(f"{name}: not a chatforge encrypted file (bad magic)")
    if len(fixed) < _FIXED.size:
        raise ChatforgeError(f"{name}: truncated header")
    _, kdf, chunk, salt, prefix = _FIXED.unpack(fixed)
    if kdf not in (_KDF_KEY, _KDF_ARGON2ID) or not 16 <= chunk <= MAX_CHUNK:
        raise ChatforgeError(f"{name}: the header was altered (kdf {kdf}, chunk size {chunk})")
    body, argon2 = fixed, None
    if kdf == _KDF_ARGON2ID:
        extra = f.read(_ARGON.size)
        if len(extra) < _ARGON.size:
            raise ChatforgeError(f"{name}: truncated header")
        argon2 = _ARGON.unpack(extra)
        if not (8 <= argon2[1] <= _ARGON2_MAX_MEMORY_KIB and 1 <= argon2[2] <= _ARGON2_MAX_ITERATIONS
                and 1 <= argon2[3] <= 255 and argon2[1] >= 8 * argon2[3]):
            raise ChatforgeError(f"{name}: the header was altered (Argon2id parameters out of range)")
        body += extra
    check = f.read(_CHECK)
    if len(check) < _CHECK:
        raise ChatforgeError(f"{name}: truncated header")
    aead_key, check_key = _subkeys(_master(key, argon2, name), salt)
    if not hmac.compare_digest(hmac.new(check_key, body, hashlib.sha256).digest()[:_CHECK], check):
        what = "passphrase" if argon2 else "key"
        raise ChatforgeError(f"{name}: wrong {what}, or the header was altered (the header check does not match)")
    return _Header(body + check, kdf, chunk, salt, prefix, argon2), aead_key


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= 2**32:
        raise ChatforgeError("file too large for the chunk size (2^32 chunks); use a larger chunk size")
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _fill(f: BinaryIO, buf: bytearray | memoryview) -> int:
    """Read into `buf` until it is full or the file ends (a pipe may return less at a time); bytes read."""
    view, n = memoryview(buf), 0
    while n < len(view):
        got = f.readinto(view[n:])
        if not got:
            break
        n += got
    return n


def encrypt_stream(src: BinaryIO, dst: BinaryIO, key: Key, chunk_size: int = DEFAULT_CHUNK) -> int:
    """Encrypt `src` into `dst` chunk by chunk (memory: three chunk buffers, reused); returns the plaintext size."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header, aead_key = _new_header(key, chunk_size)
    aead = AESGCM(aead_key)
    dst.write(header.raw)
    bufs = (bytearray(chunk_size), bytearray(chunk_size))
    out = memoryview(bytearray(chunk_size + TAG))
    index, total = 0, 0
    n = _fill(src, bufs[0])
    while True:
        current = memoryview(bufs[index % 2])[:n]
        following = _fill(src, bufs[(index + 1) % 2]) if n == chunk_size else 0
        last = following == 0
        aead.encrypt_into(_nonce(header.prefix, index, last), current, header.raw, out[: n + TAG])
        dst.write(out[: n + TAG])
        total += n
        if last:
            return total
        n, index = following, index + 1


def _verified_chunks(src: BinaryIO, key: Key, name: str) -> Iterator[memoryview]:
    """Each chunk's plaintext once its tag verified, as a view into a buffer that the next chunk reuses."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header, aead_key = _read_header(src, key, name)
    aead = AESGCM(aead_key)
    size = header.chunk + TAG
    bufs = (bytearray(size), bytearray(size))
    out = memoryview(bytearray(header.chunk))
    n = _fill(src, bufs[0])
    if not n:
        raise ChatforgeError(f"{name}: truncated: no chunk after the header")
    index = 0
    while True:
        current = memoryview(bufs[index % 2])[:n]
        following = _fill(src, bufs[(index + 1) % 2]) if n == size else 0
        last = following == 0
        if n < TAG:
            raise ChatforgeError(f"{name}: truncated inside chunk {index}")
        try:
            aead.decrypt_into(_nonce(header.prefix, index, last), current, header.raw, out[: n - TAG])
        except InvalidTag:
            raise ChatforgeError(_diagnose(aead, header, index, last, bytes(current), name)) from None
        yield out[: n - TAG]
        if last:
            return
        n, index = following, index + 1


def iter_decrypt(src: BinaryIO, key: Key, name: str = "input") -> Iterator[bytes]:
    """The plaintext of an encrypted stream, one verified chunk at a time; ChatforgeError on any tampering."""
    for view in _verified_chunks(src, key, name):
        yield bytes(view)


def _diagnose(aead, header: _Header, index: int, last: bool, chunk: bytes, name: str) -> str:
    """Why chunk `index` failed: it authenticates with the other last-chunk flag (truncated or extended), or not."""
    from cryptography.exceptions import InvalidTag

    try:
        aead.decrypt(_nonce(header.prefix, index, not last), chunk, header.raw)
    except InvalidTag:
        return (f"{name}: chunk {index} failed authentication (the file was altered: a changed byte, or chunks "
                f"reordered, dropped or replaced)")
    if last:
        return f"{name}: truncated: the file ends after chunk {index}, which is not its last chunk"
    return f"{name}: data appended after the last chunk (chunk {index})"


def encrypt_file(src: str, dst: str, key: Key, chunk_size: int = DEFAULT_CHUNK) -> int:
    """Encrypt file `src` into `dst` (written atomically); returns the plaintext size."""
    with open(src, "rb") as f, atomic_path(dst) as tmp, open(tmp, "wb") as out:
        n = encrypt_stream(f, out, key, chunk_size)
    return n


def encrypt_bytes(data: bytes, dst: str, key: Key, chunk_size: int = DEFAULT_CHUNK) -> int:
    """Encrypt `data` (plaintext held in memory) into file `dst`, written atomically: the only copy on disk is the
    ciphertext. Returns the plaintext size."""
    import io

    with atomic_path(dst) as tmp, open(tmp, "wb") as out:
        return encrypt_stream(io.BytesIO(data), out, key, chunk_size)


def decrypt_file(src: str, dst: str, key: Key) -> int:
    """Decrypt file `src` into `dst`, created readable by its owner only; nothing is left at `dst` unless the whole
    file verified. Returns the plaintext size."""
    n = 0
    with open(src, "rb") as f, atomic_path(dst, mode=0o600) as tmp, open(tmp, "wb") as out:
        for plain in _verified_chunks(f, key, src):
            out.write(plain)
            n += len(plain)
    return n


def decrypt_bytes(path: str, key: Key) -> bytes:
    """The plaintext of an encrypted file, in memory only (never written to disk)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ChatforgeError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        return b"".join(iter_decrypt(f, key, path))


def is_encrypted(path: str) -> bool:
    """A file that starts with the format's magic, or a folder holding at least one `.cfenc` file."""
    if os.path.isdir(path):
        return any(n.endswith(SUFFIX) for _, _, names in os.walk(path) for n in names)
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def plain_name(path: str) -> str:
    """The name a file had before `chatforge encrypt` (NAME.cfenc -> NAME): what its format is told from."""
    return path[: -len(SUFFIX)] if path.endswith(SUFFIX) else path


def read_file(folder: str, name: str, key: Key) -> bytes:
    """The decrypted bytes of file `name` of an encrypted folder (stored as `name.cfenc`), in memory only."""
    path = os.path.join(folder, name + SUFFIX)
    if not os.path.isfile(path):
        plain = os.path.join(folder, name)
        if os.path.isfile(plain) and is_encrypted(plain):
            path = plain
        else:
            raise ChatforgeError(f"{path}: file not found")
    return decrypt_bytes(path, key)


# ---------------------------------------------------------------- files and folders


def _files(folder: str) -> list[str]:
    """Relative paths of the files under `folder`, sorted; a symbolic link is refused, not followed."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for n in sorted(names + [d for d in dirs if os.path.islink(os.path.join(root, d))]):
            path = os.path.join(root, n)
            if os.path.islink(path):
                raise ChatforgeError(f"{path}: a symbolic link; not followed (copy what it points to)")
            found.append(os.path.relpath(path, folder))
    return found


def _check_out(src: str, out: str) -> None:
    if not os.path.exists(src):
        raise ChatforgeError(f"{src}: not found")
    if os.path.exists(out):
        raise ChatforgeError(f"{out}: already exists; choose another output or remove it")
    if os.path.isdir(src) and os.path.abspath(out).startswith(os.path.abspath(src) + os.sep):
        raise ChatforgeError(f"{out}: inside the folder being processed")


def encrypt_path(src: str, out: str, key: Key, chunk_size: int = DEFAULT_CHUNK) -> list[tuple[str, int]]:
    """Encrypt a file to `out`, or a folder to folder `out` (each file as NAME.cfenc). Returns (path, bytes) done."""
    _check_out(src, out)
    if not os.path.isdir(src):
        if is_encrypted(src):
            raise ChatforgeError(f"{src}: already encrypted")
        return [(out, encrypt_file(src, out, key, chunk_size))]
    done = []
    for rel in _files(src):
        if rel.endswith(SUFFIX):
            raise ChatforgeError(f"{os.path.join(src, rel)}: already encrypted (ends in {SUFFIX})")
    for rel in _files(src):
        target = os.path.join(out, rel + SUFFIX)
        done.append((target, encrypt_file(os.path.join(src, rel), target, key, chunk_size)))
    fsync_path(out)
    return done


def decrypt_path(src: str, out: str, key: Key) -> list[tuple[str, int]]:
    """Decrypt a file to `out`, or an encrypted folder to folder `out` (NAME.cfenc -> NAME). Every file is verified
    before anything is written, so a wrong key or a damaged file leaves no partial output."""
    _check_out(src, out)
    if not os.path.isdir(src):
        return [(out, decrypt_file(src, out, key))]
    rels = _files(src)
    plain = [r for r in rels if not r.endswith(SUFFIX)]
    if plain:
        raise ChatforgeError(f"{os.path.join(src, plain[0])}: not encrypted (no {SUFFIX} suffix)")
    for rel in rels:  # verify all first: one bad file must not leave half a folder of plaintext
        with open(os.path.join(src, rel), "rb") as f:
            for _ in _verified_chunks(f, key, os.path.join(src, rel)):
                pass
    done = []
    for rel in rels:
        target = os.path.join(out, rel[: -len(SUFFIX)])
        done.append((target, decrypt_file(os.path.join(src, rel), target, key)))
    return done
