"""Records -> token ids + loss masks -> fixed-length packed rows that never attend across records.

Every conversation goes through `tokenizer.render`, the one chat contract, so training sees exactly what generation
will prompt with. Rows hold several records back to back; each token carries its record's index in the row (doc id)
and its position inside its record, and the model masks attention by doc id, so a packed row trains exactly like its
records trained one by one (tests/test_pack.py holds that). Token arrays stay numpy int32: the builtin corpus is
small, but a real dataset is millions of tokens and Python lists of ints cost 10x the memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from chatforge.errors import ChatforgeError

# What carries the loss. assistant: assistant replies and their closing end-of-turn (SFT); all: every token
# (pretraining); content: the content of every turn, any role, plus its end-of-turn (held-out dialog-text metrics).
TARGETS = ("assistant", "all", "content")


def _content_mask(tokenizer, messages: list[dict], ids: list[int]) -> list[int]:
    """1 on each message's content tokens and its closing end-of-turn token, 0 on role headers.

    Found with the renderer itself: rendering the first i messages plus an empty message of the next role puts the
    end-of-turn token right where that message's content starts. The fallback of Tokenizer.render_content, which
    finds the same in one render; this renders every prefix (quadratic in the dialog's length).
    """
    mask = [0] * len(ids)
    eos = tokenizer.eos_id
    for i, m in enumerate(messages):
        probe, _ = tokenizer.render(list(messages[:i]) + [{"role": m["role"], "content": ""}])
        start = len(probe) - 1 - probe[::-1].index(eos)  # the empty message's end-of-turn: content starts here
        end = start
        while end < len(ids) and ids[end] != eos:
            end += 1
        for j in range(start, min(end + 1, len(ids))):
            mask[j] = 1
    return mask


def encode_record(record: dict, tokenizer, target: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of one record. Text records end with the end-of-sequence token so the model learns where text ends."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if "messages" in record:
        if target == "content":
            rendered = tokenizer.render_content(record["messages"], tools=record.get("tools"))
            if rendered is not None:
                return rendered
        ids, mask = tokenizer.render(record["messages"], tools=record.get("tools"))
        if target == "all":
            mask = [1] * len(ids)
        elif target == "content":  # a template that changes the content (trims it): probe message by message
            mask = _content_mask(tokenizer, record["messages"], ids)
        return ids, mask
    if "text" in record:
        ids = tokenizer.encode(record["text"]) + [tokenizer.eos_id]
        return ids, [1] * len(ids)
    raise ChatforgeError(f"record has neither 'messages' nor 'text': keys {sorted(record)[:5]}")


@dataclass
class Encoded:
    """Records as token arrays (one per row-sized piece) and what happened on the way."""

    ids: list[np.ndarray]
    masks: list[np.ndarray]
    stats: dict

    def __len__(self) -> int:
        return len(self.ids)

    def __add__(self, other: "Encoded") -> "Encoded":
        """Both record sets, self's first; the counts added up."""
        return Encoded(self.ids + other.ids, self.masks + other.masks,
                       {k: self.stats.get(k, 0) + other.stats.get(k, 0) for k in {**self.stats, **other.stats}})

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(i) for i in self.ids), dtype=np.int64, count=len(self.ids))

    def pieces(self, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, mask) of the given records; data/shards.ShardedEncoded reads the same from token shards."""
        return [(self.ids[i], self.masks[i]) for i in indices]


def encode_records(records, tokenizer, target: str, row_len: int, split_long: bool) -> Encoded:
    """Encode every record; one longer than a row is split into overlapping pieces (pretraining) or truncated.

    A split piece starts with the last token of the previous piece as context, so every token but the first is
    still a target exactly once. Records left with no trained token are dropped; every case is counted.
    """
    ids_out: list[np.ndarray] = []
    masks_out: list[np.ndarray] = []
    stats = {"records": 0, "conversations": 0, "texts": 0, "tokens": 0, "trained_tokens": 0,
             "truncated": 0, "truncated_tokens": 0, "split": 0, "dropped_no_trained_tokens": 0}
    for record in records:
        stats["records"] += 1
        stats["conversations" if "messages" in record else "texts"] += 1
        ids, mask = encode_record(record, tokenizer, target)
        ids_a, mask_a = np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)
        mask_a[:1] = 0  # the first token has no context to be predicted from
        if len(ids_a) > row_len:
            if split_long:
                stats["split"] += 1
                step = row_len - 1
                pieces = [(ids_a[s:s + row_len], mask_a[s:s + row_len].copy())
                          for s in range(0, len(ids_a) - 1, step)]
                for _, m in pieces[1:]:
                    m[0] = 0
            else:
                stats["truncated"] += 1
                stats["truncated_tokens"] += len(ids_a) - row_len
                pieces = [(ids_a[:row_len], mask_a[:row_len])]
        else:
            pieces = [(ids_a, mask_a)]
        kept = [(i, m) for i, m in pieces if len(i) >= 2 and m.any()]
        if not kept:
            stats["dropped_no_trained_tokens"] += 1
            continue
        for i, m in kept:
            ids_out.append(i)
            masks_out.append(m)
            stats["tokens"] += len(i)
            stats["trained_tokens"] += int(m.sum())
    return Encoded(ids_out, masks_out, stats)


# ---------------------------------------------------------------- packing

def pack_rows(lengths: list[int] | np.ndarray, order: np.ndarray, row_len: int, open_rows: int = 8) -> list[list[int]]:
    """Record indices per row, first-fit over the last `open_rows` rows (deterministic, little padding, near order)."""
    members, starts = pack_layout(np.asarray(lengths), np.asarray(order), row_len, open_rows)
    return [members[a:b].tolist() for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]


@dataclass
class Rows:
    """Packed rows of row_len = seq_len + 1 tokens; inputs are [:-1], targets [1:]."""

    tokens: np.ndarray  # (R, L) int32
    mask: np.ndarray  # (R, L) uint8: this token is trained as a target
    doc: np.ndarray  # (R, L) int32: record index within the row; -1 on padding
    pos: np.ndarray  # (R, L) int32: position within the record

    def __len__(self) -> int:
        return len(self.tokens)


def build_rows(enc: Encoded, rows: list[list[int]], row_len: int, pad_id: int) -> Rows:
    R = len(rows)
    tokens = np.full((R, row_len), pad_id, dtype=np.int32)
    mask = np.zeros((R, row_len), dtype=np.uint8)
    doc = np.full((R, row_len), -1, dtype=np.int32)
    pos = np.zeros((R, row_len), dtype=np.int32)
    pieces = iter(enc.pieces([idx for members in rows for idx in members]))  # one read per batch from shards
    for r, members in enumerate(rows):
        at = 0
        for d, _ in enumerate(members):
            ids, piece_mask = next(pieces)
            n = len(ids)
            tokens[r, at:at + n] = ids
            mask[r, at:at + n] = piece_mask
            doc[r, at:at + n] = d
            pos[r, at:at + n] = np.arange(n, dtype=np.int32)
            at += n
    return Rows(tokens, mask, doc, pos)


@dataclass
class Batch:
    input_ids: "torch.Tensor"  # (B, T) long
    targets: "torch.Tensor"  # (B, T) long
    loss_mask: "torch.Tensor"  # (B, T) bool: target trained and in the same record as its input
    doc_ids: "torch.Tensor"  # (B, T) long
    position_ids: "torch.Tensor"  # (B, T) long
    # some row holds more than one record, so attention needs the doc mask; without, causal attention is exact for
    # every real token (padding only follows them) and takes the faster causal kernel
    packed: bool = True

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.targets, self.loss_mask, self.doc_ids, self.position_ids)),
                     packed=self.packed)

    @property
    def n_trained(self) -> int:
        return int(self.loss_mask.sum())

    trained_tokens = n_trained  # what the metrics count: here also the loss's divisor


class PackedRows:
    """An epoch's packing (which records fill each row) with the rows built only when a batch asks for them, so
    memory holds a few integers per record instead of the whole epoch's token arrays (data larger than memory).
    A batch of these rows is exactly the batch of the same rows of `pack`."""

    def __init__(self, enc, members: np.ndarray, starts: np.ndarray, row_len: int, pad_id: int):
        self.enc, self.members, self.starts, self.row_len, self.pad_id = enc, members, starts, row_len, pad_id

    def __len__(self) -> int:
        return len(self.starts) - 1

    def take(self, index) -> Rows:
        index = np.arange(len(self))[index]
        return build_rows(self.enc, [self.members[self.starts[r]:self.starts[r + 1]].tolist() for r in index],
                          self.row_len, self.pad_id)


def pack_layout(lengths: np.ndarray, order: np.ndarray, row_len: int, open_rows: int = 8) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """pack_rows as two flat arrays: record indices grouped by row (each row's in the order pack_rows adds them)
    and the row boundaries; a few bytes per record where lists of lists cost ~100."""
    row_of = np.empty(len(order), dtype=np.int64)
    free: list[int] = []  # free space of the open rows, which are rows n_rows - len(free) ..
    n_rows = 0
    lengths = lengths.tolist() if isinstance(lengths, np.ndarray) else list(lengths)
    for k, idx in enumerate(order.tolist()):
        n = lengths[idx]
        base = n_rows - len(free)
        for j, space in enumerate(free):
            if n <= space:
                row_of[k] = base + j
                free[j] -= n
                break
        else:
            row_of[k] = n_rows
            n_rows += 1
            free.append(row_len - n)
            if len(free) > open_rows:
                free.pop(0)
    members = np.asarray(order)[np.argsort(row_of, kind="stable")].astype(np.int64)
    starts = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=starts[1:])
    return members, starts


def packed(enc, seq_len: int, pad_id: int, order: np.ndarray | None = None,
           lengths: np.ndarray | None = None) -> PackedRows:
    """`pack`, with rows built per batch (PackedRows)."""
    lengths = enc.lengths() if lengths is None else lengths
    order = np.arange(len(lengths)) if order is None else order
    return PackedRows(enc, *pack_layout(lengths, order, seq_len + 1), seq_len + 1, pad_id)


def make_batch(rows: Rows | PackedRows, index) -> Batch:
    import torch

    if isinstance(rows, PackedRows):
        rows, index = rows.take(index), slice(None)
    tok, m, doc, pos = rows.tokens[index], rows.mask[index], rows.doc[index], rows.pos[index]
    loss_mask = (m[:, 1:] == 1) & (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)
    return Batch(torch.from_numpy(tok[:, :-1].astype(np.int64)), torch.from_numpy(tok[:, 1:].astype(np.int64)),
                 torch.from_numpy(loss_mask), torch.from_numpy(doc[:, :-1].astype(np.int64)),
                 torch.from_numpy(pos[:, :-1].astype(np.int64)), packed=bool((doc[:, :-1] > 0).any()))


def pack(enc: Encoded, seq_len: int, pad_id: int, order: np.ndarray | None = None) -> Rows:
    row_len = seq_len + 1
    order = np.arange(len(enc.ids)) if order is None else order
    return build_rows(enc, pack_rows([len(i) for i in enc.ids], order, row_len), row_len, pad_id)


def iter_batches(rows: Rows, batch_size: int, max_batches: int | None = None):
    """Every row once, in order (evaluation)."""
    for b, start in enumerate(range(0, len(rows), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield make_batch(rows, np.arange(start, min(start + batch_size, len(rows))))


class BatchStream:
    """Endless training batches. Epoch e's shuffle and packing depend only on (seed, e), so the position
    {"epoch", "row"} is all a resumed run needs to continue with exactly the batches it would have seen.
    members(epoch), when given, names the records an epoch holds (replay's changing general dialogs); else all."""

    def __init__(self, enc: Encoded, seq_len: int, batch_size: int, pad_id: int, seed: int,
                 members: Callable[[int], np.ndarray] | None = None):
        if not len(enc):
            raise ChatforgeError("data: no training records left after encoding (see data_report.json)")
        self.enc, self.seq_len, self.batch_size, self.pad_id, self.seed = enc, seq_len, batch_size, pad_id, seed
        self.members = members
        self.epoch, self.row = 0, 0
        self._rows: Rows | PackedRows | None = None
        self._rows_epoch = -1
        self._lengths: np.ndarray | None = None

    def _epoch_rows(self) -> Rows | PackedRows:
        """The epoch's packing; its rows are built batch by batch (in memory or from token shards alike)."""
        if self._rows_epoch != self.epoch:
            if self._lengths is None:
                self._lengths = self.enc.lengths()
            rng = np.random.default_rng([self.seed, self.epoch])
            if self.members is None:
                order = rng.permutation(len(self._lengths))
            else:
                chosen = self.members(self.epoch)
                order = chosen[rng.permutation(len(chosen))]
            self._rows = None  # the previous epoch's layout goes before the next one is made
            self._rows = packed(self.enc, self.seq_len, self.pad_id, order, self._lengths)
            self._rows_epoch = self.epoch
        return self._rows

    def rows_per_epoch(self) -> int:
        return len(self._epoch_rows())

    def state(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def load_state(self, state: dict) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])

    def next(self) -> Batch:
        """The next batch_size rows, running on into the next epoch so no row is skipped."""
        parts: list[Batch] = []
        need = self.batch_size
        while need:
            rows = self._epoch_rows()
            take = min(need, len(rows) - self.row)
            parts.append(make_batch(rows, np.arange(self.row, self.row + take)))
            self.row += take
            need -= take
            if self.row == len(rows):
                self.epoch, self.row = self.epoch + 1, 0
        if len(parts) == 1:
            return parts[0]
        import torch

        return Batch(*(torch.cat(ts) for ts in zip(*((p.input_ids, p.targets, p.loss_mask, p.doc_ids, p.position_ids)
                                                      for p in parts))), packed=any(p.packed for p in parts))


# ---------------------------------------------------------------- bytes per token, for bits-per-byte

def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for; special/control tokens count 0 (their loss still counts).

    Byte-level BPE maps each byte to one printable character, so a token's length in characters is its length in
    bytes; SentencePiece-style vocabularies spell bytes as <0xAB> and spaces as U+2581.
    """
    hf = tokenizer.hf
    n = tokenizer.vocab_size
    out = np.zeros(n, dtype=np.int32)
    decoder = json.loads(hf.to_str()).get("decoder") or {}
    byte_level = "ByteLevel" in json.dumps(decoder)
    added = hf.get_added_tokens_decoder()
    for i in range(n):
        if i in added:  # added tokens are stored as plain text, not in the byte alphabet
            out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            continue
        piece = hf.id_to_token(i)
        if piece is None:
            continue
        if byte_level:
            out[i] = len(piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = 1
        else:
            out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out
