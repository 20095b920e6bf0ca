"""The one sampling-defaults rule, across the CLI, Python and the server: an unset temperature/top_k/top_p takes the
model folder's generation_config.json value, else SamplingParams' built-in default; explicit values still win."""

import httpx
import pytest

from serve_support import CORPUS

HELLO = [{"role": "user", "content": "hello"}]
BUILT_IN = {"temperature": 0.7, "top_p": 0.9, "top_k": 0}  # what the rule documents (SamplingParams' defaults)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A random tiny model twice: with sampling settings in generation_config.json, and without any."""
    import torch

    from chatforge.model.gpt import GPT, ModelConfig
    from chatforge.tokenizer import train_tokenizer
    from chatforge.weights.folder import save_model

    tok = train_tokenizer(CORPUS, vocab_size=300, min_frequency=2)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=128))
    root = tmp_path_factory.mktemp("defaults")
    return {name: str(save_model(model, tok, root / name, generation_config=settings))
            for name, settings in [("configured", {"temperature": 1.3, "top_k": 5}), ("plain", {})]}


def replies(folder: str, capsys, **explicit) -> dict[str, str]:
    """The reply to "hello" (seed 1, 12 tokens) from the CLI, Python and the server, given only `explicit`."""
    from chatforge.cli import main
    from chatforge.generation.bot import Bot
    from chatforge.serve.app import ServerThread, create_app

    flags = [a for k, v in explicit.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    assert main(["generate", folder, "--prompt", "hello", "--seed", "1", "--max-new-tokens", "12", *flags]) == 0
    cli = capsys.readouterr().out.removesuffix("\n")
    bot = Bot.load(folder, device="cpu")
    python = bot.chat(HELLO, seed=1, max_new_tokens=12, **explicit)
    with ServerThread(create_app(bot, model_name="tiny")) as srv:
        body = {"messages": HELLO, "seed": 1, "max_tokens": 12} | explicit
        server = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
    return {"cli": cli, "python": python, "server": server["choices"][0]["message"]["content"]}


def engine_reply(folder: str, **params) -> str:
    """The same request straight through the engine, every sampling field spelled out."""
    from chatforge.generation.bot import Bot
    from chatforge.generation.engine import SamplingParams

    bot = Bot.load(folder, device="cpu")
    ids = bot.prompt(HELLO, 12)
    stops = bot.defaults["stop_token_ids"]
    return bot.engine.generate_batch([ids], SamplingParams(seed=1, max_new_tokens=12, stop_token_ids=stops,
                                                           **params))[0].text


def test_generation_config_then_built_in_default_everywhere(folders, capsys):
    configured = replies(folders["configured"], capsys)
    want = engine_reply(folders["configured"], **BUILT_IN | {"temperature": 1.3, "top_k": 5})
    assert configured == {"cli": want, "python": want, "server": want}
    # the test can tell the rules apart: greedy (generate's old default) and 1.0/1.0 (the server's) differ
    assert want != engine_reply(folders["configured"], temperature=0.0)
    assert want != engine_reply(folders["configured"], temperature=1.0, top_p=1.0)

    plain = replies(folders["plain"], capsys)
    want = engine_reply(folders["plain"], **BUILT_IN)
    assert plain == {"cli": want, "python": want, "server": want}
    assert want != engine_reply(folders["plain"], temperature=0.0)


def test_explicit_values_win(folders, capsys):
    got = replies(folders["configured"], capsys, temperature=0.0)
    want = engine_reply(folders["configured"], temperature=0.0)
    assert got == {"cli": want, "python": want, "server": want}
