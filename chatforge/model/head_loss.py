"""The vocabulary head and its cross-entropy as one step, a chunk of rows at a time, for training.

Through autograd, the head's loss keeps an (N, V) fp32 log-softmax for the backward, runs the exponential over it
twice (forward and backward) and zero-fills an fp32 gradient of the same size: on CPU at the nanoGPT 1M shape
(768 tokens, a 4k vocabulary) that was a quarter of the training step. Here each chunk's logits become the loss and
their gradient (softmax minus one-hot) at once, in one exponential pass; the backward only scales and multiplies.
With a frozen head (LoRA) the input's gradient is made chunk by chunk too and nothing of size N x V outlives its
chunk; a trained head keeps the (N, V) gradient in the compute dtype for one weight-gradient matmul, half the fp32
log-softmax it replaces. Numerics are autocast's: bf16 matmuls, an fp32 softmax.
"""

from __future__ import annotations

import torch

from chatforge.device import autocast_dtype

CHUNK_ELEMENTS = 1 << 21  # logits a chunk holds: 8 MiB of fp32 (512 rows of a 4k vocabulary, 42 of a 49k one)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dev = h.device.type
        dtype = autocast_dtype(dev) or h.dtype
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(dev, enabled=False):
            x, w = h.to(dtype), weight.to(dtype)
            N, V = x.shape[0], w.shape[0]
            rows = max(1, CHUNK_ELEMENTS // V)
            loss = torch.zeros((), device=h.device)
            grad_x = torch.empty(x.shape, device=h.device) if want_h and not want_w else None  # fp32
            grad_logits = torch.empty(N, V, device=h.device, dtype=dtype) if want_w else None
            for i in range(0, N, rows):
                t = targets[i:i + rows, None]
                z = (x[i:i + rows] @ w.T).float()
                z = z.sub_(z.amax(-1, keepdim=True))
                picked = z.gather(1, t)
                e = z.exp_()
                total = e.sum(-1, keepdim=True)
                loss += (total.log() - picked).sum()
                if want_h or want_w:  # d(summed loss)/d(logits) = softmax - one-hot
                    g = e.div_(total).scatter_add_(1, t, torch.full_like(picked, -1.0)).to(dtype)
                    if want_w:
                        grad_logits[i:i + rows] = g
                    else:
                        grad_x[i:i + rows] = g @ w
            if want_w:
                grad_x = (grad_logits @ w).float() if want_h else None
                grad_w = (grad_logits.T @ x).float()
            else:
                grad_w = None
        ctx.save_for_backward(grad_x, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        gh = None if grad_x is None else (grad_x * grad_loss).to(ctx.h_dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.w_dtype)
        return gh, gw, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `targets` (N,) under the logits h @ weight.T (h: (N, D); weight: (V, D)), with the
    gradients of h and weight made in the same pass (so call it only to train: the forward does the backward's
    work)."""
    return _LinearCrossEntropy.apply(h, weight, targets)
