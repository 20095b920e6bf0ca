"""Sources of records (a user's file, a built-in corpus) and the read + validate step of `prepare`."""

from __future__ import annotations

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

    def raw_records(self, encoding: str = "utf-8", csv_options: CsvOptions | None = None) -> Iterator[tuple[str, Any]]:
        if self.reader is not None:
            return self.reader()
        return read_records(self.path, self.format, name=self.name, encoding=encoding, csv_options=csv_options)


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
