"""Fixtures shared by several test modules."""

import pytest
import torch
import torch.nn.functional as F


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


# A tiny tokenizer and two kinds of tiny real models, shared by tests/generation, tests/serve and others
# (`from conftest import make_tokenizer, memorized_model`): random ones (init_std 0.1, so greedy paths are diverse)
# and one overfitted on three replies, so the generated text is known exactly.
TEXTS = ["hello there how are you", "I am fine thank you", "the quick brown fox jumps over the lazy dog"] * 20
REPLY = "Hello there! 你好世界, how are you?"  # Chinese characters are 3 byte tokens each in this tokenizer
BRIEF = "Hi. STOP here"
CONVERSATIONS = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": REPLY}],
    [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": BRIEF}],
    [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two three four five six seven"}],
]


def make_tokenizer():
    from chatforge.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)


def random_model(tok, preset: str = "nano", seed: int = 0):
    from chatforge.model.gpt import GPT, config_from_preset

    torch.manual_seed(seed)
    return GPT(config_from_preset(preset, vocab_size=tok.vocab_size, max_seq_len=128, n_layer=2, init_std=0.1)).eval()


def memorized_model(tok, conversations=CONVERSATIONS):
    """A tiny model trained until greedy decoding reproduces every assistant reply with a clear margin."""
    from chatforge.model.gpt import GPT, config_from_preset

    torch.manual_seed(0)
    model = GPT(config_from_preset("nano", vocab_size=tok.vocab_size, max_seq_len=128, n_layer=2, d_model=64,
                                   n_head=4, n_kv_head=2))
    rendered = [tok.render(c) for c in conversations]
    length = max(len(ids) for ids, _ in rendered)
    x = torch.full((len(rendered), length), tok.pad_id)
    y = torch.full((len(rendered), length), -100)
    trained = torch.zeros((len(rendered), length), dtype=torch.bool)
    for i, (ids, mask) in enumerate(rendered):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(ids) - 1] = torch.tensor(ids[1:])
        trained[i, : len(ids) - 1] = torch.tensor(mask[1:], dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    good = 0
    for _ in range(600):
        logits = model(x)
        top2 = logits.detach().topk(2, dim=-1).values
        ok = (logits.argmax(-1) == y)[trained].all() and ((top2[..., 0] - top2[..., 1])[trained] > 2).all()
        good = good + 1 if ok else 0
        if good == 3:
            return model.eval()
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    raise AssertionError("the tiny model did not memorize the replies")
