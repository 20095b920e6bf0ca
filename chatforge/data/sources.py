"""Sources of records (a user's file, a built-in corpus) and the read + validate step of `prepare`.

An encrypted data file (`chatforge encrypt`: NAME.cfenc, or any file that starts with the format's magic) is read
here, the one place data files meet privacy.crypto: decrypted into memory with the key given, else the environment's
(CHATFORGE_KEY, else CHATFORGE_PASSPHRASE), and parsed from those bytes; no plaintext is written anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from chatforge.data.formats import CsvOptions, Header, Item, Skip, read_records
from chatforge.data.preference import read_record
from chatforge.data.report import INVALID, Report
from chatforge.errors import ChatforgeError


@dataclass(frozen=True)
class Source:
    """One place records come from, with the format its raw records are in."""

    name: str  # as shown in locations and the report
    format: str
    path: str | None = None  # a file to read; or None with `reader`
    language: str | None = None  # known for the built-in corpora; None: told from each record's script
    builtin: bool = False  # a built-in corpus ships a few malformed entries: always skipped and counted, never fatal
    reader: Callable[[], Iterator[tuple[str, Any]]] | None = None  # (location, raw record) when not a plain file
    key: Any = None  # a privacy.crypto.Key: `path` is encrypted, decrypted in memory when read

    def raw_records(self, encoding: str = "utf-8", csv_options: CsvOptions | None = None) -> Iterator[tuple[str, Any]]:
        if self.reader is not None:
            return self.reader()
        return read_data_file(self.path, self.format, name=self.name, key=self.key, encoding=encoding,
                              csv_options=csv_options)


def is_encrypted_file(path: str) -> bool:
    from chatforge.privacy.crypto import is_encrypted

    return os.path.isfile(path) and is_encrypted(path)


def data_key(key=None):
    """The key to read encrypted data with: the one given, else the environment's (a one-line error says how)."""
    if key is not None:
        return key
    from chatforge.privacy.crypto import resolve_key

    return resolve_key()


def plain_view(path: str, key=None) -> tuple[str, bytes | None]:
    """(the name whose extension tells the format, the plaintext) of an encrypted file, decrypted in memory with
    `key` (else data_key()); (path, None) for a plain file, which its reader opens itself."""
    if not is_encrypted_file(path):
        return path, None
    from chatforge.privacy.crypto import decrypt_bytes, plain_name

    return plain_name(path), decrypt_bytes(path, data_key(key))


def read_data_file(path: str, fmt: str | None = None, *, name: str | None = None, key=None,
                   **options) -> Iterator[tuple[str, Any]]:
    """formats.read_records for a plain or an encrypted file (the format of NAME.cfenc is told from NAME)."""
    view, data = plain_view(path, key)
    return read_records(view, fmt, name=name or path, data=data, **options)


def read_sources(
    sources: Iterable[Source], report: Report, skip_invalid: bool = False, encoding: str = "utf-8",
    csv_options: CsvOptions | None = None,
) -> Iterator[Item]:
    """The read + validate step: every valid record as an Item; a bad one raises unless skipped (and counted)."""
    for source in sources:
        report.source(source.name, source.format, source.language)
        for location, raw in source.raw_records(encoding, csv_options):
            if isinstance(raw, Header):
                report.csv_headers[source.name] = {"columns": list(raw.cells), "decision": raw.decision}
                continue
            if isinstance(raw, Skip):
                report.count_read(source.name)
                report.count_dropped(source.name, raw.reason, f"{location}: {raw.detail}")
                continue
            try:
                record = read_record(raw, source.format, location)
            except ChatforgeError as e:
                if not (skip_invalid or source.builtin):
                    raise
                report.count_read(source.name)
                report.count_dropped(source.name, INVALID, str(e))
                continue
            yield Item(source.name, location, record)
