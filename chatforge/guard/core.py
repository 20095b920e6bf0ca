"""SafetyGuard: the one guard chat, generate, serve and `eval --safety` put around a model.

Prompts: Unicode tricks are found and undone (guard.unicode), gibberish suffixes are caught by the windowed
perplexity filter when one is given (guard.perplexity), and the prompt classifier scores OpenAI's categories
(guard.moderation). Replies: the obfuscation-proof lexicon (guard.lexicon), also as a stream that holds back only
the characters the longest lexicon entry needs. The policy (guard.policy) turns findings into allow / flag /
redact / refuse; any error inside fails closed.

Not to be confused with chatforge.serve.security's Guard (API keys and request caps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatforge.guard.policy import Decision, Policy, log_decision, severity

# a classifier category counts when P(category | unsafe) reaches this share (the top one always counts)
CATEGORY_SHARE = 0.35


def _decide(policy: Policy, categories: dict[str, float], can_redact: bool) -> str:
    action = "allow"
    for category in categories:
        wanted = policy.action(category)
        if wanted == "redact" and not can_redact:
            wanted = "refuse"
        if severity(wanted) > severity(action):
            action = wanted
    return action


@dataclass
class SafetyGuard:
    """policy: what to do per category. moderation / lexicon / perplexity: the detectors; None turns one off.
    The defaults are the moderation model and lexicon that ship with chatforge; the perplexity filter needs a
    model and its calibrated thresholds (PerplexityFilter.from_pretrained)."""

    policy: Policy = field(default_factory=Policy)
    moderation: object | None = "default"
    lexicon: object | None = "default"
    perplexity: object | None = None
    moderate_replies: bool = False  # also run the prompt classifier over replies

    def __post_init__(self) -> None:
        if self.moderation == "default":
            from chatforge.guard.moderation import default_model

            self.moderation = default_model()
        if self.lexicon == "default":
            from chatforge.guard.lexicon import default_lexicon

            self.lexicon = default_lexicon()

    # -- prompts ----------------------------------------------------------------------------------------------

    def check_prompt(self, text: str) -> Decision:
        """The decision about a user's prompt; Decision.text is the normalised prompt to give the model, or the
        refusal message. Never raises: an internal error is a refusal (category guard_error)."""
        from chatforge.guard.perplexity import language_of

        try:
            decision = self._check_prompt(text)
        except Exception as e:  # fail closed: a broken guard must not wave text through
            decision = Decision("refuse", self.policy.refusal_for(_language(text)), {"guard_error": 1.0},
                                [f"guard error: {type(e).__name__}"], "prompt")
        else:
            if decision.action == "refuse":
                decision.text = self.policy.refusal_for(language_of(text))
        log_decision(decision, self.policy, text)
        return decision

    def _check_prompt(self, text: str) -> Decision:
        from collections import Counter

        from chatforge.guard.unicode import normalize, scan

        categories: dict[str, float] = {}
        reasons: list[str] = []
        scores: dict[str, float] = {}
        findings = scan(text)
        clean = normalize(text) if findings else text
        if findings:
            categories["unicode"] = 1.0
            kinds = Counter(f.kind for f in findings)
            reasons.append("unicode: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
        if self.perplexity is not None:
            verdict = self.perplexity.check(clean)
            if verdict.flagged:
                categories["gibberish"] = 1.0
                reasons.append(f"perplexity ({verdict.language}): {verdict.reason}")
        if self.moderation is not None:
            flagged, p, scores = self.moderation.classify(clean)
            if flagged:
                found = _classifier_categories(p, scores)
                categories.update(found)
                reasons.append(f"classifier: P(unsafe) {p:.2f}, " + ", ".join(f"{c} {s:.2f}" for c, s in found.items()))
        action = _decide(self.policy, categories, can_redact=False)
        return Decision(action, clean, categories, reasons, "prompt", scores)

    # -- replies ----------------------------------------------------------------------------------------------

    def check_reply(self, text: str, log: bool = True, since: int = 0) -> Decision:
        """The decision about a whole reply; Decision.text is the reply to show (redacted where the policy says)
        or the refusal message. since: only lexicon entries ending after this index count (a stream's earlier text
        was checked as it arrived). Never raises (fails closed)."""
        try:
            decision = self._check_reply(text, since)
        except Exception as e:
            decision = Decision("refuse", self.policy.refusal_for(_language(text)), {"guard_error": 1.0},
                                [f"guard error: {type(e).__name__}"], "reply")
        if log:
            log_decision(decision, self.policy, text)
        return decision

    def _check_reply(self, text: str, since: int = 0) -> Decision:
        categories: dict[str, float] = {}
        reasons: list[str] = []
        scores: dict[str, float] = {}
        hits = [h for h in self.lexicon.find(text) if h.end > since] if self.lexicon is not None else []
        for hit in hits:
            categories[hit.category] = 1.0
            reasons.append(f"lexicon: {hit.entry} at {hit.start}-{hit.end}")
        if self.moderate_replies and self.moderation is not None:
            flagged, p, scores = self.moderation.classify(text)
            if flagged:
                categories.update(_classifier_categories(p, scores))
                reasons.append(f"classifier: P(unsafe) {p:.2f}")
        # redaction covers lexicon hits only; a category found by the classifier alone cannot be redacted
        action = _decide(self.policy, {c: s for c, s in categories.items() if any(h.category == c for h in hits)},
                         can_redact=True)
        others = {c: s for c, s in categories.items() if not any(h.category == c for h in hits)}
        action = max(action, _decide(self.policy, others, can_redact=False), key=severity)
        out = text
        if action == "refuse":
            out = self.policy.refusal_for(_language(text))
        elif action == "redact":
            out = self.lexicon.redact(text, [h for h in hits if self.policy.action(h.category) == "redact"])
        return Decision(action, out, categories, reasons, "reply", scores)

    def stream_reply(self) -> "ReplyStream":
        """A checker for a reply arriving in pieces (see ReplyStream)."""
        return ReplyStream(self)

    # -- OpenAI's /v1/moderations ------------------------------------------------------------------------------

    def moderate(self, texts: list[str]) -> list[dict]:
        """OpenAI moderation `results` for each text: the prompt checks (classifier, Unicode, perplexity) and the
        lexicon, as flags and scores per OpenAI category."""
        results = []
        for text in texts:
            decision = self.check_prompt(text)
            reply = self.check_reply(text)
            decision.categories.update(reply.categories)
            results.append(decision.moderation_result())
        return results


def _classifier_categories(p: float, scores: dict[str, float]) -> dict[str, float]:
    top = max(scores, key=scores.get)
    return {c: s for c, s in scores.items() if c == top or (p > 0 and s / p >= CATEGORY_SHARE)}


def _language(text: str) -> str:
    try:
        from chatforge.guard.perplexity import language_of

        return language_of(text)
    except Exception:
        return "en"


WINDOW_PER_CHAR = 8  # a streamed check looks this many characters back per character of the longest entry


class ReplyStream:
    """Moderates a streamed reply without leaking flagged text.

    push(delta) returns the text that is safe to send now. It holds back the tail that could still become the
    start of a lexicon entry — the last (longest entry - 1) letters, digits or ideographs — and nothing more. When
    an entry completes: under refuse, nothing more is sent and `decision` is set (stop the stream there,
    finish_reason "content_filter"); under redact the entry is replaced before it is sent. close() returns the
    rest and the final decision over the whole reply.

    Each push checks a window, not the whole buffer (that made a reply's checks quadratic in its length: ~1 ms a
    token at 127 tokens): the unsent text plus WINDOW_PER_CHAR characters per character of the longest entry before
    it, enough for an entry spelled out with spaces, zero-width characters or punctuation between its letters.
    Only entries reaching into the unsent text count; the earlier ones were decided when they arrived. An entry
    spread wider than the window is still found by close(), over the whole reply. With the classifier on replies
    (moderate_replies) every push checks the whole buffer, since a classifier's score is not local.
    """

    def __init__(self, guard: SafetyGuard):
        self.guard = guard
        self.buffer = ""  # everything received, redactions applied
        self.sent = 0  # characters of buffer already returned
        self.decision: Decision | None = None  # set when the reply was refused, and by close()
        self.redactions: list[Decision] = []  # what was redacted on the way (the buffer no longer shows it)
        self.hold = max(0, (guard.lexicon.longest if guard.lexicon is not None else 0) - 1)

    @property
    def stopped(self) -> bool:
        return self.decision is not None and self.decision.action == "refuse"

    def _release_point(self) -> int:
        """Index of the first character that must wait: the hold-th letter/digit/ideograph from the end."""
        if self.hold == 0:
            return len(self.buffer)
        count = 0
        for i in range(len(self.buffer) - 1, self.sent - 1, -1):
            if self.buffer[i].isalnum():
                count += 1
                if count == self.hold:
                    return i
        return self.sent

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.buffer += delta
        start = 0 if self.guard.moderate_replies else max(0, self.sent - WINDOW_PER_CHAR * (self.hold + 1))
        # logged once, when refused or closed
        decision = self.guard.check_reply(self.buffer[start:], log=False, since=self.sent - start)
        if decision.action == "refuse":
            self.decision = decision
            log_decision(decision, self.guard.policy, self.buffer)
            return ""
        if decision.action == "redact":
            self.buffer = self.buffer[:start] + decision.text
            self.redactions.append(decision)
        release = max(self.sent, self._release_point())
        out, self.sent = self.buffer[self.sent:release], release
        return out

    def close(self) -> tuple[str, Decision]:
        """(the text still held back, the decision over the whole reply)."""
        if self.stopped:
            return "", self.decision
        decision = self.guard.check_reply(self.buffer)
        if decision.action == "refuse":
            self.decision = decision
            return "", decision
        self.buffer = decision.text
        out, self.sent = self.buffer[self.sent:], len(self.buffer)
        for earlier in self.redactions:
            decision.categories.update(earlier.categories)
            decision.reasons = earlier.reasons + decision.reasons
        if self.redactions and severity(decision.action) < severity("redact"):
            decision.action = "redact"
        self.decision = decision
        return out, decision
