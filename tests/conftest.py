"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and much faster when other test processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Tiny models of each family, shared by tests/model and tests/generation (`from conftest import FAMILIES`).
FAMILIES = {
    "gpt2": dict(family="gpt2", norm="layernorm", positions="learned", mlp="gelu", activation="gelu_tanh",
                 attn_bias=True, attn_out_bias=True, mlp_bias=True, n_layer=2, n_head=4, d_model=64,
                 vocab_size=97, max_seq_len=64),
    "llama-gqa": dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=97,
                      max_seq_len=64, tie_embeddings=False, rope_theta=500.0),
    "qwen2-bias": dict(family="qwen2", n_layer=2, n_head=4, n_kv_head=1, d_model=64, vocab_size=97,
                       max_seq_len=64, attn_bias=True),
    "mistral-window": dict(family="mistral", n_layer=2, n_head=4, d_model=64, vocab_size=97, max_seq_len=64,
                           sliding_window=8),
}


def random_family_model(kw: dict, seed: int = 0):
    """A random model of one family (gpt2/llama/qwen2/mistral-window) with perturbed norms and biases."""
    from chatforge.model.gpt import GPT, ModelConfig

    torch.manual_seed(seed)
    model = GPT(ModelConfig(**kw))
    with torch.no_grad():  # perturb norms and biases too, so a mapping mistake cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
