"""Fixtures shared by several test modules."""

import os
import socket
from pathlib import Path

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


# Tiny Hugging Face models and folders of each family and a help-desk chat tokenizer, shared by tests/weights
# (`from conftest import hf_folder, chat_tokenizer, assert_transformers_agrees`).
HELPDESK_TEXTS = ["The printer is offline again.", "Restart the router and try once more.", "How do I reset my password?",
         "Click settings, then accounts, then reset.", "Thanks, that worked!", "The screen stays black."] * 20
CHAT = [{"role": "system", "content": "You are a help desk."}, {"role": "user", "content": "My printer is offline."},
        {"role": "assistant", "content": "Restart the router."}, {"role": "user", "content": "Still offline!"}]

HF_CONFIGS = {  # tiny random models of each family, as transformers builds them
    "gpt2": ("GPT2Config", dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)),
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                                  rope_theta=5000.0)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      sliding_window=16, tie_word_embeddings=False)),
}


def chat_tokenizer():
    """A small ChatML tokenizer, as a chat model ships."""
    from chatforge.tokenizer import train_tokenizer

    return train_tokenizer(HELPDESK_TEXTS, vocab_size=320)


def base_tokenizer_folder(folder: Path) -> Path:
    """A GPT-2-style base tokenizer written by transformers: byte-level BPE, <|endoftext|>, no chat template."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(HELPDESK_TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(folder)
    return folder


def hf_model(family: str, vocab_size: int, seed: int = 0):
    """A transformers model with random weights, norms and biases perturbed so no mapping hides behind 1s and 0s."""
    import transformers

    name, kw = HF_CONFIGS[family]
    torch.manual_seed(seed)
    config = getattr(transformers, name)(vocab_size=vocab_size, **kw)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_folder(tmp_path: Path, family: str, tokenizer=None, **save_kw) -> tuple[Path, object]:
    """A folder written by transformers' save_pretrained (model and tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = tokenizer or chat_tokenizer()
    staging, src = tmp_path / f"{family}-tok", tmp_path / f"{family}-hf"
    tokenizer.save(str(staging))
    model = hf_model(family, tokenizer.vocab_size)
    model.save_pretrained(src, **save_kw)
    AutoTokenizer.from_pretrained(staging).save_pretrained(src)
    return src, model


def ids(n: int, vocab: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def prompt_ids(n: int, seed: int) -> list[int]:
    """n seeded random token ids of the tiny tokenizer's vocabulary (no special tokens)."""
    return torch.randint(4, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_params(n: int):
    from chatforge.generation.engine import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=n)


def train_until_killed(args: list[str], out_dir: Path, step: int, timeout: float = 180) -> int:
    """Run `chatforge train ARGS` in a subprocess and SIGKILL it once its saved resume state reaches `step`;
    returns the step of the last state it saved (what `--resume` continues from)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.Popen([sys.executable, "-m", "chatforge.cli", "train", *args], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out_dir / "state" / "latest.json"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if latest.exists() and json.loads(latest.read_text())["step"] >= step:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return json.loads(latest.read_text())["step"]


def resume_training(args: list[str]) -> None:
    """`chatforge train ARGS --resume` in a subprocess; it must succeed and say it resumed."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "chatforge.cli", "train", *args, "--resume"], cwd=root,
                       env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_transformers_agrees(folder: Path, model, tokenizer_ids: list[int] | None = None, tol: float = 1e-4) -> None:
    """transformers' AutoModelForCausalLM and AutoTokenizer read `folder` as chatforge does (item 5: export)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.tokenizer import Tokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = ids(24, min(model.config.vocab_size, hf.config.vocab_size))
    with torch.no_grad():
        assert max_diff(hf(x).logits, model(x)) <= tol
    ours = Tokenizer.load(str(folder))
    theirs = AutoTokenizer.from_pretrained(folder)
    expected = ours.render(CHAT, add_generation_prompt=True)[0]
    got = theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(got) == expected
    if tokenizer_ids is not None:
        assert expected == tokenizer_ids


@pytest.fixture()
def no_network(monkeypatch):
    """Sockets disabled: nothing in chatforge.privacy may open a network connection (tests/privacy use it)."""
    def refuse(*args, **kwargs):
        raise OSError("network access in a privacy test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
