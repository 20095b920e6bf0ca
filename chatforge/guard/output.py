"""The one output path of a chat model: the guard on the prompt, and on the reply the guard's lexicon check followed
by PII redaction, for the CLI (chat, generate) and the server alike.

    chain = OutputChain.build(guard=True, redact_pii=True)
    decision = chain.check_prompt(text)       # None when the guard is off; .allowed / .text (normalised or refusal)
    f = chain.reply()                         # one per reply: f.feed(delta) -> text safe to show now
    rest = f.close()                          # the text still held back; f.finish_reason is "content_filter" when
                                              # the guard stopped the reply (nothing flagged was ever returned)
    text, finish = chain.filter_text(reply)   # a whole reply at once (generate --n, non-streamed results)

PII that the prompt itself holds (context=) is left as it is: a reply may repeat the user's own e-mail address
(a tool call's arguments) or the system prompt's phone number; what is redacted is PII the model brings.
Streaming holds back only what the two filters need: the guard the last (longest lexicon entry - 1) letters, the
PII redactor the segment still open at the end (privacy.pii). Filtering a stream piece by piece gives the same text
as filtering the whole reply. Decisions are logged by the guard (category and reason, never the text).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from chatforge.errors import ChatforgeError
from chatforge.guard.core import SafetyGuard
from chatforge.guard.policy import Decision

LOG = logging.getLogger("chatforge.guard")
CONTENT_FILTER = "content_filter"  # OpenAI's finish_reason for a reply the moderation stopped


def default_guard(policy: str | None = None) -> tuple[SafetyGuard, str | None]:
    """(the guard the commands put on by default, a warning or None). The shipped moderation model may be missing
    (built by `chatforge guard train-moderation`): the guard then runs without the prompt classifier (Unicode
    checks and the reply lexicon stay on) and the warning says so. policy: a YAML/JSON policy file."""
    from chatforge.guard.policy import Policy

    rules = Policy.load(policy) if policy else Policy()
    try:
        return SafetyGuard(rules), None
    except ChatforgeError as e:
        return SafetyGuard(rules, moderation=None), f"guard: prompt moderation off ({e})"


@dataclass
class OutputChain:
    """guard: the SafetyGuard (None: off). scrubber: a privacy.pii.Scrubber redacting PII in replies (None: off)."""

    guard: SafetyGuard | None = None
    scrubber: object | None = None

    @classmethod
    def build(cls, guard: bool | SafetyGuard = True, redact_pii: bool = True, policy: str | None = None,
              warn=None) -> OutputChain:
        """The chain the commands use; `warn(text)` receives a note when the guard runs with less than usual."""
        if guard is True:
            guard, note = default_guard(policy)
            if note and warn is not None:
                warn(note)
        scrubber = None
        if redact_pii:
            from chatforge.privacy.pii import Scrubber

            scrubber = Scrubber()
        return cls(guard or None, scrubber)

    @property
    def active(self) -> bool:
        return self.guard is not None or self.scrubber is not None

    def check_prompt(self, text: str) -> Decision | None:
        return self.guard.check_prompt(text) if self.guard is not None else None

    def check_messages(self, messages: list[dict]) -> tuple[list[dict], Decision | None]:
        """(messages with the user turns normalised, the refusal if one was refused). Every user turn is checked:
        an unsafe request hidden in an earlier turn is still the client's request."""
        if self.guard is None:
            return messages, None
        out = []
        for m in messages:
            content = m.get("content")
            if m.get("role") == "user" and isinstance(content, str) and content:
                d = self.guard.check_prompt(content)
                if not d.allowed:
                    return messages, d
                m = {**m, "content": d.text}
            out.append(m)
        return out, None

    def reply(self, context: str = "") -> ReplyFilter:
        """A filter for one reply; context: the prompt it answers (PII the prompt holds is not redacted)."""
        return ReplyFilter(self, context)

    def filter_text(self, text: str, context: str = "") -> tuple[str, str | None]:
        """(the whole reply filtered, "content_filter" if the guard stopped it else None)."""
        f = self.reply(context)
        out = f.feed(text) + f.close()
        return out, f.finish_reason


class ReplyFilter:
    """One reply through the chain: the guard's ReplyStream, then the PII Redactor on what the guard released."""

    def __init__(self, chain: OutputChain, context: str = ""):
        from chatforge.privacy.pii import Redactor

        self.stream = chain.guard.stream_reply() if chain.guard is not None else None
        self.redactor = Redactor(chain.scrubber, chain.scrubber.known(context)) if chain.scrubber is not None \
            else None
        self.closed = False
        self.redacted = False  # the text shown differs from the model's (lexicon or PII redaction)
        self.decision: Decision | None = None

    @property
    def stopped(self) -> bool:
        """The guard refused the reply: stop generating, nothing more is shown."""
        return self.stream is not None and self.stream.stopped

    @property
    def finish_reason(self) -> str | None:
        return CONTENT_FILTER if self.stopped else None

    def _pii(self, text: str, final: bool) -> str:
        if self.redactor is None:
            return text
        counts = self.redactor.scrubber.counts  # shared by every reply of the chain: compare before and after
        before = dict(counts)
        out = self.redactor.feed(text) if text else ""
        if final:
            out += self.redactor.flush()
        found = sorted(t for t, n in counts.items() if n > before.get(t, 0))
        if found:
            self.redacted = True
            LOG.info("guard reply: redact categories=%s reasons=pii redaction", ",".join(f"pii:{t}" for t in found))
        return out

    def feed(self, delta: str) -> str:
        """The text that is safe to show now (maybe "", while held back)."""
        if self.closed or self.stopped:
            return ""
        safe = self.stream.push(delta) if self.stream is not None else delta
        if self.stopped:  # refused: what the redactor still holds stays unshown too
            self.decision = self.stream.decision
            return ""
        if self.stream is not None and self.stream.redactions:
            self.redacted = True
        return self._pii(safe, final=False)

    def close(self) -> str:
        """The rest of the reply, at its end."""
        if self.closed:
            return ""
        self.closed = True
        if self.stopped:
            return ""
        rest = ""
        if self.stream is not None:
            rest, self.decision = self.stream.close()
            if self.stopped:
                return ""
            self.redacted = self.redacted or self.decision.action == "redact"
        return self._pii(rest, final=True)


def filter_deltas(chain: OutputChain, deltas, context: str = ""):
    """Engine Deltas with their text filtered by a fresh ReplyFilter (the CLI's stream). The last delta carries
    the held-back rest; a refused reply ends at once with finish_reason "content_filter" and the generator is
    closed, which aborts the request in the engine."""
    from dataclasses import replace

    f = chain.reply(context)
    try:
        for d in deltas:
            text = f.feed(d.text)
            if f.stopped:
                yield replace(d, text="", finish_reason=CONTENT_FILTER)
                return
            if d.finish_reason is not None:
                text += f.close()
                if f.stopped:
                    yield replace(d, text=text, finish_reason=CONTENT_FILTER)
                    return
            yield replace(d, text=text)
    finally:
        deltas.close()
