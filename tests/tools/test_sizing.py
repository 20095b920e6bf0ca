"""`chatforge size`: parameter counts equal the built model's, FLOPs match torch's counter, the training-memory
estimate is within 20% of the peak measured during real training steps, and the recommendation logic."""

import json

import pytest
import torch

from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, PRESETS, KVCache, ModelConfig, config_from_preset
from chatforge.model.shape import count_params, flops_per_token, kv_cache_bytes_per_token, mean_context, \
    training_memory
from chatforge.tools.sizing import config_for_params, measure_training_peak, parse_count, recommend

SHAPES = [config_from_preset(name) for name in PRESETS] + [
    config_from_preset("nano", n_kv_head=1),  # multi-query
    config_from_preset("nano", n_kv_head=4, tie_embeddings=False),  # multi-head, untied head
    config_from_preset("micro", attn_bias=True, attn_out_bias=False),  # Qwen2-style q/k/v biases
    config_from_preset("nano", attn_bias=True, attn_out_bias=True, mlp_bias=True, norm="layernorm"),
    config_from_preset("nano", head_dim=48, d_ff=200, sliding_window=16),  # head_dim * n_head != d_model
    config_from_preset("gpt2-nano", n_layer=3, d_ff=300, vocab_size=1000, max_seq_len=77),
    ModelConfig(family="llama", positions="learned", mlp="gelu", activation="gelu", tie_embeddings=False),
    config_for_params(5_000_000),
]


@pytest.mark.parametrize("c", SHAPES, ids=lambda c: f"{c.family}-L{c.n_layer}-d{c.d_model}-kv{c.n_kv_head}")
def test_parameter_counts_equal_the_built_model(c):
    with torch.device("meta"):
        model = GPT(c)
    p = count_params(c)
    assert p["total"] == model.num_params()
    assert p["non_embedding"] == model.num_params(non_embedding=True)
    assert p["embedding"] + p["non_embedding"] == p["total"]


def test_flops_match_torch_flop_counter():
    """Dense FLOPs are exactly torch's count of the forward's matmuls. Attention, run with SDPA's math kernel so the
    counter sees its two batched matmuls, costs 4 * H * hd * T per token and layer over the full T x T scores; we
    count the causal mean context (T + 1) / 2 instead (Kaplan et al.), the half that is not masked away."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    c = config_from_preset("nano", vocab_size=512, n_kv_head=1)
    B, T = 2, 32
    model = GPT(c).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(B, T, dtype=torch.long))
    per_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    f = flops_per_token(c, T)
    assert f["dense_forward"] * B * T == per_op["aten.mm"]
    full_attention_per_token = 4 * c.n_layer * c.n_head * c.head_dim * T
    assert per_op["aten.bmm"] == full_attention_per_token * B * T
    assert f["attention_forward"] == pytest.approx(full_attention_per_token * (T + 1) / 2 / T)
    assert f["training"] == 3 * f["forward"]


def test_mean_context():
    assert mean_context(4) == (1 + 2 + 3 + 4) / 4
    assert mean_context(4, window=2) == (1 + 2 + 2 + 2) / 4


def test_kv_cache_bytes_match_the_cache_the_engine_allocates():
    c = config_from_preset("micro")
    cache = KVCache(c, batch_size=3, max_len=10, dtype=torch.bfloat16)
    assert kv_cache_bytes_per_token(c, 2) == (cache.k.nbytes + cache.v.nbytes) // (3 * 10)


MEMORY_CASES = [  # (shape, batch, seq, dtype, gradient checkpointing, trained fraction)
    (config_from_preset("nano", vocab_size=512), 4, 128, "fp32", False, 1.0),
    (config_from_preset("nano", vocab_size=512), 4, 128, "fp32", True, 1.0),
    (config_from_preset("nano", vocab_size=1024, n_layer=2), 4, 128, "fp32", False, 0.3),
    (config_from_preset("gpt2-nano", vocab_size=512, n_layer=2), 4, 64, "fp32", False, 1.0),
]
if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX"):  # bf16 where the CPU trains in it
    MEMORY_CASES += [(config_from_preset("nano", vocab_size=512), 4, 128, "bf16", False, 1.0),
                     (config_from_preset("nano", vocab_size=512), 4, 128, "bf16", True, 0.5)]


@pytest.mark.parametrize("c,B,T,dtype,ckpt,frac", MEMORY_CASES)
def test_training_memory_estimate_within_20_percent_of_measured_peak(c, B, T, dtype, ckpt, frac):
    """Measured: every allocation of two real training steps (train.accumulate_gradients, clipping, fused AdamW)
    through torch's profiler; the second step is the steady state with AdamW moments allocated."""
    measured = measure_training_peak(c, B, T, device="cpu", dtype=dtype, gradient_checkpointing=ckpt,
                                     trained_fraction=frac)
    est = training_memory(c, B, T, mixed=dtype == "bf16", gradient_checkpointing=ckpt, trained_fraction=frac)
    assert est["peak"] == pytest.approx(measured, rel=0.20), (est["peak"] / 2**20, measured / 2**20)
    p = count_params(c)["total"]
    assert (est["weights"], est["gradients"], est["optimizer"]) == (4 * p, 4 * p, 8 * p)


def test_gradient_checkpointing_keeps_fewer_activations():
    c = config_from_preset("micro")
    full = training_memory(c, 16, 256)
    ckpt = training_memory(c, 16, 256, gradient_checkpointing=True)
    assert ckpt["activations_per_layer"] == 4 * c.d_model * 16 * 256  # only each layer's fp32 input
    assert ckpt["peak"] < full["peak"]


def test_parse_count_and_shape_for_a_budget():
    assert parse_count("10M") == 10_000_000 and parse_count("1.5B") == 1_500_000_000 and parse_count("300k") == 300_000
    with pytest.raises(ChatforgeError, match="--params"):
        parse_count("ten")
    c = config_for_params(10_000_000, vocab_size=4096)
    assert count_params(c)["total"] == pytest.approx(10_000_000, rel=0.1)
    assert 24 <= c.d_model / c.n_layer <= 96


def test_recommendation_takes_the_largest_size_that_time_allows():
    calls = []

    def throughput(c):  # tokens/s inversely proportional to size: deterministic, so the numbers are exact
        calls.append(c.d_model)
        return 2e12 / count_params(c)["total"]

    micro, mini = (count_params(config_from_preset(n, vocab_size=4096))["total"] for n in ("micro", "mini"))
    seconds = 20 * micro * micro / 2e12 * 1.5  # micro's optimal tokens take 2/3 of the budget; mini's do not fit
    rec = recommend(4096, 16, 256, data_tokens=None, seconds=seconds, throughput=throughput)
    assert rec["preset"] == "micro"
    assert rec["max_tokens"] == 20 * micro
    assert "mini" in rec["reason"]
    assert calls == [128, 192, 320]  # mini was probed and ruled out; small was never probed
    assert 20 * mini > rec["candidates"][2]["budget_tokens"]


def test_recommendation_when_the_data_is_too_small():
    rec = recommend(4096, 16, 256, data_tokens=50_000, seconds=None, throughput=None)
    assert rec["preset"] == "nano"
    assert rec["max_tokens"] == 4 * 50_000 and rec["epochs"] == 4
    assert rec["reason"].startswith("even nano")


def test_size_command_json_and_errors(tmp_path, capsys):
    out = tmp_path / "size.json"
    assert main(["size", "--config", "micro", "--no-probe", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    with torch.device("meta"):
        assert d["params"]["total"] == GPT(config_from_preset("micro", vocab_size=4096)).num_params()
    assert "compute-optimal tokens" in capsys.readouterr().out
    assert main(["size", "--params", "lots", "--no-probe"]) == 2
    assert "--params" in capsys.readouterr().err
    assert main(["size", "--config", "nano", "--params", "1M", "--no-probe"]) == 2
    assert main(["size", "--config", "nano", "--minutes", "5", "--no-probe"]) == 2
    assert "probe" in capsys.readouterr().err


def test_size_command_probe_and_data_recommendation(tmp_path, capsys):
    yaml = tmp_path / "t.yaml"
    yaml.write_text("data: builtin:english/ai\nvocab_size: 300\nseq_len: 32\nbatch_size: 2\n"
                    "model: {preset: nano, n_layer: 1, d_model: 32}\n")
    out = tmp_path / "size.json"
    assert main(["size", "--config", str(yaml), "--probe-steps", "1", "--data", "builtin:english/ai", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["training_memory"]["batch_size"] == 2 and d["training_memory"]["seq_len"] == 32
    assert d["throughput"]["tokens_per_s"] > 0
    assert d["data"]["tokens"] > 0
    # a few thousand tokens cannot feed even nano compute-optimally: the smallest size, limited by data
    assert d["recommendation"]["preset"] == "nano"
    assert d["recommendation"]["max_tokens"] == 4 * d["data"]["tokens"]
    printed = capsys.readouterr().out
    assert "recommended: nano" in printed
    # the suggested command trains on the data it was sized for (it used to leave data= out: the built-in corpus)
    assert (f"train it with: chatforge train --config {yaml} data=builtin:english/ai model.preset=nano "
            f"max_steps=null max_time_s=null max_tokens={4 * d['data']['tokens']} (about 4.0 epochs)") in printed


def test_size_counts_a_from_scratch_model_s_data_as_pretraining_encodes_it(tmp_path, capsys):
    """A preset is trained from scratch, so all the text is pretrained on: the SFT encoding (assistant rows,
    truncated) would undercount the data that bounds the recommendation."""
    from chatforge.tools.sizing import dataset_tokens

    out = tmp_path / "size.json"
    assert main(["size", "--config", "nano", "--no-probe", "--vocab-size", "300", "--seq-len", "32",
                 "--data", "builtin:english/ai", "--out", str(out)]) == 0
    d = json.loads(out.read_text())["data"]
    pretrain = dataset_tokens("builtin:english/ai", 300, 32, "pretrain")
    assert d["stage"] == "pretrain" and d["tokens"] == pretrain["tokens"]
    assert d["tokens"] > dataset_tokens("builtin:english/ai", 300, 32, "sft")["tokens"]
    assert "encoded for pretrain" in capsys.readouterr().out


def test_size_plans_exactly_the_model_that_training_builds(tmp_path):
    """One model-shape rule (model/shape.py): `size` on a training config gives the ModelConfig train builds."""
    from chatforge.config import load_config
    from chatforge.tokenizer import Tokenizer, train_tokenizer
    from chatforge.tools.sizing import model_config_from_train
    from chatforge.train.loop import build_model

    train_tokenizer(["hello there, how are you today?"] * 20, vocab_size=300).save(str(tmp_path / "tok"))
    cfg = load_config(None, [f"tokenizer={tmp_path / 'tok'}", "model.n_layer=2", "model.d_model=64",
                             "seq_len=600", "dropout=0.1"])  # longer than nano's 512: the context grows to fit
    _, core = build_model(cfg, Tokenizer.load(str(tmp_path / "tok")))
    planned = model_config_from_train(cfg)
    assert planned == core.config and planned.max_seq_len == 600 and planned.dropout == 0.1
