"""The server against real clients: the official `openai` package over loopback, and schemathesis on our schema."""

import os
import threading
import time

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from serve_support import REPLIES, build_models, serve

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def models():
    return build_models()


@pytest.fixture(scope="module")
def server(models):
    with serve(models["chat"], max_tokens_cap=100) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=50, user="alice")
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.content == REPLIES["hello"] and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0


def test_stream_with_usage(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                            temperature=0, max_tokens=60, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLIES["你好"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                          temperature=0, max_tokens=60)
    assert chunks[-1].usage.model_dump(exclude={"prompt_tokens_details"}) == \
        full.usage.model_dump(exclude={"prompt_tokens_details"})  # the second prompt came from the prefix cache


def test_n_choices(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, n=2, temperature=0, max_tokens=50)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [REPLIES["hello"]] * 2
    one = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=50)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    assert r.usage.completion_tokens == 2 * one.usage.completion_tokens


def test_stop(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=50, stop="weather")
    assert r.choices[0].message.content == "Hello there! The " and r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=50,
                                            stop=["nice", "zzz"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello there! The weather is "


def test_seed_reproducibility(models):
    with serve(models["random"]) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)

        def sample(seed, n=1):
            r = c.chat.completions.create(model="tiny", messages=HELLO, temperature=1.0, max_tokens=30, seed=seed,
                                          n=n)
            return [ch.message.content for ch in r.choices]

        first = sample(7)
        assert sample(7) == first
        assert sample(8) != first
        assert sample(7, n=2) == first + sample(8)  # choice i is seeded with seed + i
        assert c.completions.create(model="tiny", prompt="Hi", max_tokens=20, seed=3).choices[0].text == \
            c.completions.create(model="tiny", prompt="Hi", max_tokens=20, seed=3).choices[0].text


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "chatforge"


def test_completions(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=1)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert len(r.choices[0].logprobs.tokens) == 5 and r.usage.completion_tokens == 5


def test_error_statuses(models, server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, tools=[
            {"type": "function", "function": {"name": "get weather", "parameters": {"type": "object"}}}])
    assert e.value.param == "tools[0].function.name"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 400}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 1_100_000}])
    assert e.value.status_code == 413
    with serve(models["chat"], api_key="right-key") as srv:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong-key", max_retries=0).models.list()
        assert openai.OpenAI(base_url=srv.url + "/v1", api_key="right-key").models.list().data[0].id == "tiny"


def test_rate_limited_when_the_queue_is_full(models):
    with serve(models["random"], max_batch_size=1, max_queue=1, slow=0.02) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        streams = [c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=200, stream=True)
                   for _ in range(2)]  # one decoding, one waiting: the capacity
        deadline = time.monotonic() + 5
        while srv.app.state.scheduler.outstanding < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5)
        assert e.value.code == "rate_limit_exceeded"
        for s in streams:
            s.close()


def test_every_concurrent_stream_gets_its_whole_reply(models):
    """A common server bug sends all but one of many concurrent streams nothing; here each gets all it asked for."""
    with serve(models["random"], max_batch_size=16) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        expected = {}
        for i in range(16):
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"client {i}"}],
                                          temperature=0, max_tokens=25)
            expected[i] = r.choices[0].message.content
        got = {}

        def client_thread(i):
            stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"client {i}"}],
                                               temperature=0, max_tokens=25, stream=True)
            got[i] = "".join(ch.choices[0].delta.content or "" for ch in stream)

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == expected
        assert srv.app.state.scheduler.peak_batch >= 4


# ------------------------------------------------------------------------------------------------ schemathesis

@pytest.fixture(scope="module")
def api_schema(models):
    from chatforge.serve.app import create_app
    from serve_support import load_bot

    # Small caps keep each generated request fast; they are part of the schema, so generated requests respect them.
    app = create_app(load_bot(models["random"]), model_name="tiny", max_tokens_cap=8, max_n=2)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schema_conformance(api_schema, mode):
    """Generated requests (valid ones, and ones that break the schema) against every operation of our schema.

    Every default check runs (no 5xx, documented status codes and content types, responses matching their schemas,
    schema-breaking requests refused) except positive_data_acceptance: a valid request may still be refused with 400
    for what JSON Schema cannot express, such as a prompt longer than the model's context.
    CHATFORGE_SCHEMA_EXAMPLES=500 searches harder (30 examples per operation by default).
    """
    from hypothesis import given

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health"}
    statuses = {}

    def served_model(case):
        # Valid requests name the served model, so they reach the engine instead of stopping at 404.
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"
        return case

    for op in operations:
        if mode == "negative" and op.method.upper() == "GET":
            continue  # no body and no constrained parameter: nothing there can break the schema
        strategy = op.as_strategy(schemathesis.GenerationMode(mode))

        @given(case=strategy.map(served_model) if mode == "positive" else strategy)
        @settings(max_examples=int(os.environ.get("CHATFORGE_SCHEMA_EXAMPLES", "30")), deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
            statuses.setdefault(op.path, set()).add(response.status_code)

        check()
    if mode == "positive":
        assert 200 in statuses["/v1/chat/completions"] and 200 in statuses["/v1/completions"], statuses
        # The schema's own example requests (plain, streamed with usage and logprobs, sampled with n) must all work
        # and their replies, every streamed event included, must match the documented response schemas.
        for op in operations:
            content = api_schema.raw_schema["paths"][op.path][op.method.lower()].get("requestBody", {})
            examples = content.get("content", {}).get("application/json", {}).get("examples", {})
            for name, example in examples.items():
                response = op.Case(body=example["value"], media_type="application/json").call_and_validate()
                expected = "text/event-stream" if example["value"].get("stream") else "application/json"
                assert response.status_code == 200 and response.headers["content-type"][0].startswith(expected), name
    else:
        assert statuses["/v1/chat/completions"] <= {400, 404, 413}, statuses
