"""Dropout whose mask comes from 64-bit random words, four 16-bit draws each.

torch's CPU dropout draws one Bernoulli sample per element: at LoRA's usual 0.05 on the q, k, v and o adapters of
SmolLM2-135M (120 inputs of 1024 x 576 a step) that was a fifth of the step on 2 cores. Here an element is dropped
when its 16-bit draw is among the lowest round(p * 2^16), so the rate is p to within 2^-17, and kept elements are
scaled by the exact inverse of the realised keep probability (the expectation is unchanged). Forward and backward
took 1.8 ms against F.dropout's 3.3 for one such input (bf16, 2 threads, 2026-12-04).
"""

from __future__ import annotations

import torch
from torch import nn

LEVELS = 1 << 16


def keep_mask(shape: torch.Size, device, threshold: int) -> torch.Tensor:
    """True where kept: an int16 draw (uniform over all 2^16 values, from words drawn over the full int64 range) at
    or above the threshold-th lowest value."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    return words.view(torch.int16)[:n].view(shape) >= threshold - (LEVELS >> 1)


class Dropout(nn.Module):
    """nn.Dropout(p) with the mask above; the identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * LEVELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        keep = keep_mask(x.shape, x.device, self.threshold)
        return torch.where(keep, x * (LEVELS / (LEVELS - self.threshold)), 0)

    def extra_repr(self) -> str:
        return f"p={self.p}"
