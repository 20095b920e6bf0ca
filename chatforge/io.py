"""Files: atomic writes (a kill mid-write leaves the old file or the new one, never half of one), the one atomic
folder writer (model folders, adapters, GGUF conversions), and the one reader of JSON files, whose errors name the
file and line.

The temporary file or folder lives next to the target (os.replace is only atomic within one file system), is fsynced
before the rename, and the parent is fsynced after it so the rename itself survives a power cut. What is written
gets the usual permissions, 0666 for files and 0777 for folders minus the umask: a model trained by one user is
readable by another user or a service account exactly when the umask says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
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
def atomic_path(path: str | os.PathLike, mode: int = 0o666) -> Iterator[str]:
    """Yield a temporary path to write to; on success it replaces `path`, on error it is removed.

    For libraries that insist on writing a path themselves (e.g. safetensors' save_file). The temporary file is
    created here (`mode` minus the umask: the usual permissions, or 0o600 for a file only its owner may read) and
    given that mode again before the rename: safetensors replaces it with a 0600 file of its own, which would hide a
    shipped or shared file from other users.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temp_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))  # os.open applies the umask
    final_mode = os.stat(tmp).st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, final_mode)
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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it becomes `path`, on any error nothing is left behind.

    The temporary folder is a hidden sibling (`.NAME.tmp-...`). On success every file in it gets 0666 minus the
    umask (safetensors writes 0600, mkdtemp makes 0700) and is fsynced, then the folder is renamed into place. An
    existing `path` is replaced when `replace` (moved aside first, so a reader sees the old folder or the new one);
    without it an existing non-empty `path` is an error. An OSError (disk full, no permission) becomes a
    ChatforgeError naming `path`.
    """
    target = Path(os.path.abspath(os.fspath(path)))
    stem = f".{target.name}."
    tmp = target.with_name(f"{stem}tmp-{os.getpid()}-{secrets.token_hex(4)}")
    old = target.with_name(f"{stem}old-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp, 0o777)  # mkdir applies the umask: its mode tells the file mode without touching the umask
        dir_mode = os.stat(tmp).st_mode & 0o777
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), dir_mode)
            for name in files:
                os.chmod(os.path.join(root, name), dir_mode & 0o666)
                fsync_path(os.path.join(root, name))
            fsync_path(root)
        if replace and target.exists():
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)  # onto an empty folder it succeeds; onto a non-empty one it fails
        fsync_path(target.parent)
    except OSError as e:
        raise ChatforgeError(f"{target}: cannot write the folder ({e.strerror or e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone when it was renamed into place


def check_new_folder(out: str | None, flag: str = "--out") -> None:
    """Refuse an output folder that is missing or already holds something (commands that create a model folder)."""
    if not out:
        raise ChatforgeError(f"{flag}: required (the model folder to create)")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ChatforgeError(f"{out}: already exists and is not empty; choose another {flag} or remove it")


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


def read_jsonl(path: str | os.PathLike, expected: str) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a JSONL file of objects; `expected` says what an object
    holds, for the one-line error on a line that is not one."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise ChatforgeError(f"{path}: file not found") from None
    except OSError as e:
        raise ChatforgeError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatforgeError(f"{where}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ChatforgeError(f"{where}: expected an object with {expected}")
                yield where, obj
        except UnicodeDecodeError:
            raise ChatforgeError(f"{path}: not valid UTF-8") from None
