"""From raw inputs to a prepared folder (train.jsonl, val.jsonl, report.json), and the in-memory equivalent.

`prepare` (what `chatforge prepare` calls) and `load_dataset` (what training and evaluation call) share one pipeline,
so a dataset means the same thing either way. It is a sequence of steps; each passes Items (a record and its
location) to the next and counts what it drops in the Report:

    resolve inputs -> read + validate -> clean -> de-duplicate -> split -> report
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

from chatforge.data.augment import Provenance
from chatforge.data.builtin import builtin_sources, is_builtin_spec
from chatforge.data.clean import NORMAL_FORMS, clean, dedup, split
from chatforge.data.formats import (
    SUPPORTED_EXTS, TEXT_EXTS, CsvOptions, check_encoding, check_format, check_readable, detect_format,
)
from chatforge.data.preference import read_record
from chatforge.data.report import Report
from chatforge.data.sources import (
    Source, data_key, is_encrypted_file, plain_view, read_data_file, read_sources,
)
from chatforge.errors import ChatforgeError
from chatforge.io import atomic_write_text
from chatforge.privacy.crypto import SUFFIX as ENCRYPTED  # NAME.cfenc: how `chatforge encrypt` stores NAME
from chatforge.privacy.pii import MODES as PII_MODES
from chatforge.privacy.pii import Scrubber, pseudonym_key

PREPARED_FILES = ("train.jsonl", "val.jsonl")
PLAIN_TEXT_IGNORED = "plain text beside conversation files (pass --include-text to train on it)"


@dataclass
class PrepareOptions:
    """Every setting of the pipeline, checked when made (so a bad one fails before anything is read)."""

    format: str | None = None  # None: detected per file
    skip_invalid: bool = False
    include_text: bool = False  # read .txt/.md files found beside conversation files in a folder
    encoding: str = "utf-8"  # of the user's files (the built-in corpora are UTF-8)
    csv_delimiter: str | None = None
    csv_header: str = "auto"
    csv_columns: str | tuple[str, str] | None = None
    normalize: str = "nfc"
    fullwidth_ascii: bool = False
    max_turn_chars: int = 4000
    canaries: int = 0  # made-up secrets planted per repetition count, for `chatforge audit` (data/canaries.py)
    canary_repeats: str = "1,10,100"  # how many copies of each canary the train split gets
    canary_digits: int = 6  # digits of a canary's secret: |R| = 10^digits candidates
    val_fraction: float = 0.1
    seed: int = 0
    scrub_pii: str | None = None  # placeholder | pseudonym: personal data replaced (chatforge.privacy.pii)
    refusals: str | None = None  # a file of unsafe prompts answered with refusals (data/refusals.py)

    def __post_init__(self) -> None:
        check_format(self.format)
        check_encoding(self.encoding)
        if self.normalize not in NORMAL_FORMS:
            raise ChatforgeError(f"normalize: expected {' or '.join(NORMAL_FORMS)}, got {self.normalize!r}")
        if not 0 <= self.val_fraction < 1:
            raise ChatforgeError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_turn_chars < 1:
            raise ChatforgeError(f"max_turn_chars must be at least 1, got {self.max_turn_chars}")
        if self.canaries < 0:
            raise ChatforgeError(f"canaries: expected 0 or more, got {self.canaries}")
        if self.canaries:
            from chatforge.data.canaries import make_canaries

            make_canaries(1, self.canary_repeats, self.canary_digits)  # a bad repeat list or digit count fails now
        self.csv = CsvOptions(self.csv_delimiter, self.csv_header, self.csv_columns)
        self.csv_columns = self.csv.columns
        if self.scrub_pii is not None and self.scrub_pii not in PII_MODES:
            raise ChatforgeError(f"scrub_pii: expected {' or '.join(PII_MODES)}, got {self.scrub_pii!r}")


def _stored(folder: str, name: str) -> str | None:
    """The path of prepared file `name` in `folder`: NAME, or NAME.cfenc when encrypted; None when neither."""
    for path in (os.path.join(folder, name), os.path.join(folder, name + ENCRYPTED)):
        if os.path.isfile(path):
            return path
    return None


def is_prepared(path: str) -> bool:
    """A folder written by `prepare` (or by hand in its layout): has train.jsonl (or train.jsonl.cfenc)."""
    return os.path.isdir(path) and _stored(path, "train.jsonl") is not None


def _folder_files(folder: str, report: Report, exclude: str | None, include_text: bool) -> list[str]:
    """The files of a folder to read. Plain text (.txt, .md) is read only when asked or when the folder holds
    nothing else: a README or notes beside the conversations are not training data. Everything not read is listed
    in the report with the reason."""
    if is_prepared(folder):
        return [p for p in (_stored(folder, f) for f in PREPARED_FILES) if p]
    skip = os.path.realpath(exclude) if exclude else None
    files: list[str] = []
    texts: list[str] = []
    for root, dirs, names in os.walk(folder):
        # Hidden folders, and the output folder of this very run (`prepare data --out data/prepared` twice).
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) != skip)
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            ext = os.path.splitext(name.removesuffix(ENCRYPTED))[1].lower()  # NAME.cfenc: NAME's type
            if ext in TEXT_EXTS:
                texts.append(path)
            elif ext in SUPPORTED_EXTS:
                files.append(path)
            else:
                report.ignore(path, "unsupported file type")
    if include_text or not files:
        files += texts
    else:
        for path in texts:
            report.ignore(path, PLAIN_TEXT_IGNORED)
    if not files:
        raise ChatforgeError(f"{folder}: no supported files in this folder (expected {', '.join(SUPPORTED_EXTS)})")
    return sorted(files)


def resolve_inputs(
    inputs: list[str], options: PrepareOptions, report: Report, exclude: str | None = None, key=None
) -> list[Source]:
    """The resolve step: every file behind the inputs (files, folders, builtin specs), with its format, in a stable
    order. With --skip-invalid a file whose format cannot be told is skipped and listed, like any stray file.
    An encrypted file is read with `key` (else the environment's), in memory (data/sources.py)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ChatforgeError("no inputs given; expected files, folders or builtin[:CORPUS]")
    sources: list[Source] = []
    for spec in inputs:
        if is_builtin_spec(spec):
            sources += builtin_sources(spec)
            continue
        if not os.path.exists(spec):
            raise ChatforgeError(f"{spec}: file not found")
        in_folder = os.path.isdir(spec)
        include_text = options.include_text or options.format == "text"
        for path in _folder_files(spec, report, exclude, include_text) if in_folder else [spec]:
            check_readable(path)
            view, data = plain_view(path, key)  # an encrypted file: a wrong key stops here, skipped or not
            try:
                fmt = options.format or detect_format(view, path, data)
            except ChatforgeError as e:
                if options.skip_invalid:
                    report.ignore(path, str(e).removeprefix(f"{path}: "))
                    continue
                raise ChatforgeError(f"{e} (or --skip-invalid to skip such files)" if in_folder else str(e)) from None
            sources.append(Source(path, fmt, path, key=None if data is None else data_key(key)))
    return sources


def scrub_pii(items, report: Report, mode: str):
    """The scrub step: personal data in every text replaced by placeholders, or by pseudonyms keyed by
    CHATFORGE_PII_KEY (else a key drawn for this run, never stored); what was replaced is counted per type."""
    scrubber = Scrubber(mode, pseudonym_key())
    scrubber.counts = report.pii
    for item in items:
        yield item._replace(record=scrubber.scrub_record(item.record))


def _plan(inputs: list[str], options: PrepareOptions, exclude: str | None, key) -> tuple[Report, list[Source]]:
    """The report to fill and the sources to read (the resolve step, and the refusals when asked)."""
    report = Report()
    report.settings = {"inputs": list(inputs), **asdict(options)}
    sources = resolve_inputs(inputs, options, report, exclude, key)
    report.settings["encrypted_inputs"] = sum(s.key is not None for s in sources)
    if options.refusals:
        from chatforge.data.refusals import read_prompts, refusal_raw

        read_prompts(options.refusals)  # a missing or empty file fails before anything else is read
        sources.append(Source(f"refusals:{options.refusals}", "messages",
                              reader=lambda: refusal_raw(options.refusals, options.seed)))
    return report, sources


def _nothing_left(inputs: list[str], report: Report) -> ChatforgeError:
    dropped = ", ".join(f"{r} {n}" for r, n in sorted(report.dropped.items()))
    return ChatforgeError(f"{', '.join(inputs)}: no records left to use (read {report.read}"
                          + (f"; dropped: {dropped})" if dropped else ")"))


def build(
    inputs: list[str], options: PrepareOptions | None = None, exclude: str | None = None, key=None, plan=None
) -> tuple[list[dict], list[dict], Report]:
    """The pipeline: (train records, validation records, report); encrypted inputs read with `key`; `plan`: the
    (report, sources) of _plan when made already."""
    options = options or PrepareOptions()
    report, sources = plan or _plan(inputs, options, exclude, key)
    provenance = Provenance()  # augmented copies (data/augment.py): de-duplicated against originals, split by source
    items = provenance.take(read_sources(sources, report, options.skip_invalid, options.encoding, options.csv))
    items = clean(items, report, options.max_turn_chars, options.normalize, options.fullwidth_ascii)
    # After cleaning (it sees normalised text), before de-duplication (copies that differ only in a number collapse).
    if options.scrub_pii:
        items = scrub_pii(items, report, options.scrub_pii)
    items = dedup(provenance.originals_first(items), report)
    originals, copies = [], []
    for item in items:
        (copies if provenance.is_copy(item) else originals).append(item)
    if not originals:
        raise _nothing_left(inputs, report)
    # The originals alone are split (as they would be without augmentation); a copy follows its source.
    train, val = split([i.record for i in originals], options.val_fraction, options.seed,
                       [i.canonical for i in originals])
    in_train = {id(r) for r in train}
    train_items = [i for i in originals if id(i.record) in in_train]
    copies = provenance.assign(train_items, [i for i in originals if id(i.record) not in in_train], copies, report)
    train += [i.record for i in copies]
    for item in originals + copies:
        report.count_kept(item.source, item.record)
    report.train, report.val = len(train), len(val)
    return train, val, report


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def prepare(inputs: list[str], out: str | None, options: PrepareOptions | None = None, *, key=None,
            encrypt: bool = False, tokenizer=None, shard_stage: str = "sft", shard_seq_len: int = 256,
            workers: int | None = None, **settings) -> dict:
    """Run the pipeline and write out/train.jsonl, out/val.jsonl and out/report.json; returns the report.

    `settings` are PrepareOptions fields (e.g. val_fraction=0.2), applied over `options`. Encrypted inputs are read
    with `key` (else the environment's); when any input is encrypted, or `encrypt`, every file written is encrypted
    with that key (train.jsonl.cfenc, ...), so the prepared data never reaches the disk in plaintext.

    Plain inputs stream (data/streaming.py: bounded memory, `workers` cleaning processes, None: one per core for
    inputs over 16 MiB); encrypted ones, canaries and augmented copies take the in-memory path. With `tokenizer`,
    out/shards/ gets the token ids and loss masks of every record for `shard_stage` and `shard_seq_len`
    (data/shards.py), which training reads instead of tokenizing; never for encrypted data (one-line refusal).
    """
    if not out:  # a flag rather than a second positional, so `prepare a.jsonl b.jsonl --out DIR` reads clearly
        raise ChatforgeError("prepare: no output folder given; pass --out DIR")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ChatforgeError(f"{out}: exists and is not a folder")
    options = replace(options, **settings) if options is not None else PrepareOptions(**settings)
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if tokenizer is not None:
        from chatforge.data.shards import check_stage

        check_stage(shard_stage)
        if encrypt:
            raise ChatforgeError(PLAIN_SHARDS)
    plan = None if encrypt or options.canaries else _plan(inputs, options, out, key)
    streams = plan is not None and not plan[0].settings["encrypted_inputs"]
    if plan is not None and not streams and tokenizer is not None:
        raise ChatforgeError(PLAIN_SHARDS)
    shards = (lambda: _shard_builder(out, tokenizer, shard_stage, shard_seq_len, workers, plan)) \
        if tokenizer is not None else None
    report = _prepare_streaming(inputs, out, options, plan, workers, shards) if streams else None
    if report is None:  # encrypted, canaries, or augmented copies: in memory
        train, val, report = build(inputs, options, exclude=out, key=key, plan=None if streams else plan)
        out_key = data_key(key) if encrypt or report.settings["encrypted_inputs"] else None
        if out_key is not None and tokenizer is not None:
            raise ChatforgeError(PLAIN_SHARDS)
        canaries = []
        if options.canaries:  # after de-duplication and the split: every copy stays, in train only
            from chatforge.data.canaries import insert_canaries, make_canaries

            canaries = make_canaries(options.canaries, options.canary_repeats, options.canary_digits,
                                     seed=options.seed)
            train = insert_canaries(train, canaries, options.seed)
        _open_out(out)
        _write(out, "train.jsonl", _jsonl(train), out_key)
        _write(out, "val.jsonl", _jsonl(val), out_key)
        if shards is not None:
            builder = shards()
            for split_name, records in (("train", train), ("val", val)):
                for record in records:
                    builder.add(split_name, json.dumps(record, ensure_ascii=False))
            report.shards = builder.close()
    else:
        out_key, canaries = None, []
    if shards is None:
        from chatforge.data.shards import remove_shards

        remove_shards(out)  # shards of an earlier prepare no longer describe these files
    _write_canaries(out, canaries, out_key)
    # Each file is replaced atomically; the report goes last, so its presence says the three belong together.
    result = report.to_dict()
    if out_key is not None:
        result["encrypted"] = True  # every file of the folder is NAME.cfenc
    if canaries:
        result["canaries"] = {"canaries": len(canaries), "records": sum(c.repeats for c in canaries),
                              "repeats": sorted({c.repeats for c in canaries}), "digits": options.canary_digits,
                              "file": "canaries.json" + (ENCRYPTED if out_key else "")}
        result["train"] = len(train)
    if getattr(report, "shards", None):
        from chatforge.data.shards import summary

        result["shards"] = summary(report.shards)
    _write(out, "report.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n", out_key)
    return result


PLAIN_SHARDS = ("prepare --tokenizer: token shards would hold the encrypted data in plaintext; drop --tokenizer "
                "(training reads encrypted data and tokenizes it in memory)")


def _open_out(out: str) -> None:
    """Create the output folder; the report of an earlier prepare goes first (it is written last)."""
    try:
        os.makedirs(out, exist_ok=True)
        _remove(out, "report.json")
    except OSError as e:
        raise ChatforgeError(f"{out}: cannot write there ({e.strerror})") from None


def _workers(sources: list[Source], workers: int | None) -> int:
    """Worker processes for cleaning and tokenizing: as asked, else one per core for inputs over 16 MiB (a pool
    costs more than it saves on small data)."""
    if workers is not None:
        if workers < 0:
            raise ChatforgeError(f"workers: expected 0 or more, got {workers}")
        return workers
    size = sum(os.path.getsize(s.path) for s in sources if s.path and os.path.isfile(s.path))
    return (os.cpu_count() or 1) if size > 16 << 20 else 0


def _shard_builder(out: str, tokenizer, stage: str, seq_len: int, workers: int | None, plan):
    from chatforge.data.shards import ShardBuilder

    return ShardBuilder(out, tokenizer, stage, seq_len, _workers(plan[1] if plan else [], workers))


def _prepare_streaming(inputs: list[str], out: str, options: PrepareOptions, plan, workers: int | None,
                       shards) -> Report | None:
    """The pipeline in two passes over a spool file (data/streaming.py), writing train.jsonl, val.jsonl and the
    shards; None when the inputs need the in-memory path (augmented copies)."""
    from chatforge.data.streaming import NeedsMemory, first_pass, write_split

    report, sources = plan
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)  # for the spool; an earlier prepare's files stay until the second pass
    except OSError as e:
        raise ChatforgeError(f"{out}: cannot write there ({e.strerror})") from None
    n_workers = _workers(sources, workers)
    items = read_sources(sources, report, options.skip_invalid, options.encoding, options.csv)
    try:
        spool = first_pass(items, report, options, os.path.join(out, f".prepare-{os.getpid()}.spool"), n_workers)
        if not spool.count:
            spool.remove()
            raise _nothing_left(inputs, report)
    except BaseException as e:
        if created and not os.listdir(out):  # nothing half-written
            os.rmdir(out)
        if isinstance(e, NeedsMemory):
            return None
        raise
    _open_out(out)
    builder = shards() if shards is not None else None
    write_split(spool, out, report, options.val_fraction, builder)
    for name in PREPARED_FILES:  # an encrypted variant left by an earlier prepare
        if os.path.exists(os.path.join(out, name + ENCRYPTED)):
            os.remove(os.path.join(out, name + ENCRYPTED))
    if builder is not None:
        report.shards = builder.close()
    return report


def _remove(out: str, name: str) -> None:
    """Remove NAME and NAME.cfenc (a stale file of an earlier prepare, plain or encrypted)."""
    for path in (os.path.join(out, name), os.path.join(out, name + ENCRYPTED)):
        if os.path.exists(path):
            os.remove(path)


def _write(out: str, name: str, text: str, key=None) -> str:
    """out/NAME atomically, or out/NAME.cfenc encrypted with `key` (the plaintext stays in memory); the other
    variant, left by an earlier prepare, is removed so the folder holds one version of each file."""
    path = os.path.join(out, name)
    if key is None:
        atomic_write_text(path, text)
    else:
        from chatforge.privacy.crypto import encrypt_bytes

        path += ENCRYPTED
        encrypt_bytes(text.encode("utf-8"), path, key)
    stale = os.path.join(out, name) if key is not None else path + ENCRYPTED
    if os.path.exists(stale):
        os.remove(stale)
    return path


def _write_canaries(out: str, canaries: list, key=None) -> None:
    """canaries.json beside the data (mode 0600: it holds the secrets the audit looks for); a stale one from an
    earlier prepare without canaries is removed, so the file always describes this train.jsonl."""
    from chatforge.data.canaries import CANARY_FILE, canaries_to_json

    if not canaries:
        _remove(out, CANARY_FILE)
        return
    path = _write(out, CANARY_FILE, json.dumps(canaries_to_json(canaries), indent=1, ensure_ascii=False) + "\n", key)
    os.chmod(path, 0o600)


def _read_prepared(folder: str, key=None) -> tuple[list[dict], list[dict], dict]:
    """A prepared folder as is: validated record by record, not re-cleaned or re-split; an encrypted one
    (NAME.cfenc) decrypted in memory with `key`, else the environment's."""
    parts: list[list[dict]] = []
    for name in PREPARED_FILES:
        path = _stored(folder, name)
        if path is None:
            parts.append([])
            continue
        parts.append([read_record(raw, "messages", loc)
                      for loc, raw in read_data_file(path, "messages", key=key)])
    train, val = parts
    report: dict = {}
    report_path = _stored(folder, "report.json")
    if report_path is not None:
        try:
            if is_encrypted_file(report_path):
                from chatforge.privacy.crypto import decrypt_bytes

                report = json.loads(decrypt_bytes(report_path, data_key(key)))
            else:
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
    spec: str | list[str], val_fraction: float = 0.1, seed: int = 0, key=None
) -> tuple[list[dict], list[dict], dict]:
    """(train, val, report) for whatever a user wrote as `data:`.

    A prepared folder is read as is; a builtin spec, a raw file or a folder of raw files goes through the same
    read -> clean -> de-duplicate -> split path as `prepare`, in memory. Encrypted files and folders are decrypted
    in memory with `key` (a privacy.crypto.Key), else the environment's (CHATFORGE_KEY, CHATFORGE_PASSPHRASE).
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if len(specs) == 1 and is_prepared(specs[0]):
        return _read_prepared(specs[0], key)
    train, val, report = build(specs, PrepareOptions(val_fraction=val_fraction, seed=seed), key=key)
    return train, val, report.to_dict()
