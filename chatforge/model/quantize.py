"""Weight quantization: fewer bytes read per decoded token, which is what decode speed depends on.

int8-dyn: int8 weights and per-token dynamically quantized int8 activations (torchao; int8 matmuls, fastest on an
AVX-512 CPU once compiled and frozen, 8x slower than int8-wo where the CPU has only AVX2, +3.8% perplexity on
SmolLM2 and, compiled on Granite Rapids, wrong: generation.decode.int_mm_takes_one_row). int8-wo: int8 weights with
a scale per output row. int4-wo: 4-bit weights in groups of 32 with a scale and a zero each (GGUF Q4_1's bytes per
weight), the output head at int8. Weight-only methods run through torchao on CUDA and through torch's own kernels on
CPU (model/cpu_linear.py: torchao has no CPU int4, and its int8-wo decoded at half the speed there). Every nn.Linear
is quantized, the output head included (on SmolLM2 it is a fifth of the weights); embeddings stay as they are (a
lookup reads one row per token), except that on CPU a tied embedding reads the int8 head's rows (one table), and a
block's q, k, v and gate, up become one kernel layer each (fuse_projections). Measure the quality cost with
chatforge.eval.compare before recommending a method.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from chatforge.errors import ChatforgeError

METHODS = ("int8-dyn", "int8-wo", "int4-wo")
CPU_METHODS = ("int8-wo", "int4-wo")  # on CPU through torch's own kernels (model/cpu_linear.py), not torchao
INT4_GROUP = 32  # weights per int4 scale, as Q4_1; a Linear whose input width it does not divide stays unquantized
# int4-wo keeps the output head at int8, as llama.cpp's Q4 mixes keep output.weight at 6-8 bits: SmolLM2's head (tied
# to its embedding) came out of int4 groups of 32 with 9% weight error where every other layer had 0.25%
HEAD = "lm_head"
QUANTIZE_GROUP = 8  # Linears quantized between two hand-backs of freed memory (about one decoder block)


def _torchao():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao import quantization
    except ImportError:
        raise ChatforgeError("quantize: needs the torchao package (pip install torchao)") from None
    return torchao, quantization


def quantize(model: nn.Module, method: str, group_size: int = INT4_GROUP) -> nn.Module:
    """Quantize `model`'s Linear weights in place (torchao; weight-only on CPU: torch's kernels); returns the model.

    Raises ChatforgeError naming the method when it is unknown or the model's device has no kernel for it.
    """
    from chatforge.device import release_host_memory

    if method not in METHODS:
        raise ChatforgeError(f"quantize: unknown method {method!r} (use {', '.join(METHODS)})")
    param = next(model.parameters())
    device = param.device
    if getattr(model, "quantization", None):
        raise ChatforgeError(f"quantize: the model is already quantized ({model.quantization})")
    if on_cpu_kernels(method, device):
        from chatforge.model.cpu_linear import quantize_cpu

        quantize_cpu(model, method, group_size, int8_names={HEAD})
        _tie_int8_embedding(model)
        finish_loading(model, method)
        return model
    torchao, q = _torchao()
    if method == "int8-dyn":
        config = q.Int8DynamicActivationInt8WeightConfig()
    elif method == "int8-wo":
        config = q.Int8WeightOnlyConfig()
    else:
        if device.type != "cuda":
            raise ChatforgeError(f"quantize: int4-wo has no kernel for {device.type} (torchao {torchao.__version__}: "
                                 f"CUDA; torch: CPU); use int8-wo or int8-dyn")
        if param.dtype != torch.bfloat16:
            model.to(torch.bfloat16)  # torchao's CUDA int4 kernel takes bf16 activations
        config = q.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    head_config = q.Int8WeightOnlyConfig() if method == "int4-wo" else config

    def eligible(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and (method != "int4-wo" or module.in_features % group_size == 0)

    # a few Linears at a time, the freed weights handed back between groups: quantizing all at once kept the
    # bf16 and the int8 copies of SmolLM2-135M resident together (peak +360 MiB over the bf16 model)
    names = [fqn for fqn, module in model.named_modules() if eligible(module, fqn) and fqn != HEAD]
    batches = [(config, set(names[i:i + QUANTIZE_GROUP])) for i in range(0, len(names), QUANTIZE_GROUP)]
    if isinstance(getattr(model, HEAD, None), nn.Linear):
        batches.append((head_config, {HEAD}))
    for batch_config, group in batches:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.quantize_(model, batch_config, filter_fn=lambda module, fqn: fqn in group)
        release_host_memory()
    model.quantization = method
    return model


def on_cpu_kernels(method: str | None, device: torch.device) -> bool:
    """Whether `method` runs through model/cpu_linear.py on `device`, which also lets a load quantize as it reads."""
    return method in CPU_METHODS and torch.device(device).type == "cpu"


def _tie_int8_embedding(model: nn.Module) -> None:
    """A tied model's input embedding reads its int8 head's rows, and its float table is freed."""
    from chatforge.model.cpu_linear import Int8Embedding, Int8Linear

    config = getattr(model, "config", None)
    if getattr(config, "tie_embeddings", False) and isinstance(getattr(model, HEAD, None), Int8Linear):
        model.model.embed_tokens = Int8Embedding(model.lm_head, model.model.embed_tokens.weight.dtype)


def fuse_projections(model: nn.Module) -> None:
    """Every block's q, k, v and its gate, up as one kernel layer each (model/cpu_linear.joined), where they were
    quantized alike: one kernel call a token instead of three and two (SmolLM2: 211 calls a token become 121)."""
    from chatforge.model.cpu_linear import joined
    from chatforge.model.gpt import MLP, Attention

    for module in [m for m in model.modules() if isinstance(m, (Attention, MLP))]:
        module.fuse(joined)


def finish_loading(model: nn.Module, method: str) -> None:
    """What follows the last CPU-quantized Linear: projections fused, the freed memory handed back, the method
    recorded on the model."""
    from chatforge.device import release_host_memory

    fuse_projections(model)
    release_host_memory()
    model.quantization = method


def loading_quantizer(model: nn.Module, method: str, group_size: int = INT4_GROUP) -> Callable[[str], None]:
    """For a model built on the meta device whose weights arrive one tensor at a time (weights.folder.load_model):
    a function to call with each parameter's name once it is loaded. A Linear is quantized as soon as all of its
    weights are in, so the full-precision model is never resident at once. The result is what `quantize` makes of
    the whole model once the caller, with every weight in, calls finish_loading. CPU weight-only methods only
    (on_cpu_kernels)."""
    from chatforge.device import release_host_memory
    from chatforge.model.cpu_linear import quantized

    if method not in CPU_METHODS:
        raise ValueError(f"loading_quantizer: {method!r} is not a CPU weight-only method")
    tied = model.config.tie_embeddings
    done = 0

    def loaded(name: str) -> None:
        nonlocal done
        owner = name.rpartition(".")[0]
        if tied and name == "model.embed_tokens.weight":  # the head is this table: quantized once, then shared
            model.lm_head.weight, owner = model.model.embed_tokens.weight, HEAD
        module = model.get_submodule(owner)
        if not isinstance(module, nn.Linear) or any(p.is_meta for p in module.parameters()):
            return
        layer = quantized(module, method, group_size, owner == HEAD)
        if layer is None:
            return
        parent, _, leaf = owner.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)
        if owner == HEAD:
            _tie_int8_embedding(model)
        done += 1
        if done % QUANTIZE_GROUP == 0:
            release_host_memory()

    return loaded


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters as stored (a quantized weight counts its int data and scales); a tied weight once."""
    from chatforge.model.cpu_linear import stored_bytes

    total, seen = stored_bytes(model), set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        inner = [getattr(p, name) for name in getattr(p, "__tensor_flatten__", lambda: ([], None))()[0]]
        total += sum(t.numel() * t.element_size() for t in inner) if inner else p.numel() * p.element_size()
    return total
