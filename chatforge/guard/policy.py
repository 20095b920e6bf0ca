"""What the guard does about each category, and the one record of each decision.

Actions, mildest first: allow (pass it on), flag (pass it on, record it), redact (replace the offending spans),
refuse (answer with the refusal message instead). A category with no rule gets `default`. Redaction needs spans;
where a detector has none (the prompt classifier, the perplexity filter), redact becomes refuse. An error inside
the guard is decided as refuse ("fail closed"), category `guard_error`.

Every decision is logged on the `chatforge.guard` logger at INFO (refusals at WARNING): where it was taken, the
action, the categories and the reasons — never the text, unless the policy says `log_text` (for debugging).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from chatforge.errors import ChatforgeError

ACTIONS = ("allow", "flag", "redact", "refuse")
LOG = logging.getLogger("chatforge.guard")
LOG.addHandler(logging.NullHandler())  # a library logs; the application (serve, chat) decides where it goes

DEFAULT_REFUSAL = {
    "en": "Sorry, I can't help with that.",
    "zh": "抱歉，这个我无法帮忙。",
}
# Perturbed input is normalised and passed on (flag); gibberish suffixes and unsafe requests are refused.
DEFAULT_RULES = {"unicode": "flag", "gibberish": "refuse", "guard_error": "refuse"}


@dataclass
class Policy:
    rules: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_RULES))
    default: str = "refuse"
    refusal: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_REFUSAL))
    log_text: bool = False

    def __post_init__(self) -> None:
        for category, action in [*self.rules.items(), ("default", self.default)]:
            if action not in ACTIONS:
                raise ChatforgeError(f"guard policy: {category}: action {action!r} is not one of {', '.join(ACTIONS)}")
        self.rules.setdefault("guard_error", "refuse")  # failing closed is not configurable away

    @classmethod
    def from_dict(cls, data: dict, source: str = "policy") -> "Policy":
        """{rules: {category: action}, default: action, refusal: str | {lang: str}, log_text: bool}."""
        unknown = set(data) - {"rules", "default", "refusal", "log_text"}
        if unknown:
            raise ChatforgeError(f"{source}: unknown field {sorted(unknown)[0]!r}; "
                                 "expected rules, default, refusal, log_text")
        refusal = data.get("refusal", DEFAULT_REFUSAL)
        if isinstance(refusal, str):
            refusal = {"en": refusal, "zh": refusal}
        if not isinstance(refusal, dict) or not all(isinstance(v, str) for v in refusal.values()):
            raise ChatforgeError(f"{source}: field 'refusal' must be a message or a map of language to message")
        rules = {**DEFAULT_RULES, **(data.get("rules") or {})}
        return cls(rules, data.get("default", "refuse"), {**DEFAULT_REFUSAL, **refusal}, bool(data.get("log_text")))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        """A policy from a YAML or JSON file."""
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ChatforgeError(f"{path}: cannot read the guard policy: {e}") from None
        if not isinstance(data, dict):
            raise ChatforgeError(f"{path}: a guard policy is a mapping (rules, default, refusal, log_text)")
        return cls.from_dict(data, str(path))

    def action(self, category: str) -> str:
        return self.rules.get(category, self.default)

    def refusal_for(self, language: str) -> str:
        return self.refusal.get(language) or self.refusal.get("en") or DEFAULT_REFUSAL["en"]


def severity(action: str) -> int:
    return ACTIONS.index(action)


@dataclass
class Decision:
    """The guard's answer about one text.

    text: what to pass on — the normalised prompt, the redacted reply, or the refusal message when refused.
    categories: every category found, with its score (1.0 for rule-based detectors). reasons: one line per finding,
    naming detector and category, never the text.
    """

    action: str
    text: str
    categories: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    where: str = "prompt"
    scores: dict[str, float] = field(default_factory=dict)  # the classifier's category scores (OpenAI's names)

    @property
    def allowed(self) -> bool:
        return self.action != "refuse"

    @property
    def flagged(self) -> bool:
        return bool(self.categories)

    def moderation_result(self) -> dict:
        """One entry of an OpenAI /v1/moderations response's `results`."""
        from chatforge.guard.moderation import OPENAI_CATEGORIES

        return {"flagged": self.flagged,
                "categories": {c: c in self.categories for c in OPENAI_CATEGORIES},
                "category_scores": {c: round(max(self.scores.get(c, 0.0), self.categories.get(c, 0.0)), 6)
                                    for c in OPENAI_CATEGORIES}}


def log_decision(decision: Decision, policy: Policy, text: str | None = None) -> None:
    level = logging.WARNING if decision.action == "refuse" else logging.INFO
    if decision.action == "allow" and not decision.categories:
        level = logging.DEBUG
    message = "guard %s: %s categories=%s reasons=%s"
    args = [decision.where, decision.action, ",".join(sorted(decision.categories)) or "-",
            "; ".join(decision.reasons) or "-"]
    if policy.log_text and text is not None:
        message += " text=%r"
        args.append(text)
    LOG.log(level, message, *args)
