"""`chatforge generate` and `chatforge chat`: flags -> Bot -> printed replies (the interactive REPL lives here).

Sampling flags left unset follow the sampling-defaults rule (SamplingParams): the model folder's
generation_config.json, else the built-in default; so the CLI samples as Python's Bot and the server do.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace

from chatforge.errors import ChatforgeError
from chatforge.generation.bot import Bot

# A terminal in canonical mode (no readline) cuts a line at this many bytes: Linux's N_TTY_BUF_SIZE minus the newline.
TTY_LINE_LIMIT = 4095
BLOCK = '"""'  # a line starting with it opens a multi-line message, one ending with it closes it


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _set(**flags) -> dict:
    """The flags the user gave: the unset (None) ones are left to the model's defaults."""
    return {k: v for k, v in flags.items() if v is not None}


def model_key(key_file: str | None, passphrase: bool):
    """The key for an encrypted model or dataset from --key-file / --passphrase; None leaves the choice to the
    loader (CHATFORGE_KEY when the folder is encrypted, nothing for a plain one)."""
    from chatforge.commands.privacy import given_key

    return given_key(key_file, passphrase)


def load_bot(model: str, *, device: str, dtype: str | None, quantize: str | None, key_file: str | None,
             passphrase: bool, max_batch_size: int, compile: bool = False, kv_dtype: str | None = None) -> Bot:
    """The Bot chat, generate and serve use: the one loader, with dtype, quantization, the key and compile (its
    warm-up time goes to stderr: the first start on a machine compiles for minutes, later ones read the cache)."""
    from chatforge.weights.loader import check_quantize

    check_quantize(quantize)  # before the key prompt and the weights
    if quantize == "int8-dyn" and not compile:
        _err("note: int8-dyn pays only compiled (eager, torchao's int8 matmuls decoded ~15x slower than bf16 on a "
             "2-core AVX-512 CPU); add --compile, or use --quantize int8-wo")
    if compile:
        from chatforge.generation.decode import inductor_cache_dir

        _err(f"compiling the decode step (first start on this machine: minutes; cached in {inductor_cache_dir()})")
    bot = Bot.load(model, device=device, dtype=dtype, max_batch_size=max_batch_size, quantize=quantize,
                   key=model_key(key_file, passphrase), compile=compile, kv_dtype=kv_dtype)
    if bot.warmup_s is not None:
        _err(f"compiled decode ready: warm-up {bot.warmup_s:.1f} s")
    return bot


def output_chain(guard: bool, redact_pii: bool, guard_policy: str | None):
    """The one output filter of chat, generate and serve (guard.output.OutputChain); notes go to stderr."""
    from chatforge.guard.output import OutputChain

    return OutputChain.build(guard=guard, redact_pii=redact_pii, policy=guard_policy, warn=_err)


def _refused(decision) -> None:
    """A prompt the guard refused: its refusal message instead of a reply, and the categories on stderr."""
    _out(decision.text + "\n")
    _err(f"(refused by the guard: {', '.join(sorted(decision.categories)) or '-'}; finish: content_filter)")


def generate_command(model: str, prompt: list[str] | None = None, system: str | None = None, raw: bool = False,
                     max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                     top_p: float | None = None, repetition_penalty: float | None = None,
                     stop: list[str] | None = None, seed: int | None = None, n: int = 1, device: str = "auto",
                     dtype: str | None = None, json_schema: str | None = None, best_of: int = 1,
                     reward: str | None = None, quantize: str | None = None, guard: bool = True,
                     guard_policy: str | None = None, redact_pii: bool = True, key_file: str | None = None,
                     passphrase: bool = False, compile: bool = False) -> None:
    """Generate a reply to one prompt: streamed when n is 1, else n numbered samples decoded as one batch.

    Sampling flags left unset take the model folder's generation_config.json values, else the built-in defaults
    (as in Python and the server).

    Args:
        model: model folder, .gguf file or known model name (e.g. smollm2-135m-instruct).
        prompt: the user message (several words are joined with spaces).
        system: system prompt put before the user message.
        raw: continue the prompt as plain text instead of answering it as a chat message (for base models).
        max_new_tokens: most tokens to generate per sample (unset: the model's default).
        temperature: sampling temperature; 0 is greedy (unset: the model's default).
        top_k: sample among the k most likely tokens only; 0 is off (unset: the model's default).
        top_p: sample among the most likely tokens holding this much probability; 1 is off (unset: the model's
            default).
        repetition_penalty: CTRL-style penalty on tokens already in the prompt or reply; 1 is off (unset: the
            model's default).
        stop: stop strings; generation ends before the first one, which is not printed.
        seed: random seed (sample i of n uses seed+i), for reproducible sampling.
        n: number of samples.
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on a GPU that has it).
        json_schema: a JSON schema file; the reply is a JSON value valid under it (constrained decoding).
        best_of: sample this many replies and print the one the --reward model scores highest (rejection sampling).
        reward: a reward model folder (trained with stage: reward) for --best-of.
        quantize: int8-dyn, int8-wo or int4-wo (weight quantization; int4-wo: 4-bit groups of 32, the output head
            int8; CPU or CUDA).
        guard: check the prompt and the reply with the safety guard (--no-guard: off).
        guard_policy: a YAML/JSON guard policy (rules per category, refusal message).
        redact_pii: replace e-mail addresses, phone numbers, ID and card numbers, IBANs and IPs in the reply.
        key_file: key of an encrypted model folder (base64, mode 0600); default: CHATFORGE_KEY.
        passphrase: the model was encrypted with a passphrase: CHATFORGE_PASSPHRASE, else asked for.
        compile: decode through a torch.compile'd step, compiled at load (minutes the first time on a machine, then
            read from the disk cache); pays for long replies and for int8-dyn, which is slow eager.
    """
    from chatforge.generation.constraint import Constraint
    from chatforge.io import read_json

    if not prompt:
        raise ChatforgeError("--prompt: required (the text to answer)")
    constraint = Constraint.json_schema(read_json(json_schema), where=json_schema) if json_schema else None
    if n < 1:
        raise ChatforgeError(f"--n: must be >= 1, got {n}")
    chain = output_chain(guard, redact_pii, guard_policy)
    bot = load_bot(model, device=device, dtype=dtype, quantize=quantize, key_file=key_file, passphrase=passphrase,
                   max_batch_size=min(n, 8), compile=compile)
    text = " ".join(prompt)
    decision = chain.check_prompt(text)
    if decision is not None and not decision.allowed:
        return _refused(decision)
    text = decision.text if decision is not None else text
    kw = _set(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              repetition_penalty=repetition_penalty, stop=list(stop) if stop else None, seed=seed,
              constraint=constraint)
    if raw:
        ids, params = bot.request_text(text, **kw)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids, params = bot.request(messages, **kw)
    if best_of > 1:
        from chatforge.commands.preference import print_best_of

        return print_best_of(bot, None if raw else messages, kw, best_of, reward, device, chain)
    t0 = time.perf_counter()
    if n == 1:
        finish, count = None, 0
        from chatforge.guard.output import filter_deltas

        for delta in filter_deltas(chain, bot.engine.generate(ids, params), bot.tokenizer.decode(ids)):
            _out(delta.text)
            finish, count = delta.finish_reason, count + len(delta.token_ids)
        _out("\n")
        tokens, wall = count, time.perf_counter() - t0
        _err(f"({len(ids)} prompt tokens, {tokens} generated in {wall:.2f} s, {tokens / max(wall, 1e-9):.1f} "
             f"tokens/s; finish: {finish})")
        return
    plist = [replace(params, seed=None if seed is None else seed + i) for i in range(n)]
    results = bot.engine.generate_batch([ids] * n, plist)
    wall = time.perf_counter() - t0
    for i, c in enumerate(results, 1):  # each sample, then its own finish line; the statistics apart at the end
        shown, stopped = chain.filter_text(c.text, bot.tokenizer.decode(ids))
        _out(f"[{i}] {shown}" + ("" if shown.endswith("\n") else "\n"))
        _err(f"    ({c.completion_tokens} tokens, finish: {stopped or c.finish_reason})")
    tokens = sum(c.completion_tokens for c in results)
    _err(f"\n({len(ids)} prompt tokens, {n} samples, {tokens} tokens generated in {wall:.2f} s, "
         f"{tokens / max(wall, 1e-9):.1f} tokens/s)")


# ---------------------------------------------------------------- the interactive chat

HELP = (f"commands: /reset clears the history, /system TEXT sets the system prompt, /exit quits; "
        f"a line starting with {BLOCK} starts a multi-line message that a line ending with {BLOCK} ends")


class LineReader:
    """Lines from the terminal through readline (editing, arrow keys, history, whole pastes), or from a pipe.

    Without readline a terminal hands over at most TTY_LINE_LIMIT bytes of a line and drops the rest unseen;
    `maybe_cut` says when a line read that way is that long, so the chat can warn instead of answering half a paste.
    """

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.readline = False
        if interactive:
            try:
                import readline  # noqa: F401 - importing it is what makes input() use it

                self.readline = True
            except ImportError:  # Python built without it: plain input(), cut at the terminal's limit
                pass

    def __call__(self, prompt: str) -> str | None:
        """One line without its line ending (a pasted block may hold several lines); None at the end of input."""
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                _out("\n")
                return None
        line = sys.stdin.readline()
        return line.removesuffix("\n").removesuffix("\r") if line else None

    def maybe_cut(self, line: str) -> bool:
        return self.interactive and not self.readline and len(line.encode("utf-8")) >= TTY_LINE_LIMIT


def read_message(read: Callable[[str], str | None]) -> str | None:
    """One message: a line, or the lines from one starting with \"\"\" to one ending with it; None at the end."""
    line = read("you> ")
    if line is None:
        return None
    if not line.lstrip().startswith(BLOCK):
        return line
    body = line.lstrip()[len(BLOCK):]
    if body.rstrip().endswith(BLOCK):  # """all on one line"""
        return body.rstrip()[:-len(BLOCK)]
    lines = [body] if body else []
    while (line := read("... ")) is not None:
        if line.rstrip().endswith(BLOCK):
            lines.append(line.rstrip()[:-len(BLOCK)])
            break
        lines.append(line)
    return "\n".join(lines)


def chat_command(model: str, system: str | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None,
                 max_new_tokens: int | None = None, seed: int | None = None, device: str = "auto",
                 dtype: str | None = None, quantize: str | None = None, guard: bool = True,
                 guard_policy: str | None = None, redact_pii: bool = True, key_file: str | None = None,
                 passphrase: bool = False, compile: bool = False) -> None:
    """Chat in the terminal: replies stream as they are generated; the history is kept until /reset.

    Lines are edited with readline (arrow keys, history); a paste arrives whole, several lines included. When the
    history outgrows the context window, the oldest exchanges are dropped (the system prompt stays) and a note says
    how many messages went; a message that cannot fit at all is refused with its size. Reads stdin line by line, so
    a pipe works too. Sampling flags left unset take the model's defaults, as in generate.

    Args:
        model: model folder, .gguf file or known model name (e.g. smollm2-135m-instruct).
        system: system prompt (change it in the chat with /system TEXT).
        temperature: sampling temperature; 0 is greedy (unset: the model's default).
        top_k: sample among the k most likely tokens only; 0 is off (unset: the model's default).
        top_p: sample among the most likely tokens holding this much probability; 1 is off (unset: the model's
            default).
        repetition_penalty: CTRL-style penalty on tokens already in the conversation; 1 is off (unset: the model's
            default).
        max_new_tokens: most tokens per reply (unset: the model's default).
        seed: random seed, for reproducible replies.
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on a GPU that has it).
        quantize: int8-dyn, int8-wo or int4-wo (weight quantization; int4-wo: 4-bit groups of 32, the output head
            int8; CPU or CUDA).
        guard: check each message and reply with the safety guard (--no-guard: off).
        guard_policy: a YAML/JSON guard policy (rules per category, refusal message).
        redact_pii: replace e-mail addresses, phone numbers, ID and card numbers, IBANs and IPs in replies.
        key_file: key of an encrypted model folder (base64, mode 0600); default: CHATFORGE_KEY.
        passphrase: the model was encrypted with a passphrase: CHATFORGE_PASSPHRASE, else asked for.
        compile: decode through a torch.compile'd step, compiled at load (minutes the first time on a machine, then
            read from the disk cache); pays for long replies and for int8-dyn, which is slow eager.
    """
    chain = output_chain(guard, redact_pii, guard_policy)
    bot = load_bot(model, device=device, dtype=dtype, quantize=quantize, key_file=key_file, passphrase=passphrase,
                   max_batch_size=1, compile=compile)
    kw = _set(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
              max_new_tokens=max_new_tokens, seed=seed)
    bot.sampling(**kw)  # a bad flag fails now, not after the first message
    read = LineReader(sys.stdin.isatty())
    _err(f"chatting with {model} (context window {bot.context_length} tokens). {HELP}")
    history: list[dict] = []
    while True:
        try:
            text = read_message(read)
        except KeyboardInterrupt:
            break
        if text is None:
            break  # end of input (Ctrl-D, or the end of a pipe)
        if not text.strip():
            continue
        if "\n" not in text and text.strip().startswith("/"):
            command, _, arg = text.strip().partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history = []
                _err("(history cleared)")
            elif command == "/system":
                system = arg.strip() or None
                _err(f"(system prompt {'set' if system else 'cleared'})")
            else:
                _err(f"unknown command {command}; {HELP}")
            continue
        if read.maybe_cut(text):
            _err(f"(this line is {TTY_LINE_LIMIT} bytes, the terminal's limit without readline: the rest of it was "
                 f"probably cut off; not sent. Paste long text into a file and pipe it in.)")
            continue
        history = _reply(bot, system, history, text.strip(), kw, chain)


def _reply(bot: Bot, system: str | None, history: list[dict], text: str, kw: dict, chain=None) -> list[dict]:
    """Stream the reply to one message through the output chain; the history after it (trimmed as the Bot had
    to). A refused message is answered with the refusal and left out of the history."""
    decision = chain.check_prompt(text) if chain is not None else None
    if decision is not None and not decision.allowed:
        _refused(decision)
        return history
    text = decision.text if decision is not None else text
    messages = ([{"role": "system", "content": system}] if system else []) + history
    messages.append({"role": "user", "content": text})
    try:
        ids, params = bot.request(messages, **kw)
        deltas = bot.engine.generate(ids, params)
        if chain is not None:
            from chatforge.guard.output import filter_deltas

            deltas = filter_deltas(chain, deltas, bot.tokenizer.decode(ids))
        pieces = _chat_texts(deltas)
    except ChatforgeError as e:
        _err(f"error: {e} (your message: {len(text):,} characters)")
        return history
    if bot.last_dropped:
        history = history[bot.last_dropped:]
        _err(f"(dropped the {bot.last_dropped} oldest messages to fit the context window)")
    reply = []
    try:
        for piece in pieces:
            reply.append(piece)
            _out(piece)
    except KeyboardInterrupt:
        pieces.close()
        _err("\n(interrupted)")
    _out("\n")
    if pieces.finish == "content_filter":
        _err("(the guard stopped this reply; it is left out of the history)")
        return history
    return history + [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}]


class _chat_texts:  # noqa: N801 - used as a generator
    """The texts of a stream of deltas, remembering how it finished; close() aborts the request."""

    def __init__(self, deltas):
        self.deltas, self.finish = deltas, None

    def __iter__(self):
        try:
            for d in self.deltas:
                self.finish = d.finish_reason or self.finish
                if d.text:
                    yield d.text
        finally:
            self.deltas.close()

    def close(self) -> None:
        self.deltas.close()
