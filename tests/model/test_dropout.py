"""The 16-bit dropout LoRA's adapters use: nn.Dropout's rate and expectation, its gradient, identity in eval."""

import pytest
import torch

from chatforge.model.dropout import LEVELS, Dropout


def test_drops_at_the_rate_and_keeps_the_expectation():
    torch.manual_seed(0)
    drop = Dropout(0.05).train()
    x = torch.ones(4_000_000)
    y = drop(x)
    rate = float((y == 0).float().mean())
    assert drop.threshold == round(0.05 * LEVELS)
    assert rate == pytest.approx(0.05, abs=5 * (0.05 * 0.95 / x.numel()) ** 0.5)  # five standard errors
    assert float(y.mean()) == pytest.approx(1.0, abs=1e-3)
    kept = y[y != 0]
    assert torch.all(kept == LEVELS / (LEVELS - drop.threshold))


def test_gradient_is_the_mask_times_the_scale_and_eval_is_the_identity():
    torch.manual_seed(1)
    drop = Dropout(0.3).train()
    x = torch.randn(7, 33, requires_grad=True)  # a size that is no multiple of 4 draws a word
    y = drop(x)
    y.sum().backward()
    scale = LEVELS / (LEVELS - drop.threshold)
    torch.testing.assert_close(x.grad, (y != 0).float() * scale)
    torch.testing.assert_close(y, x.detach() * x.grad)
    assert drop.eval()(x) is x and Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)
