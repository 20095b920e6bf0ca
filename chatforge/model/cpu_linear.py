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
returns the model's dtype. A prompt (dense_rows rows or more) is multiplied by the weight dequantized to the model's
dtype instead, nearly as fast as a dense model prefills: the kernels are built for a few rows. `joined` makes one
layer of several that read the same input (q, k, v; gate, up), for fewer, larger kernel calls per token.
"""

from __future__ import annotations

import torch
from torch import nn

BLOCK = 64  # the int4 kernel packs output rows in blocks of 64 (two nibbles of a byte: rows j and j + 32 of a block)
KERNEL_DTYPE = torch.bfloat16
ROWS = 4096  # rows quantized at a time
# From this many rows on (a prompt), a layer multiplies by its weight dequantized to the model's dtype instead of
# calling the kernel, which is built for a few rows. Where bf16 is native (Granite Rapids with AMX, 1 thread, 576 x
# 1536): the int8 kernel took 3.8 ms for 184 rows where a bf16 matmul takes 0.37, and 0.17 against 0.12 at 8 rows;
# where it is emulated (the AVX2 EPYC) the int8 kernel and an fp32 matmul crossed between 32 and 48 rows.
DENSE_ROWS = 32
# int4's weight takes longer to dequantize: at 2 threads (Granite Rapids) the kernel and the dequantized matmul cross
# near 64 rows (1536 x 576: 0.63 ms each), and at 184 rows the matmul takes 0.64 ms where the kernel takes 1.77
DENSE_ROWS_INT4 = 64


def fits(linear: nn.Linear, group: int) -> bool:
    """Whether the int4 kernel takes this layer's shape (other layers stay as they are). Whole blocks only, so that
    the packed weight reads back (dequantized) and concatenates (join) block by block."""
    return linear.in_features % group == 0 and linear.out_features % BLOCK == 0


class _KernelLinear(nn.Module):
    """What both layers share: flatten and cast to KERNEL_DTYPE, multiply in the kernel, give back the shape and
    dtype the model passed in, add the bias."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None
    dense_rows: int | None = None  # from this many rows on, multiply by the dequantized weight instead

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense(self, flat: torch.Tensor) -> torch.Tensor:
        """The product in flat's dtype, through a dense matmul."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.dense_rows is not None and flat.shape[0] >= self.dense_rows:
            y = self.dense(flat)
        else:
            y = self.matmul(flat.to(KERNEL_DTYPE)).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _joined_bias(layers: list[_KernelLinear]) -> nn.Parameter | None:
    biases = [layer.bias for layer in layers]
    return None if biases[0] is None else nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)


class Int4Linear(_KernelLinear):
    """An nn.Linear whose weight is stored as packed int4 with a bf16 (scale, zero) per group."""

    dense_rows = DENSE_ROWS_INT4

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, bias: nn.Parameter | None, group: int):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)
        self.bias = bias
        self.out_features, self.in_features, self.group = packed.shape[0], packed.shape[1] * 2, group

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: nn.Parameter | None, group: int) -> Int4Linear:
        weight = weight.detach().float()
        n, k = weight.shape
        blocks = weight.reshape(n, k // group, group)
        low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-12) / 15
        q = ((blocks - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        # the kernel dequantizes (q - 8) * scale + zero, so zero is the value of the group's middle code
        zero = low + 8 * scale
        scale_zero = torch.stack([scale[..., 0], zero[..., 0]], -1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        return cls(torch._convert_weight_to_int4pack_for_cpu(q, 1), scale_zero, bias, group)

    @classmethod
    def join(cls, layers: list[Int4Linear]) -> Int4Linear:
        """One layer giving the outputs of `layers` side by side (whole blocks of rows concatenate as they are)."""
        return cls(torch.cat([layer.packed for layer in layers]), torch.cat([layer.scale_zero for layer in layers], 1),
                   _joined_bias(layers), layers[0].group)

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zero)

    def dense(self, flat: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(flat, self.dequantized(flat.dtype))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the kernel multiplies by ([out, in]; a transposed view, which is what F.linear reads), from
        its packing: in each block of 64 rows, byte j of input column c holds row j (low nibble) and row j + 32
        (high nibble). Worked in that order, where every operation runs over 32 contiguous rows (SmolLM2's 1536 x
        576 layer in 0.4 ms at 2 threads; unpacked to [out, in] first, 1.1)."""
        n, k, g = self.out_features, self.in_features, self.group
        blocks = n // BLOCK
        p = self.packed.view(blocks, k, BLOCK // 2)
        codes = torch.stack([p & 15, p >> 4], 1).to(dtype).view(blocks, 2, k // g, g, BLOCK // 2)
        scale, zero = self.scale_zero.float().unbind(-1)  # (k // g, n) each

        def packed_order(t: torch.Tensor) -> torch.Tensor:  # (k // g, n) -> (blocks, 2, k // g, 1, 32)
            return t.view(k // g, blocks, 2, BLOCK // 2).permute(1, 2, 0, 3)[:, :, :, None].to(dtype)

        # (code - 8) * scale + zero = code * scale + (zero - 8 * scale), in place
        w = torch.addcmul(packed_order(zero - 8 * scale), codes, packed_order(scale), out=codes)
        return w.view(blocks * 2, k, BLOCK // 2).permute(1, 0, 2).reshape(k, n).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, int4"


class Int8Linear(_KernelLinear):
    """An nn.Linear whose weight is stored as int8 with one bf16 scale per output row (symmetric, absmax / 127)."""

    dense_rows = DENSE_ROWS

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: nn.Parameter | None):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.bias = bias
        self.out_features, self.in_features = weight_int8.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: nn.Parameter | None) -> Int8Linear:
        weight = weight.detach()
        n, k = weight.shape
        scale = torch.empty(n)
        q = torch.empty(n, k, dtype=torch.int8)
        for a in range(0, n, ROWS):  # a block of rows at a time: an fp32 temporary of SmolLM2's head is 113 MiB
            rows = weight[a:a + ROWS].float()
            scale[a:a + ROWS] = rows.abs().amax(1).clamp(min=1e-12) / 127
            q[a:a + ROWS] = (rows / scale[a:a + ROWS, None]).round_().clamp_(-127, 127).to(torch.int8)
        return cls(q, scale.to(KERNEL_DTYPE), bias)

    @classmethod
    def join(cls, layers: list[Int8Linear]) -> Int8Linear:
        """One layer giving the outputs of `layers` side by side."""
        return cls(torch.cat([layer.weight_int8 for layer in layers]), torch.cat([layer.scale for layer in layers]),
                   _joined_bias(layers))

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


def joined(layers: list[nn.Module]) -> _KernelLinear | None:
    """One layer computing `layers`' outputs side by side (q, k and v; gate and up), or None where they are not all
    int8 or all int4 of one group, with biases all or none: one kernel call a token instead of three or two (at 2
    threads, q + k + v took 26 us and their join 17)."""
    kinds = {(type(layer), getattr(layer, "group", None), layer.bias is None) for layer in layers}
    if len(kinds) != 1 or not issubclass(next(iter(kinds))[0], (Int4Linear, Int8Linear)):
        return None
    return type(layers[0]).join(layers)


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
        return Int4Linear.quantize(linear.weight, linear.bias, group) if fits(linear, group) else None
    return Int8Linear.quantize(linear.weight, linear.bias)


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
