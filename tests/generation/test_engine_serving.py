"""Engine features for serving: prefix caching (a shared prompt prefix is prefilled once) and chunked prefill (a long
prompt does not stall the running streams). Both must leave greedy output exactly as without them."""

from __future__ import annotations

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.generation.engine import Engine, SamplingParams, common_prefix
from conftest import greedy_params as greedy, make_tokenizer, prompt_ids as ids, random_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return random_model(tok)


def run_alone(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return engine.generate_batch([prompt], greedy(n))[0].token_ids


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([5], [1]) == 0
    assert common_prefix([], [1]) == 0
    assert all(common_prefix(list(range(k)) + [-1], list(range(40))) == k for k in range(40))


def test_shared_system_prompt_is_prefilled_once_and_output_is_unchanged(tok, model):
    system = ids(40, 0)
    prompts = [system + ids(5 + i, 10 + i) for i in range(4)]
    plain = Engine(model, tok, max_batch_size=2, prefix_cache=False)
    cached = Engine(model, tok, max_batch_size=2)
    want = [run_alone(plain, p, 12) for p in prompts]
    got = [run_alone(cached, p, 12) for p in prompts]
    assert got == want
    assert len({tuple(w) for w in want}) == 4
    total = sum(map(len, prompts))
    assert plain.stats.prefill_tokens == plain.stats.prompt_tokens == total and plain.stats.cached_tokens == 0
    # The first prompt is prefilled whole; each later one reuses at least the 40 system tokens.
    assert cached.stats.cached_tokens >= 3 * 40
    assert cached.stats.prefill_tokens == total - cached.stats.cached_tokens


def test_conversation_turns_reuse_the_previous_turn_and_reply(tok, model):
    """The second turn's prompt starts with the first turn's prompt and reply: all of it but the reply's last
    token (never fed to the model) is reused."""
    first = ids(30, 1)
    engine = Engine(model, tok, max_batch_size=3)
    reply = engine.generate_batch([first], greedy(10))[0]
    second = first + reply.token_ids + ids(8, 2)
    done = engine.generate_batch([second], greedy(10))[0]
    assert engine.stats.cached_tokens == len(first) + len(reply.token_ids) - 1
    assert done.token_ids == run_alone(Engine(model, tok, prefix_cache=False), second, 10)


def test_prefix_of_a_running_request_is_copied_into_a_new_row(tok, model):
    shared = ids(24, 3)
    a, b = shared + ids(6, 4), shared + ids(9, 5)
    engine = Engine(model, tok, max_batch_size=2)
    ra = engine.add_request(a, greedy(20))
    engine.step()
    engine.step()  # a is decoding in row 0
    rb = engine.add_request(b, greedy(15))
    while engine.has_work():
        engine.step()
    assert rb.cached_tokens == 24 and ra.cached_tokens == 0
    plain = Engine(model, tok, prefix_cache=False)
    assert ra.output_ids == run_alone(plain, a, 20)
    assert rb.output_ids == run_alone(plain, b, 15)


def test_identical_prompt_reuses_all_but_its_last_token(tok, model):
    p = ids(20, 6)
    engine = Engine(model, tok, max_batch_size=1)
    first = run_alone(engine, p, 8)
    second = engine.generate_batch([p], greedy(8))[0]
    assert second.token_ids == first and engine.stats.cached_tokens == 19


def test_sliding_window_rows_are_not_reused(tok):
    from chatforge.model.gpt import GPT, config_from_preset

    torch.manual_seed(0)
    m = GPT(config_from_preset("nano", vocab_size=tok.vocab_size, max_seq_len=128, n_layer=2, init_std=0.1,
                               sliding_window=16)).eval()
    engine = Engine(m, tok, max_batch_size=2)
    assert not engine.prefix_cache
    p = ids(30, 7)
    assert run_alone(engine, p, 8) == run_alone(engine, p + [], 8)
    assert engine.stats.cached_tokens == 0


def test_chunked_prefill_keeps_running_streams_going(tok, model):
    short, long = ids(5, 8), ids(70, 9)
    engine = Engine(model, tok, max_batch_size=2, prefill_chunk=16, prefix_cache=False)
    running = engine.add_request(short, greedy(30))
    engine.step()  # the short prompt is prefilled and gives its first token
    late = engine.add_request(long, greedy(10))
    steps_to_first = 0
    while not late.output_ids:
        before = len(running.output_ids)
        engine.step()
        steps_to_first += 1
        assert len(running.output_ids) == before + 1  # a token in every step while the long prompt prefills
    assert steps_to_first == 5  # 70 prompt tokens at 16 per step
    while engine.has_work():
        engine.step()
    whole = Engine(model, tok, max_batch_size=2, prefill_chunk=None, prefix_cache=False)
    assert running.output_ids == run_alone(whole, short, 30)
    assert late.output_ids == run_alone(whole, long, 10)
    assert engine.stats.prefill_tokens == 75


def test_chunked_prefill_budget_is_shared_by_prompts_admitted_together(tok, model):
    prompts = [ids(10, 20), ids(10, 21), ids(10, 22)]
    engine = Engine(model, tok, max_batch_size=3, prefill_chunk=12, prefix_cache=False)
    reqs = [engine.add_request(p, greedy(4)) for p in prompts]
    engine.step()  # 12 tokens: the first prompt and 2 of the second
    assert [len(r.output_ids) for r in reqs] == [1, 0, 0]
    engine.step()  # the first decodes; 8 more of the second, 4 of the third
    assert [len(r.output_ids) for r in reqs] == [2, 1, 0]
    while engine.has_work():
        engine.step()
    whole = Engine(model, tok, prefill_chunk=None, prefix_cache=False)
    assert [r.output_ids for r in reqs] == [run_alone(whole, p, 4) for p in prompts]


def test_abort_during_chunked_prefill_keeps_the_written_prefix_reusable(tok, model):
    p = ids(40, 23)
    engine = Engine(model, tok, max_batch_size=1, prefill_chunk=16)
    req = engine.add_request(p, greedy(5))
    engine.step()
    engine.abort(req)
    done = engine.generate_batch([p], greedy(5))[0]
    assert engine.stats.cached_tokens == 16
    assert done.token_ids == run_alone(Engine(model, tok, prefix_cache=False), p, 5)


def test_prefill_chunk_must_be_positive(tok, model):
    with pytest.raises(ChatforgeError, match=r"engine: prefill_chunk must be None or an integer >= 1, got 0"):
        Engine(model, tok, prefill_chunk=0)


@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0])  # flat (nucleus past the top-256 head), usual, peaked
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_exactly_the_nucleus_of_a_full_sort(scale, top_p):
    from chatforge.generation.engine import process_logits

    logits = torch.randn(5000, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    sorted_x, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_x, -1)
    keep = (torch.cumsum(probs, -1) - probs) < top_p
    keep[0] = True
    want = torch.full_like(logits, float("-inf"))
    want[order[keep]] = logits[order[keep]]
    assert torch.equal(process_logits(logits, SamplingParams(temperature=1.0, top_p=top_p)), want)


def test_greedy_ignores_top_k_and_top_p():
    from chatforge.generation.engine import process_logits

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    assert torch.equal(process_logits(logits, SamplingParams(temperature=0.0, top_k=1, top_p=0.1)), logits)


@pytest.mark.parametrize("preset", ["nano", "gpt2-nano"])
def test_prompts_admitted_together_prefill_in_one_padded_forward(tok, preset):
    m = random_model(tok, preset)
    prompts = [ids(n, 30 + n) for n in (9, 12, 7, 11)]
    engine = Engine(m, tok, max_batch_size=4, prefix_cache=False)
    got = [c.token_ids for c in engine.generate_batch(prompts, greedy(15))]
    assert engine.stats.prefill_forwards == 1 and engine.stats.prefill_tokens == 39
    alone = Engine(m, tok, max_batch_size=1, prefix_cache=False)
    assert got == [run_alone(alone, p, 15) for p in prompts]


def test_a_long_chunk_is_not_padded_together_with_short_ones(tok, model):
    prompts = [ids(60, 40), ids(5, 41), ids(6, 42)]
    engine = Engine(model, tok, max_batch_size=3, prefix_cache=False, prefill_chunk=None)
    got = [c.token_ids for c in engine.generate_batch(prompts, greedy(10))]
    assert engine.stats.prefill_forwards == 2  # the 60-token prompt alone, the two short ones together
    alone = Engine(model, tok, max_batch_size=1, prefix_cache=False)
    assert got == [run_alone(alone, p, 10) for p in prompts]
