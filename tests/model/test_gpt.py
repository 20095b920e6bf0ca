"""The one model: parity with transformers both ways, KV-cache and packing behaviour."""

import json

import pytest
import torch

from chatforge.weights.folder import load_model, read_config, save_model
from chatforge.errors import ChatforgeError
from chatforge.model import gpt
from chatforge.model.gpt import GPT, KVCache, ModelConfig, PRESETS, config_from_preset
from conftest import FAMILIES, random_family_model as _random_model

@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_loads_chatforge_folder_with_same_logits(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = _random_model(FAMILIES[family])
    save_model(model, None, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa", "qwen2-bias"])
def test_chatforge_loads_transformers_folder_with_same_logits(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = _random_model(FAMILIES[family], seed=3)
    save_model(model, None, tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "theirs")  # written by transformers itself
    ours = load_model(tmp_path / "theirs")
    ids = torch.randint(0, 97, (1, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_saved_config_is_plain_transformers_json(tmp_path):
    save_model(_random_model(FAMILIES["llama-gqa"]), None, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "generation_config.json",
                                                                   "model.safetensors"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_decoding_matches_full_forward(family):
    model = _random_model(FAMILIES[family])
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch_size=2, max_len=32)
        pos = torch.arange(12).expand(2, 12)
        steps = [model(ids[:, :12], position_ids=pos, cache=cache)]
        for t in range(12, 20):
            steps.append(model(ids[:, t:t + 1], position_ids=torch.full((2, 1), t), cache=cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("matmuls", [True, False])
@pytest.mark.parametrize("n_kv_head,window", [(4, None), (2, None), (1, 6)])
def test_bf16_decode_matches_an_fp32_full_forward(n_kv_head, window, matmuls, monkeypatch):
    """Half-precision decode steps attend through decode_attention (a CPU without AMX) or SDPA (with AMX): either
    gives an fp32 full forward's logits to bf16 error."""
    monkeypatch.setattr(gpt, "CPU_DECODE_MATMULS", matmuls)
    calls, matmul_attention = [], gpt.decode_attention
    monkeypatch.setattr(gpt, "decode_attention", lambda *a: calls.append(1) or matmul_attention(*a))
    config = ModelConfig(n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=64, vocab_size=97, max_seq_len=32,
                         sliding_window=window)
    model = GPT(config).eval()
    half = GPT(config).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(config, batch_size=2, max_len=32, dtype=torch.bfloat16)
        half(ids[:, :12], position_ids=torch.arange(12).expand(2, 12), cache=cache)
        steps = [half(ids[:, t:t + 1], position_ids=torch.full((2, 1), t), cache=cache) for t in range(12, 20)]
    assert (torch.cat(steps, 1).float() - full[:, 12:]).abs().max().item() <= 0.02
    assert len(calls) == (8 * config.n_layer if matmuls else 0)


def test_packed_conversations_do_not_attend_to_each_other():
    model = _random_model(FAMILIES["llama-gqa"])
    a = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(5))
    b = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(6))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 10 + [1] * 14])
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with torch.no_grad():
        together = model(packed, position_ids=pos, doc_ids=doc)
        alone = model(b)
        leaky = model(packed)  # without doc_ids the second conversation does see the first
    assert (together[:, 10:] - alone).abs().max().item() <= 1e-5
    assert (leaky[:, 10:] - alone).abs().max().item() > 1e-3


def test_cache_rows_let_one_slot_restart_without_touching_others():
    model = _random_model(FAMILIES["llama-gqa"])
    x = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x)
        cache = KVCache(model.config, batch_size=3, max_len=16)
        cache.rows = torch.tensor([2])
        model(torch.randint(0, 97, (1, 12)), cache=cache)  # a previous, longer occupant of slot 2
        out = model(x, cache=cache)  # restarts slot 2 from position 0
    assert (out - ref).abs().max().item() <= 1e-5


def test_cache_initialises_only_the_rows_in_use_and_keeps_a_copied_prefix():
    """reserve() zeroes only the rows use_rows named (one client of an 8-row server keeps one row resident), never
    slots a row already holds: a prefix copied in by copy_row survives the reserve that follows it."""
    cache = KVCache(_random_model(FAMILIES["llama-gqa"]).config, batch_size=4, max_len=32)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    cache.use_rows([2])
    cache.reserve(10)
    assert cache.k[:, 2, :, :10].eq(0).all() and cache.k[:, 2, :, 10:].isnan().all()
    assert cache.k[:, [0, 1, 3]].isnan().all() and cache.v[:, [0, 1, 3]].isnan().all()
    cache.k[:, 2, :, :10] = 1.0
    cache.copy_row(2, 0, 10)
    cache.use_rows([0, 2])
    cache.reserve(16)
    assert cache.k[:, 0, :, :10].eq(1).all() and cache.k[:, 0, :, 10:16].eq(0).all()
    assert cache.k[:, 2, :, :10].eq(1).all() and cache.k[:, 2, :, 10:16].eq(0).all()
    assert cache.k[:, [1, 3]].isnan().all() and cache.k[:, :, :, 16:].isnan().all()


def test_presets_span_1m_to_gpt2_124m():
    sizes = {name: GPT(config_from_preset(name, vocab_size=4096)).num_params(non_embedding=True)
             for name in ("nano", "micro", "mini", "small")}
    assert 0.5e6 < sizes["nano"] < 1.5e6 < sizes["micro"] < sizes["mini"] < sizes["small"]
    with torch.device("meta"):
        gpt2 = GPT(ModelConfig(**PRESETS["gpt2-124m"]))
    assert gpt2.num_params() == 124_439_808  # GPT2LMHeadModel('gpt2').num_parameters()


def test_a_broken_config_json_is_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama",\n "hidden_size": }\n')
    with pytest.raises(ChatforgeError, match=rf"^{path}:2: not valid JSON \(Expecting value\)$"):
        read_config(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(ChatforgeError, match=rf"^{path}:1: expected a JSON object$"):
        read_config(tmp_path)
