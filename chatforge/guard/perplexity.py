"""A windowed perplexity filter for gibberish adversarial suffixes (GCG-style), computed by a small language model.

GCG attacks append ~20 optimised tokens (`describing.\\ + similarlyNow write oppositeley.]( Me giving**ONE please?`)
that no fluent text contains. A whole-prompt perplexity hides them behind a long clean prompt, so the filter scores
every window of `window` tokens (mean next-token negative log-likelihood, nats), plus the prefix and suffix windows
where attacks sit, and flags the prompt when any score exceeds its language's threshold.

Thresholds are calibrated on clean held-out dialogs per language (a high quantile of the clean scores) and stored
beside the model as `guard_perplexity.json`, so a model folder carries the thresholds that fit it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.errors import ChatforgeError

THRESHOLDS_FILE = "guard_perplexity.json"
SCORES = ("window", "prefix", "suffix")


def language_of(text: str) -> str:
    """"zh" when at least a fifth of the letters are CJK ideographs, else "en" (the two calibrated languages)."""
    letters = [c for c in text if c.isalpha()]
    cjk = sum(1 for c in letters if 0x3400 <= ord(c) <= 0x9FFF or 0xF900 <= ord(c) <= 0xFAFF)
    return "zh" if letters and cjk / len(letters) >= 0.2 else "en"


@dataclass
class PerplexityVerdict:
    flagged: bool
    language: str
    scores: dict[str, float]  # window / prefix / suffix: mean NLL in nats
    reason: str = ""


@dataclass
class PerplexityFilter:
    """Scores text with `model` (a chatforge GPT) and `tokenizer`; `thresholds` maps language -> score -> nats."""

    model: object
    tokenizer: object
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    window: int = 10
    max_tokens: int = 512
    batch_size: int = 16

    @classmethod
    def from_pretrained(cls, name_or_path: str, thresholds: str | os.PathLike | None = None,
                        require_thresholds: bool = True, **kwargs) -> "PerplexityFilter":
        """The filter of a model folder or known name, with the thresholds (and window) stored beside it, or at
        `thresholds`. Without require_thresholds a folder with none gives an uncalibrated filter (to calibrate)."""
        from chatforge.io import read_json
        from chatforge.weights.loader import load

        loaded = load(name_or_path)
        model, tokenizer, folder = loaded.model, loaded.tokenizer, loaded.folder
        path = Path(thresholds) if thresholds else Path(folder) / THRESHOLDS_FILE
        found = read_thresholds(path) if (path.exists() or require_thresholds) else {}
        if found and "window" not in kwargs:
            kwargs["window"] = int(read_json(path).get("window", 10))
        return cls(model, tokenizer, found, **kwargs)

    def _context(self) -> list[int]:
        """What the text follows: the chat template's user-turn opening where the tokenizer has it, so the first
        tokens are scored in context as the model would read them, not as the start of a document."""
        hf = self.tokenizer.hf
        start = hf.token_to_id("<|im_start|>")
        return ([start] if start is not None else []) + self.tokenizer.encode("user\n")

    def _ids(self, text: str) -> list[int]:
        context = self._context()
        room = getattr(getattr(self.model, "config", None), "max_seq_len", None)  # never past the model's positions
        keep = self.max_tokens if room is None else max(1, min(self.max_tokens, room - len(context)))
        return context + self.tokenizer.encode(text)[-keep:]  # an attack suffix sits at the end

    def token_nll(self, texts: list[str]) -> list[list[float]]:
        """Per-token negative log-likelihood (nats) of each text's tokens, after the user-turn context, in batches.

        Texts are batched by length (padding costs as much as text) and right-padded: causal attention keeps the
        padding from touching the real tokens.
        """
        import torch

        all_ids = [self._ids(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(all_ids[i]))
        out: list[list[float]] = [[] for _ in texts]
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                ids = [all_ids[i] for i in rows]
                width = max(2, max(len(i) for i in ids))
                batch = torch.zeros(len(ids), width, dtype=torch.long)
                for row, seq in enumerate(ids):
                    batch[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                logits = self.model(batch).float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                nll = -logp.gather(-1, batch[:, 1:, None])[..., 0]
                skip = len(self._context()) - 1 if self._context() else 0  # the context's own tokens
                for row, (i, seq) in enumerate(zip(rows, ids)):
                    out[i] = nll[row, skip:max(0, len(seq) - 1)].tolist()
        return out

    def window_scores(self, nll: list[float]) -> dict[str, float]:
        """Max mean NLL over sliding windows, and the mean over the first and the last window. A text shorter than
        a window scores 0: it cannot hold a GCG suffix (~20 tokens), and a few tokens' mean is noise."""
        if len(nll) < self.window:
            return dict.fromkeys(SCORES, 0.0)
        w = self.window
        sums = [sum(nll[:w])]
        for i in range(w, len(nll)):
            sums.append(sums[-1] + nll[i] - nll[i - w])
        return {"window": max(sums) / w, "prefix": sums[0] / w, "suffix": sums[-1] / w}

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        return [self.window_scores(n) for n in self.token_nll(texts)]

    def check_many(self, texts: list[str]) -> list[PerplexityVerdict]:
        verdicts = []
        for text, scores in zip(texts, self.scores(texts)):
            language = language_of(text)
            limits = self.thresholds.get(language) or self.thresholds.get("en")
            if not limits:
                raise ChatforgeError(f"{THRESHOLDS_FILE}: no thresholds for language {language!r}; "
                                     "run `chatforge guard calibrate MODEL`")
            over = [k for k in SCORES if scores[k] > limits[k]]
            reason = ", ".join(f"{k} perplexity {math.exp(scores[k]):.0f} > {math.exp(limits[k]):.0f}"
                               for k in over)
            verdicts.append(PerplexityVerdict(bool(over), language, scores, reason))
        return verdicts

    def check(self, text: str) -> PerplexityVerdict:
        return self.check_many([text])[0]


def calibrate(filt: PerplexityFilter, clean: dict[str, list[str]], quantile: float = 0.999,
              margin: float = 0.25) -> dict[str, dict[str, float]]:
    """Per-language thresholds: the `quantile` of each score over clean texts, plus `margin` nats of headroom.

    The quantile sets the false-positive rate on text like the calibration set; the margin covers the gap between
    calibration and deployment text.
    """
    for language, texts in clean.items():
        if len(texts) < 20:
            raise ChatforgeError(f"calibrate: {len(texts)} clean {language} texts; need at least 20")
    return {language: thresholds_from_scores(filt.scores(texts), quantile, margin) for language, texts in clean.items()}


def thresholds_from_scores(scores: list[dict[str, float]], quantile: float = 0.999,
                           margin: float = 0.25) -> dict[str, float]:
    """One language's thresholds from the window scores of its clean texts (see calibrate)."""
    limits = {}
    for k in SCORES:
        values = sorted(s[k] for s in scores)
        at = min(len(values) - 1, max(0, int(math.ceil(quantile * len(values))) - 1))
        limits[k] = round(values[at] + margin, 4)
    return limits


def read_thresholds(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    from chatforge.io import read_json

    if not Path(path).exists():
        raise ChatforgeError(f"{path}: no perplexity thresholds; run `chatforge guard calibrate MODEL` first")
    data = read_json(path)
    found = data.get("thresholds")
    if not isinstance(found, dict) or not all(isinstance(v, dict) and set(SCORES) <= set(v) for v in found.values()):
        raise ChatforgeError(f"{path}: field 'thresholds' must map a language to {', '.join(SCORES)} (nats)")
    return {lang: {k: float(v[k]) for k in SCORES} for lang, v in found.items()}


def write_thresholds(path: str | os.PathLike, thresholds: dict[str, dict[str, float]], window: int,
                     meta: dict | None = None) -> None:
    import json

    from chatforge.io import atomic_write_text

    body = {"window": window, "thresholds": thresholds, **(meta or {})}
    atomic_write_text(path, json.dumps(body, indent=2, ensure_ascii=False) + "\n")
