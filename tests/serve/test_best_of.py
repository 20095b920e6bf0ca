"""Best-of-N in the server (serve --reward MODEL [--best-of N]) and the one ranking it shares with the CLI: the
argmax-reward reply, the n best in order, usage over every candidate, the 400s, and the output chain on the chosen
reply. Tiny real models: serve_support's random model (varied samples) and test_guarded's trained one (replies
with PII and with a lexicon entry); the reward model is one of them with a seeded random scalar head."""

from __future__ import annotations

import httpx
import pytest
import torch

from serve_support import build_models, counts, serve
from test_guarded import REPLIES, guard, model_folder  # noqa: F401 - guard: the real guard fixture

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello"}]


def reward_model(folder: str, seed: int = 3):
    from chatforge.model.reward import attach_scalar_head
    from chatforge.tokenizer import Tokenizer
    from chatforge.weights.folder import load_model

    model = load_model(folder).eval()
    torch.manual_seed(seed)
    attach_scalar_head(model)
    with torch.no_grad():  # a larger head than the init's: scores far apart, so the order is not a rounding tie
        model.lm_head.weight.mul_(50)
    return model, Tokenizer.load(folder)


def post(srv, **body) -> httpx.Response:
    return httpx.post(srv.url + CHAT, json={"model": "tiny", "messages": MESSAGES, **body}, timeout=120)


def scores(reward, texts: list[str]) -> list[float]:
    from chatforge.model.reward import score_conversations

    return score_conversations(*reward, [MESSAGES + [{"role": "assistant", "content": t}] for t in texts])


@pytest.fixture(scope="module")
def models():
    return build_models()


@pytest.fixture(scope="module")
def reward(models):
    return reward_model(models["random"])


@pytest.fixture(scope="module")
def ranked(models, reward):
    with serve(models["random"], max_n=6, reward=reward, best_of=1) as srv:
        yield srv


SAMPLE = {"temperature": 1.0, "max_tokens": 8, "seed": 11}


def test_best_of_returns_the_argmax_reward_reply_and_counts_every_candidate(ranked, reward):
    plain = post(ranked, n=5, **SAMPLE).json()  # the same 5 samples (sample i uses seed + i), unranked
    texts = [c["message"]["content"] for c in plain["choices"]]
    assert len(set(texts)) > 1
    s = scores(reward, texts)
    body = post(ranked, best_of=5, **SAMPLE).json()
    (choice,) = body["choices"]
    assert choice["message"]["content"] == texts[max(range(5), key=lambda i: (s[i], -i))]
    assert choice["index"] == 0
    assert counts(body["usage"]) == counts(plain["usage"])  # all five candidates' tokens: they were all generated
    two = post(ranked, n=2, best_of=5, **SAMPLE).json()
    order = sorted(range(5), key=lambda i: (-s[i], i))
    assert [c["message"]["content"] for c in two["choices"]] == [texts[i] for i in order[:2]]
    assert [c["index"] for c in two["choices"]] == [0, 1] and counts(two["usage"]) == counts(plain["usage"])


def test_best_of_errors(ranked, models):
    def error(srv, **body):
        r = post(srv, **body)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    e = error(ranked, n=3, best_of=2, **SAMPLE)
    assert e["param"] == "best_of" and e["message"] == (
        "'best_of' (2) must be at least 'n' (3): best_of candidates are sampled and the n best returned.")
    assert error(ranked, best_of=3, stream=True, **SAMPLE)["message"] == (
        "'best_of' (3) > n cannot be streamed: the best reply is known only once every candidate is finished; "
        "send stream=false.")
    assert error(ranked, best_of=3, **(SAMPLE | {"temperature": 0}))["message"] == (
        "'best_of' (3) > n needs sampling: with temperature 0 every candidate is the same reply.")
    assert error(ranked, best_of=7, **SAMPLE)["param"] == "best_of"  # above max_n (6)
    # best_of equal to n is plain sampling, streamed or not
    assert post(ranked, n=2, best_of=2, stream=True, **SAMPLE).status_code == 200
    with serve(models["random"]) as plain:  # no reward model: best_of is off
        assert error(plain, best_of=2, **SAMPLE)["message"] == (
            "Unsupported parameter: 'best_of': this server ranks no candidates (start it with --reward MODEL); "
            "best_of is only accepted when it equals n (1).")
        assert post(plain, best_of=1, **SAMPLE).status_code == 200


def test_server_default_best_of_applies_to_sampled_unstreamed_requests(models, reward):
    with serve(models["random"], max_n=6, reward=reward, best_of=4) as srv:
        texts = [c["message"]["content"] for c in post(srv, n=4, best_of=4, **SAMPLE).json()["choices"]]
        s = scores(reward, texts)
        body = post(srv, **SAMPLE).json()
        assert body["choices"][0]["message"]["content"] == texts[max(range(4), key=lambda i: (s[i], -i))]
        greedy = post(srv, **(SAMPLE | {"temperature": 0})).json()  # greedy: one candidate
        streamed = post(srv, stream=True, **SAMPLE)  # streamed: answered as sampled
        assert greedy["usage"]["completion_tokens"] <= 8 and streamed.status_code == 200
    from chatforge.errors import ChatforgeError
    from chatforge.serve.app import check_best_of

    with pytest.raises(ChatforgeError, match=r"^serve: --best-of needs --reward MODEL \(a reward model folder"):
        check_best_of(2, 8, False)
    with pytest.raises(ChatforgeError, match=r"^serve: --best-of \(9\) must be at most --max-n \(8\)"):
        check_best_of(9, 8, True)


def test_the_chosen_reply_goes_through_the_output_chain(guard):
    from chatforge.guard.output import OutputChain
    from chatforge.privacy.pii import Scrubber

    folder = model_folder()
    with serve(folder, max_n=4, reward=reward_model(folder), output=OutputChain(guard, Scrubber())) as srv:
        def ask(prompt):
            return httpx.post(srv.url + CHAT, json={"messages": [{"role": "user", "content": prompt}],
                                                    "best_of": 3, "temperature": 0.3, "max_tokens": 60, "seed": 1},
                              timeout=120).json()

        contact = ask("contact")["choices"][0]
        assert "ann.lee@example.com" not in contact["message"]["content"]
        assert "138 1234 5678" not in contact["message"]["content"]
        assert contact["message"]["content"].startswith("Write to ")
        story = ask("story")["choices"][0]
        assert story["finish_reason"] == "content_filter" and "meth" not in story["message"]["content"]
        assert REPLIES["story"] not in story["message"]["content"]


def test_rank_filters_before_scoring_and_puts_stopped_candidates_last(guard, reward):
    from chatforge.generation.best_of import rank
    from chatforge.guard.output import OutputChain
    from chatforge.privacy.pii import Scrubber

    chain = OutputChain(guard, Scrubber())
    texts = ["Once upon a time the bad man wanted to cook meth in his kitchen.", "Write to ann.lee@example.com now.",
             "Hello there!"]
    best = rank(*reward, MESSAGES, texts, ["stop"] * 3, 30, chain)
    shown = [chain.filter_text(t)[0] for t in texts]
    assert best.candidates == shown and "ann.lee@example.com" not in best.candidates[1]
    assert best.finish_reasons == ["content_filter", "stop", "stop"] and best.order[-1] == 0
    assert best.scores == pytest.approx(scores(reward, shown), abs=1e-5)
    assert best.order[0] == (1 if best.scores[1] >= best.scores[2] else 2) and best.completion_tokens == 30


def test_legacy_completions_best_of_returns_the_most_likely_per_token(models):
    """OpenAI's legacy best_of needs no reward model: the n candidates with the highest mean token logprob."""
    def complete(srv, **body) -> httpx.Response:
        return httpx.post(srv.url + "/v1/completions", json={"prompt": "hello", **SAMPLE, **body}, timeout=120)

    with serve(models["random"], max_n=6) as srv:
        plain = complete(srv, n=5, logprobs=0).json()  # the same 5 samples (sample i uses seed + i), unranked
        texts = [c["text"] for c in plain["choices"]]
        assert len(set(texts)) > 1
        means = [sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"]) for c in plain["choices"]]
        order = sorted(range(5), key=lambda i: (-means[i], i))
        one = complete(srv, best_of=5).json()
        assert [c["text"] for c in one["choices"]] == [texts[order[0]]]
        assert one["choices"][0]["logprobs"] is None  # not asked for: ranked with them, returned without
        assert counts(one["usage"]) == counts(plain["usage"])  # every candidate was generated
        two = complete(srv, n=2, best_of=5, logprobs=0).json()
        assert [c["text"] for c in two["choices"]] == [texts[i] for i in order[:2]]
        assert [c["index"] for c in two["choices"]] == [0, 1]
        got, want = two["choices"][0]["logprobs"], plain["choices"][order[0]]["logprobs"]
        assert got["tokens"] == want["tokens"] and got["text_offset"] == want["text_offset"]
        assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-5)  # batched apart: rounding
        both = complete(srv, prompt=["hello", "hello"], best_of=2).json()  # seeds 11, 12 | 13, 14: ranked per prompt
        assert [c["text"] for c in both["choices"]] == [texts[min(pair, key=lambda i: (-means[i], i))]
                                                        for pair in ((0, 1), (2, 3))]

        def error(**body) -> dict:
            r = complete(srv, **body)
            assert r.status_code == 400, r.text
            return r.json()["error"]

        assert error(n=3, best_of=2)["message"] == (
            "'best_of' (2) must be at least 'n' (3): best_of candidates are sampled and the n best returned.")
        assert error(best_of=3, stream=True)["param"] == "best_of"
        assert error(best_of=3, temperature=0)["param"] == "best_of"
        e = error(prompt=["a", "b", "c"], best_of=3)
        assert e["param"] == "best_of" and e["message"] == (
            "3 prompts x best_of=3 asks for 9 candidates; this server allows at most 6 per request.")
        assert complete(srv, n=2, best_of=2, stream=True).status_code == 200
