"""Bot: a model folder you can chat with from Python, and the `generate` and `chat` commands built on it.

History policy (Bot.prompt): the prompt must leave room for the reply, `reserve` = min(max_new_tokens, half the
context window) tokens. A conversation longer than that loses its oldest whole exchanges first (a user message and
the assistant replies after it); leading system messages are always kept. If the system prompt plus the last user
exchange alone do not fit, nothing is cut out of a message: it is an error naming the sizes, because a silently
truncated question gets a confidently wrong answer. The reply may then use up to max_new_tokens or whatever the
context window has left, whichever is less (finish_reason "length" when it runs out).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import replace

from chatforge.generation.engine import Completion, Engine, SamplingParams
from chatforge.errors import ChatforgeError

# Used when neither the caller nor the model's generation_config.json says otherwise.
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256}
_FROM_GENERATION_CONFIG = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def defaults_from_generation_config(gc: dict) -> dict:
    """Sampling defaults a model folder ships: transformers' do_sample=false means greedy whatever the temperature."""
    out = {k: gc[k] for k in _FROM_GENERATION_CONFIG if gc.get(k) is not None}
    if gc.get("do_sample") is False:
        out["temperature"] = 0.0
    eos = gc.get("eos_token_id")
    if eos is not None:
        out["stop_token_ids"] = [int(i) for i in (eos if isinstance(eos, list) else [eos])]
    return out


class Bot:
    """A model, its tokenizer and an engine: `chat(messages) -> str`, `stream(messages) -> Iterator[str]`.

    `bot.model` is the torch module (input ids -> logits) and `bot.tokenizer` the tokenizer. Sampling keyword
    arguments are SamplingParams fields; unset ones come from the folder's generation_config.json, then CHAT_DEFAULTS.
    """

    def __init__(self, model, tokenizer, engine: Engine | None = None, defaults: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine or Engine(model, tokenizer)
        self.defaults = CHAT_DEFAULTS | (defaults or {})
        self.last_dropped = 0  # messages the last call dropped to fit the context (see the module docstring)

    @classmethod
    def load(cls, path_or_name: str, device: str | None = None, dtype: str | None = None, max_batch_size: int = 8,
             max_seq_len: int | None = None) -> Bot:
        """A model folder, a LoRA adapter folder, a .gguf file or a known model name (e.g. "smollm2-135m-instruct").

        dtype: fp32 (the default on CPU), bf16 or fp16; on a GPU the default is bf16 where supported.
        """
        from chatforge.device import pick_device, resolve_dtype
        from chatforge.weights.loader import load

        dev = pick_device(device or "auto")
        torch_dtype = resolve_dtype(dtype or ("fp32" if dev.type == "cpu" else "auto"), dev)
        loaded = load(path_or_name, device=dev, dtype=torch_dtype)  # the one loader: names, GGUF, folders, adapters
        model, tokenizer = loaded.model, loaded.tokenizer
        engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        return cls(model, tokenizer, engine, defaults_from_generation_config(loaded.generation_config))

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def sampling(self, **kwargs) -> SamplingParams:
        """SamplingParams from the defaults overridden by kwargs (an unknown name is a TypeError).

        json_schema= (a dict), regex= or choices= (a list of strings) constrain the reply to that grammar
        (generation/constraint.py); constraint= takes a ready Constraint.
        """
        from chatforge.generation.constraint import constraint_from

        kwargs = dict(kwargs)
        if (constraint := constraint_from(kwargs)) is not None:
            kwargs["constraint"] = constraint
        params = SamplingParams(**(self.defaults | kwargs))
        params.validate()
        return params

    def reply_budget(self, prompt_ids: list[int], max_new_tokens: int | None) -> int:
        """New tokens a reply may take after this prompt: max_new_tokens, capped by what the context has left."""
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise ChatforgeError(f"prompt: {len(prompt_ids)} tokens leave no room in the context window of "
                                 f"{self.context_length} tokens")
        return room if max_new_tokens is None else min(max_new_tokens, room)

    def prompt(self, messages: list[dict], max_new_tokens: int | None) -> list[int]:
        """Prompt ids for `messages` with a generation prompt, trimmed to fit (policy in the module docstring)."""
        half = self.context_length // 2
        budget = self.context_length - (half if max_new_tokens is None else min(max_new_tokens, half))
        n_system = 0
        while n_system < len(messages) and messages[n_system].get("role") == "system":
            n_system += 1
        system, rest = list(messages[:n_system]), list(messages[n_system:])
        starts = [0] + [i for i, m in enumerate(rest) if m.get("role") == "user" and i > 0]
        for dropped in starts:
            ids, _ = self.tokenizer.render(system + rest[dropped:], add_generation_prompt=True)
            if len(ids) <= budget:
                self.last_dropped = dropped
                return ids
        raise ChatforgeError(
            f"messages: the system prompt and the last user exchange take {len(ids)} tokens, more than the {budget} "
            f"the context window of {self.context_length} leaves after reserving {self.context_length - budget} "
            f"for the reply; shorten the message")

    def chat(self, messages: list[dict], **sampling) -> str:
        """The assistant's reply to a conversation (list of {"role", "content"})."""
        return "".join(self.stream(messages, **sampling))

    def stream(self, messages: list[dict], **sampling) -> Iterator[str]:
        """The reply as it is generated, in pieces that never split a character or leak part of a stop string."""
        params = self.sampling(**sampling)
        ids = self.prompt(messages, params.max_new_tokens)
        params.max_new_tokens = self.reply_budget(ids, params.max_new_tokens)
        return _texts(self.engine.generate(ids, params))

    def chat_batch(self, conversations: list[list[dict]], **sampling) -> list[str]:
        """Replies to many conversations, decoded together."""
        params = self.sampling(**sampling)
        prompts = [self.prompt(m, params.max_new_tokens) for m in conversations]
        plist = [replace(params, max_new_tokens=self.reply_budget(p, params.max_new_tokens)) for p in prompts]
        return [c.text for c in self.engine.generate_batch(prompts, plist)]

    def complete(self, text: str, **sampling) -> Completion:
        """Plain continuation of `text`, without the chat template (what a base model is for)."""
        params = self.sampling(**sampling)
        ids = self.tokenizer.encode(text)
        if self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id] + ids
        params.max_new_tokens = self.reply_budget(ids, params.max_new_tokens)
        return self.engine.generate_batch([ids], params)[0]


def _texts(deltas: Iterator) -> Iterator[str]:
    try:
        for d in deltas:
            if d.text:
                yield d.text
    finally:
        deltas.close()  # a consumer that stops early aborts the request and frees its slot


# ---------------------------------------------------------------- the `generate` and `chat` commands

def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def generate_command(model: str, prompt: list[str] | None = None, system: str | None = None, raw: bool = False,
                     max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     repetition_penalty: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                     n: int = 1, device: str = "auto", dtype: str | None = None) -> None:
    """Generate a reply to one prompt: streamed when n is 1, else n numbered samples decoded as one batch.

    Args:
        model: model folder, .gguf file or known model name (e.g. smollm2-135m-instruct).
        prompt: the user message (several words are joined with spaces).
        system: system prompt put before the user message.
        raw: continue the prompt as plain text instead of answering it as a chat message (for base models).
        max_new_tokens: most tokens to generate per sample.
        temperature: sampling temperature; 0 is greedy.
        top_k: sample among the k most likely tokens only (0: off).
        top_p: sample among the most likely tokens holding this much probability (1: off).
        repetition_penalty: CTRL-style penalty on tokens already in the prompt or reply (1: off).
        stop: stop strings; generation ends before the first one, which is not printed.
        seed: random seed (sample i of n uses seed+i), for reproducible sampling.
        n: number of samples.
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on a GPU that has it).
    """
    if not prompt:
        raise ChatforgeError("--prompt: required (the text to answer)")
    if n < 1:
        raise ChatforgeError(f"--n: must be >= 1, got {n}")
    bot = Bot.load(model, device=device, dtype=dtype, max_batch_size=min(n, 8))
    text = " ".join(prompt)
    if raw:
        ids = bot.tokenizer.encode(text)
        ids = ([bot.tokenizer.bos_id] if bot.tokenizer.bos_id is not None else []) + ids
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = bot.prompt(messages, max_new_tokens)
    kw = dict(max_new_tokens=bot.reply_budget(ids, max_new_tokens), temperature=temperature, top_k=top_k,
              top_p=top_p, repetition_penalty=repetition_penalty, stop=list(stop or []))
    t0 = time.perf_counter()
    if n == 1:
        finish, count = None, 0
        for delta in bot.engine.generate(ids, bot.sampling(**kw, seed=seed)):
            _out(delta.text)
            finish, count = delta.finish_reason, count + len(delta.token_ids)
        _out("\n")
        completions = [(count, finish)]
    else:
        params = [bot.sampling(**kw, seed=None if seed is None else seed + i) for i in range(n)]
        results = bot.engine.generate_batch([ids] * n, params)
        for i, c in enumerate(results, 1):
            _out(f"[{i}] {c.text}\n")
        completions = [(c.completion_tokens, c.finish_reason) for c in results]
    wall = time.perf_counter() - t0
    tokens = sum(c for c, _ in completions)
    finishes = ", ".join(sorted({f for _, f in completions}))
    _err(f"({len(ids)} prompt tokens, {tokens} generated in {wall:.2f} s, {tokens / max(wall, 1e-9):.1f} tokens/s; "
         f"finish: {finishes})")


HELP = "commands: /reset clears the history, /system TEXT sets the system prompt, /exit quits"


def chat_command(model: str, system: str | None = None, temperature: float = 0.7, top_k: int = 0,
                 top_p: float = 0.9, repetition_penalty: float = 1.0, max_new_tokens: int = 256,
                 seed: int | None = None, device: str = "auto", dtype: str | None = None) -> None:
    """Chat in the terminal: replies stream as they are generated; the history is kept until /reset.

    When the history outgrows the context window, the oldest exchanges are dropped (the system prompt stays) and a
    note says how many messages went. Reads stdin line by line, so a pipe works too.

    Args:
        model: model folder, .gguf file or known model name (e.g. smollm2-135m-instruct).
        system: system prompt (change it in the chat with /system TEXT).
        temperature: sampling temperature; 0 is greedy.
        top_k: sample among the k most likely tokens only (0: off).
        top_p: sample among the most likely tokens holding this much probability (1: off).
        repetition_penalty: CTRL-style penalty on tokens already in the conversation (1: off).
        max_new_tokens: most tokens per reply.
        seed: random seed, for reproducible replies.
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on a GPU that has it).
    """
    bot = Bot.load(model, device=device, dtype=dtype, max_batch_size=1)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
              max_new_tokens=max_new_tokens, seed=seed)
    bot.sampling(**kw)  # a bad flag fails now, not after the first message
    interactive = sys.stdin.isatty()
    _err(f"chatting with {model} (context window {bot.context_length} tokens). {HELP}")
    history: list[dict] = []
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and not line:
            break  # end of the piped input
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
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
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": line})
        try:
            pieces = bot.stream(messages, **kw)
        except ChatforgeError as e:
            _err(f"error: {e}")
            continue
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
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(reply)}]
