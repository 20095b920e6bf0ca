"""The training step's fused head + cross-entropy, and its fp32 attention on CPU: the same loss and gradients as the
plain autograd path."""

import pytest
import torch
import torch.nn.functional as F

from chatforge.model import gpt, head_loss
from chatforge.model.gpt import GPT, ModelConfig


def _model(tie: bool = True, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=97, max_seq_len=64,
                           tie_embeddings=tie))


def _grads(model, ids, mask, targets, ctx, fused: bool, freeze_head: bool = False):
    model.zero_grad(set_to_none=True)
    model.lm_head.weight.requires_grad_(not freeze_head)
    with ctx:
        if fused:
            loss = model(ids, only=mask, targets=targets[mask])
        else:
            loss = F.cross_entropy(model(ids, only=mask)[0].float(), targets[mask], reduction="sum")
    (loss / 13).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids, targets = torch.randint(0, 97, (3, 20), generator=g), torch.randint(0, 97, (3, 20), generator=g)
    return ids, targets, torch.rand(3, 20, generator=g) > 0.3


@pytest.mark.parametrize("tie,freeze_head", [(True, False), (False, False), (False, True)])
def test_fused_head_loss_equals_autograd_in_fp32(tie, freeze_head, monkeypatch):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 97 * 7)  # 7 rows a chunk: the 40-odd trained rows span several
    model, (ids, targets, mask) = _model(tie), _batch()
    off = torch.autocast("cpu", enabled=False)
    fused_loss, fused = _grads(model, ids, mask, targets, off, True, freeze_head)
    plain_loss, plain = _grads(model, ids, mask, targets, off, False, freeze_head)
    assert fused.keys() == plain.keys()
    assert ("lm_head.weight" in fused) == (not tie and not freeze_head)
    assert abs(float(fused_loss - plain_loss)) <= 1e-4 * float(plain_loss)
    for name in plain:
        assert (fused[name] - plain[name]).abs().max() <= 1e-5 * plain[name].abs().max() + 1e-8, name


def test_fused_head_loss_in_bf16_is_as_close_to_fp32_as_autograd():
    """Under bf16 autocast the fused loss rounds as autocast's head does: no further from the fp32 gradients."""
    model, (ids, targets, mask) = _model(), _batch(2)
    _, exact = _grads(model, ids, mask, targets, torch.autocast("cpu", enabled=False), False)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    _, fused = _grads(model, ids, mask, targets, bf16, True)
    _, plain = _grads(model, ids, mask, targets, bf16, False)

    def error(g):
        return max(float((g[n] - exact[n]).norm() / exact[n].norm()) for n in exact)

    assert error(fused) <= 1.25 * error(plain) + 1e-3, (error(fused), error(plain))


def test_bf16_training_attends_in_fp32_on_short_cpu_rows(monkeypatch):
    """Training under bf16 autocast on CPU runs SDPA on fp32 inputs up to CPU_FP32_ATTENTION_MAX_T tokens (its bf16
    backward was 2-4x slower there) and in bf16 beyond and at inference."""
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention",
                        lambda q, *a, **k: seen.append(q.dtype) or sdpa(q, *a, **k))
    model, (ids, targets, mask) = _model(), _batch(3)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with bf16:
        model(ids, only=mask, targets=targets[mask]).backward()
        with torch.no_grad():
            model(ids)
    monkeypatch.setattr(gpt, "CPU_FP32_ATTENTION_MAX_T", 16)  # rows of 20 are now long
    with bf16:
        model(ids, only=mask, targets=targets[mask]).backward()
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2 + [torch.bfloat16] * 2
