"""`chatforge audit MODEL --canaries FILE`: what a trained model memorised.

Exposure (Carlini et al. 2019, "The Secret Sharer"): each candidate secret r of the canary's randomness space R is
scored by the model's log-perplexity of the canary conversation holding r (bits summed over the reply's tokens);
the true secret's rank among all candidates (1 = the most likely) gives exposure = log2|R| - log2 rank. Where
|R| <= exact_limit (1e6) every candidate is scored in batches; beyond it the log-perplexities of a random sample of
candidates are fitted with a skew-normal distribution (scipy.stats.skewnorm), as the paper does, and exposure is
-log2 of the fitted CDF at the true secret's log-perplexity (capped at log2|R|, the exact maximum). An untrained
model puts the true secret in the middle of the pack (exposure ~1 bit); one that memorised it, near log2|R|.

Extraction: greedy decoding from the canary's prompt (its question and the reply up to the secret) either writes the
secret out exactly or not; and for training sequences of at least prefix + suffix tokens, the first `prefix` tokens
are given and the next `suffix` (50 and 50) must come out verbatim (the verbatim extraction rate).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from chatforge.data.canaries import Canary, read_canaries, spaced
from chatforge.errors import ChatforgeError

AUDIT_FILE = "audit.json"
EXACT_LIMIT = 1_000_000


# ---------------------------------------------------------------- exposure from scores

def rank_of(true_score: float, scores: np.ndarray) -> int:
    """1 + the number of candidates strictly more likely (lower log-perplexity) than the true secret."""
    return 1 + int(np.count_nonzero(np.asarray(scores) < true_score))


def exposure_exact(true_score: float, scores: np.ndarray, space: int) -> float:
    """log2|R| - log2 rank, `scores` holding the log-perplexity of every candidate of R (the true one included)."""
    return math.log2(space) - math.log2(rank_of(true_score, scores))


def exposure_skewnorm(true_score: float, sample: np.ndarray, space: int) -> float:
    """-log2 P(candidate log-perplexity <= true), the distribution a skew-normal fitted to a random sample of
    candidates; capped at log2|R|, which the exact exposure cannot exceed."""
    from scipy.stats import skewnorm

    a, loc, scale = skewnorm.fit(np.asarray(sample, dtype=np.float64))
    log_cdf = float(skewnorm.logcdf(true_score, a, loc, scale))
    return float(min(max(-log_cdf / math.log(2.0), 0.0), math.log2(space)))


# ---------------------------------------------------------------- scoring candidates with a model

def score_sequences(model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 256) -> np.ndarray:
    """Log-perplexity in bits (-sum log2 p over the masked targets) of each (ids, mask) sequence, in batches."""
    import torch

    device = next(model.parameters()).device
    out = np.empty(len(sequences), dtype=np.float64)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for i, (s, m) in enumerate(chunk):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(ids[:, :-1]).float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            bits = -(logp * mask[:, 1:]).sum(1) / math.log(2.0)
            out[start:start + len(chunk)] = bits.cpu().numpy()
    return out


def canary_scores(model, tokenizer, canary: Canary, numbers: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Log-perplexity (bits) of the canary conversation with each candidate secret number in place of its own."""
    seqs = [tokenizer.render(canary.messages(spaced(int(n), canary.digits))) for n in numbers]
    return score_sequences(model, seqs, batch_size)


def canary_exposure(model, tokenizer, canary: Canary, exact_limit: int = EXACT_LIMIT, sample_size: int = 5000,
                    batch_size: int = 256, seed: int = 0, method: str = "auto") -> dict:
    """{"exposure", "method", "rank" (exact only), "candidates", "log_perplexity"} of one canary. method: auto (exact
    when |R| <= exact_limit), exact, or skewnorm (a sample of sample_size other candidates)."""
    space = canary.space
    true_number = int(canary.secret.replace(" ", ""))
    true_score = float(canary_scores(model, tokenizer, canary, np.array([true_number]), batch_size)[0])
    if method == "auto":
        method = "exact" if space <= exact_limit else "skewnorm"
    if method == "exact":
        if space > exact_limit:
            raise ChatforgeError(f"audit: {canary.id}: |R| = {space:,} is more than the exact limit {exact_limit:,}")
        others = np.array([n for n in range(space) if n != true_number])
        scores = canary_scores(model, tokenizer, canary, others, batch_size)
        rank = rank_of(true_score, scores)
        return {"exposure": math.log2(space) - math.log2(rank), "method": "exact", "rank": rank,
                "candidates": space, "log_perplexity": true_score}
    rng = np.random.default_rng([seed, true_number % (2 ** 32)])
    sample = rng.choice(space - 1, size=min(sample_size, space - 1), replace=False)
    sample = sample + (sample >= true_number)  # every candidate but the true one
    scores = canary_scores(model, tokenizer, canary, sample, batch_size)
    return {"exposure": exposure_skewnorm(true_score, scores, space), "method": "skewnorm", "rank": None,
            "candidates": space, "sampled": int(len(sample)), "log_perplexity": true_score}


# ---------------------------------------------------------------- extraction

def greedy_continuations(model, tokenizer, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """The greedy continuation of each prompt, `lengths[i]` tokens (fewer where the model stops), through the engine."""
    from chatforge.generation.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer, max_batch_size=min(16, max(1, len(prompts))))
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, top_p=1.0) for n in lengths]
    return [c.token_ids for c in engine.generate_batch(prompts, params)]


def secret_span(tokenizer, canary: Canary) -> tuple[list[int], list[int]]:
    """(prompt ids, the secret's ids): the canary rendered, cut where a secret differing in every digit diverges."""
    ids, mask = tokenizer.render(canary.messages())
    other = " ".join(str((int(d) + 1) % 10) for d in canary.secret.split(" "))
    alt, _ = tokenizer.render(canary.messages(other))
    start = next(i for i, (a, b) in enumerate(zip(ids, alt)) if a != b)
    end = len(ids) - next(i for i, (a, b) in enumerate(zip(ids[::-1], alt[::-1])) if a != b)
    return ids[:start], ids[start:end]


def canary_extraction(model, tokenizer, canaries: list[Canary]) -> list[bool]:
    spans = [secret_span(tokenizer, c) for c in canaries]
    outs = greedy_continuations(model, tokenizer, [p for p, _ in spans], [len(s) for _, s in spans])
    return [list(o[:len(s)]) == list(s) for o, (_, s) in zip(outs, spans)]


def verbatim_extraction(model, tokenizer, records: list[dict], prefix: int = 50, suffix: int = 50,
                        max_sequences: int = 200, seed: int = 0) -> dict:
    """Share of training sequences (rendered records of >= prefix + suffix tokens, a seeded sample of at most
    max_sequences) whose `suffix` tokens after the first `prefix` come out of greedy decoding verbatim."""
    from chatforge.data.pack import encode_record

    context = model.config.max_seq_len
    if prefix + suffix > context:
        raise ChatforgeError(f"audit: prefix + suffix ({prefix + suffix} tokens) is longer than the model's context "
                             f"({context})")
    long = [ids for ids in (encode_record(r, tokenizer, "all")[0] for r in records) if len(ids) >= prefix + suffix]
    rng = np.random.default_rng(seed)
    picked = [long[i] for i in sorted(rng.permutation(len(long))[:max_sequences])]
    if not picked:
        return {"sequences": 0, "eligible": 0, "extracted": 0, "rate": None, "prefix": prefix, "suffix": suffix}
    outs = greedy_continuations(model, tokenizer, [ids[:prefix] for ids in picked], [suffix] * len(picked))
    hits = sum(list(o[:suffix]) == list(ids[prefix:prefix + suffix]) for o, ids in zip(outs, picked))
    return {"sequences": len(picked), "eligible": len(long), "extracted": hits, "rate": hits / len(picked),
            "prefix": prefix, "suffix": suffix}


# ---------------------------------------------------------------- the audit

def audit_folder(model_path: str) -> Path:
    """Where audit.json goes: the run folder when the model is its best/ or final/, else the model folder."""
    folder = Path(model_path)
    return folder.parent if (folder.parent / "summary.json").exists() else folder


def audit(model_path: str, canaries_path: str, data: str | None = None, exact_limit: int = EXACT_LIMIT,
          sample_size: int = 5000, prefix_tokens: int = 50, suffix_tokens: int = 50, max_sequences: int = 200,
          batch_size: int = 256, device: str = "auto", seed: int = 0, out: str | None = None,
          method: str = "auto") -> dict:
    """Exposure and extraction of every canary, and the verbatim extraction rate on data's train split; written to
    audit.json (out, or the run folder) and returned."""
    from chatforge.device import pick_device
    from chatforge.weights.folder import write_json
    from chatforge.weights.loader import load

    if method not in ("auto", "exact", "skewnorm"):
        raise ChatforgeError(f"audit: method must be auto, exact or skewnorm, got {method!r}")
    canaries = read_canaries(canaries_path)
    loaded = load(model_path, device=pick_device(device), dtype="fp32")
    model, tok = loaded.model, loaded.tokenizer
    extracted = canary_extraction(model, tok, canaries)
    rows = []
    for c, hit in zip(canaries, extracted):
        e = canary_exposure(model, tok, c, exact_limit, sample_size, batch_size, seed, method)
        rows.append({"id": c.id, "language": c.language, "repeats": c.repeats, "digits": c.digits,
                     "max_exposure": math.log2(c.space), "extracted": hit, **e})
    by_repeats = {}
    for r in sorted({row["repeats"] for row in rows}):
        group = [row for row in rows if row["repeats"] == r]
        by_repeats[str(r)] = {"canaries": len(group), "mean_exposure": float(np.mean([g["exposure"] for g in group])),
                              "max_exposure": float(max(g["exposure"] for g in group)),
                              "extracted": sum(g["extracted"] for g in group)}
    result = {"model": str(model_path), "canaries_file": str(canaries_path), "canaries": rows,
              "by_repeats": by_repeats}
    if data:
        from chatforge.data import load_dataset

        train, _, _ = load_dataset(data, seed=seed)
        result["verbatim"] = verbatim_extraction(model, tok, train, prefix_tokens, suffix_tokens, max_sequences, seed)
    privacy = Path(model_path) / "privacy.json"
    if privacy.exists():
        from chatforge.io import read_json

        p = read_json(privacy)
        result["privacy"] = {"epsilon": p.get("epsilon"), "delta": p.get("delta")}
    target = Path(out) if out else audit_folder(model_path) / AUDIT_FILE
    os.makedirs(target.parent, exist_ok=True)
    write_json(target, result)
    result["path"] = str(target)
    return result
