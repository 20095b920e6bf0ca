"""The built-in corpus: the multilingual dialogs of the `chatterbot-corpus` package, read from where it is installed.

Specs: "builtin" (English + Chinese), "builtin:english", "builtin:chinese", "builtin:english/tech_support" (one
category), or a comma list such as "builtin:english,chinese/ai". A spec works wherever a dataset path does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from chatforge.errors import ChatforgeError

PREFIX = "builtin"
BUILTIN_LANGUAGES = ("english", "chinese")  # what plain "builtin" means


def is_builtin_spec(spec: str) -> bool:
    return spec == PREFIX or spec.startswith(PREFIX + ":")


def corpus_dir() -> Path:
    """The installed corpus' data folder (chatterbot_corpus/data/<language>/<category>.yml)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ChatforgeError("builtin: the chatterbot-corpus package is not installed (pip install chatterbot-corpus)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def available_languages() -> list[str]:
    return sorted(p.name for p in corpus_dir().iterdir() if p.is_dir() and any(p.glob("*.yml")))


def available_categories(language: str) -> list[str]:
    return sorted(p.stem for p in (corpus_dir() / language).glob("*.yml"))


def builtin_files(spec: str = PREFIX) -> list[tuple[str, Path]]:
    """(name, path) of every corpus file a spec selects, e.g. ("builtin:english/ai", .../english/ai.yml)."""
    if not is_builtin_spec(spec):
        raise ChatforgeError(f"{spec}: not a builtin spec; expected builtin or builtin:LANGUAGE[/CATEGORY][,...]")
    items = list(BUILTIN_LANGUAGES) if spec == PREFIX else [i.strip() for i in spec[len(PREFIX) + 1 :].split(",")]
    languages = available_languages()
    files: list[tuple[str, Path]] = []
    for item in items:
        language, _, category = item.partition("/")
        language = language.strip().lower()
        category = category.strip().removesuffix(".yml")
        if language not in languages:
            raise ChatforgeError(
                f"{spec}: unknown language {language!r}; available: {', '.join(languages)}"
            )
        categories = available_categories(language)
        if category and category not in categories:
            raise ChatforgeError(
                f"{spec}: unknown category {category!r} for {language}; available: {', '.join(categories)}"
            )
        for cat in [category] if category else categories:
            entry = (f"{PREFIX}:{language}/{cat}", corpus_dir() / language / f"{cat}.yml")
            if entry not in files:
                files.append(entry)
    return files


def load_builtin(spec: str = PREFIX, report=None) -> list[dict]:
    """Canonical records of the selected corpus files, before cleaning (see load_dataset for clean + split).

    The corpus has a few malformed entries; they are skipped and, when a Report is given, counted as invalid.
    """
    from chatforge.data.prepare import read_inputs

    return [record for _, record in read_inputs([spec], report=report)]
