"""Engine: KV-cache parity, batch independence, sampling math, stop strings, UTF-8-safe streaming.

Two kinds of tiny real models: random ones (init_std 0.1, so greedy paths are diverse and the top-2 logit gap stays
~1000x above float noise) and one overfitted on three replies, so the generated text is known exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from chatforge.generation.engine import Engine, SamplingParams, holdback, process_logits, sample_token
from chatforge.errors import ChatforgeError
from conftest import BRIEF, CONVERSATIONS, REPLY, make_tokenizer, memorized_model, random_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def memo(tok):
    return memorized_model(tok)


def prompt_of(tok, messages) -> list[int]:
    return tok.render(messages, add_generation_prompt=True)[0]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def reference_greedy(model, prompt: list[int], n: int, stop_ids: set[int]) -> list[int]:
    """No cache: the full forward recomputed for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(token)
            if token in stop_ids:
                break
    return ids[len(prompt):]


def prompts_of_lengths(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 300, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------- cache and batching parity

@pytest.mark.parametrize("preset", ["nano", "gpt2-nano"])
def test_kv_cache_generation_equals_full_recompute(tok, preset):
    model = random_model(tok, preset)
    engine = Engine(model, tok, max_batch_size=4)
    for prompt in prompts_of_lengths([1, 7, 30]):
        got = [t for d in engine.generate(prompt, greedy(max_new_tokens=40)) for t in d.token_ids]
        want = reference_greedy(model, prompt, 40, tok.stop_ids)
        assert got == want
        assert len(set(got)) > 3  # a diverse path, not a constant token


def test_batch_of_8_with_staggered_joins_equals_batch_of_1(tok):
    model = random_model(tok)
    lengths = [3, 11, 1, 20, 6, 15, 9, 2]
    new_tokens = [25, 12, 30, 18, 50, 8, 22, 40]  # different leave times; the late 20+50 one grows the cache
    prompts = prompts_of_lengths(lengths, seed=1)
    params = [greedy(max_new_tokens=n) for n in new_tokens]
    params[3] = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=18)  # seeded sampling too

    alone = Engine(model, tok, max_batch_size=1)
    want = [alone.generate_batch([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert len({tuple(w) for w in want}) == 8

    engine = Engine(model, tok, max_batch_size=8)
    got: dict[int, list[int]] = {}
    reqs = []
    for join in ([0, 1, 2], [3, 4], [5, 6, 7]):  # requests join while others are mid-generation
        reqs += [engine.add_request(prompts[i], params[i]) for i in join]
        for _ in range(2):
            for r, d in engine.step():
                got.setdefault(r.id, []).extend(d.token_ids)
    assert engine.num_running == 8
    while engine.has_work():
        for r, d in engine.step():
            got.setdefault(r.id, []).extend(d.token_ids)
    assert [got[r.id] for r in reqs] == want
    assert [r.output_ids for r in reqs] == want

    # Fewer slots than requests: queued requests reuse the slots others left, over their stale keys.
    small = Engine(model, tok, max_batch_size=3)
    assert [c.token_ids for c in small.generate_batch(prompts, params)] == want


# ---------------------------------------------------------------- sampling

def test_process_logits_exact_math():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    seen = torch.tensor([True, True, False, False, False, False])
    counts = torch.tensor([0.0, 0.0, 2.0, 1.0, 0.0, 0.0])
    # top_p=1.0 turns off the built-in nucleus default (0.9), so each case tests its own filter alone
    p = SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=2.0)
    assert process_logits(logits, p, seen).tolist() == [1.0, -2.0, 0.5, 3.0, -2.0, 1.0]

    p = SamplingParams(temperature=1.0, top_p=1.0, presence_penalty=0.5, frequency_penalty=0.25)
    assert process_logits(logits, p, None, counts).tolist() == [2.0, -1.0, 0.5 - 0.5 - 0.5, 3.0 - 0.5 - 0.25, -2.0, 1.0]

    p = SamplingParams(temperature=0.5, top_p=1.0, repetition_penalty=2.0, presence_penalty=0.5,
                       frequency_penalty=0.25)
    want = torch.tensor([1.0, -2.0, -0.5, 2.25, -2.0, 1.0]) / 0.5  # penalties first, then temperature
    assert torch.equal(process_logits(logits, p, seen, counts), want)

    p = SamplingParams(temperature=1.0, top_p=1.0, top_k=2)
    assert process_logits(logits, p).tolist() == [2.0, -math.inf, -math.inf, 3.0, -math.inf, -math.inf]

    # top-p: probabilities sorted are ~[.60 (id 3), .22 (id 0), .08 (id 5), .05 (id 2), ...]
    probs = torch.softmax(logits, -1)
    p = SamplingParams(temperature=1.0, top_p=0.8)  # .60 < .8, .60+.22 >= .8 -> ids 3 and 0
    kept = torch.isfinite(process_logits(logits, p)).nonzero().flatten().tolist()
    assert sorted(kept) == [0, 3] and probs[3] < 0.8 <= probs[3] + probs[0]
    p = SamplingParams(temperature=1.0, top_p=0.01)  # always at least the most likely id
    assert torch.isfinite(process_logits(logits, p)).nonzero().flatten().tolist() == [3]

    # greedy takes the argmax of the penalised logits
    p = SamplingParams(temperature=0.0, repetition_penalty=10.0)
    assert sample_token(process_logits(logits, p, torch.tensor([False, False, False, True, False, False])), 0.0) == 0


def test_holdback_keeps_only_possible_stop_prefixes():
    assert holdback("Hello wor", ["world"]) == 6
    assert holdback("Hello", ["world"]) == 5
    assert holdback("abab", ["abc"]) == 2
    assert holdback("x\n\n", ["\n\nUser:", "\n"]) == 1
    assert holdback("anything", []) == 8


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(tok):
    model = random_model(tok)
    prompt = prompts_of_lengths([5])[0]
    params = SamplingParams(temperature=1.2, top_k=50, seed=123, max_new_tokens=30)
    engine = Engine(model, tok, max_batch_size=8)
    alone = engine.generate_batch([prompt], params)[0].token_ids
    assert engine.generate_batch([prompt], params)[0].token_ids == alone
    others = prompts_of_lengths([2, 9, 4, 14, 7, 3, 12], seed=5)
    batch = [prompt] + others
    plist = [params] + [SamplingParams(temperature=1.0, seed=i, max_new_tokens=20 + i) for i in range(7)]
    assert engine.generate_batch(batch, plist)[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.2, top_k=50, seed=124, max_new_tokens=30)
    assert engine.generate_batch([prompt], other_seed)[0].token_ids != alone


def test_top_k_1_equals_greedy(tok):
    model = random_model(tok)
    engine = Engine(model, tok)
    prompts = prompts_of_lengths([4, 8])
    want = [c.token_ids for c in engine.generate_batch(prompts, greedy(max_new_tokens=30))]
    got = [c.token_ids for c in engine.generate_batch(prompts, SamplingParams(temperature=1.5, top_k=1,
                                                                               max_new_tokens=30))]
    assert got == want


def test_max_new_tokens_finishes_with_length(tok):
    engine = Engine(random_model(tok), tok)
    (c,) = engine.generate_batch([prompts_of_lengths([6])[0]], greedy(max_new_tokens=17))
    assert (c.finish_reason, c.completion_tokens, c.prompt_tokens, len(c.token_ids)) == ("length", 17, 6, 17)


def test_presence_penalty_is_applied_in_generation(tok):
    engine = Engine(random_model(tok), tok)
    prompt = prompts_of_lengths([3])[0]
    plain = engine.generate_batch([prompt], greedy(max_new_tokens=40))[0].token_ids
    assert len(set(plain)) < len(plain)  # the unpenalised path repeats tokens
    penalised = engine.generate_batch([prompt], greedy(max_new_tokens=40, presence_penalty=50.0))[0].token_ids
    assert len(set(penalised)) == len(penalised)


def test_logprobs_are_the_models_distribution(tok):
    model = random_model(tok)
    engine = Engine(model, tok)
    prompt = prompts_of_lengths([5])[0]
    (c,) = engine.generate_batch([prompt], SamplingParams(temperature=0.7, seed=3, logprobs=3, max_new_tokens=6))
    ids = list(prompt)
    for token, entry in zip(c.token_ids, c.logprobs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids]))[0, -1], -1)
        assert entry["logprob"] == pytest.approx(float(ref[token]), abs=1e-4)
        top = entry["top_logprobs"]
        assert [t["logprob"] for t in top] == pytest.approx(ref.topk(3).values.tolist(), abs=1e-4)
        ids.append(token)


def test_logprob_bytes_rebuild_the_text(tok, memo):
    engine = Engine(memo, tok)
    (c,) = engine.generate_batch([prompt_of(tok, CONVERSATIONS[0][:1])], greedy(max_new_tokens=60, logprobs=0))
    assert b"".join(bytes(e["bytes"]) for e in c.logprobs[:-1]) == REPLY.encode()
    assert c.logprobs[-1]["token"] == "<|im_end|>" and c.logprobs[-1]["top_logprobs"] == []
    assert all(e["logprob"] > -0.2 for e in c.logprobs)  # memorized: the chosen tokens are near-certain


# ---------------------------------------------------------------- text: stop strings, end of turn, UTF-8

def stream(engine, prompt, **kw):
    deltas = list(engine.generate(prompt, greedy(max_new_tokens=60, **kw)))
    return [d.text for d in deltas], deltas[-1].finish_reason


def test_end_of_turn_token_stops_and_is_not_text(tok, memo):
    engine = Engine(memo, tok)
    deltas = list(engine.generate(prompt_of(tok, CONVERSATIONS[0][:1]), greedy(max_new_tokens=60)))
    assert "".join(d.text for d in deltas) == REPLY
    assert deltas[-1].finish_reason == "stop" and deltas[-1].token_ids == [tok.eos_id]
    # Extra stop ids work the same way: "!" ends the reply and is not text.
    (bang,) = tok.encode("!")
    texts, finish = stream(engine, prompt_of(tok, CONVERSATIONS[0][:1]), stop_token_ids=[bang])
    assert ("".join(texts), finish) == ("Hello there", "stop")


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tok, memo):
    engine = Engine(memo, tok)
    prompt = prompt_of(tok, CONVERSATIONS[1][:2])
    # "TOP h" spans the tokens T, O, P, " ", "he": none of it may reach the stream.
    texts, finish = stream(engine, prompt, stop=["TOP h"])
    assert ("".join(texts), finish) == ("Hi. S", "stop")
    assert texts[:5] == ["H", "i", ".", " ", "S"] and not any(t for t in texts[5:])
    # A stop string completed inside a token: "re" + "!" completes "e!", cut inside "re".
    texts, finish = stream(engine, prompt_of(tok, CONVERSATIONS[0][:1]), stop=["e!", "zzz"])
    assert ("".join(texts), finish) == ("Hello ther", "stop")
    # A prefix that never completes is held back, then released whole.
    texts, finish = stream(engine, prompt, stop=["STOP now"])
    assert ("".join(texts), finish) == (BRIEF, "stop")
    assert "STOP he" in texts and not any("S" in t for t in texts[:texts.index("STOP he")])
    # A held prefix is released when the end-of-turn token arrives.
    texts, finish = stream(engine, prompt_of(tok, CONVERSATIONS[0][:1]), stop=["?!"])
    assert ("".join(texts), finish, texts[-2:]) == (REPLY, "stop", ["", "?"])


def test_stop_string_prefix_is_released_at_length(tok, memo):
    engine = Engine(memo, tok)
    deltas = list(engine.generate(prompt_of(tok, CONVERSATIONS[1][:2]), greedy(max_new_tokens=6, stop=["STOP now"])))
    assert "".join(d.text for d in deltas) == "Hi. ST" and deltas[-1].finish_reason == "length"


def test_streamed_deltas_never_split_a_utf8_character(tok, memo):
    engine = Engine(memo, tok)
    prompt = prompt_of(tok, CONVERSATIONS[0][:1])
    texts, _ = stream(engine, prompt)
    assert "".join(texts) == REPLY
    assert all("\ufffd" not in t for t in texts)
    assert "你" in texts and "好" in texts  # each character arrives whole, after its 3 byte tokens
    assert len([t for t in texts if t == ""]) >= 8
    # Stopping in the middle of a character: the cut-off character is dropped, never shown as U+FFFD.
    n = next(i for i, t in enumerate(texts) if t == "你")
    (c,) = engine.generate_batch([prompt], greedy(max_new_tokens=n))  # the last of 3 byte tokens is missing
    assert c.text == REPLY[:REPLY.index("你")] and c.finish_reason == "length" and len(c.token_ids) == n


# ---------------------------------------------------------------- requests and errors

def test_request_validation_errors(tok):
    engine = Engine(random_model(tok), tok, max_seq_len=32)
    assert engine.context_length == 32
    with pytest.raises(ChatforgeError, match="exceed the context window of 32"):
        engine.add_request([5] * 20, greedy(max_new_tokens=13))
    engine.generate_batch([[5] * 20], greedy(max_new_tokens=12))  # exactly fits
    with pytest.raises(ChatforgeError, match="prompt: empty"):
        engine.add_request([], greedy())
    with pytest.raises(ChatforgeError, match="top_p"):
        engine.add_request([5], SamplingParams(top_p=0.0))
    with pytest.raises(ChatforgeError, match="outside the vocabulary"):
        engine.add_request([10_000], greedy())
    assert not engine.has_work()


def test_context_end_finishes_with_length_when_max_new_tokens_is_none(tok):
    engine = Engine(random_model(tok), tok, max_seq_len=24)
    (c,) = engine.generate_batch([prompts_of_lengths([20])[0]], greedy(max_new_tokens=None))
    assert (c.finish_reason, c.prompt_tokens + c.completion_tokens) == ("length", 24)


def test_abort_frees_the_slot_and_closing_generate_aborts(tok):
    engine = Engine(random_model(tok), tok, max_batch_size=1)
    a = engine.add_request([5, 6], greedy(max_new_tokens=50))
    b = engine.add_request([7, 8], greedy(max_new_tokens=3))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.abort(a)
    assert a.finished and a.finish_reason == "abort" and engine.num_running == 0
    while engine.has_work():
        engine.step()
    assert b.finish_reason == "length" and len(b.output_ids) == 3
    it = engine.generate([5, 6], greedy(max_new_tokens=50))
    next(it)
    it.close()
    assert not engine.has_work()


def test_a_bf16_kv_cache_under_an_fp32_model_keeps_the_reply(tok, memo):
    """kv_dtype stores keys and values in bf16 (half an fp32 model's cache) while attention reads them in fp32: the
    memorized replies come out whole, batched and alone; an unknown dtype is one line."""
    engine = Engine(memo, tok, max_batch_size=2, kv_dtype="bf16")
    prompts = [prompt_of(tok, c[:1]) for c in CONVERSATIONS[:2]]
    outs = engine.generate_batch(prompts, greedy(max_new_tokens=60))
    assert engine.kv_dtype == torch.bfloat16 and engine._cache.k.dtype == torch.bfloat16
    assert next(memo.parameters()).dtype == torch.float32
    assert tok.decode(outs[0].token_ids, skip_special=True) == REPLY
    fp32 = Engine(memo, tok, max_batch_size=2).generate_batch(prompts, greedy(max_new_tokens=60))
    assert [o.token_ids for o in outs] == [o.token_ids for o in fp32]
    with pytest.raises(ChatforgeError, match=r"^dtype: 'int3' is not one of fp32, bf16, fp16$"):
        Engine(memo, tok, kv_dtype="int3")
