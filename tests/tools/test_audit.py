"""The memorisation audit: exposure's formula, the skew-normal fit against exact enumeration, a memorised canary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chatforge.data.canaries import Canary, canaries_to_json, make_canaries
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.tokenizer import train_tokenizer
from chatforge.tools.audit import (
    canary_exposure, canary_extraction, exposure_exact, exposure_skewnorm, rank_of,
)


def test_exposure_formula_on_a_hand_made_ranking():
    scores = np.array([9.0, 3.0, 7.5, 4.0, 12.0, 3.5, 8.0, 6.0])  # 8 candidates, the true one scored 4.0
    assert rank_of(4.0, scores) == 3  # 3.0 and 3.5 are more likely
    assert exposure_exact(4.0, scores, 8) == pytest.approx(math.log2(8) - math.log2(3))
    assert exposure_exact(3.0, scores, 8) == pytest.approx(3.0)  # the most likely: log2|R|
    assert exposure_exact(12.0, scores, 8) == pytest.approx(0.0)  # the least likely


def test_skew_normal_fit_agrees_with_exact_enumeration():
    from scipy.stats import skewnorm

    scores = skewnorm.rvs(4.0, loc=20.0, scale=3.0, size=100_000, random_state=np.random.default_rng(0))
    sample = np.random.default_rng(1).choice(scores, 5000, replace=False)
    for q in (0.5, 0.05, 0.002):
        true = float(np.quantile(scores, q))
        exact = exposure_exact(true, scores, len(scores))
        assert exposure_skewnorm(true, sample, len(scores)) == pytest.approx(exact, abs=0.35), q


def _memoriser(canary: Canary, others: int = 12, steps: int = 150):
    texts = [canary.prefix + " ".join("0123456789")] * 4 + [f"Hello number {i}, how are you?" for i in range(30)]
    tok = train_tokenizer(texts, vocab_size=320)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64, max_seq_len=64))
    untrained = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64, max_seq_len=64))
    untrained.load_state_dict(model.state_dict())
    convs = [canary.messages()] + [[{"role": "user", "content": f"Hello number {i}"},
                                    {"role": "assistant", "content": f"Hi {i}, how are you?"}] for i in range(others)]
    seqs = [tok.render(m) for m in convs]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        width = max(len(s) for s, _ in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, (s, m) in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(m)] = torch.tensor(s), torch.tensor(m, dtype=torch.bool)
        model.train()
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tok, model.eval(), untrained.eval()


def test_a_memorised_canary_is_exposed_and_extracted_an_untrained_one_is_not():
    torch.set_num_threads(1)
    canary = make_canaries(1, (1,), digits=3, languages=("en",), seed=2)[0]
    tok, trained, untrained = _memoriser(canary)
    hi = canary_exposure(trained, tok, canary, batch_size=500)
    lo = canary_exposure(untrained, tok, canary, batch_size=500)
    assert hi["method"] == "exact" and hi["candidates"] == 1000
    assert hi["exposure"] >= math.log2(1000) - 1.0 and hi["rank"] <= 2
    assert lo["exposure"] < 5.0 and lo["exposure"] < hi["exposure"] - 4
    assert canary_extraction(trained, tok, [canary]) == [True]
    assert canary_extraction(untrained, tok, [canary]) == [False]
    # both paths on the same canary: the fit on 400 sampled candidates tells an unexposed secret from an exposed one
    lo_fit = canary_exposure(untrained, tok, canary, sample_size=400, batch_size=500, method="skewnorm")
    assert lo_fit["method"] == "skewnorm" and lo_fit["exposure"] == pytest.approx(lo["exposure"], abs=1.5)
    hi_fit = canary_exposure(trained, tok, canary, sample_size=400, batch_size=500, method="skewnorm")
    assert hi_fit["exposure"] > math.log2(1000) - 2


def test_audit_writes_audit_json_and_the_report_shows_it(tmp_path):
    from chatforge.tools.audit import audit
    from chatforge.tools.report import audit_blocks
    from chatforge.weights.folder import save_model

    canary = make_canaries(1, (1,), digits=2, seed=1)[0]
    tok, trained, _ = _memoriser(canary, steps=40)
    run = tmp_path / "run"
    save_model(trained, tok, run / "final")
    (run / "summary.json").write_text("{}")
    (tmp_path / "canaries.json").write_text(json.dumps(canaries_to_json([canary])))
    r = audit(str(run / "final"), str(tmp_path / "canaries.json"), batch_size=100)
    assert r["path"] == str(run / "audit.json") and set(r["by_repeats"]) == {"1"}
    assert json.loads((run / "audit.json").read_text())["canaries"][0]["candidates"] == 100
    blocks = audit_blocks(run)
    assert blocks[0] == ("h", 2, "Memorisation audit") and any(b[0] == "table" for b in blocks)
