"""4-bit grouped weights on CPU through torch's own kernel (aten._weight_int4pack_mm_for_cpu).

torchao 0.18 has no int4 layout for CPU (its int4 formats need CUDA or the mslk package), while torch ships the
tinygemm-style CPU kernel itself: weights packed two per byte, one (scale, zero) pair per `group` inputs, activations
in the model's dtype. Decode reads a quarter of bf16's bytes per token, which is what decode speed depends on. The
grouping matches GGUF's Q4_1 (asymmetric min/max, 32 weights a block), so a model dequantized from a Q4_1 file comes
back to nearly the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

N_MULTIPLE = 16  # the kernel packs output rows in tiles of 16
# The kernel multiplies in bf16 whatever the model's dtype: its fp32 and fp16 paths are not vectorized (on an AVX2
# EPYC, 1.18 and 1.35 ms for a 576x1536 layer at batch 1, where bf16 took 0.11 ms and a dense fp32 layer 0.12).
KERNEL_DTYPE = torch.bfloat16


def fits(linear: nn.Linear, group: int) -> bool:
    """Whether the CPU kernel takes this layer's shape (other layers stay as they are)."""
    return linear.in_features % group == 0 and linear.out_features % N_MULTIPLE == 0


class Int4Linear(nn.Module):
    """An nn.Linear whose weight is stored as packed int4 with a bf16 (scale, zero) per group; it takes and returns
    the model's dtype."""

    def __init__(self, linear: nn.Linear, group: int):
        super().__init__()
        weight = linear.weight.detach().float()
        n, k = weight.shape
        blocks = weight.reshape(n, k // group, group)
        low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-12) / 15
        q = ((blocks - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        # the kernel dequantizes (q - 8) * scale + zero, so zero is the value of the group's middle code
        zero = low + 8 * scale
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scale_zero", torch.stack([scale[..., 0], zero[..., 0]], -1).transpose(0, 1)
                             .contiguous().to(KERNEL_DTYPE))
        self.bias = linear.bias
        self.in_features, self.out_features, self.group = k, n, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zero)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by (fp32, [out, in]): for tests and quality checks."""
        eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scale_zero).float().t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, int4"


def quantize_int4(model: nn.Module, group: int) -> list[str]:
    """Replace every Linear the kernel takes by an Int4Linear, in place; returns their names."""
    done = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and fits(child, group):
                setattr(parent, name, Int4Linear(child, group))
                done.append(f"{parent_name}.{name}" if parent_name else name)
    return done
