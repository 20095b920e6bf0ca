"""Tiny real models for the serve tests, built once per test process (a few seconds on 2 cores).

- a tokenizer trained on a little English and Chinese, small enough that Chinese characters split into byte tokens;
- `random`: a randomly initialised model (random text: fine for protocol, batching and limit tests);
- `chat`: a model trained here to reply with fixed texts (REPLIES) to fixed prompts, so tests know what a greedy
  reply is: a Chinese one for UTF-8 streaming, an English one for stop strings, one with Markdown, code and HTML for
  the web page's safe rendering.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

REPLIES = {
    "你好": "你好！很高兴认识你。我们来聊天吧。",
    "hello": "Hello there! The weather is nice today. Have a good day.",
    "code": "**Bold** and:\n```\n<script>pwned=1</script>\n```\n<img src=x onerror=pwned=2>",
}
CORPUS = [
    "The weather is nice today and the sky is clear.", "Hello there, how are you doing today?",
    "Here is some code for you to read.", "Have a good day and see you soon.",
    "今天天气很好，我们去公园散步吧。", "你好，很高兴认识你。", "我们来聊天吧，你今天怎么样？",
] * 3


def conversation(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@functools.lru_cache(maxsize=1)
def build_models() -> dict[str, str]:
    """{"random": folder, "chat": folder}; the chat model's greedy replies to REPLIES' prompts are checked here."""
    import torch

    from chatforge.weights.folder import save_model
    from chatforge.generation.engine import Engine, SamplingParams
    from chatforge.model.gpt import GPT, ModelConfig
    from chatforge.tokenizer import train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="chatforge-serve-test-"))
    texts = CORPUS + [t for pair in REPLIES.items() for t in pair]
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=2)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=256)
    save_model(GPT(config), tok, root / "random")

    model = GPT(config)
    rows = [tok.render(conversation(p) + [{"role": "assistant", "content": r}]) for p, r in REPLIES.items()]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [tok.pad_id] * (width - len(i)) for i, _ in rows])
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in rows], dtype=torch.bool)
    targets = torch.where(mask[:, 1:], ids[:, 1:], -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    prompts = {p: tok.render(conversation(p), add_generation_prompt=True)[0] for p in REPLIES}
    for step in range(1, 601):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 60 and step % 20 == 0:
            model.eval()
            engine = Engine(model, tok)
            got = [c.text for c in engine.generate_batch(list(prompts.values()),
                                                          SamplingParams(temperature=0.0, max_new_tokens=120))]
            model.train()
            if got == list(REPLIES.values()):
                break
    else:
        raise AssertionError(f"the chat test model did not learn its replies: {got}")
    save_model(model.eval(), tok, root / "chat")
    return {"random": str(root / "random"), "chat": str(root / "chat")}


# ------------------------------------------------------------------------------------------------ servers

def _slow_engine_class():
    from chatforge.generation.engine import Engine

    class SlowEngine(Engine):
        """The real engine, with a pause per step: long enough replies to stop, disconnect from or queue behind."""

        delay = 0.02

        def step(self):
            import time

            time.sleep(self.delay)
            return super().step()

    return SlowEngine


def load_bot(folder: str, max_batch_size: int = 8, slow: float = 0.0):
    from chatforge.generation.bot import Bot

    bot = Bot.load(folder, device="cpu", max_batch_size=max_batch_size)
    if slow:
        engine = _slow_engine_class()(bot.model, bot.tokenizer, max_batch_size=max_batch_size)
        engine.delay = slow
        bot.engine = engine
    return bot


def serve(folder: str, max_batch_size: int = 8, slow: float = 0.0, **app_kwargs):
    """A live server on a free loopback port: `with serve(...) as srv: srv.url, srv.app`."""
    from chatforge.serve.app import ServerThread, create_app

    app_kwargs.setdefault("model_name", "tiny")
    app = create_app(load_bot(folder, max_batch_size, slow), **app_kwargs)
    srv = ServerThread(app)
    srv.app = app
    return srv


def sse_payloads(raw: bytes) -> list:
    """The data of each server-sent event, JSON-decoded (the final "[DONE]" stays a string)."""
    import json

    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), "an event stream ends with a blank line"
    out = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: "), event
        data = event[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def counts(usage: dict) -> dict:
    """A usage object's token counts without prompt_tokens_details: how many prompt tokens the prefix cache served
    depends on the requests before (the same prompt again is served from the cache)."""
    return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}
