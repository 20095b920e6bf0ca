"""prepare for data larger than memory: the same pipeline as prepare.build, record by record.

Records are read lazily, file by file (sources.read_sources); cleaning, PII scrubbing and the canonical form are
computed in chunks by a pool of worker processes, taken back in order, so every count and example of the report
comes out as build() makes them. What stays in memory is per kept conversation:

- de-duplication: a set of 16-byte blake2b digests of the canonical records (exact up to a 2^-128 collision;
  ~90 bytes a conversation with Python's set, ~90 MB per million conversations),
- the split: its 8-byte hash of each kept record (8 MB per million), sorted once to pick the validation records
  exactly as clean.split does.

The kept records wait in a spool file beside the output (first pass); the second pass reads it once and writes
train.jsonl and val.jsonl (atomically) and, with a tokenizer, the token shards (data/shards.py). Inputs that need
the whole data in memory (augmented copies, which follow their source's split) raise NeedsMemory before anything
is written, and prepare takes the in-memory path instead.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable

import numpy as np

from chatforge.data.augment import META, provenance_of
from chatforge.data.clean import canonical_json, clean_record, clean_text, val_count
from chatforge.data.formats import Item
from chatforge.data.report import DUPLICATE, Report
from chatforge.io import atomic_path

CHUNK = 1000  # records per task of a cleaning worker


class NeedsMemory(Exception):
    """The inputs need prepare's in-memory path (the reason says why)."""


_SETTINGS: dict = {}


def _init(settings: dict) -> None:
    _SETTINGS.clear()
    _SETTINGS.update(settings)
    if settings["scrub_mode"]:
        from chatforge.privacy.pii import Scrubber

        _SETTINGS["scrubber"] = Scrubber(settings["scrub_mode"], settings["scrub_key"])


def _clean_chunk(chunk: list[tuple[str, dict]]) -> tuple[list[tuple], collections.Counter, collections.Counter]:
    """Clean (and scrub) a chunk of (location, record): per record (record or None, reason, detail, turns removed,
    JSONL line, dedup digest, split hash), with the counts of the cleaning rules and of the PII replaced."""
    s = _SETTINGS
    cleaning: collections.Counter = collections.Counter()
    scrubber = s.get("scrubber")
    if scrubber is not None:
        scrubber.counts = collections.Counter()

    def cleaner(text: str) -> str:
        return clean_text(text, s["normalize"], s["fullwidth_ascii"], cleaning)

    out = []
    for _, record in chunk:
        result = clean_record(record, s["max_turn_chars"], cleaner)
        rec = result.record
        if rec is None:
            out.append((None, result.reason, result.detail, 0, None, None, None))
            continue
        if scrubber is not None:
            rec = scrubber.scrub_record(rec)
        c = canonical_json(rec)
        out.append((rec, result.reason, result.detail, result.turns_removed, json.dumps(rec, ensure_ascii=False),
                     hashlib.blake2b(c, digest_size=16).digest(), hashlib.blake2b(s["salt"] + c, digest_size=8).digest()))
    return out, cleaning, scrubber.counts if scrubber is not None else collections.Counter()


class Spool:
    """The first pass: kept records in order in a spool file, with what the split and the report need."""

    def __init__(self, path: str):
        self.path = path
        self.hashes = np.zeros(0, dtype=">u8")  # split hashes (big-endian: sorted as clean.split sorts digests)
        self.count = 0
        self.wanted: dict[bytes, list[int]] = {}  # digest -> DUPLICATE examples that name its first location

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


def first_pass(items: Iterable[Item], report: Report, options, spool_path: str, workers: int = 0) -> Spool:
    """Read, clean, scrub and de-duplicate into the spool; every record counted in `report` as build() does."""
    import secrets

    from chatforge.privacy.pii import pseudonym_key

    settings = {"max_turn_chars": options.max_turn_chars, "normalize": options.normalize,
                "fullwidth_ascii": options.fullwidth_ascii, "scrub_mode": options.scrub_pii,
                # one key for every worker: the same entity gets the same pseudonym across chunks
                "scrub_key": (pseudonym_key() or secrets.token_bytes(32)) if options.scrub_pii else None,
                "salt": f"{options.seed}\0".encode()}
    spool = Spool(spool_path)
    seen: set[bytes] = set()
    hashes = bytearray()
    pool = None
    if workers:
        import multiprocessing

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                                   initargs=(settings,))
    else:
        _init(settings)
    pending: collections.deque = collections.deque()

    def take(chunk: list[Item], result) -> None:
        results, cleaning, pii = result
        report.cleaning.update(cleaning)
        report.pii.update(pii)
        for item, (rec, reason, detail, removed, line, digest, split_hash) in zip(chunk, results):
            report.count_read(item.source)
            if rec is None:
                report.count_dropped(item.source, reason, f"{item.location}: {detail}")
                continue
            if removed:
                report.count_turns_dropped(reason, removed, f"{item.location}: cut before {detail}" if detail
                                           else None)
            if digest in seen:
                shown = report.dropped_examples.get(DUPLICATE, [])
                before = len(shown)
                report.count_dropped(item.source, DUPLICATE, f"{item.location}: same as ")
                if len(report.dropped_examples[DUPLICATE]) > before:
                    spool.wanted.setdefault(digest, []).append(before)
                continue
            seen.add(digest)
            hashes.extend(split_hash)
            spool_file.write(f"{item.location}\0{digest.hex()}\0{line}\n")
            report.count_kept(item.source, rec)

    def send(chunk: list[Item]) -> None:
        payload = [(i.location, i.record) for i in chunk]
        if pool is None:
            take(chunk, _clean_chunk(payload))
            return
        pending.append((chunk, pool.submit(_clean_chunk, payload)))
        while len(pending) > 2 * workers:
            take(*_result(pending.popleft()))

    try:
        with open(spool_path, "w", encoding="utf-8", newline="\n") as spool_file:
            chunk: list[Item] = []
            for item in items:
                if META in item.record and "messages" in item.record:
                    if provenance_of(item.record, item.location) is not None:
                        raise NeedsMemory(f"{item.location}: an augmented copy")
                    item = item._replace(record={k: v for k, v in item.record.items() if k != META})
                chunk.append(item)
                if len(chunk) >= CHUNK:
                    send(chunk)
                    chunk = []
            if chunk:
                send(chunk)
            while pending:
                take(*_result(pending.popleft()))
    except BaseException:
        spool.remove()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    spool.hashes = np.frombuffer(bytes(hashes), dtype=">u8")
    spool.count = len(spool.hashes)
    return spool


def _result(entry):
    chunk, future = entry
    return chunk, future.result()


def write_split(spool: Spool, out: str, report: Report, val_fraction: float, shards=None) -> None:
    """The second pass: out/train.jsonl and out/val.jsonl (each atomic) in the spool's order, split as clean.split
    splits (the val_count records of smallest (hash, position)), and the token shards with a ShardBuilder."""
    n = spool.count
    n_val = val_count(n, val_fraction)
    is_val = np.zeros(n, dtype=bool)
    if n_val:
        order = np.lexsort((np.arange(n), spool.hashes))  # by hash, then position
        is_val[order[:n_val]] = True
    firsts: dict[bytes, str] = {}
    try:
        with atomic_path(os.path.join(out, "train.jsonl")) as train_tmp, \
                atomic_path(os.path.join(out, "val.jsonl")) as val_tmp:
            with open(train_tmp, "w", encoding="utf-8", newline="\n") as train_f, \
                    open(val_tmp, "w", encoding="utf-8", newline="\n") as val_f, \
                    open(spool.path, encoding="utf-8", newline="\n") as spool_f:
                for i, entry in enumerate(spool_f):
                    location, digest, line = entry.rstrip("\n").split("\0", 2)
                    if spool.wanted:
                        key = bytes.fromhex(digest)
                        if key in spool.wanted:
                            firsts[key] = location
                    split = "val" if is_val[i] else "train"
                    (val_f if is_val[i] else train_f).write(line + "\n")
                    if shards is not None:
                        shards.add(split, line)
    finally:
        spool.remove()
    shown = report.dropped_examples.get(DUPLICATE, [])
    for digest, slots in spool.wanted.items():
        for k in slots:
            shown[k] += firsts.get(digest, "an earlier record")
    report.train, report.val = n - n_val, n_val
