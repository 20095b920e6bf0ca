"""From raw inputs to a prepared folder (train.jsonl, val.jsonl, report.json), and the in-memory equivalent.

`prepare` (the CLI command) and `load_dataset` (what training and evaluation call) share one path:
resolve inputs -> read + validate -> clean + de-duplicate -> split, so a dataset means the same thing either way.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, NamedTuple

from chatforge.data.builtin import builtin_files, is_builtin_spec
from chatforge.data.clean import INVALID, Report, clean_records, split
from chatforge.data.formats import (
    SUPPORTED_EXTS, check_format, check_readable, detect_format, read_records, to_record,
)
from chatforge.errors import ChatforgeError
from chatforge.io import atomic_write_text

PREPARED_FILES = ("train.jsonl", "val.jsonl")


class Source(NamedTuple):
    name: str  # as shown in locations and the report
    path: str
    format: str
    builtin: bool  # the corpus ships a few malformed entries: always skipped and counted, never fatal


def is_prepared(path: str) -> bool:
    """A folder written by `prepare` (or by hand in its layout): has train.jsonl."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "train.jsonl"))


def _folder_files(folder: str, report: Report | None, exclude: str | None = None) -> list[str]:
    if is_prepared(folder):
        return [os.path.join(folder, f) for f in PREPARED_FILES if os.path.isfile(os.path.join(folder, f))]
    skip = os.path.realpath(exclude) if exclude else None
    files: list[str] = []
    for root, dirs, names in os.walk(folder):
        # Hidden folders, and the output folder of this very run (`prepare data --out data/prepared` twice).
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) != skip)
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            if os.path.splitext(name)[1].lower() in SUPPORTED_EXTS:
                files.append(path)
            elif report is not None:
                report.ignored_files.append(path)
    if not files:
        raise ChatforgeError(f"{folder}: no supported files in this folder (expected {', '.join(SUPPORTED_EXTS)})")
    return sorted(files)


def resolve_inputs(
    inputs: list[str], fmt: str | None = None, report: Report | None = None, exclude: str | None = None
) -> list[Source]:
    """Every file behind the inputs (files, folders, builtin specs), with its format, in a stable order."""
    check_format(fmt)
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ChatforgeError("no inputs given; expected files, folders or builtin[:LANGUAGE]")
    sources: list[Source] = []
    for spec in inputs:
        if is_builtin_spec(spec):
            sources += [Source(name, str(path), "chatterbot", True) for name, path in builtin_files(spec)]
            continue
        if not os.path.exists(spec):
            raise ChatforgeError(f"{spec}: file not found")
        for path in _folder_files(spec, report, exclude) if os.path.isdir(spec) else [spec]:
            check_readable(path)
            sources.append(Source(path, path, fmt or detect_format(path), False))
    return sources


def read_inputs(
    inputs: list[str], fmt: str | None = None, skip_invalid: bool = False, report: Report | None = None,
    exclude: str | None = None,
) -> Iterator[tuple[str, dict]]:
    """Yield (source name, canonical record) for every valid record; a bad one raises unless skipped (and counted)."""
    report = report if report is not None else Report()
    for source in resolve_inputs(inputs, fmt, report, exclude):
        report.source(source.name, source.format)
        for location, raw in read_records(source.path, source.format, name=source.name):
            try:
                record = to_record(raw, source.format, location)
            except ChatforgeError as e:
                if not (skip_invalid or source.builtin):
                    raise
                report.count_read(source.name)
                report.count_dropped(source.name, INVALID, str(e))
                continue
            yield source.name, record


def _build(
    inputs: list[str], fmt: str | None, skip_invalid: bool, val_fraction: float, seed: int, max_turn_chars: int,
    exclude: str | None = None,
) -> tuple[list[dict], list[dict], Report]:
    if not 0 <= val_fraction < 1:
        raise ChatforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_turn_chars < 1:
        raise ChatforgeError(f"max_turn_chars must be at least 1, got {max_turn_chars}")
    report = Report()
    report.settings = {"inputs": list(inputs), "format": fmt, "skip_invalid": skip_invalid,
                       "val_fraction": val_fraction, "seed": seed, "max_turn_chars": max_turn_chars}
    records = clean_records(read_inputs(inputs, fmt, skip_invalid, report, exclude), report, max_turn_chars)
    if not records:
        dropped = ", ".join(f"{r} {n}" for r, n in sorted(report.dropped.items()))
        raise ChatforgeError(
            f"{', '.join(inputs)}: no records left to use (read {report.read}"
            + (f"; dropped: {dropped})" if dropped else ")")
        )
    train, val = split(records, val_fraction, seed)
    report.train, report.val = len(train), len(val)
    return train, val, report


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def prepare(
    inputs: list[str],
    out: str | None = None,
    format: str | None = None,
    skip_invalid: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_turn_chars: int = 4000,
) -> dict:
    """Clean, de-duplicate and split conversations into train/val JSONL files with a report of what was dropped.

    Args:
        inputs: files, folders (all supported files inside) or builtin corpus specs
            (builtin, builtin:english, builtin:chinese, builtin:english/ai)
        out: output folder for train.jsonl, val.jsonl and report.json (required)
        format: input format instead of detecting it: messages, sharegpt, alpaca, chatterbot, csv or text
        skip_invalid: skip bad records and count them in the report instead of stopping at the first one
        val_fraction: share of conversations held out for validation, chosen by a hash of their content
        seed: seed of the train/validation split
        max_turn_chars: turns longer than this many characters (after cleaning) are dropped
    """
    if not out:  # a flag rather than a second positional, so `prepare a.jsonl b.jsonl --out DIR` reads clearly
        raise ChatforgeError("prepare: no output folder given; pass --out DIR")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ChatforgeError(f"{out}: exists and is not a folder")
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    train, val, report = _build(inputs, format, skip_invalid, val_fraction, seed, max_turn_chars, exclude=out)
    report_path = os.path.join(out, "report.json")
    try:
        os.makedirs(out, exist_ok=True)
        if os.path.exists(report_path):
            os.remove(report_path)
    except OSError as e:
        raise ChatforgeError(f"{out}: cannot write there ({e.strerror})") from None
    atomic_write_text(os.path.join(out, "train.jsonl"), _jsonl(train))
    atomic_write_text(os.path.join(out, "val.jsonl"), _jsonl(val))
    # Each file is replaced atomically; the report goes last, so its presence says the three belong together.
    atomic_write_text(report_path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    print(report.summary())
    print(f"wrote {os.path.join(out, 'train.jsonl')} and {os.path.join(out, 'val.jsonl')}")
    return report.to_dict()


def _read_prepared(folder: str) -> tuple[list[dict], list[dict], dict]:
    """A prepared folder as is: validated record by record, not re-cleaned or re-split."""
    parts: list[list[dict]] = []
    for name in PREPARED_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            parts.append([])
            continue
        parts.append([to_record(raw, "messages", loc) for loc, raw in read_records(path, "messages")])
    train, val = parts
    report: dict = {}
    report_path = os.path.join(folder, "report.json")
    if os.path.isfile(report_path):
        try:
            with open(report_path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = {}
    if not isinstance(report, dict):
        report = {}
    report.update(train=len(train), val=len(val))
    report.setdefault("read", len(train) + len(val))
    report.setdefault("kept", len(train) + len(val))
    report.setdefault("dropped", {})
    return train, val, report


def load_dataset(
    spec: str | list[str], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict], list[dict], dict]:
    """(train, val, report) for whatever a user wrote as `data:`.

    A prepared folder is read as is; a builtin spec, a raw file or a folder of raw files goes through the same
    read -> clean -> de-duplicate -> split path as `prepare`, in memory.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if len(specs) == 1 and is_prepared(specs[0]):
        return _read_prepared(specs[0])
    train, val, report = _build(specs, None, False, val_fraction, seed, 4000)
    return train, val, report.to_dict()
