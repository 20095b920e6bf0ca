"""The safety guard: perturbed-input detection, moderation of prompts and replies, and the policy between them.

    from chatforge.guard import SafetyGuard
    guard = SafetyGuard()                      # shipped moderation model + lexicon; no perplexity model
    d = guard.check_prompt(text)               # Decision: action, text (normalised or refusal), categories, reasons
    r = guard.check_reply(reply)               # lexicon (obfuscation-proof), redact / refuse
    stream = guard.stream_reply(); stream.push(delta) -> safe text; stream.close() -> (rest, Decision)

Modules load their heavy libraries (scikit-learn, torch, opencc, pypinyin, ftfy) only when used.
"""

from chatforge.guard.core import ReplyStream, SafetyGuard
from chatforge.guard.policy import ACTIONS, Decision, Policy

__all__ = ["ACTIONS", "Decision", "Policy", "ReplyStream", "SafetyGuard"]
