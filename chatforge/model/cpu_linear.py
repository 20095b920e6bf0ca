"""Weight-only int4 and int8 Linears on CPU through torch's own kernels (aten._weight_int4pack_mm_for_cpu and
aten._weight_int8pack_mm).

int4: torchao 0.18 has no int4 layout for CPU (its int4 formats need CUDA or the mslk package), while torch ships the
tinygemm-style CPU kernel itself: weights packed two per byte, one (scale, zero) pair per `group` inputs. The grouping
matches GGUF's Q4_1 (asymmetric min/max, 32 weights a block). int8: one symmetric scale per output row, as torchao's
int8 weight-only, but torch's kernel ran a 576x1536 layer at batch 1 in 69 us where torchao's (compiled, frozen) took
186 and a dense fp32 one 96 (AVX2 EPYC, 2 threads). Decode reads these bytes once per token, which is what its speed
depends on.

Both kernels multiply in bf16 whatever the model's dtype: their fp32 and fp16 paths are not vectorized (on the AVX2
EPYC, 1.18 ms for the int4 layer above in fp32 where bf16 took 0.11; int8 0.68 ms against 0.07). A layer takes and
returns the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

N_MULTIPLE = 16  # the int4 kernel packs output rows in tiles of 16
KERNEL_DTYPE = torch.bfloat16


def fits(linear: nn.Linear, group: int) -> bool:
    """Whether the int4 kernel takes this layer's shape (other layers stay as they are)."""
    return linear.in_features % group == 0 and linear.out_features % N_MULTIPLE == 0


class _KernelLinear(nn.Module):
    """What both layers share: flatten and cast to KERNEL_DTYPE, multiply in the kernel, give back the shape and
    dtype the model passed in, add the bias."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features).to(KERNEL_DTYPE))
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(_KernelLinear):
    """An nn.Linear whose weight is stored as packed int4 with a bf16 (scale, zero) per group."""

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

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zero)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by (fp32, [out, in]): for tests and quality checks."""
        return self.matmul(torch.eye(self.in_features, dtype=KERNEL_DTYPE)).float().t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, int4"


class Int8Linear(_KernelLinear):
    """An nn.Linear whose weight is stored as int8 with one bf16 scale per output row (symmetric, absmax / 127)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(KERNEL_DTYPE))
        self.bias = linear.bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by (fp32, [out, in])."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_cpu(model: nn.Module, method: str, group: int, int8_names: set[str] = frozenset()) -> None:
    """Replace every Linear the method's kernel takes by an Int4Linear (int4-wo) or Int8Linear (int8-wo, and the
    layers named in `int8_names` under int4-wo), in place."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            fqn = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(child, nn.Linear):
                continue
            if method == "int4-wo" and fqn not in int8_names:
                if not fits(child, group):
                    continue
                setattr(parent, name, Int4Linear(child, group))
            else:
                setattr(parent, name, Int8Linear(child))


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights and their scales held by this module's CPU int4/int8 layers."""
    return sum(b.nbytes for m in model.modules() if isinstance(m, _KernelLinear) for b in m.buffers())
