"""Token shards: a prepared folder's conversations as token ids and loss masks on disk, read through memory maps.

`prepare --tokenizer T` writes OUT/shards/: per split (train, val) files of SHARD_TOKENS tokens or so, each as
raw little-endian arrays, and index.json last (its presence says the shards are complete):

    train-00000.ids      token ids, uint16 when the vocabulary fits, else uint32
    train-00000.mask     uint8: this token is trained as a target (encode_records' mask)
    train-00000.offsets  int64: where each piece starts, plus the end (pieces + 1 values)
    index.json           version, tokenizer fingerprint, dtype, stage, seq_len, per split: shards
                         [{name, records, pieces, tokens, trained_tokens}] and the encoding stats

A piece is what pack.encode_records makes of a record for one stage and seq_len (a long record is truncated for
SFT, split for pretraining), so training on the shards draws exactly the batches of the in-memory path: the same
pieces in the same order, packed by the same BatchStream. Training keeps a few integers per piece in memory and
reads the tokens of each batch from the maps; the pages it touched are given back after every batch (madvise),
because a map kept open otherwise grows the resident memory to the size of the file.
"""

from __future__ import annotations

import collections
import hashlib
import json
import mmap
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Iterator

import numpy as np

from chatforge.errors import ChatforgeError
from chatforge.io import atomic_write_bytes, atomic_write_text, read_json

SHARDS = "shards"
INDEX = "index.json"
VERSION = 1
SHARD_TOKENS = 1 << 24  # ~16.8M tokens: 32 MiB of uint16 ids per shard
CHUNK_RECORDS = 512  # records per task sent to a tokenizing worker
# What each token stage trains (pack.TARGETS) and whether a record longer than a row is split (else truncated);
# the same pairs as train/loss.STAGES (a test holds them together).
STAGE_ENCODING = {"sft": ("assistant", False), "pretrain": ("all", True)}


def tokenizer_fingerprint(tokenizer) -> str:
    """What makes two tokenizers produce the same ids for the same conversation: vocabulary, merges, specials and
    the chat template."""
    h = hashlib.sha256()
    for part in (tokenizer.hf.to_str(), tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token,
                 tokenizer.bos_token or ""):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()[:32]


def check_stage(stage: str) -> tuple[str, bool]:
    if stage not in STAGE_ENCODING:
        raise ChatforgeError(f"shard stage: expected {' or '.join(STAGE_ENCODING)}, got {stage!r}")
    return STAGE_ENCODING[stage]


# ---------------------------------------------------------------- writing

_WORKER: dict = {}


def _init_worker(tokenizer, target: str, row_len: int, split_long: bool) -> None:
    _WORKER.update(tokenizer=tokenizer, target=target, row_len=row_len, split_long=split_long)


def _encode_lines(lines: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """A chunk of messages-JSONL lines -> (ids, mask, piece lengths, stats), in a worker (or inline)."""
    from chatforge.data.pack import encode_records

    w = _WORKER
    enc = encode_records((json.loads(line) for line in lines), w["tokenizer"], w["target"], w["row_len"],
                         w["split_long"])
    lengths = enc.lengths()
    if not enc.ids:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8), lengths, enc.stats
    return np.concatenate(enc.ids), np.concatenate(enc.masks), lengths, enc.stats


class _SplitWriter:
    """The shards of one split, written as the encoded chunks arrive (in order)."""

    def __init__(self, folder: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.stats: collections.Counter = collections.Counter()
        self._reset()

    def _reset(self) -> None:
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.records = 0
        self.tokens = 0

    def add(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, stats: dict) -> None:
        self.stats.update(stats)
        self.ids.append(ids.astype(self.dtype))
        self.masks.append(mask)
        self.lengths.append(lengths)
        self.records += stats["records"]
        self.tokens += len(ids)
        if self.tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        name = f"{self.split}-{len(self.shards):05d}"
        lengths = np.concatenate(self.lengths)
        offsets = np.zeros(len(lengths) + 1, dtype="<i8")
        np.cumsum(lengths, out=offsets[1:])
        mask = np.concatenate(self.masks)
        for ext, arr in (("ids", np.concatenate(self.ids)), ("mask", mask), ("offsets", offsets)):
            atomic_write_bytes(os.path.join(self.folder, f"{name}.{ext}"), arr.astype(arr.dtype.newbyteorder("<"),
                                                                                      copy=False).tobytes())
        self.shards.append({"name": name, "records": self.records, "pieces": int(len(lengths)),
                            "tokens": int(offsets[-1]), "trained_tokens": int(mask.sum())})
        self._reset()


class ShardBuilder:
    """Encodes conversations (messages-JSONL lines) into the shards of OUT/shards, tokenizing chunks in a pool of
    `workers` processes (0: in this process); chunks are taken back in the order they were sent, so the pieces
    keep the order of the lines, and at most 2 per worker are in flight (bounded memory)."""

    def __init__(self, out: str, tokenizer, stage: str = "sft", seq_len: int = 256, workers: int = 0,
                 shard_tokens: int = SHARD_TOKENS):
        target, split_long = check_stage(stage)
        if seq_len < 1:
            raise ChatforgeError(f"shard seq_len: expected 1 or more, got {seq_len}")
        remove_shards(out)  # the index first: shards being rewritten are not complete until the new index
        self.folder = os.path.join(out, SHARDS)
        os.makedirs(self.folder, exist_ok=True)
        dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")
        self.meta = {"version": VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
                     "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "stage": stage, "target": target,
                     "split_long": split_long, "seq_len": seq_len}
        self.writers = {s: _SplitWriter(self.folder, s, dtype, shard_tokens) for s in ("train", "val")}
        self.chunks: dict[str, list[str]] = {"train": [], "val": []}
        self.pending: collections.deque = collections.deque()
        self.workers = workers
        args = (tokenizer, target, seq_len + 1, split_long)
        if workers:
            import multiprocessing

            # spawn: a forked copy of a process holding torch's threads can deadlock
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=args)
        else:
            self.pool = None
            _init_worker(*args)

    def add(self, split: str, line: str) -> None:
        chunk = self.chunks[split]
        chunk.append(line)
        if len(chunk) >= CHUNK_RECORDS:
            self._send(split)

    def _send(self, split: str) -> None:
        lines, self.chunks[split] = self.chunks[split], []
        if not lines:
            return
        if self.pool is None:
            self.writers[split].add(*_encode_lines(lines))
            return
        self.pending.append((split, self.pool.submit(_encode_lines, lines)))
        while len(self.pending) > 2 * self.workers:
            self._receive()

    def _receive(self) -> None:
        split, future = self.pending.popleft()
        self.writers[split].add(*future.result())

    def close(self) -> dict:
        """Write the last shards and index.json; returns the index."""
        try:
            for split in self.chunks:
                self._send(split)
            while self.pending:
                self._receive()
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)
        index = dict(self.meta)
        for split, w in self.writers.items():
            w.flush()
            index[split] = {"shards": w.shards, "stats": dict(w.stats)}
        atomic_write_text(os.path.join(self.folder, INDEX), json.dumps(index, indent=1) + "\n")
        return index


def remove_shards(out: str) -> None:
    """Remove OUT/shards (index first) as prepare writes them; nothing else in the folder is touched."""
    folder = os.path.join(out, SHARDS)
    if not os.path.isdir(folder):
        return
    names = sorted(os.listdir(folder), key=lambda n: n != INDEX)
    for name in names:
        stem, _, ext = name.rpartition(".")
        if name == INDEX or (ext in ("ids", "mask", "offsets") and stem.split("-")[0] in ("train", "val")):
            os.remove(os.path.join(folder, name))
    if not os.listdir(folder):
        os.rmdir(folder)


def summary(index: dict) -> dict:
    """What report.json says of the shards: their settings and the totals per split."""
    out = {k: index[k] for k in ("stage", "seq_len", "dtype", "vocab_size", "tokenizer")}
    for split in ("train", "val"):
        shards = index[split]["shards"]
        out[split] = {"shards": len(shards), **{k: sum(s[k] for s in shards)
                                                for k in ("records", "pieces", "tokens", "trained_tokens")}}
    return out


# ---------------------------------------------------------------- reading

def open_index(folder: str) -> dict | None:
    """FOLDER/shards/index.json of a prepared folder, or None when it has no (complete) shards."""
    path = os.path.join(folder, SHARDS, INDEX)
    if not (isinstance(folder, str) and os.path.isfile(path)):
        return None
    index = read_json(path)
    if index.get("version") != VERSION:
        raise ChatforgeError(f"{path}: shard format version {index.get('version')!r}, expected {VERSION} "
                             "(run prepare again)")
    return index


def mismatch(index: dict, stage: str, seq_len: int, tokenizer) -> str | None:
    """Why shards cannot stand in for tokenizing in memory for this run (None: they can)."""
    if stage not in STAGE_ENCODING:
        return f"stage {stage} has its own encoding"
    if index["stage"] != stage or index["seq_len"] != seq_len:
        return f"made for stage {index['stage']} and seq_len {index['seq_len']}, this run is {stage}, {seq_len}"
    if index["tokenizer"] != tokenizer_fingerprint(tokenizer):
        return "made with another tokenizer"
    return None


class _Maps:
    """Read-only maps of one shard's files, whose touched pages are dropped after each read."""

    def __init__(self, folder: str, name: str, dtype: np.dtype):
        self.files, self.maps, self.arrays = [], [], {}
        for ext, dt in (("ids", dtype), ("mask", np.dtype("u1"))):
            f = open(os.path.join(folder, f"{name}.{ext}"), "rb")
            size = os.fstat(f.fileno()).st_size
            m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None
            self.files.append(f)
            self.maps.append(m)
            self.arrays[ext] = np.frombuffer(m, dtype=dt) if m is not None else np.zeros(0, dt)

    def release(self) -> None:
        """Give the pages back: the file stays mapped, resident memory falls back (Linux madvise)."""
        for m in self.maps:
            if m is not None and hasattr(mmap, "MADV_DONTNEED"):
                m.madvise(mmap.MADV_DONTNEED)


class ShardedEncoded:
    """One split of the shards with pack.Encoded's reading interface (len, lengths, pieces, stats)."""

    def __init__(self, folder: str, index: dict, split: str):
        self.folder = os.path.join(folder, SHARDS)
        self.stats = dict(index[split]["stats"])
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.names = [s["name"] for s in index[split]["shards"]]
        offsets = [np.fromfile(os.path.join(self.folder, f"{n}.offsets"), dtype="<i8") for n in self.names]
        self.first = np.zeros(len(offsets) + 1, dtype=np.int64)  # global index of each shard's first piece
        np.cumsum([len(o) - 1 for o in offsets], out=self.first[1:])
        self.starts = [o[:-1] for o in offsets]
        self.ends = [o[1:] for o in offsets]
        self._maps: dict[int, _Maps] = {}

    def __len__(self) -> int:
        return int(self.first[-1])

    @property
    def ids(self) -> range:  # truthiness and length, as loss.Stage.eval_rows and the DP check read them
        return range(len(self))

    def lengths(self) -> np.ndarray:
        if not self.names:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([e - s for s, e in zip(self.starts, self.ends)])

    def _shard(self, k: int) -> _Maps:
        if k not in self._maps:
            self._maps[k] = _Maps(self.folder, self.names[k], self.dtype)
        return self._maps[k]

    def pieces(self, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        indices = np.asarray(list(indices), dtype=np.int64)
        shards = np.searchsorted(self.first, indices, side="right") - 1
        out, touched = [], set()
        for i, k in zip(indices.tolist(), shards.tolist()):
            j = i - int(self.first[k])
            a, b = int(self.starts[k][j]), int(self.ends[k][j])
            maps = self._shard(k)
            out.append((maps.arrays["ids"][a:b].astype(np.int32), maps.arrays["mask"][a:b].copy()))
            touched.add(k)
        for k in touched:
            self._maps[k].release()
        return out


def sample_records(folder: str, n: int) -> list[dict]:
    """The first n validation records of a prepared folder, read lazily (sample prompts need only those)."""
    from itertools import islice

    from chatforge.data.preference import read_record
    from chatforge.data.sources import read_data_file

    path = os.path.join(folder, "val.jsonl")
    if n <= 0 or not os.path.isfile(path):
        return []
    return [read_record(raw, "messages", loc) for loc, raw in islice(read_data_file(path, "messages"), n)]


def iter_lines(records: Iterable[dict]) -> Iterator[str]:
    """Records as the JSONL lines the shard workers read."""
    for r in records:
        yield json.dumps(r, ensure_ascii=False)


def prepared_report(folder: str, index: dict) -> dict:
    """report.json of a prepared folder with the train/val counts of its shards (what data_report.json records)."""
    path = os.path.join(folder, "report.json")
    report = read_json(path) if os.path.isfile(path) else {}
    totals = summary(index)
    report.update(train=totals["train"]["records"], val=totals["val"]["records"], shards=totals)
    return report
