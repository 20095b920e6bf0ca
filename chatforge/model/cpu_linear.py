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
returns the model's dtype. Where bf16 is emulated (AVX2), an int8 layer multiplies a prompt (DENSE_ROWS rows or more)
by its weight converted to the model's dtype instead: a 184-token prompt then prefills as fast as in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from chatforge.device import bf16_supported

N_MULTIPLE = 16  # the int4 kernel packs output rows in tiles of 16
KERNEL_DTYPE = torch.bfloat16
ROWS = 4096  # rows quantized at a time
# Where bf16 is emulated (no AVX-512 BF16), an int8 layer multiplies a prompt of this many rows or more by its weight
# converted to the model's dtype (on the AVX2 EPYC the two cross between 32 and 48 rows; at 184, 2.9 ms against 6.2)
DENSE_ROWS = 32


def fits(linear: nn.Linear, group: int) -> bool:
    """Whether the int4 kernel takes this layer's shape (other layers stay as they are)."""
    return linear.in_features % group == 0 and linear.out_features % N_MULTIPLE == 0


class _KernelLinear(nn.Module):
    """What both layers share: flatten and cast to KERNEL_DTYPE, multiply in the kernel, give back the shape and
    dtype the model passed in, add the bias."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    dense_rows: int | None = None  # from this many rows on (a prompt), multiply by the dequantized weight instead

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense(self, flat: torch.Tensor) -> torch.Tensor:
        """The product in flat's dtype, through a dense matmul (for layers that set dense_rows)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.dense_rows is not None and flat.shape[0] >= self.dense_rows:
            y = self.dense(flat)
        else:
            y = self.matmul(flat.to(KERNEL_DTYPE)).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(_KernelLinear):
    """An nn.Linear whose weight is stored as packed int4 with a bf16 (scale, zero) per group."""

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None, group: int):
        super().__init__()
        weight = weight.detach().float()
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
        self.bias = bias
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

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None):
        super().__init__()
        weight = weight.detach()
        n, k = weight.shape
        scale = torch.empty(n)
        q = torch.empty(n, k, dtype=torch.int8)
        for a in range(0, n, ROWS):  # a block of rows at a time: an fp32 temporary of SmolLM2's head is 113 MiB
            rows = weight[a:a + ROWS].float()
            scale[a:a + ROWS] = rows.abs().amax(1).clamp(min=1e-12) / 127
            q[a:a + ROWS] = (rows / scale[a:a + ROWS, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(KERNEL_DTYPE))
        self.bias = bias
        self.in_features, self.out_features = k, n
        self.dense_rows = None if bf16_supported(torch.device("cpu")) else DENSE_ROWS

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)

    def dense(self, flat: torch.Tensor) -> torch.Tensor:
        # the row scales applied to the output columns: one pass over the weight fewer than dequantizing it
        return nn.functional.linear(flat, self.weight_int8.to(flat.dtype)) * self.scale.to(flat.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by (fp32, [out, in])."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """A tied input embedding that reads the int8 output head's rows: one copy of the vocabulary's weights, not an
    fp32 table beside the int8 head (SmolLM2-135M: 113 of the 237 MiB int8-wo kept)."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        # the head's own tensors, not copies; not persistent, so a state dict holds them once
        self.register_buffer("weight_int8", head.weight_int8, persistent=False)
        self.register_buffer("scale", head.scale, persistent=False)
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[ids].to(self.dtype) * self.scale[ids].to(self.dtype).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8, the output head's rows"


def quantized(linear: nn.Linear, method: str, group: int, int8: bool) -> nn.Module | None:
    """The layer's replacement under `method` (int8: an Int8Linear even under int4-wo), or None where the int4
    kernel cannot take its shape (the layer stays as it is)."""
    if method == "int4-wo" and not int8:
        return Int4Linear(linear.weight, linear.bias, group) if fits(linear, group) else None
    return Int8Linear(linear.weight, linear.bias)


def quantize_cpu(model: nn.Module, method: str, group: int, int8_names: set[str] = frozenset()) -> None:
    """Replace every Linear the method's kernel takes by an Int4Linear (int4-wo) or Int8Linear (int8-wo, and the
    layers named in `int8_names` under int4-wo), in place."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            fqn = f"{parent_name}.{name}" if parent_name else name
            layer = quantized(child, method, group, fqn in int8_names) if isinstance(child, nn.Linear) else None
            if layer is not None:
                setattr(parent, name, layer)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights and their scales held by this module's CPU int4/int8 layers."""
    return sum(b.nbytes for m in model.modules() if isinstance(m, _KernelLinear) for b in m.buffers())
