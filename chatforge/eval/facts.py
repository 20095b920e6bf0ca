"""Fact check: does the model's reply to a held-out question contain the fact it must state?

A fact file is JSONL, one question per line: {"messages": [..., {"role": "user", ...}], "expect": ["9:00", "21:00"]}
and optionally "lang" ("en", "zh", ...; default: zh when the question has Han characters, else en) and "fact" (a name
shown in the results). The reply is generated greedily through the one engine (Bot.chat_batch, so prompts are
rendered and trimmed as in `chat`); a fact counts when every expected string appears in it after both are
normalised: NFKC (full-width digits, letters, colon and percent sign become their ASCII forms, so "９：００" matches
"9:00") and case-folded; a number counts whole ("89元" is not in "189元", "9:00" not in "19:00"). Accuracy is
reported per language, because a model can learn a shop's facts in English and not in Chinese.
"""

from __future__ import annotations

import re
import unicodedata

from chatforge.data.report import script_language
from chatforge.errors import ChatforgeError
from chatforge.io import read_jsonl


def normalise(text: str) -> str:
    """NFKC + case-fold: "９：００" -> "9:00", "ＷｅＣｈａｔ" -> "wechat", "１０％" -> "10%"."""
    return unicodedata.normalize("NFKC", text).casefold()


def _holds(text: str, expected: str) -> bool:
    """expected occurs in text, and a number in it is not part of a longer number ("89元" is not in "189元",
    "9:00" not in "19:00")."""
    pattern = re.escape(expected)
    if expected[:1].isdigit():
        pattern = r"(?<!\d)" + pattern
    if expected[-1:].isdigit():
        pattern += r"(?!\d)"
    return re.search(pattern, text) is not None


def fact_ok(reply: str, expect: list[str]) -> bool:
    """True when every expected string appears in the reply (normalised both sides), numbers whole."""
    text = normalise(reply)
    return all(_holds(text, normalise(e)) for e in expect)


def read_facts(path: str) -> list[dict]:
    """The questions of a fact file, validated line by line (file:line: field: reason)."""
    items = []
    for where, obj in read_jsonl(path, "messages and expect"):
        messages, expect = obj.get("messages"), obj.get("expect")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
            raise ChatforgeError(f"{where}: messages: expected a list of {{role, content}} objects")
        if messages[-1].get("role") != "user":
            raise ChatforgeError(f"{where}: messages: the last message must be the user's question")
        if isinstance(expect, str):
            expect = [expect]
        if not isinstance(expect, list) or not expect or not all(isinstance(e, str) and e.strip() for e in expect):
            raise ChatforgeError(f"{where}: expect: expected a non-empty list of non-empty strings")
        lang = obj.get("lang")
        if lang is None:
            lang = "zh" if script_language(messages[-1]["content"]) == "chinese" else "en"
        elif not isinstance(lang, str) or not lang:
            raise ChatforgeError(f"{where}: lang: expected a language code such as en or zh")
        items.append({"messages": messages, "expect": expect, "lang": lang, "fact": obj.get("fact"),
                      "where": where})
    if not items:
        raise ChatforgeError(f"{path}: no questions")
    return items


def score(items: list[dict], replies: list[str]) -> dict:
    """{"by_lang": {lang: {"correct", "total", "accuracy"}}, "accuracy", "total", "items": [...]} for fixed replies."""
    by_lang: dict[str, dict] = {}
    rows = []
    for item, reply in zip(items, replies, strict=True):
        ok = fact_ok(reply, item["expect"])
        s = by_lang.setdefault(item["lang"], {"correct": 0, "total": 0})
        s["correct"] += ok
        s["total"] += 1
        rows.append({"question": item["messages"][-1]["content"], "expect": item["expect"], "lang": item["lang"],
                     "fact": item["fact"], "reply": reply, "ok": ok})
    for s in by_lang.values():
        s["accuracy"] = s["correct"] / s["total"]
    correct = sum(s["correct"] for s in by_lang.values())
    return {"accuracy": correct / len(rows), "correct": correct, "total": len(rows),
            "by_lang": dict(sorted(by_lang.items())), "items": rows}


def fact_check(bot, path_or_items: str | list[dict], max_new_tokens: int = 64, seed: int = 0) -> dict:
    """Greedy replies of `bot` to every question of a fact file, scored (see `score`); deterministic."""
    items = read_facts(path_or_items) if isinstance(path_or_items, str) else path_or_items
    replies = bot.chat_batch([i["messages"] for i in items], max_new_tokens=max_new_tokens, temperature=0.0,
                             seed=seed)
    out = score(items, replies)
    if isinstance(path_or_items, str):
        out["file"] = path_or_items
    return out
