"""The one decoder-only Transformer.

GPT-2 and the Llama family (Llama, Mistral, Qwen2, SmolLM2) differ only by config fields: norm, positions, MLP,
biases and kv heads. Parameter names follow transformers' Llama layout (model.layers.N.self_attn.q_proj, ...), so a
Llama-family state dict loads as is and LoRA target names mean the same thing here and in peft; checkpoint.py maps
GPT-2's fused Conv1D layout to and from it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.device import autocast_dtype, cpu_has_amx
from chatforge.errors import ChatforgeError
from chatforge.model.head_loss import linear_cross_entropy

# One query's half-precision attention on CPU runs as two matmuls (decode_attention) unless the CPU has AMX tiles:
# without them PyTorch's flash kernel ran one bf16 query 4-8x slower than the matmuls (AVX-512 BF16, 2026-12-01);
# with them it took 22 us a layer where the matmuls took 67 (Granite Rapids, 264 keys, 2026-12-04). A constant, so
# that a compiled step bakes the choice in.
CPU_DECODE_MATMULS = not cpu_has_amx()
# Half-precision training on CPU runs the flash kernel in fp32 for rows up to this many tokens: its bf16 backward
# took 2-4x the fp32 one's time up to 128 tokens, 1.0-1.2x at 256, and won at 1024 (1-2 threads, heads of 32-64,
# AMX, 2026-12-04).
CPU_FP32_ATTENTION_MAX_T = 256


@dataclass
class ModelConfig:
    """Shape and family of the model; saved as a transformers config.json by checkpoint.py."""

    family: str = "llama"  # the transformers model_type written on save: gpt2 | llama | qwen2 | mistral
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: multi-head; 1: multi-query; in between: grouped-query
    d_model: int = 128
    d_ff: int | None = None  # None: 4*d_model (gelu) or ~8/3*d_model rounded to 32 (swiglu)
    head_dim: int | None = None  # None: d_model // n_head
    max_seq_len: int = 512
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    positions: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    mlp: str = "swiglu"  # swiglu | gelu
    activation: str = "silu"  # silu (swiglu) | gelu_tanh | gelu
    attn_bias: bool = False  # biases on q, k, v (GPT-2, Qwen2)
    attn_out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    sliding_window: int | None = None  # attend to at most this many previous positions
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # family-specific config.json keys kept for a faithful round trip

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ChatforgeError(f"model: d_model {self.d_model} is not divisible by n_head {self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.positions == "rope" and self.head_dim % 2:
            raise ChatforgeError(f"model: rope needs an even head_dim, got {self.head_dim} (d_model / n_head)")
        if self.n_head % self.n_kv_head:
            raise ChatforgeError(f"model: n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 32 * math.ceil(8 * self.d_model / 3 / 32)
        for name, allowed in (("norm", ("rmsnorm", "layernorm")), ("positions", ("rope", "learned")),
                              ("mlp", ("swiglu", "gelu")), ("activation", ("silu", "gelu_tanh", "gelu"))):
            if getattr(self, name) not in allowed:
                raise ChatforgeError(f"model: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _gpt2(**kw) -> dict:
    base = dict(family="gpt2", norm="layernorm", positions="learned", mlp="gelu", activation="gelu_tanh",
                attn_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, max_seq_len=1024)
    return base | kw


def _llama(**kw) -> dict:
    return dict(family="llama", norm="rmsnorm", positions="rope", mlp="swiglu", activation="silu") | kw


# Size presets, smallest first. Non-embedding sizes are about 1M, 3M, 10M, 30M, 85M (the GPT-2 124M shape).
PRESETS: dict[str, dict] = {
    "nano": _llama(n_layer=4, n_head=4, n_kv_head=2, d_model=128, max_seq_len=512),
    "micro": _llama(n_layer=6, n_head=6, n_kv_head=2, d_model=192, max_seq_len=512),
    "mini": _llama(n_layer=8, n_head=8, n_kv_head=4, d_model=320, max_seq_len=1024),
    "small": _llama(n_layer=12, n_head=8, n_kv_head=4, d_model=448, max_seq_len=1024),
    "gpt2-nano": _gpt2(n_layer=4, n_head=4, d_model=128),
    "gpt2-124m": _gpt2(n_layer=12, n_head=12, d_model=768, vocab_size=50257),
}


def config_from_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ChatforgeError(f"model: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig(**(PRESETS[name] | overrides))


class KVCache:
    """Static keys/values for `batch_size` rows (slots), preallocated once and written in place.

    Layout (layer, row, kv_head, slot, head_dim): a decode step writes each row's new key with one index_copy_ per
    layer and reads a contiguous prefix of slots, so nothing is reallocated as sequences grow. A sliding-window model
    keeps only its window: a ring of `window` slots where position p lives in slot p % window. Memory is allocated
    with torch.empty (pages are touched only when used) and zeroed per row up to `reserve(length)`, so resident
    memory follows the rows in use and their lengths, not the capacity. Rows are independent: a row restarts by
    writing from position 0, and a query at position p only sees slots holding positions <= p, so a previous
    occupant's keys stay invisible.
    `rows` maps the batch being run to cache rows (None: row i is cache row i), which lets a continuous-batching
    engine run any subset of its slots.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        w = config.sliding_window
        self.window = w
        self.ring = bool(w) and w < max_len
        self.capacity = w if self.ring else max_len
        shape = (config.n_layer, batch_size, config.n_kv_head, self.capacity, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len  # positions it can hold (a ring holds any number, keeping the last `window`)
        self.rows: torch.Tensor | None = None
        self._slots: list[int] | None = None  # the rows use_rows named (None: every row)
        # per row, slots [0, n) are initialised: stale but finite, so masked reads cannot give NaN
        self._zeroed = [0] * batch_size
        if self.ring:
            self.reserve(self.capacity)  # a ring is read whole

    def reserve(self, length: int) -> None:
        """Initialise the slots the rows in use (use_rows; until then every row) read for `length` positions
        (host-side; call before the step). Rows never used stay untouched: one client of a server with 8 rows
        keeps one row's keys resident, not eight."""
        end = min(self.capacity, length)
        for r in self._slots if self._slots is not None else range(len(self._zeroed)):
            if end > self._zeroed[r]:
                self.k[:, r, :, self._zeroed[r]:end].zero_()
                self.v[:, r, :, self._zeroed[r]:end].zero_()
                self._zeroed[r] = end

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the keys/values of positions 0..length-1 from row `src` to row `dst` in place (prefix caching; not
        for a ring, whose row holds only the last `window` positions)."""
        self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
        self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])
        self._zeroed[dst] = max(self._zeroed[dst], length)  # initialised now: reserve must not zero them again

    def use_rows(self, slots: list[int]) -> None:
        """Run the next forwards on these cache rows; a prefix 0..B-1 reads without a gather."""
        self._slots = list(slots)
        self.rows = None if self._slots == list(range(len(slots))) else torch.tensor(slots, device=self.k.device)

    def plan(self, positions: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask, write index) for one forward, shared by every layer.

        positions: (B, T) absolute positions of the new tokens; kv_len: max position + 1, known on the host, so the
        mask bounds need no device-to-host read. The mask is (B, 1, T, S) over the S keys update() returns.
        """
        if not self.ring and kv_len > self.capacity:
            raise ChatforgeError(f"generation: sequence exceeds the KV cache length {self.capacity}")
        B, T = positions.shape
        dev, w = positions.device, self.window
        q = positions[:, :, None]
        if self.ring and T > 1:  # attend to the ring as it was plus the chunk, then keep the chunk's last `window`
            start = positions[:, :1]
            s = torch.arange(self.capacity, device=dev)
            held = start - 1 - torch.remainder(start - 1 - s, self.capacity)  # (B, W) position in each slot
            old = (held[:, None, :] > q - w) & (held[:, None, :] >= 0)
            k_pos = positions[:, None, :]
            new = (k_pos <= q) & (k_pos > q - w)
            mask = torch.cat((old, new), -1)
            slots = torch.remainder(positions[:, -min(T, w):], self.capacity)
        else:
            slots = torch.remainder(positions, self.capacity) if self.ring else positions
            k_pos = torch.arange(min(kv_len, self.capacity), device=dev)[None, None, :]
            mask = k_pos <= q  # a ring's slot s holds a position in (p - window, p] once it is written
            if w and not self.ring:
                mask = mask & (k_pos > q - w)
        rows = torch.arange(B, device=dev) if self.rows is None else self.rows
        H = self.k.shape[2]
        heads = torch.arange(H, device=dev)
        index = ((rows[:, None, None] * H + heads[None, :, None]) * self.capacity + slots[:, None, :]).flatten()
        return mask[:, None], index

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (B, H, T, hd) in place; the keys/values the queries attend to."""
        B, T = k.shape[0], k.shape[2]
        ring_chunk = self.ring and T > 1
        if ring_chunk:
            old_k, old_v = self._read(layer, B, self.capacity)
            keys, values = torch.cat((old_k, k.to(old_k.dtype)), 2), torch.cat((old_v, v.to(old_v.dtype)), 2)
            k, v = k[:, :, -min(T, self.window):], v[:, :, -min(T, self.window):]
        hd = k.shape[-1]
        if torch.compiler.is_compiling():
            # Under inductor a write through a view of the cache (self.k[layer].view) is functionalised into a copy
            # of the whole cache per layer (at 8k slots, slower than eager); an index_put_ on the cache itself is
            # done in place. The same slots, the same values.
            H, S = self.k.shape[2], self.capacity
            row_head, slot = index // S, index % S
            at = (torch.full_like(slot, layer), row_head // H, row_head % H, slot)
            self.k.index_put_(at, k.reshape(-1, hd).to(self.k.dtype))
            self.v.index_put_(at, v.reshape(-1, hd).to(self.v.dtype))
        else:
            self.k[layer].view(-1, hd).index_copy_(0, index, k.reshape(-1, hd).to(self.k.dtype))
            self.v[layer].view(-1, hd).index_copy_(0, index, v.reshape(-1, hd).to(self.v.dtype))
        if ring_chunk:
            return keys, values
        return self._read(layer, B, min(kv_len, self.capacity))

    def _read(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows is None:
            return self.k[layer, :batch, :, :length], self.v[layer, :batch, :, :length]
        return self.k[layer][self.rows, :, :length], self.v[layer][self.rows, :, :length]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as transformers does, so bf16 runs match it.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        compute = autocast_dtype(x.device.type)
        if compute is not None:
            # rounded once here to the dtype every consuming matmul casts it to (the same values), rather than once
            # per q, k, v, gate, up projection and LoRA adapter: a sixth of a LoRA step was these copies
            return (self.weight * h).to(compute)
        return self.weight * h.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


@torch.library.custom_op("chatforge::rope_cos_sin", mutates_args=())
def rope_cos_sin_op(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = torch.matmul(positions.float()[..., None], inv_freq[None, :])  # (B, T, hd/2), as transformers does
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@rope_cos_sin_op.register_fake
def _(positions, head_dim, theta):
    shape = (*positions.shape, head_dim)
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (B, T, hd) cos and sin, from one opaque op: inductor then computes the tables once, where it inlined cos
    and sin into every layer's and head's RoPE kernel (a fifth of a compiled 10M training step on CPU)."""
    with torch.autocast(positions.device.type, enabled=False):
        return rope_cos_sin_op(positions, head_dim, theta)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); the rotate-half layout used by transformers' Llama.
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotated * sin


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row in bf16/fp16: two matmuls and an fp32 softmax.

    On a CPU without AMX, PyTorch's flash kernel for half-precision runs one query 4-8x slower than this (and than
    its own fp32 kernel), which costs more than the weights at batch 8 (CPU_DECODE_MATMULS says where).
    q: (B, H, 1, hd); k, v: (B, Hkv, S, hd); bias: additive fp32 (B, 1, 1, S). Query heads are grouped by kv head
    as enable_gqa groups them.
    """
    B, H, _, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scores = torch.matmul(q.reshape(B, Hkv, H // Hkv, hd), k.transpose(-1, -2)).float()
    scores = scores.mul_(hd ** -0.5).add_(bias)
    probs = torch.softmax(scores, -1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, H, 1, hd)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.c = c
        self.q_proj = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=c.attn_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=c.attn_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=c.attn_bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=c.attn_out_bias)
        self.qkv: nn.Module | None = None  # q, k and v as one layer (fuse), for inference

    def fuse(self, join) -> None:
        """Replace q, k and v by the one layer `join([q, k, v])` makes of them, unless it returns None: one larger
        matmul a token instead of three (quantized inference; the model's state dict no longer reads as a Llama's)."""
        layer = join([self.q_proj, self.k_proj, self.v_proj])
        if layer is not None:
            self.qkv = layer
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int, plan: tuple | None) -> torch.Tensor:
        c, (B, T, _) = self.c, x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).split([c.n_head * c.head_dim] + [c.n_kv_head * c.head_dim] * 2, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, c.n_head, c.head_dim)
        k = k.view(B, T, c.n_kv_head, c.head_dim)
        v = v.view(B, T, c.n_kv_head, c.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # plan: (write index, kv_len), made once per forward by KVCache.plan
            k, v = cache.update(layer, k, v, *plan)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if mask is not None and mask.dtype == torch.float32 and T == 1:
            y = decode_attention(q, k, v, mask)
        else:
            dropout = c.dropout if self.training else 0.0
            dtype = q.dtype
            fp32 = dtype in (torch.bfloat16, torch.float16) and cache is None and T <= CPU_FP32_ATTENTION_MAX_T \
                and q.device.type == "cpu" and torch.is_grad_enabled()
            if fp32:
                q, k, v = q.float(), k.float(), v.float()
            with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():  # autocast recasts SDPA
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                                   enable_gqa=c.n_kv_head != c.n_head).to(dtype)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.gated = c.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=c.mlp_bias)
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[c.activation]
        self.gate_up: nn.Module | None = None  # gate and up as one layer (fuse), for inference

    def fuse(self, join) -> None:
        """Replace gate and up by the one layer `join([gate, up])` makes of them, unless it returns None (as
        Attention.fuse)."""
        layer = join([self.gate_proj, self.up_proj]) if self.gated else None
        if layer is not None:
            self.gate_up = layer
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, -1)
            h = self.act(gate) * up
        else:
            h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache, layer, plan):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), rope, mask, cache, layer, plan))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding, left uninitialised under torch.device("meta") (a model built to be loaded): normal_ on a meta
    tensor imports some 800 modules (68 MiB resident), and GPT initialises every weight itself anyway."""
    if torch.empty(0).is_meta:
        return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))
    return nn.Embedding(rows, dim)


class Backbone(nn.Module):
    """Everything but the head; named `model` inside GPT so parameter names match transformers' Llama."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = _embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.embed_positions = _embedding(config.max_seq_len, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)


class GPT(nn.Module):
    """input ids -> logits. Training passes doc_ids for packed sequences; generation passes a KVCache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.drop = nn.Dropout(config.dropout)
        self.gradient_checkpointing = False
        if self.lm_head.weight.is_meta:  # built to be loaded (see _embedding)
            return
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # GPT-2's scaled residual init
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if hasattr(self.model, "embed_positions"):
                n -= self.model.embed_positions.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def _mask(self, positions: torch.Tensor, doc_ids: torch.Tensor | None):
        """Boolean attention mask (B, 1, Tq, Tk) without a cache, or None when plain causal attention is exact."""
        w = self.config.sliding_window
        if doc_ids is None and not w:
            return None
        T = positions.shape[1]
        idx = torch.arange(T, device=positions.device)
        m = (idx[None, :] <= idx[:, None])[None]  # (1, T, T)
        if w:
            m = m & (idx[None, :] > idx[:, None] - w)[None]
        if doc_ids is not None:
            m = m & (doc_ids[:, :, None] == doc_ids[:, None, :])
        return m[:, None]

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, cache: KVCache | None = None, kv_len: int | None = None,
                logits_at: torch.Tensor | None = None, last_only: bool = False,
                only: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V); only the positions that are sampled with logits_at (B,) or last_only: (B, 1, V); only
        the positions a (B, T) bool mask `only` marks (the trained ones): (1, N, V), the vocabulary head and the loss
        skip the rest (with SmolLM2's 49k vocabulary the head is ~20% of a token's FLOPs).
        targets (N,) with `only`, to train: the summed cross-entropy of those positions instead of their logits, the
        head and loss fused (model/head_loss.py) unless the head is an adapted or quantized layer.

        position_ids: absolute positions (B, T); default 0..T-1. Packed training resets them per conversation.
        doc_ids: (B, T) conversation index per token; tokens attend only within their own conversation.
        cache: a KVCache; keys are written at position_ids and the queries see positions < kv_len.
        kv_len: max(position_ids) + 1, which the caller knows on the host (so the step never waits on the device);
            computed from position_ids (one device read) when not given.
        """
        c = self.config
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            kv_len = T if kv_len is None else kv_len
        if cache is not None and kv_len is None:
            kv_len = int(position_ids.max()) + 1
        x = self.model.embed_tokens(input_ids)
        if c.positions == "learned":
            # Packed rows (position_ids, no cache) restart positions per record: their bound is the largest position,
            # not the row length (one device read, skipped under compile where the lookup itself bounds-checks).
            bound = kv_len if kv_len is not None else \
                0 if torch.compiler.is_compiling() else int(position_ids.max()) + 1
            if bound > c.max_seq_len:
                raise ChatforgeError(f"model: position {bound - 1} is beyond max_seq_len {c.max_seq_len}")
            x = x + self.model.embed_positions(position_ids)
            rope = None
        else:
            rope = rope_cos_sin(position_ids, c.head_dim, c.rope_theta)
            compute = autocast_dtype(x.device.type)
            if compute is not None:  # cast once for every layer's q and k
                rope = tuple(t.to(compute) for t in rope)
        x = self.drop(x)
        plan = None
        if cache is not None:
            if not torch.compiler.is_compiling():
                cache.reserve(kv_len)
            mask, index = cache.plan(position_ids, kv_len)
            plan = (index, kv_len)
            if T == 1 and x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" \
                    and CPU_DECODE_MATMULS:
                # decode_attention's additive form, made once for every layer
                mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
        else:
            mask = self._mask(position_ids, doc_ids)
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, i, None, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, i, plan)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]
        elif only is not None:
            x = x[only][None]
        x = self.model.norm(x)
        if targets is None:
            return self.lm_head(x)
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            return linear_cross_entropy(x[0], self.lm_head.weight, targets)
        return F.cross_entropy(self.lm_head(x)[0].float(), targets, reduction="sum")
