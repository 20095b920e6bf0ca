"""Weight quantization (torchao; on CPU, int8-wo and int4-wo through torch's kernels): close to the unquantized
model, works through the decode path, clear errors."""

from __future__ import annotations

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.generation import decode
from chatforge.model.gpt import KVCache
from chatforge.model.quantize import quantize, weight_bytes
from conftest import FAMILIES, random_family_model

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_thread")

# int8 needs some width; int4 takes output widths in whole blocks of 64
WIDE = dict(FAMILIES["llama-gqa"], d_model=128, n_head=4, n_kv_head=2, vocab_size=256, d_ff=384)
# a quantized block's q, k, v and gate, up are one layer each (model.quantize.fuse_projections)
FUSED = {"self_attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj")}


def _reference_weights(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weight of every Linear of `ref` under the quantized model's names (fused layers: their parts stacked)."""
    weights = {n: m.weight for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    for i in range(ref.config.n_layer):
        p = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            weights[p + fused] = torch.cat([weights.pop(p + part) for part in parts])
    return weights


@pytest.mark.parametrize("method", ["int8-dyn", "int8-wo"])
def test_int8_keeps_the_logits_and_quarters_the_linear_bytes(method):
    ref = random_family_model(WIDE)
    model = random_family_model(WIDE)
    before = weight_bytes(model)
    quantize(model, method)
    assert model.quantization == method
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = ref(ids), model(ids)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.03, rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
    linear = sum(m.weight.numel() for m in ref.modules() if isinstance(m, torch.nn.Linear))
    assert before - weight_bytes(model) >= 0.7 * 3 * linear  # fp32 -> int8 (+ scales) on every Linear


def test_int4_on_cpu_is_the_grouped_weight_the_kernel_multiplies_by():
    """int4-wo on CPU (torch's kernel): each group of 32 weights is min/max quantized to 16 levels, so no weight
    moves by much more than half a level (the bf16 scale and zero round a little), the logits stay close, and the
    Linears take 5 bits a weight (int4 + a bf16 scale and zero per 32); the output head is int8 (8 bits + a bf16
    scale per row)."""
    from chatforge.model.cpu_linear import Int4Linear, Int8Linear

    ref = random_family_model(WIDE).to(torch.bfloat16)
    model = random_family_model(WIDE).to(torch.bfloat16)
    before = weight_bytes(model)
    quantize(model, "int4-wo")
    assert model.quantization == "int4-wo"
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    weights = _reference_weights(ref)
    assert set(layers) == set(weights) - {"lm_head"} and isinstance(model.lm_head, Int8Linear)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    for name, layer in layers.items():
        w = weights[name].float()
        groups = w.reshape(w.shape[0], -1, 32)
        step = (groups.amax(-1) - groups.amin(-1)) / 15
        err = (layer.dequantized() - w).abs().reshape_as(groups)
        assert (err / step[..., None]).max() <= 0.6, name  # half a level, plus the bf16 rounding of scale and zero
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = ref(ids).float(), model(ids).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.2, rel  # random weights have no structure: each layer adds ~8% noise (a real model: eval --compare)
    n_int4 = sum(w.numel() for name, w in weights.items() if name != "lm_head")
    vocab, width = ref.lm_head.weight.shape
    saved = n_int4 * (2 - 5 / 8) + vocab * width * (2 - 1) - 2 * vocab
    assert before - weight_bytes(model) == pytest.approx(saved, rel=1e-6)


def test_int8_wo_on_cpu_is_a_scale_per_row_the_kernel_multiplies_by():
    """int8-wo on CPU (torch's kernel): every Linear, weights within half a step of absmax/127 per row (plus the bf16
    rounding of the scale); the layer returns the model's dtype and is the dequantized weight's product."""
    from chatforge.model.cpu_linear import Int8Linear

    ref = random_family_model(WIDE)
    model = quantize(random_family_model(WIDE), "int8-wo")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    weights = _reference_weights(ref)
    assert set(layers) == set(weights)
    for name, layer in layers.items():
        w = weights[name]
        step = w.abs().amax(1, keepdim=True) / 127
        assert ((layer.dequantized() - w).abs() / step).max() <= 0.5 + 127 * 2 ** -8, name
    layer = next(iter(layers.values()))
    x = torch.randn(3, layer.in_features)
    with torch.inference_mode():
        y = layer(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y, x.bfloat16().float() @ layer.dequantized().t(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_prompt_rows_multiply_the_dequantized_weight(kind):
    """From dense_rows rows on (a prompt), a layer multiplies in the model's dtype by its dequantized weight: the same
    product as the kernel's up to its bf16 rounding of the input."""
    from chatforge.model import cpu_linear

    w, bias = torch.randn(64, 96) * 0.05, torch.nn.Parameter(torch.randn(64))
    if kind == "int8":
        layer, rows = cpu_linear.Int8Linear.quantize(w, bias), cpu_linear.DENSE_ROWS
    else:
        layer, rows = cpu_linear.Int4Linear.quantize(w, bias, 32), cpu_linear.DENSE_ROWS_INT4
    assert layer.dense_rows == rows
    prompt, token = torch.randn(2, rows // 2, 96), torch.randn(1, 1, 96)
    with torch.inference_mode():
        dense, kernel = layer(prompt), layer(token)
        layer.dense_rows = None
        via_kernel = layer(prompt)
    w = layer.dequantized()
    assert torch.allclose(dense, prompt @ w.t() + layer.bias, atol=1e-5)
    assert torch.allclose(kernel, token.bfloat16().float() @ w.t() + layer.bias, atol=1e-2, rtol=1e-2)
    assert torch.allclose(dense, via_kernel, atol=2e-2, rtol=2e-2) and not torch.equal(dense, via_kernel)


@pytest.mark.parametrize("method", ["int8-wo", "int4-wo"])
def test_a_tied_embedding_reads_the_int8_head(method):
    """A tied model keeps one int8 copy of its vocabulary table: the embedding looks up the head's rows (dequantized
    in the model's dtype), the float table is gone from the weights and the state dict holds the table once."""
    from chatforge.model.cpu_linear import Int8Embedding, Int8Linear

    tied = dict(WIDE, tie_embeddings=True)
    ref = random_family_model(tied)
    model = quantize(random_family_model(tied), method)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, Int8Embedding) and isinstance(head, Int8Linear)
    ids = torch.tensor([[0, 5, 255, 5]])
    with torch.inference_mode():
        got = emb(ids)
    assert got.dtype == torch.float32 and torch.equal(got, head.dequantized()[ids])
    step = ref.model.embed_tokens.weight.abs().amax(1, keepdim=True) / 127
    assert ((got[0] - ref.model.embed_tokens.weight[ids[0]]).abs() / step[ids[0]]).max() <= 0.5 + 127 * 2 ** -8
    assert not any(p.numel() == 256 * 128 for p in model.parameters())  # no float table left
    keys = [k for k in model.state_dict() if "embed_tokens" in k or "lm_head" in k]
    assert keys == ["lm_head.weight_int8", "lm_head.scale"]


def test_int4_leaves_a_layer_the_cpu_kernel_cannot_take():
    """int4 takes an input width divisible by the group and an output width in whole blocks of 64 (the kernel's
    packing, which dequantized() and join read): other layers stay. An fp32 model's int4 layer takes and gives fp32
    (the kernel multiplies in bf16)."""
    from chatforge.model.cpu_linear import Int4Linear

    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 48), torch.nn.Linear(48, 64))
    quantize(net, "int4-wo")
    assert [type(m) for m in net] == [Int4Linear, torch.nn.Linear, torch.nn.Linear]
    x = torch.randn(3, 64)
    with torch.inference_mode():
        y = net[0](x)
        want = x.bfloat16().float() @ net[0].dequantized().t() + net[0].bias
    assert y.dtype == torch.float32
    assert torch.allclose(y, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("method", ["int8-wo", "int4-wo"])
def test_quantized_model_decodes_through_the_cache_path(method):
    model = quantize(random_family_model(WIDE), method)
    cache = KVCache(model.config, 1, 64)
    prompt = list(range(3, 15))
    with torch.inference_mode():
        first = decode.prefill(model, cache, 0, prompt)
        nxt = decode.step(model, cache, [0], [int(first.argmax())], [len(prompt)])
        full = model(torch.tensor([prompt + [int(first.argmax())]]))[0, -2:]
    assert (torch.stack([first, nxt[0]]) - full).abs().max().item() <= 1e-4


def test_quantize_errors_name_the_method():
    model = random_family_model(WIDE)
    with pytest.raises(ChatforgeError, match=r"^quantize: unknown method 'int3' \(use int8-dyn, int8-wo, int4-wo\)$"):
        quantize(model, "int3")
    quantize(model, "int8-wo")
    with pytest.raises(ChatforgeError, match=r"^quantize: the model is already quantized \(int8-wo\)$"):
        quantize(model, "int8-dyn")


@pytest.mark.parametrize("method", ["int8-wo", "int4-wo"])
def test_joined_projections_are_their_parts_side_by_side(method):
    """A quantized block runs q, k, v as one kernel layer and gate, up as another: the same logits as the parts
    one by one (the kernels compute each output column alike), fewer layers; an fp32 model has none."""
    from chatforge.model import quantize as quantize_module

    fused = quantize(random_family_model(WIDE), method)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize_module, "fuse_projections", lambda model: None)
        apart = quantize(random_family_model(WIDE), method)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert attn.qkv is not None and mlp.gate_up is not None and not hasattr(attn, "q_proj")
    assert apart.model.layers[0].self_attn.qkv is None
    assert random_family_model(WIDE).model.layers[0].self_attn.qkv is None
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    cache = KVCache(fused.config, 1, 64)
    with torch.inference_mode():
        assert torch.equal(fused(ids), apart(ids))
        first = decode.prefill(fused, cache, 0, list(range(3, 15)))
        step = decode.step(fused, cache, [0], [7], [12])
        full = fused(torch.tensor([list(range(3, 15)) + [7]]))[0, -2:]
    assert (torch.stack([first, step[0]]) - full).abs().max().item() <= 1e-4


def test_joined_needs_one_kind_of_layer():
    """join takes int8 layers, or int4 layers of one group, with biases all or none; otherwise it declines."""
    from chatforge.model.cpu_linear import Int4Linear, Int8Linear, joined

    w = [torch.randn(64, 64) for _ in range(3)]
    bias = torch.nn.Parameter(torch.randn(64))
    assert joined([Int8Linear.quantize(w[0], None), Int4Linear.quantize(w[1], None, 32)]) is None
    assert joined([Int4Linear.quantize(w[0], None, 32), Int4Linear.quantize(w[1], None, 64)]) is None
    assert joined([Int8Linear.quantize(w[0], bias), Int8Linear.quantize(w[1], None)]) is None
    assert joined([torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)]) is None
    parts = [Int4Linear.quantize(x, torch.nn.Parameter(torch.randn(64)), 32) for x in w]
    one = joined(parts)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        assert torch.equal(one(x), torch.cat([p(x) for p in parts], -1))
        assert torch.equal(one.dequantized(), torch.cat([p.dequantized() for p in parts]))


def test_int4_dequantized_is_the_kernels_weight():
    """dequantized() reads the kernel's packing (rows in blocks of 64): the weight the kernel multiplies by, as a
    product with the identity shows (to the bf16 rounding of that product)."""
    from chatforge.model.cpu_linear import Int4Linear

    layer = Int4Linear.quantize(torch.randn(192, 96), None, 32)
    with torch.inference_mode():
        by_kernel = layer.matmul(torch.eye(96, dtype=torch.bfloat16)).float().t()
    w = layer.dequantized()
    assert w.shape == (192, 96)
    assert (w - by_kernel).abs().max().item() <= 2 ** -8 * w.abs().max().item()
