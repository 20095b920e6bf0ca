"""Bot: a model folder you can chat with from Python (the `generate` and `chat` commands are in commands/chat.py).

Sampling defaults: a keyword argument left unset takes the model folder's generation_config.json value
(Bot.defaults), else SamplingParams' built-in default; the CLI and the server follow the same rule.

History policy (Bot.prompt): the prompt must leave room for the reply, `reserve` = min(max_new_tokens, half the
context window) tokens. A conversation longer than that loses its oldest whole exchanges first (a user message and
the assistant replies after it); leading system messages are always kept. If the system prompt plus the last user
exchange alone do not fit, nothing is cut out of a message: it is an error naming the sizes, because a silently
truncated question gets a confidently wrong answer. The reply may then use up to max_new_tokens or whatever the
context window has left, whichever is less (finish_reason "length" when it runs out).
"""

from __future__ import annotations

from collections.abc import Iterator

from chatforge.errors import ChatforgeError
from chatforge.generation.engine import Completion, Engine, SamplingParams, reply_budget

_FROM_GENERATION_CONFIG = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def defaults_from_generation_config(gc: dict) -> dict:
    """The sampling defaults a model folder ships (the first step of the sampling-defaults rule); transformers'
    do_sample=false means greedy whatever the temperature."""
    out = {k: gc[k] for k in _FROM_GENERATION_CONFIG if gc.get(k) is not None}
    if gc.get("do_sample") is False:
        out["temperature"] = 0.0
    eos = gc.get("eos_token_id")
    if eos is not None:
        out["stop_token_ids"] = [int(i) for i in (eos if isinstance(eos, list) else [eos])]
    return out


def check_messages(messages) -> None:
    """A conversation is a list of {"role", "content"} dicts; say so instead of failing deep inside."""
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        return
    got = type(messages).__name__ if not isinstance(messages, list) else \
        f"a list holding {type(next(m for m in messages if not isinstance(m, dict))).__name__}"
    text = repr(messages)
    raise ChatforgeError(f'messages: expected a list of {{"role", "content"}} dicts, e.g. [{{"role": "user", '
                         f'"content": "Hello"}}], got {got} {text if len(text) <= 40 else text[:37] + "..."}')


class Bot:
    """A model, its tokenizer and an engine: `chat(messages) -> str`, `stream(messages) -> Iterator[str]`.

    `bot.model` is the torch module (input ids -> logits) and `bot.tokenizer` the tokenizer. Sampling keyword
    arguments are SamplingParams fields; unset ones come from `defaults` (the folder's generation_config.json), then
    SamplingParams' built-in defaults.
    """

    def __init__(self, model, tokenizer, engine: Engine | None = None, defaults: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine or Engine(model, tokenizer)
        self.defaults = dict(defaults or {})
        self.last_dropped = 0  # messages the last call dropped to fit the context (see the module docstring)
        self.quantization: str | None = None  # the quantization scheme Bot.load applied
        self.warmup_s: float | None = None  # seconds Bot.load(compile=True) spent compiling (or loading) the step

    @classmethod
    def load(cls, path_or_name: str, device: str | None = None, dtype: str | None = None, max_batch_size: int = 8,
             max_seq_len: int | None = None, *, quantize: str | None = None, key=None, compile: bool = False,
             kv_dtype: str | None = None) -> Bot:
        """A model folder, a LoRA adapter folder, a .gguf file or a known model name (e.g. "smollm2-135m-instruct").

        dtype: fp32 (the default on CPU), bf16 or fp16; on a GPU the default is bf16 where supported.
        quantize: int8-dyn, int8-wo or int4-wo (model.quantize; `bot.quantization` says which ran). key: a
        privacy.crypto.Key for an encrypted model folder (unset: CHATFORGE_KEY), read in memory only.
        compile: decode through a torch.compile'd step (generation.decode.compile_decode), compiled here by a
        warm-up (`bot.warmup_s`) rather than on the first request; the artefacts are cached on disk, so a later
        start loads them. What int8-dyn needs to be fast; the same greedy tokens as eager. kv_dtype: fp32, bf16
        or fp16 keys and values in the KV cache (default: the model's dtype).
        """
        from chatforge.device import pick_device, resolve_dtype
        from chatforge.weights.loader import load

        dev = pick_device(device or "auto")
        torch_dtype = resolve_dtype(dtype or ("fp32" if dev.type == "cpu" else "auto"), dev)
        # the one loader: names, GGUF, folders, adapters, encrypted folders
        loaded = load(path_or_name, device=dev, dtype=torch_dtype, quantize=quantize, key=key)
        model, tokenizer = loaded.model, loaded.tokenizer
        engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len, kv_dtype=kv_dtype)
        bot = cls(model, tokenizer, engine, defaults_from_generation_config(loaded.generation_config))
        bot.quantization = loaded.quantization
        if compile:
            from chatforge.generation import decode

            decode.compile_decode(model)
            bot.warmup_s = decode.warmup(model, batch_sizes=(1, 2) if max_batch_size > 1 else (1,),
                                         rows=max_batch_size, max_len=engine.context_length,
                                         cache_dtype=engine.kv_dtype)
        return bot

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def sampling(self, **kwargs) -> SamplingParams:
        """SamplingParams from kwargs, then the defaults, then the built-in ones (an unknown name is a TypeError).

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
        return reply_budget(len(prompt_ids), max_new_tokens, self.context_length, clamp=True)

    def prompt(self, messages: list[dict], max_new_tokens: int | None) -> list[int]:
        """Prompt ids for `messages` with a generation prompt, trimmed to fit (policy in the module docstring)."""
        check_messages(messages)
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
        return _texts(self.engine.generate(*self.request(messages, **sampling)))

    def request(self, messages: list[dict], **sampling) -> tuple[list[int], SamplingParams]:
        """(prompt ids, sampling params) for a conversation: the history trimmed and the reply budgeted to fit."""
        params = self.sampling(**sampling)
        ids = self.prompt(messages, params.max_new_tokens)
        params.max_new_tokens = self.reply_budget(ids, params.max_new_tokens)
        return ids, params

    def request_text(self, text: str, **sampling) -> tuple[list[int], SamplingParams]:
        """(prompt ids, sampling params) to continue plain text, without the chat template."""
        params = self.sampling(**sampling)
        ids = self.tokenizer.encode(text)
        if self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id] + ids
        params.max_new_tokens = self.reply_budget(ids, params.max_new_tokens)
        return ids, params

    def chat_batch(self, conversations: list[list[dict]], **sampling) -> list[str]:
        """Replies to many conversations, decoded together."""
        prompts, plist = zip(*[self.request(m, **sampling) for m in conversations]) if conversations else ((), ())
        return [c.text for c in self.engine.generate_batch(list(prompts), list(plist))]

    def complete(self, text: str, **sampling) -> Completion:
        """Plain continuation of `text`, without the chat template (what a base model is for)."""
        ids, params = self.request_text(text, **sampling)
        return self.engine.generate_batch([ids], params)[0]


def _texts(deltas: Iterator) -> Iterator[str]:
    try:
        for d in deltas:
            if d.text:
                yield d.text
    finally:
        deltas.close()  # a consumer that stops early aborts the request and frees its slot
