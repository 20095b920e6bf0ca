"""`chatforge prepare`: flags -> chatforge.data.prepare -> the report, printed for a person."""

from __future__ import annotations

import os

MAX_SOURCE_ROWS = 20  # more sources than this are summed up in one line (report.json has them all)


def _group(name: str) -> str:
    """Built-in corpus files are shown per corpus (builtin:english/ai -> builtin:english); a user's file by name."""
    return name.split("/", 1)[0] if name.startswith("builtin:") else name


def _source_rows(sources: dict) -> list[tuple[str, dict]]:
    groups: dict[str, dict] = {}
    for name, s in sources.items():
        g = groups.setdefault(_group(name), {"format": s["format"], "language": s.get("language"), "files": 0,
                                             "read": 0, "kept": 0, "dropped": 0, "characters": 0})
        g["files"] += 1
        for key in ("read", "kept", "characters"):
            g[key] += s.get(key, 0)
        g["dropped"] += sum(s["dropped"].values())
    return [(name if g["files"] == 1 else f"{name} ({g['files']} files)", g) for name, g in groups.items()]


def format_report(report: dict) -> str:
    """The report as a person reads it after `chatforge prepare`: what each source and language contributed, what
    cleaning changed, and what was dropped, with the first few dropped records named."""
    dropped = sum(report["dropped"].values())
    lines = [
        f"read {report['read']:,} records from {len(report['sources'])} source(s): kept {report['kept']:,} "
        f"(train {report['train']:,}, val {report['val']:,}), dropped {dropped:,}"
    ]
    rows = _source_rows(report["sources"])
    if rows:
        shown, rest = rows[:MAX_SOURCE_ROWS], rows[MAX_SOURCE_ROWS:]
        width = max(len("source"), *(len(n) for n, _ in shown))
        fwidth = max(len("format"), *(len(str(g["format"])) for _, g in shown))
        lines.append(f"  {'source'.ljust(width)}  {'format'.ljust(fwidth)}  {'language':<9}  {'read':>8}  "
                     f"{'kept':>8}  {'dropped':>8}  {'characters':>11}")
        for name, g in shown:
            lines.append(f"  {name.ljust(width)}  {str(g['format']).ljust(fwidth)}  {g['language'] or '-':<9}  "
                         f"{g['read']:>8,}  {g['kept']:>8,}  {g['dropped']:>8,}  {g['characters']:>11,}")
        if rest:
            lines.append(f"  ... and {len(rest)} more sources (see report.json)")
    if report.get("languages"):
        lines.append("kept by language: " + "; ".join(
            f"{lang} {v['records']:,} records, {v['characters']:,} characters"
            for lang, v in report["languages"].items()))
    if report.get("cleaning"):
        lines.append("cleaning changed (texts per rule): "
                     + ", ".join(f"{rule} {n:,}" for rule, n in report["cleaning"].items()))
    if report.get("pii"):
        lines.append("personal data replaced: " + ", ".join(f"{t} {n:,}" for t, n in report["pii"].items()))
    for source, header in report.get("csv_headers", {}).items():
        columns = ", ".join(header["columns"])
        lines.append({
            "detected": f"{source}: first row looks like a header, not trained on ({columns}); pass --csv-header no "
                        "if it is a conversation",
            "given": f"{source}: first row is the header, not trained on ({columns})",
            "doubt": f"{source}: first row read as a conversation, though it may be a header ({columns}); pass "
                     "--csv-header yes if it is one",
        }[header["decision"]])
    if report["dropped"]:
        lines.append("dropped: " + ", ".join(f"{r} {n:,}" for r, n in report["dropped"].items()))
        for reason, examples in report.get("dropped_examples", {}).items():
            lines.append(f"  {reason} ({report['dropped'][reason]:,}; first {len(examples)} shown):")
            lines += [f"    {e}" for e in examples]
    if report.get("turns_dropped"):
        lines.append("turns removed from kept conversations: "
                     + ", ".join(f"{r} {n:,}" for r, n in report["turns_dropped"].items()))
        for reason, examples in report.get("turns_dropped_examples", {}).items():
            lines += [f"    {e}" for e in examples]
    by_reason: dict[str, list[str]] = {}
    for entry in report.get("ignored_files", []):
        by_reason.setdefault(entry["reason"], []).append(entry["path"])
    for reason, paths in by_reason.items():
        lines.append(f"ignored, {reason}: {', '.join(paths)}")
    return "\n".join(lines)


def shard_tokenizer(spec: str):
    """The tokenizer `chatforge train` will use with tokenizer: SPEC (a folder with tokenizer.json) or init: SPEC
    (a model), chat tokens added as training adds them, so the shards match the run."""
    from chatforge.tokenizer import Tokenizer

    if os.path.isfile(os.path.join(spec, "tokenizer.json")) and not os.path.isfile(os.path.join(spec, "config.json")):
        tok = Tokenizer.load(spec)
    else:
        from chatforge.weights.loader import load_tokenizer

        tok = load_tokenizer(spec)
    if not tok.has_chat_tokens():
        tok.add_chat_tokens()
    return tok


def prepare(
    inputs: list[str],
    out: str | None = None,
    format: str | None = None,
    skip_invalid: bool = False,
    include_text: bool = False,
    encoding: str = "utf-8",
    csv_delimiter: str | None = None,
    csv_header: str = "auto",
    csv_columns: str | None = None,
    normalize: str = "nfc",
    fullwidth_ascii: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_turn_chars: int = 4000,
    canaries: int = 0,
    canary_repeats: str = "1,10,100",
    canary_digits: int = 6,
    scrub_pii: str | None = None,
    refusals: str | None = None,
    key_file: str | None = None,
    passphrase: bool = False,
    encrypt: bool = False,
    tokenizer: str | None = None,
    stage: str = "sft",
    seq_len: int = 256,
    workers: int | None = None,
) -> dict:
    """Clean, de-duplicate and split conversations into train/val JSONL files with a report of what was dropped.

    Args:
        inputs: files, folders (the supported files inside) or built-in corpora (builtin = all of them,
            builtin:chitchat, builtin:chatterbot, builtin:english, builtin:chinese, builtin:english/ai)
        out: output folder for train.jsonl, val.jsonl and report.json (required)
        format: input format instead of detecting it: messages, sharegpt, alpaca, chatterbot, csv or text
        skip_invalid: skip bad records, and files whose format cannot be told, and list them in the report
            instead of stopping at the first one
        include_text: also read plain-text files (.txt, .md) found beside conversation files in a folder; a
            folder of plain text only, or a text file named on the command line, is always read
        encoding: text encoding of the input files, e.g. gbk, big5, shift_jis, cp1252
        csv_delimiter: CSV delimiter (a character, or tab); default: tab for .tsv, else detected
        csv_header: is a CSV file's first row a header: auto (detected), yes or no
        csv_columns: the CSV columns USER,ASSISTANT, by header name or 1-based number (e.g. question,answer or 2,3)
        normalize: Unicode normal form: nfc keeps CJK punctuation and full-width forms as written; nfkc folds them
            to ASCII (，？ -> ,?)
        fullwidth_ascii: turn full-width letters and digits (Ａ１) into ASCII; punctuation is kept
        val_fraction: share of conversations held out for validation, chosen by a hash of their content
        seed: seed of the train/validation split
        max_turn_chars: a turn longer than this many characters (after cleaning) cuts its conversation there
        canaries: plant this many made-up secrets (English and Chinese "your PIN is 8 2 7 1 9 3") per repetition
            count in the train split, listed in OUT/canaries.json, for `chatforge audit MODEL --canaries`
        canary_repeats: copies of each canary, comma-separated: 1,10,100 plants canaries 1, 10 and 100 times
        canary_digits: digits of each secret (the audit ranks it among all 10^digits candidates)
        scrub_pii: replace e-mails, phones, resident IDs, cards, IBANs and IPs: placeholder (<EMAIL>) or pseudonym
            (<EMAIL_1a2b3c4d5e>, keyed by CHATFORGE_PII_KEY, else by a key drawn for this run)
        refusals: a file of unsafe prompts ("category<TAB>prompt" lines, e.g. chatforge/guard/data/unsafe_zh.txt,
            or JSONL {prompt, category}); each is added as a conversation answered with a refusal in its language
        key_file: key of encrypted inputs (NAME.cfenc from `chatforge encrypt`, decrypted in memory only; base64,
            mode 0600); default: CHATFORGE_KEY. With an encrypted input every output file is encrypted too
        passphrase: the inputs were encrypted with a passphrase: CHATFORGE_PASSPHRASE, else asked for
        encrypt: encrypt the output files (train.jsonl.cfenc, ...) with the key even when no input is encrypted
        tokenizer: also write OUT/shards, the token ids and loss masks of every conversation, tokenized with
            this tokenizer folder or model (its tokenizer); a training run with the same tokenizer, stage and
            seq_len reads them through memory maps instead of tokenizing in memory. Refused for encrypted data
            (the shards would be plaintext)
        stage: the stage the shards are for: sft (loss on replies; long ones truncated) or pretrain (every token)
        seq_len: the training seq_len the shards are for (longer conversations are cut or split as training would)
        workers: processes cleaning and tokenizing in parallel; default: one per core for inputs over 16 MiB
    """
    from chatforge.commands.privacy import given_key
    from chatforge.data.prepare import PrepareOptions
    from chatforge.data.prepare import prepare as prepare_data

    options = PrepareOptions(
        format=format, skip_invalid=skip_invalid, include_text=include_text, encoding=encoding,
        csv_delimiter=csv_delimiter, csv_header=csv_header, csv_columns=csv_columns, normalize=normalize,
        fullwidth_ascii=fullwidth_ascii, max_turn_chars=max_turn_chars, val_fraction=val_fraction, seed=seed,
        canaries=canaries, canary_repeats=canary_repeats, canary_digits=canary_digits,
        scrub_pii=scrub_pii, refusals=refusals,
    )
    tok = None
    if tokenizer:
        tok = shard_tokenizer(tokenizer)
    report = prepare_data(inputs, out, options, key=given_key(key_file, passphrase), encrypt=encrypt, tokenizer=tok,
                          shard_stage=stage, shard_seq_len=seq_len, workers=workers)
    print(format_report(report))
    suffix = ".cfenc" if report.get("encrypted") else ""
    print(f"wrote {os.path.join(out, 'train.jsonl' + suffix)} and {os.path.join(out, 'val.jsonl' + suffix)}"
          + (" (encrypted; chatforge train reads them with the key in CHATFORGE_KEY or CHATFORGE_PASSPHRASE)"
             if suffix else ""))
    if report.get("shards"):
        sh = report["shards"]
        print(f"wrote {os.path.join(out, 'shards')}: {sh['train']['tokens']:,} train and {sh['val']['tokens']:,} "
              f"val tokens ({sh['dtype']}) for stage {sh['stage']}, seq_len {sh['seq_len']}")
    if report.get("canaries"):
        c = report["canaries"]
        print(f"planted {c['canaries']} canaries ({c['records']} records, repeats {c['repeats']}) in train.jsonl; "
              f"their secrets are in {os.path.join(out, c['file'])} (keep it private)")
    return report
