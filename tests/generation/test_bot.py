"""Bot (the Python API), history trimming, and the `generate` / `chat` commands on a saved tiny model folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import BRIEF, CONVERSATIONS, REPLY, make_tokenizer, memorized_model

import chatforge
from chatforge.generation.bot import Bot, defaults_from_generation_config
from chatforge.weights.folder import save_model
from chatforge.cli import main
from chatforge.generation.engine import Engine
from chatforge.errors import ChatforgeError

HELLO = [{"role": "user", "content": "hello"}]
SYSTEM = [{"role": "system", "content": "Be brief"}]
EXCHANGE = CONVERSATIONS[2]  # count -> one two three ...


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model folder as training writes it; do_sample=false makes greedy the folder's default."""
    tok = make_tokenizer()
    path = tmp_path_factory.mktemp("model") / "memo"
    save_model(memorized_model(tok), tok, path, generation_config={"do_sample": False})
    return str(path)


@pytest.fixture(scope="module")
def bot(folder):
    return chatforge.load(folder)


def test_load_and_chat_uses_the_folders_defaults(bot):
    assert isinstance(bot.model, torch.nn.Module) and bot.tokenizer.eos_id in bot.tokenizer.stop_ids
    assert bot.defaults["temperature"] == 0.0  # from generation_config.json
    assert bot.chat(HELLO) == REPLY
    assert bot.chat(SYSTEM + HELLO) == BRIEF
    pieces = list(bot.stream(HELLO))
    assert "".join(pieces) == REPLY and "你" in pieces and all(pieces)
    assert bot.chat(HELLO, max_new_tokens=5) == "Hello the"
    assert bot.chat(HELLO, stop=["!"]) == "Hello there"
    assert bot.chat_batch([HELLO, SYSTEM + HELLO, HELLO]) == [REPLY, BRIEF, REPLY]
    logits = bot.model(torch.tensor([bot.prompt(HELLO, 8)]))
    assert logits.shape[-1] == bot.tokenizer.vocab_size


def test_bf16_weights_and_cache(folder):
    bot = Bot.load(folder, dtype="bf16")
    assert next(bot.model.parameters()).dtype == torch.bfloat16
    assert bot.chat(HELLO) == REPLY  # the memorized margins are far above bf16 rounding
    assert bot.engine._cache.k.dtype == torch.bfloat16


def test_stream_closed_early_frees_the_engine(bot):
    pieces = bot.stream(HELLO)
    assert next(pieces) == "H"
    pieces.close()
    assert not bot.engine.has_work()
    assert bot.chat(HELLO) == REPLY


def test_defaults_from_generation_config():
    gc = {"do_sample": False, "temperature": 0.6, "top_p": 0.95, "eos_token_id": [2, 0], "pad_token_id": 3}
    assert defaults_from_generation_config(gc) == {"temperature": 0.0, "top_p": 0.95, "stop_token_ids": [2, 0]}
    assert defaults_from_generation_config({"temperature": 0.6, "top_k": 20, "eos_token_id": 2}) == {
        "temperature": 0.6, "top_k": 20, "stop_token_ids": [2]}


def test_history_trimming_drops_oldest_exchanges_and_keeps_the_system_prompt(bot):
    tok = bot.tokenizer
    long = SYSTEM + EXCHANGE * 4 + HELLO  # ~243 tokens; the context is 128
    assert bot.context_length == 128
    ids = bot.prompt(long, max_new_tokens=8)  # 120 tokens of room: one exchange (87 tokens) fits, two don't
    assert ids == tok.render(SYSTEM + EXCHANGE + HELLO, add_generation_prompt=True)[0]
    assert bot.last_dropped == 6
    assert len(tok.render(SYSTEM + EXCHANGE * 2 + HELLO, add_generation_prompt=True)[0]) > 120
    assert bot.prompt(SYSTEM + HELLO, max_new_tokens=8) == tok.render(SYSTEM + HELLO, add_generation_prompt=True)[0]
    assert bot.last_dropped == 0
    assert bot.chat(long, max_new_tokens=8)  # generation goes through the trimmed prompt
    # A history that starts with an assistant message is dropped up to the next user message.
    ids = bot.prompt(EXCHANGE[1:] + EXCHANGE * 2 + HELLO, max_new_tokens=8)
    assert ids == tok.render(EXCHANGE + HELLO, add_generation_prompt=True)[0] and bot.last_dropped == 3
    # The reply's reserve is at most half the context: max_new_tokens=100 still leaves 64 tokens of history ...
    assert bot.prompt(SYSTEM + EXCHANGE + HELLO, max_new_tokens=100) == \
        tok.render(SYSTEM + HELLO, add_generation_prompt=True)[0]
    assert bot.reply_budget([1] * 35, 100) == 93  # ... and the reply may use what the context has left
    # A last message that cannot fit is an error, never silently cut.
    with pytest.raises(ChatforgeError, match=r"the system prompt and the last user exchange take \d+ tokens, more "
                                             r"than the 120 the context window of 128 leaves after reserving 8"):
        bot.prompt(SYSTEM + [{"role": "user", "content": "count " * 40}], max_new_tokens=8)


def test_bot_over_an_engine_with_a_shorter_context(folder):
    base = Bot.load(folder)
    short = Bot(base.model, base.tokenizer, Engine(base.model, base.tokenizer, max_seq_len=64), base.defaults)
    assert short.context_length == 64
    assert short.prompt(SYSTEM + EXCHANGE + HELLO, max_new_tokens=8) == \
        base.tokenizer.render(SYSTEM + HELLO, add_generation_prompt=True)[0]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "chatforge.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.slow
def test_generate_command(folder, capsys):
    r = run_cli("generate", folder, "--prompt", "hello", "--max-new-tokens", "40")
    assert (r.returncode, r.stdout) == (0, REPLY + "\n"), r.stderr
    assert "finish: stop" in r.stderr
    # In process (same code path, no interpreter start): system prompt, stop string, n samples, errors.
    assert main(["generate", folder, "--prompt", "hello", "--system", "Be brief", "--stop", "TOP h"]) == 0
    assert capsys.readouterr().out == "Hi. S\n"
    assert main(["generate", folder, "--prompt", "hello", "--n", "3", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == "".join(f"[{i}] Hello the\n" for i in (1, 2, 3))
    assert main(["generate", folder, "--prompt", "hello", "--raw", "--max-new-tokens", "3"]) == 0
    n_plain = len(make_tokenizer().encode("hello"))  # plain text: no chat template around it
    assert f"({n_plain} prompt tokens, 3 generated" in capsys.readouterr().err
    assert main(["generate", folder, "--prompt", "hello", "--top-p", "0"]) == 2
    assert "error: sampling: top_p must be in (0, 1], got 0.0" in capsys.readouterr().err
    assert main(["generate", folder + "-missing", "--prompt", "hello"]) == 2
    assert "not a model folder" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_command_with_piped_stdin(folder):
    script = "/system Be brief\nhello\nhello\n/reset\nhello\n/bogus\n" + "count " * 60 + "\n/exit\nhello\n"
    r = run_cli("chat", folder, "--temperature", "0", "--max-new-tokens", "20", stdin=script)
    assert r.returncode == 0, r.stderr
    # The system prompt applies; the second reply sees the first exchange; after /reset the first reply is back.
    assert r.stdout.startswith(BRIEF + "\n") and r.stdout.endswith("\n" + BRIEF + "\n")
    assert r.stdout.count(BRIEF) == 2
    assert "(system prompt set)" in r.stderr and "(history cleared)" in r.stderr
    assert "unknown command /bogus" in r.stderr
    assert "error: messages: the system prompt and the last user exchange take" in r.stderr  # and the chat goes on


def test_a_conversation_must_be_a_list_of_messages(bot):
    with pytest.raises(ChatforgeError, match=r'^messages: expected a list of \{"role", "content"\} dicts, e\.g\. '
                                             r'\[\{"role": "user", "content": "Hello"\}\], got str \'Hello\'$'):
        bot.chat("Hello")
    with pytest.raises(ChatforgeError, match=r"got dict \{'role': 'user', 'content': 'hello'\}$"):
        bot.chat_batch(HELLO)  # one conversation where a list of them belongs


def test_one_prompt_budget_check_and_message(bot):
    """Engine, Bot and server (tests/serve) refuse a prompt that does not fit with the same words."""
    from chatforge.generation.engine import ContextLengthError, reply_budget

    assert reply_budget(100, 28, 128) == 28 and reply_budget(100, None, 128) == 28
    assert reply_budget(100, 50, 128, clamp=True) == 28  # the Bot's policy: what the context has left
    exceed = "prompt: 100 tokens + 29 new tokens = 129 exceed the context window of 128 tokens; shorten the " \
             "prompt or ask for fewer new tokens"
    no_room = "prompt: 128 tokens leave no room for a reply in the context window of 128 tokens; shorten the prompt"
    for call, message in [(lambda: reply_budget(100, 29, 128), exceed), (lambda: reply_budget(128, None, 128), no_room),
                          (lambda: reply_budget(128, 5, 128, clamp=True), no_room),
                          (lambda: bot.engine.add_request([5] * 100, bot.sampling(max_new_tokens=29)), exceed),
                          (lambda: bot.complete("hello " * 200), None)]:
        with pytest.raises(ContextLengthError) as e:
            call()
        assert message is None or str(e.value) == message
    assert str(e.value).endswith("leave no room for a reply in the context window of 128 tokens; shorten the prompt")


@pytest.mark.slow
def test_generate_n_prints_each_sample_with_its_own_finish(folder):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "chatforge.cli", "generate", folder, "--prompt", "count", "--n", "3",
                        "--stop", "three", "--max-new-tokens", "20"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, env=env, timeout=120)  # as a terminal shows both
    assert r.returncode == 0, r.stdout
    sample = r"\[{}\] one two \n    \(\d+ tokens, finish: stop\)\n"
    stats = r"\n\(\d+ prompt tokens, 3 samples, \d+ tokens generated in [\d.]+ s, [\d.]+ tokens/s\)\n"
    assert re.fullmatch("".join(sample.format(i) for i in (1, 2, 3)) + stats, r.stdout), r.stdout


@pytest.mark.slow
def test_chat_reads_a_multiline_block_as_one_message(folder):
    """Two messages, two replies: the block is one message, and its replies are the Bot's own to that history (a
    reply may hold a newline, so counting lines proves nothing)."""
    script = '"""\ncount\n\ncount"""\n"""count"""\n'
    r = run_cli("chat", folder, "--max-new-tokens", "8", stdin=script)
    assert r.returncode == 0, r.stderr
    bot = Bot.load(folder)
    first = [{"role": "user", "content": "count\n\ncount"}]
    reply1 = bot.chat(first, max_new_tokens=8)
    reply2 = bot.chat(first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "count"}],
                      max_new_tokens=8)
    assert r.stdout == f"{reply1}\n{reply2}\n"


def _chat_in_a_terminal(folder: str, keys: list[bytes]) -> str:
    """Run `chatforge chat` on a pseudo-terminal, as a user does, typing/pasting `keys`; what the terminal shows."""
    import pty
    import select
    import threading
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", TERM="xterm")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat, on the terminal
        os.execve(sys.executable, [sys.executable, "-m", "chatforge.cli", "chat", folder, "--max-new-tokens", "8"],
                  env)
    shown, done = bytearray(), threading.Event()

    def drain():  # the terminal's screen: read everything, or the chat blocks on a full pty
        while not done.is_set():
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    shown.extend(os.read(fd, 1 << 16))
                except OSError:
                    return

    def wait_for(text: bytes, count: int) -> None:
        deadline = time.monotonic() + 60
        while shown.count(text) < count:
            assert time.monotonic() < deadline, bytes(shown[-500:])
            time.sleep(0.05)

    threading.Thread(target=drain, daemon=True).start()
    try:
        for i, key in enumerate(keys, 1):
            wait_for(b"you> ", i)
            for start in range(0, len(key), 1024):
                os.write(fd, key[start:start + 1024])
        wait_for(b"you> ", len(keys) + 1)
        os.write(fd, b"\x04")  # Ctrl-D ends the chat
        os.waitpid(pid, 0)
    finally:
        done.set()
    return shown.decode("utf-8", errors="replace")


@pytest.mark.slow
def test_chat_in_a_terminal_reads_a_long_paste_whole(folder, bot):
    """A terminal without readline hands over 4095 bytes of a line and drops the rest; the chat sees all of it."""
    long = "count " * 7000  # 42,000 characters
    paste = b"\x1b[200~%s\x1b[201~\r"  # how a terminal delivers a paste (bracketed paste)
    screen = _chat_in_a_terminal(folder, [paste % long.encode(), paste % b"count\ncount", b"count\r"])
    whole = len(bot.tokenizer.render([{"role": "user", "content": long.strip()}], add_generation_prompt=True)[0])
    assert f"error: messages: the system prompt and the last user exchange take {whole} tokens" in screen
    assert f"(your message: {len(long.strip()):,} characters)" in screen
    # a pasted block of two lines is one message (one prompt each for the three inputs, then one for Ctrl-D)
    assert screen.count("you> ") == 4 and screen.count("error:") == 1


@pytest.mark.slow
def test_generate_compile_compiles_at_load_and_keeps_the_reply(folder, tmp_path):
    """--compile: the decode step is compiled by a warm-up at load (reported on stderr, artefacts in the disk
    cache) and the greedy reply is the eager one."""
    env_cache = str(tmp_path / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = env_cache  # inherited by the child only
    try:
        r = run_cli("generate", folder, "--prompt", "hello", "--max-new-tokens", "40", "--compile")
    finally:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert (r.returncode, r.stdout) == (0, REPLY + "\n"), r.stderr
    assert f"cached in {env_cache}" in r.stderr and "compiled decode ready: warm-up" in r.stderr
    assert any((tmp_path / "inductor").iterdir())
