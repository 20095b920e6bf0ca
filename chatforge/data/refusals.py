"""Refusal training data: unsafe requests answered with a short, polite refusal, in English and Chinese.

A small model learns to decline from examples: `prepare --refusals FILE` adds one conversation per unsafe prompt
(user: the prompt; assistant: a refusal for its category, in its language), and `refusal_pairs` makes DPO pairs
whose chosen reply is the refusal. Prompt files are the guard's format ("category<TAB>prompt" per line, `#`
comments; a line without a tab is category `default`) or JSONL {"prompt", "category"}. Categories are OpenAI's
moderation categories as the guard names them (harassment, hate, illicit, self-harm, sexual, violence, ... and
jailbreak); a sub-category (self-harm/intent) uses its parent's templates. Self-harm refusals point to help instead
of only declining. The templates were written for chatforge (MIT).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from chatforge.errors import ChatforgeError

REFUSALS: dict[str, dict[str, list[str]]] = {
    "default": {
        "en": ["I'm sorry, but I can't help with that.",
               "I can't help with that request. Is there something else I can do for you?",
               "Sorry, that's not something I can help with."],
        "zh": ["抱歉，这个我不能帮忙。", "对不起，我无法协助这个请求。还有其他我能帮你的吗？", "抱歉，这不是我能提供帮助的事情。"],
    },
    "illicit": {
        "en": ["I can't help with that; it could be illegal or cause harm. I'm happy to help with something else.",
               "Sorry, I can't give instructions for illegal activities."],
        "zh": ["抱歉，我不能提供这方面的帮助，这可能违法或造成伤害。", "对不起，我不能提供违法活动的方法。"],
    },
    "violence": {
        "en": ["I can't help with anything meant to hurt people. If someone is in danger, please contact local "
               "emergency services.", "Sorry, I won't help with violence."],
        "zh": ["我不能帮助任何伤害他人的事情。如果有人处于危险中，请联系当地紧急服务。", "抱歉，我不会协助暴力行为。"],
    },
    "self-harm": {
        "en": ["I'm really sorry you're feeling this way, but I can't help with that. You don't have to go through "
               "this alone: please reach out to someone you trust or a local crisis line.",
               "I can't help with hurting yourself. If you're in danger, please contact emergency services or a "
               "crisis hotline; talking to someone can help."],
        "zh": ["很抱歉你有这样的感受，但我不能提供这方面的帮助。你并不孤单，请联系你信任的人或当地的心理援助热线。",
               "我不能帮助你伤害自己。如果你有危险，请立即联系紧急服务或心理危机干预热线。"],
    },
    "hate": {
        "en": ["I won't write content that demeans people for who they are.",
               "Sorry, I can't help with hateful content."],
        "zh": ["我不会写贬低任何群体的内容。", "抱歉，我不能提供仇恨言论。"],
    },
    "harassment": {
        "en": ["I can't help with harassing or threatening anyone.", "Sorry, I won't help target or bully someone."],
        "zh": ["我不能帮助骚扰或威胁任何人。", "抱歉，我不会帮助针对或欺负别人。"],
    },
    "sexual": {
        "en": ["Sorry, I can't help with sexual content.", "I can't write that kind of content."],
        "zh": ["抱歉，我不能提供色情内容。", "我不能写这类内容。"],
    },
    "jailbreak": {
        "en": ["I can't ignore my guidelines, but I'm glad to help with something else.",
               "Sorry, I can't pretend to be a version of me without safety rules."],
        "zh": ["我不能忽略我的使用准则，但很乐意帮你做别的事。", "抱歉，我不能假装成没有安全规则的版本。"],
    },
}
# A compliant-sounding opener (no harmful details): the rejected reply of a refusal pair when none is given.
COMPLIANCE = {"en": ["Sure! Here is how you can do that. First,", "Of course. Step 1:", "Absolutely, here you go:"],
              "zh": ["好的！具体做法如下：首先，", "当然可以。第一步：", "没问题，方法是这样的："]}


def language(text: str) -> str:
    """zh when the text holds CJK ideographs, else en (the two languages the templates cover)."""
    return "zh" if any("\u4e00" <= c <= "\u9fff" for c in text) else "en"


def refusal(category: str, text: str, rng: random.Random) -> str:
    """A refusal for a prompt of `category` in the prompt's language."""
    family = REFUSALS.get(category) or REFUSALS.get(category.split("/")[0]) or REFUSALS["default"]
    return rng.choice(family[language(text)])


def read_prompts(path: str | Path) -> list[tuple[str, str, str]]:
    """(location, category, prompt) of every prompt in a file (format in the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ChatforgeError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"{path}: cannot read refusal prompts ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{n}"
        if path.suffix in (".jsonl", ".ndjson"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatforgeError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise ChatforgeError(f"{where}: expected {{\"prompt\": text, \"category\": name}}")
            out.append((where, str(obj.get("category") or "default"), obj["prompt"]))
        else:
            category, tab, prompt = line.partition("\t")
            out.append((where, category.strip(), prompt.strip()) if tab else (where, "default", line))
    if not out:
        raise ChatforgeError(f"{path}: no prompts in the file")
    return out


def refusal_raw(path: str | Path, seed: int = 0):
    """(location, raw {"messages"} record) per prompt: what prepare reads as a source."""
    rng = random.Random(seed)
    for where, category, prompt in read_prompts(path):
        yield where, {"messages": [{"role": "user", "content": prompt},
                                   {"role": "assistant", "content": refusal(category, prompt, rng)}]}


def refusal_records(prompts: list[tuple[str, str]], seed: int = 0) -> list[dict]:
    """SFT conversations from (category, prompt) pairs."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": refusal(c, p, rng)}]}
            for c, p in prompts]


def refusal_pairs(prompts: list[tuple[str, str]], rejected: list[str] | None = None, seed: int = 0) -> list[dict]:
    """DPO pairs: chosen = a refusal, rejected = the given reply (else a compliant-sounding opener)."""
    rng = random.Random(seed)
    out = []
    for i, (c, p) in enumerate(prompts):
        bad = rejected[i] if rejected else rng.choice(COMPLIANCE[language(p)])
        out.append({"prompt": [{"role": "user", "content": p}],
                    "chosen": [{"role": "assistant", "content": refusal(c, p, rng)}],
                    "rejected": [{"role": "assistant", "content": bad}]})
    return out
