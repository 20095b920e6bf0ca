"""Shape arithmetic of the one model: parameters, FLOPs, memory and the KV cache, from a ModelConfig alone.

Written for *this* implementation (gpt.py), so the numbers can be held to the built model: the parameter count equals
`GPT(config).num_params()` exactly, and the training-memory estimate is compared in the tests with the peak measured
during a real training step. `model_config` is the one rule that turns a training config's `model:` section into a
ModelConfig (training builds it, `size` and `ablate` plan with it).

seq_len means the same thing everywhere in chatforge: the tokens of one row, i.e. the positions the model sees at
once (a packed training row stores seq_len + 1 ids: inputs [:-1], targets [1:]).

Formulas (n = batch x sequence tokens, d = d_model, L = n_layer, V = vocab, H/KV = query/key-value heads, hd = head
dim, ff = MLP width, a = bytes of the autocast dtype: 2 for bf16, 4 for fp32):

* FLOPs per token (Kaplan et al. 2020, as nanoGPT's estimate_mfu): forward = 2 * N_matmul + 4 * L * H * hd * c,
  where N_matmul counts every weight used in a matmul (the non-embedding weights plus the output head; an embedding
  lookup costs nothing) and c is the mean number of keys a query attends to (about T/2 for causal attention over a
  sequence of T, min(window) with a sliding window). Training = 3 x forward (backward costs twice the forward).
* Training memory = weights (4 B/param, fp32) + gradients (4 B) + AdamW moments (8 B) + activations saved for the
  backward pass + the loss's logits buffers. Activations per layer and token, measured tensor by tensor with
  saved_tensors_hooks for bf16 autocast and PyTorch's flash SDPA kernel on CPU:
  norms 2 x (8d + 4) [RMSNorm keeps its fp32 input and normalised output] (LayerNorm: 2 x (4d + 8)),
  linear inputs a*d per consuming projection (autocast casts a LayerNorm's output once per q/k/v/gate/up
  projection; RMSNorm rounds its own once, a*d; fp32 shares one 4d copy per norm), RoPE cos/sin copies 4*a*hd,
  attention q/k/v/out a*(2*H*hd + 2*KV*hd) plus the fp32 log-sum-exp 4H (bf16 rows up to
  gpt.CPU_FP32_ATTENTION_MAX_T tokens attend in fp32 on CPU: 4*(2*H*hd + 2*KV*hd) and the bf16 output a*H*hd for the
  output projection), MLP 4*a*ff (SwiGLU: gate, act, up, product) or 2*a*ff (GELU), and bf16 copies of the layer's
  weights (2 B/param, autocast's cache). Packed rows add the attention mask, which SDPA converts to an additive
  B x T x T tensor of dtype a and keeps in every layer. With attention dropout PyTorch falls back to the math
  kernel, which keeps the fp32 T x T probabilities (12*H*T + 12*H*hd per token). Gradient checkpointing keeps only
  each layer's fp32 input (4d) and recomputes one layer at a time during the backward pass. The loss buffers follow
  model/head_loss.py, which makes the m trained positions' loss and gradients in the forward: a chunk of fp32 logits
  and its rounded gradient at a time ((4 + a) * V per row), the logits' gradient (a * m * V) for the head's weight
  gradient, and the input's (4 * m * d) and weight's (4 * V * d) gradients kept for the backward.
  The peak is taken over a simple timeline of the backward pass: at its start every activation and the loss buffers
  are alive; as it walks down the layers each layer's activations are freed and its gradients appear.
* Inference memory: weights + KV cache = 2 (K and V) * L * KV * hd * bytes per token.
* Compute-optimal tokens: 20 per parameter (Hoffmann et al. 2022, "Chinchilla"; total parameters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatforge.errors import ChatforgeError

if TYPE_CHECKING:  # torch is imported only when a model is built, so `chatforge size --help` stays fast
    from chatforge.model.gpt import ModelConfig

TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal ratio


# ---------------------------------------------------------------- the model a training config trains

def model_config(section: dict, vocab_size: int, seq_len: int, dropout: float | None = None) -> ModelConfig:
    """The ModelConfig that a training config's `model:` section builds from scratch: the preset (else ModelConfig's
    defaults) with the section's fields, the tokenizer's vocabulary, a context of at least seq_len unless the section
    sets max_seq_len, and the run's dropout when it sets one."""
    from chatforge.model.gpt import ModelConfig, config_from_preset

    spec = dict(section)
    preset = spec.pop("preset", None)
    spec["vocab_size"] = vocab_size
    if "max_seq_len" in spec and spec["max_seq_len"] < seq_len:
        raise ChatforgeError(f"model.max_seq_len: {spec['max_seq_len']} is shorter than seq_len {seq_len}")
    if dropout is not None:
        spec["dropout"] = dropout
    c = config_from_preset(preset, **spec) if preset else ModelConfig(**spec)
    if "max_seq_len" not in spec and c.max_seq_len < seq_len:
        c.max_seq_len = seq_len
    return c


# ---------------------------------------------------------------- parameters

def _norm_params(c: ModelConfig) -> int:
    return 2 * c.d_model if c.norm == "layernorm" else c.d_model


def _layer_matmul_params(c: ModelConfig) -> int:
    """Weights of one block that take part in a matmul (no biases, no norms)."""
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    attn = c.d_model * q + 2 * c.d_model * kv + q * c.d_model
    mlp = (3 if c.mlp == "swiglu" else 2) * c.d_model * c.d_ff
    return attn + mlp


def _layer_params(c: ModelConfig) -> int:
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    biases = (q + 2 * kv if c.attn_bias else 0) + (c.d_model if c.attn_out_bias else 0)
    if c.mlp_bias:
        biases += (2 if c.mlp == "swiglu" else 1) * c.d_ff + c.d_model
    return _layer_matmul_params(c) + biases + 2 * _norm_params(c)


def count_params(c: ModelConfig) -> dict:
    """Parameters by kind; "total" and "non_embedding" equal GPT(c).num_params() and num_params(True)."""
    embedding = c.vocab_size * c.d_model
    if c.positions == "learned":
        embedding += c.max_seq_len * c.d_model
    if not c.tie_embeddings:
        embedding += c.vocab_size * c.d_model  # the separate output head counts as embedding, as num_params does
    non_embedding = c.n_layer * _layer_params(c) + _norm_params(c)
    return {"total": embedding + non_embedding, "embedding": embedding, "non_embedding": non_embedding,
            "per_layer": _layer_params(c), "matmul": c.n_layer * _layer_matmul_params(c) + c.vocab_size * c.d_model}


# ---------------------------------------------------------------- FLOPs

def mean_context(seq_len: int, window: int | None = None) -> float:
    """Mean number of keys a query sees in causal attention over seq_len tokens (with an optional sliding window)."""
    w = window or seq_len
    return sum(min(p + 1, w) for p in range(seq_len)) / seq_len


def flops_per_token(c: ModelConfig, seq_len: int) -> dict:
    """Forward and training FLOPs per token (multiply-add = 2 FLOPs)."""
    dense = 2 * count_params(c)["matmul"]
    attention = 4 * c.n_layer * c.n_head * c.head_dim * mean_context(seq_len, c.sliding_window)
    forward = dense + attention
    return {"forward": forward, "training": 3 * forward, "dense_forward": dense, "attention_forward": attention}


# ---------------------------------------------------------------- memory

def _act_per_token(c: ModelConfig, seq_len: int, a: int, mixed: bool) -> tuple[float, float, float]:
    """(per layer, head, once-per-model) bytes of activations saved for backward, per token."""
    from chatforge.model.gpt import CPU_FP32_ATTENTION_MAX_T

    d, hd, ff = c.d_model, c.head_dim, c.d_ff
    q, kv = c.n_head * hd, c.n_kv_head * hd
    norm = 8 * d + 4 if c.norm == "rmsnorm" else 4 * d + 8
    consumers = 3 + (2 if c.mlp == "swiglu" else 1)  # projections reading a norm's output
    linear_in = (a * d if c.norm == "rmsnorm" else a * d * consumers) if mixed else 2 * 4 * d
    rope = 4 * a * hd if (c.positions == "rope" and mixed) else 0
    if c.dropout > 0:  # SDPA's math kernel: fp32 q/k/v copies and T x T probabilities, plus dropout masks
        attn = 12 * q + 12 * c.n_head * seq_len + a * q + 2 * a * d
    elif mixed and seq_len <= CPU_FP32_ATTENTION_MAX_T:  # the flash kernel on fp32 copies; the bf16 output
        attn = 4 * (2 * q + 2 * kv) + 4 * c.n_head + a * q
    else:  # flash kernel: q, k, v, output and the fp32 log-sum-exp
        attn = a * (2 * q + 2 * kv) + 4 * c.n_head
    mlp = (4 if c.mlp == "swiglu" else 2) * a * ff
    layer = 2 * norm + linear_in + rope + attn + mlp
    head = norm + (a * d if mixed else 4 * d)
    once = (8 * hd if c.positions == "rope" and not mixed else 0) + (4 * d if c.dropout > 0 else 0)
    return layer, head, once


def training_memory(c: ModelConfig, batch_size: int, seq_len: int, mixed: bool = True,
                    gradient_checkpointing: bool = False, trained_fraction: float = 1.0, packed: bool = True) -> dict:
    """Bytes needed to train with AdamW at batch_size x seq_len (bf16 autocast when mixed), and the peak.

    trained_fraction: share of positions that carry the loss (1 for pretraining; the assistant share for SFT), since
    the training loop only takes the log-softmax of those. Activations are those of CPU training. packed: rows hold
    several records, so attention gets a (B, 1, T, T) boolean mask built from doc ids.
    """
    from chatforge.model.head_loss import CHUNK_ELEMENTS

    p = count_params(c)
    n = batch_size * seq_len
    a = 2 if mixed else 4
    weights, grads, adam = 4 * p["total"], 4 * p["total"], 8 * p["total"]
    layer_tok, head_tok, once_tok = _act_per_token(c, seq_len, a, mixed)
    layer_copy = 2 * _layer_matmul_params(c) if mixed else 0  # autocast's bf16 weight copies, held until backward
    head_copy = 2 * c.vocab_size * c.d_model if mixed else 0
    # SDPA turns a boolean mask into an additive one in the compute dtype and keeps it, in every layer.
    mask = a * seq_len * seq_len * (batch_size if packed else 1 if c.sliding_window else 0)
    layer_full = layer_tok * n + layer_copy + mask
    layer_kept = 4 * c.d_model * n if gradient_checkpointing else layer_full
    head = head_tok * n + head_copy + once_tok * n
    # Loss, as model/head_loss.py computes it (see the module doc): at the head's peak, the logits' gradient, one
    # chunk's fp32 logits and rounded gradient, and the two gradients it keeps for the backward.
    m = max(1, round(trained_fraction * n))
    chunk = min(m, max(1, CHUNK_ELEMENTS // c.vocab_size))
    loss = c.vocab_size * (a * m + (4 + a) * chunk) + 4 * m * c.d_model + 4 * c.vocab_size * c.d_model
    layer_grad = 4 * _layer_params(c)
    head_grad = grads - c.n_layer * layer_grad
    # Gradient of the residual stream flowing down (fp32) and the MLP's widest gradients while a layer runs backward.
    transient = (8 * c.d_model + 3 * a * c.d_ff) * n
    static = weights + adam
    peaks = [static + c.n_layer * layer_kept + head + loss]  # backward starts: all activations + loss buffers
    for i in range(c.n_layer - 1, -1, -1):  # walking down: layer i's activations (recomputed if checkpointed)
        done = c.n_layer - 1 - i
        kept = i * layer_kept + layer_full
        peaks.append(static + head_grad + done * layer_grad + kept + transient)
    peaks.append(static + grads)  # after backward; also the first step's lazy AdamW state allocation
    activations = c.n_layer * layer_kept + head
    return {"weights": weights, "gradients": grads, "optimizer": adam, "activations": activations,
            "activations_per_layer": layer_kept, "loss_buffers": loss, "peak": max(peaks),
            "gradient_checkpointing": gradient_checkpointing, "mixed_precision": mixed,
            "batch_size": batch_size, "seq_len": seq_len}


def kv_cache_bytes_per_token(c: ModelConfig, dtype_bytes: int = 2) -> int:
    return 2 * c.n_layer * c.n_kv_head * c.head_dim * dtype_bytes


def inference_memory(c: ModelConfig, seq_len: int | None = None, dtype_bytes: int = 2) -> dict:
    """Weights plus the KV cache, in the serving dtype (bf16 by default)."""
    seq_len = seq_len or c.max_seq_len
    per_token = kv_cache_bytes_per_token(c, dtype_bytes)
    weights = count_params(c)["total"] * dtype_bytes
    return {"weights": weights, "kv_per_token": per_token, "kv_per_sequence": per_token * seq_len,
            "seq_len": seq_len, "total_one_sequence": weights + per_token * seq_len, "dtype_bytes": dtype_bytes}


def compute_optimal_tokens(c: ModelConfig) -> int:
    return TOKENS_PER_PARAM * count_params(c)["total"]
