"""The built-in corpora, read from the packages that ship them: no download, no network.

- chatterbot: the multilingual dialogs of the `chatterbot-corpus` package, English and Chinese (short scripted
  exchanges by category: greetings, ai, computers, ...; ~110 KB after de-duplication, Chinese ~11k characters).
- chitchat: the English open-domain conversations of the `chitchat-dataset` package (MIT; 7,168 human-human
  conversations, 258,145 messages, ~12.5M characters). Consecutive messages of one sender form one turn, joined by
  newlines; the first sender is the user.

Specs: "builtin" (all of them), "builtin:chitchat", "builtin:chatterbot" (its English + Chinese),
"builtin:english" / "builtin:chinese" (chatterbot's), "builtin:english/tech_support" (one category), or a comma list
such as "builtin:chitchat,chinese/ai". A spec works wherever a dataset path does.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator

from chatforge.data.formats import Invalid, Skip, read_records
from chatforge.data.report import Report
from chatforge.data.sources import Source, read_sources
from chatforge.errors import ChatforgeError

PREFIX = "builtin"
BUILTIN_LANGUAGES = ("english", "chinese")  # chatterbot's languages that plain "builtin" includes
CHITCHAT = "chitchat"
CHATTERBOT = "chatterbot"
NO_REPLY = "no_reply"  # a chitchat conversation in which only one person wrote (3,150 of the 7,168)
ALL = (CHATTERBOT, CHITCHAT)  # what plain "builtin" means


def is_builtin_spec(spec: str) -> bool:
    return spec == PREFIX or spec.startswith(PREFIX + ":")


def _package_dir(package: str, pip_name: str, spec: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ChatforgeError(f"{spec}: the {pip_name} package is not installed (pip install {pip_name})")
    return Path(next(iter(found.submodule_search_locations)))


def corpus_dir() -> Path:
    """The installed chatterbot corpus' data folder (chatterbot_corpus/data/<language>/<category>.yml)."""
    return _package_dir("chatterbot_corpus", "chatterbot-corpus", PREFIX) / "data"


def chitchat_file() -> Path:
    """The chitchat-dataset package's data file, read directly (the package's own loaders read it 3 times over)."""
    return _package_dir("chitchat_dataset", "chitchat-dataset", f"{PREFIX}:{CHITCHAT}") / "dataset.json"


def available_languages() -> list[str]:
    return sorted(p.name for p in corpus_dir().iterdir() if p.is_dir() and any(p.glob("*.yml")))


def available_categories(language: str) -> list[str]:
    return sorted(p.stem for p in (corpus_dir() / language).glob("*.yml"))


def chitchat_turns(conversation: dict) -> list[str]:
    """The turns of one chitchat conversation: consecutive messages of one sender joined by newlines."""
    turns: list[list[str]] = []
    last = None
    for group in conversation["messages"]:
        for message in group:
            if turns and message["sender"] == last:
                turns[-1].append(message["text"])
            else:
                turns.append([message["text"]])
                last = message["sender"]
    return ["\n".join(t) for t in turns]


def chitchat_raw(limit: int | None = None) -> Iterator[tuple[str, Any]]:
    """(location, list of turns) per conversation, in the file's order; the first `limit` only when given."""
    with open(chitchat_file(), encoding="utf-8") as f:
        data = json.load(f)
    for i, conversation in enumerate(data.values(), 1):
        if limit is not None and i > limit:
            return
        location = f"{PREFIX}:{CHITCHAT}:record {i}"
        try:
            turns = chitchat_turns(conversation)
        except (KeyError, TypeError):
            yield location, Invalid("not a conversation of messages with 'sender' and 'text'")
            continue
        yield location, turns if len(turns) > 1 else Skip(NO_REPLY, "only one person wrote; nobody replied")


def _chatterbot_source(language: str, category: str) -> Source:
    name = f"{PREFIX}:{language}/{category}"
    path = corpus_dir() / language / f"{category}.yml"
    reader = functools.partial(read_records, str(path), "chatterbot", name=name)  # always UTF-8
    return Source(name, "chatterbot", str(path), language, builtin=True, reader=reader)


def builtin_sources(spec: str = PREFIX) -> list[Source]:
    """Every source a spec selects, e.g. builtin:english/ai, in a stable order without repeats."""
    if not is_builtin_spec(spec):
        raise ChatforgeError(f"{spec}: not a builtin spec; expected builtin, builtin:chitchat, builtin:chatterbot or "
                             "builtin:LANGUAGE[/CATEGORY][,...]")
    items = list(ALL) if spec == PREFIX else [i.strip() for i in spec[len(PREFIX) + 1 :].split(",")]
    sources: list[Source] = []
    for item in items:
        language, _, category = item.partition("/")
        language = language.strip().lower()
        category = category.strip().removesuffix(".yml")
        if language == CHITCHAT and not category:
            chitchat_file()  # a missing package fails here, before anything is read
            new = [Source(f"{PREFIX}:{CHITCHAT}", "chatterbot", None, "english", builtin=True, reader=chitchat_raw)]
        elif language == CHATTERBOT and not category:
            new = [_chatterbot_source(lang, cat) for lang in BUILTIN_LANGUAGES for cat in available_categories(lang)]
        else:
            languages = available_languages()
            if language not in languages:
                raise ChatforgeError(f"{spec}: unknown corpus or language {language!r}; available: {CHITCHAT}, "
                                     f"{CHATTERBOT}, {', '.join(languages)}")
            categories = available_categories(language)
            if category and category not in categories:
                raise ChatforgeError(
                    f"{spec}: unknown category {category!r} for {language}; available: {', '.join(categories)}"
                )
            new = [_chatterbot_source(language, cat) for cat in ([category] if category else categories)]
        sources += [s for s in new if s.name not in {t.name for t in sources}]
    return sources


def load_builtin(spec: str = PREFIX, report: Report | None = None) -> list[dict]:
    """Canonical records of the selected corpora as they ship, before cleaning (see load_dataset for clean + split).

    The corpora have a few malformed entries; they are skipped and, when a Report is given, counted as invalid.
    """
    return [item.record for item in read_sources(builtin_sources(spec), report if report is not None else Report())]
