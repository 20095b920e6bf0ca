"""Files: atomic writes (a kill mid-write leaves the old file or the new one, never half of one), and the one
reader of JSON files, whose errors name the file and line.

The temporary file lives in the target's folder (os.replace is only atomic within one file system), is fsynced
before the rename, and the folder is fsynced after it so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import Iterator

from chatforge.errors import ChatforgeError


def _temp_name(path: str) -> str:
    folder, base = os.path.split(path)
    return os.path.join(folder, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename inside it durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path to write to; on success it replaces `path`, on error it is removed.

    For libraries that insist on writing a path themselves (e.g. safetensors' save_file).
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(os.path.dirname(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically; the new file gets the usual permissions (0666 minus umask)."""
    with atomic_path(path) as tmp:
        # os.open applies the umask, unlike mkstemp's fixed 0600 that would hide model folders from other users.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (UTF-8 unless told otherwise)."""
    atomic_write_bytes(path, text.encode(encoding))


_JSON_KINDS = {dict: "object", list: "array"}


def read_json(path: str | os.PathLike, expect: type | tuple[type, ...] = dict):
    """The JSON value in a file (by default an object), or a ChatforgeError naming the file (and line) and why."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ChatforgeError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"{path}:{getattr(e, 'lineno', 1)}: not valid JSON ({getattr(e, 'msg', e)})") from None
    except OSError as e:
        raise ChatforgeError(f"{path}: cannot read ({e.strerror or e})") from None
    kinds = expect if isinstance(expect, tuple) else (expect,)
    if not isinstance(data, kinds):
        raise ChatforgeError(f"{path}:1: expected a JSON {' or '.join(_JSON_KINDS[k] for k in kinds)}")
    return data
