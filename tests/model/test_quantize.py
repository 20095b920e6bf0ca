"""torchao quantization: close to the unquantized model, works through the decode path, clear errors."""

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

WIDE = dict(FAMILIES["llama-gqa"], d_model=128, n_head=4, n_kv_head=2, vocab_size=256)  # int8 needs some width


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


def test_quantized_model_decodes_through_the_cache_path():
    model = quantize(random_family_model(WIDE), "int8-wo")
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
    if not torch.cuda.is_available():
        with pytest.raises(ChatforgeError, match=r"^quantize: int4-wo needs a CUDA device \(torchao .* has no int4 "
                                                 r"kernel for cpu\); use int8-wo or int8-dyn$"):
            quantize(model, "int4-wo")
    quantize(model, "int8-wo")
    with pytest.raises(ChatforgeError, match=r"^quantize: the model is already quantized \(int8-wo\)$"):
        quantize(model, "int8-dyn")
