"""The server's protocol, limits and security, checked over real HTTP against tiny real models on loopback."""

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from serve_support import REPLIES, build_models, counts, serve, sse_payloads

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def models():
    return build_models()


@pytest.fixture(scope="module")
def chat_server(models):
    with serve(models["chat"], max_tokens_cap=200, max_n=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer(models):
    from chatforge.tokenizer import Tokenizer

    return Tokenizer.load(models["chat"])


def ask(prompt: str, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "temperature": 0, **kw}


def post(srv, body, path=CHAT, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60, **kw)


# ------------------------------------------------------------------------------------------------ responses

def test_chat_completion_shape_and_usage(chat_server, tokenizer):
    r = post(chat_server, ask("hello", max_tokens=100, user="u1"))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    assert abs(body["created"] - time.time()) < 60
    (choice,) = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": REPLIES["hello"], "refusal": None},
                      "logprobs": None, "finish_reason": "stop"}
    prompt = tokenizer.render([{"role": "user", "content": "hello"}], add_generation_prompt=True)[0]
    reply = tokenizer.encode(REPLIES["hello"])
    # the end-of-turn token that stopped it is generated too, as OpenAI counts it
    assert counts(body["usage"]) == {"prompt_tokens": len(prompt), "completion_tokens": len(reply) + 1,
                                     "total_tokens": len(prompt) + len(reply) + 1}


def test_length_finish_and_max_completion_tokens(chat_server):
    body = post(chat_server, ask("hello", max_completion_tokens=3)).json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
    assert REPLIES["hello"].startswith(body["choices"][0]["message"]["content"])


def test_stream_framing_matches_openai(chat_server):
    r = post(chat_server, ask("hello", max_tokens=100, stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r.content)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert {c["id"] for c in events[:-1]} == {usage_chunk["id"]}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in events[:-1])
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                                     "logprobs": None, "finish_reason": None}]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    middle = chunks[1:-1]
    assert middle and all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == REPLIES["hello"]
    assert all(c["usage"] is None for c in chunks)  # as OpenAI sends when include_usage is on
    assert usage_chunk["choices"] == []
    full = post(chat_server, ask("hello", max_tokens=100)).json()
    assert counts(usage_chunk["usage"]) == counts(full["usage"])


def test_stream_without_usage_has_no_usage_field(chat_server):
    events = sse_payloads(post(chat_server, ask("hello", max_tokens=5, stream=True)).content)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_chinese_streams_whole_characters(chat_server, tokenizer):
    reply = REPLIES["你好"]
    ids = tokenizer.encode(reply)
    # the test means something only if characters really are split across tokens
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    events = sse_payloads(post(chat_server, ask("你好", max_tokens=100, stream=True)).content)
    pieces = [e["choices"][0]["delta"]["content"] for e in events[1:-2]]
    assert "".join(pieces) == reply
    assert all(p and "\ufffd" not in p for p in pieces)
    assert len(pieces) < len(ids)  # bytes of a character were held back until it was complete


def test_stop_string_across_tokens_never_leaks(chat_server, tokenizer):
    stop = "The weather"
    assert len(tokenizer.encode(stop)) > 1
    expected = REPLIES["hello"].split(stop)[0]
    events = sse_payloads(post(chat_server, ask("hello", max_tokens=100, stream=True, stop=stop)).content)
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[1:-1]]
    assert "".join(pieces) == expected  # not even "The" or "T" reached the client
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    body = post(chat_server, ask("hello", max_tokens=100, stop=["zzz", "nice"])).json()
    assert body["choices"][0]["message"]["content"] == REPLIES["hello"].split("nice")[0]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_n_choices_share_the_prompt_in_usage(chat_server):
    one = post(chat_server, ask("hello", max_tokens=4)).json()
    two = post(chat_server, ask("hello", max_tokens=4, n=3)).json()
    assert [c["index"] for c in two["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == one["choices"][0]["message"]["content"] for c in two["choices"])
    assert two["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert two["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    events = sse_payloads(post(chat_server, ask("hello", max_tokens=4, n=2, stream=True)).content)
    finished = sorted(e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["finish_reason"])
    assert finished == [0, 1]


def test_usage_reports_the_prompt_tokens_the_prefix_cache_served(chat_server, tokenizer):
    """prompt_tokens_details.cached_tokens, as OpenAI reports prompt caching: a prompt sharing a long system
    prompt with the request before it prefills only what is new (all but its last token comes from the cache)."""
    system = {"role": "system", "content": "You answer briefly and kindly, in plain words, every time. " * 3}

    def usage(text: str) -> dict:
        return post(chat_server, {"model": "tiny", "temperature": 0, "max_tokens": 4,
                                  "messages": [system, {"role": "user", "content": text}]}).json()["usage"]

    first, again = usage("hello"), usage("hello")
    assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"] - 1
    assert first["prompt_tokens_details"]["cached_tokens"] < again["prompt_tokens"] - 1
    shared = len(tokenizer.render([system], add_generation_prompt=False)[0])
    other = usage("what is the weather like today")
    assert shared <= other["prompt_tokens_details"]["cached_tokens"] < other["prompt_tokens"] - 1
    streamed = sse_payloads(post(chat_server, {"model": "tiny", "temperature": 0, "max_tokens": 4, "stream": True,
                                               "stream_options": {"include_usage": True},
                                               "messages": [system, {"role": "user", "content": "hello"}]}).content)
    assert shared <= streamed[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] < again["prompt_tokens"]


def test_content_parts_and_developer_role(chat_server):
    as_parts = post(chat_server, {"model": "tiny", "temperature": 0, "max_tokens": 100, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hello"}]}]}).json()
    assert as_parts["choices"][0]["message"]["content"] == REPLIES["hello"]
    replies = [post(chat_server, {"model": "tiny", "temperature": 0, "max_tokens": 8, "messages": [
        {"role": role, "content": "Be brief."}, {"role": "user", "content": "hello"}]}).json() for role in
        ("system", "developer")]
    assert counts(replies[0]["usage"]) == counts(replies[1]["usage"])  # developer is OpenAI's name for system
    assert replies[0]["choices"][0]["message"] == replies[1]["choices"][0]["message"]


def test_logprobs(chat_server):
    body = post(chat_server, ask("hello", max_tokens=6, logprobs=True, top_logprobs=3)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 6
    assert "".join(e["token"] for e in content) == body["choices"][0]["message"]["content"]
    for e in content:
        assert len(e["top_logprobs"]) == 3 and e["logprob"] <= 0
        assert e["top_logprobs"][0]["token"] == e["token"]  # greedy picks the most likely token
        assert e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
        assert bytes(e["bytes"]).decode() == e["token"]
    events = sse_payloads(post(chat_server, ask("hello", max_tokens=6, logprobs=True, stream=True)).content)
    streamed = [t for e in events[1:-2] for t in e["choices"][0]["logprobs"]["content"]]
    assert [t["token"] for t in streamed] == [t["token"] for t in content]
    assert all(t["top_logprobs"] == [] for t in streamed)


def test_completion_echo_takes_only_the_boolean_false(chat_server):
    """The schema's const false: 0 and 0.0 are refused (found by schemathesis); an integral logprobs 0.0 is fine."""
    base = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    for echo in (0, 0.0):
        r = post(chat_server, base | {"logprobs": 0.0, "echo": echo}, "/v1/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo", r.text
    assert post(chat_server, base | {"logprobs": 0.0, "echo": False}, "/v1/completions").status_code == 200


def test_legacy_completions(chat_server, tokenizer):
    body = post(chat_server, {"model": "tiny", "prompt": ["Hello", "你好"], "n": 2, "max_tokens": 5, "temperature": 0,
                              "logprobs": 2}, "/v1/completions").json()
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode("Hello")) + len(tokenizer.encode("你好"))
    assert body["usage"]["completion_tokens"] == 4 * 5
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert lp["text_offset"][0] == len("Hello") and all(len(t) == 2 for t in lp["top_logprobs"])
    events = sse_payloads(post(chat_server, {"model": "tiny", "prompt": "Hello", "max_tokens": 5, "temperature": 0,
                                             "stream": True}, "/v1/completions").content)
    assert events[-1] == "[DONE]" and events[0]["object"] == "text_completion"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == body["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_models_and_health(chat_server):
    assert httpx.get(chat_server.url + "/health").json() == {"status": "ok", "compiled_decode": False,
                                                             "warmup_s": None}
    models = httpx.get(chat_server.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(chat_server.url + "/v1/models/tiny").json()["id"] == "tiny"
    r = httpx.get(chat_server.url + "/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# ------------------------------------------------------------------------------------------------ errors

BAD_REQUESTS = [
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"uniqueItems": True}}}},
     "response_format.json_schema.schema"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"frobnicate": True}, "frobnicate"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "system"}, {"role": "user", "content": "hi"}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": "?"}]},
     "messages[1].content"),
    ({"max_tokens": 5.5}, "max_tokens"),
    ({"n": 0}, "n"), ({"n": 5}, "n"), ({"n": "2"}, "n"),
    ({"max_tokens": 201}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"seed": 2**70}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": 5}, "model"),
    ({"store": 0}, "store"), ({"store": 0.0}, "store"),  # JSON Schema's const false is not 0
]


def test_health_reports_a_compiled_decode_and_its_warm_up(models):
    """serve --compile: /health says the step runs compiled and how long the start-up warm-up took (the compile
    itself is lazy until a step runs, so none happens here)."""
    from chatforge.generation import decode
    from chatforge.serve.app import ServerThread, create_app

    from serve_support import load_bot

    bot = load_bot(models["chat"])
    decode.compile_decode(bot.model)
    bot.warmup_s = 12.5
    with ServerThread(create_app(bot, model_name="tiny")) as srv:
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "compiled_decode": True, "warmup_s": 12.5}


@pytest.mark.parametrize("change,param", BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
def test_invalid_requests_get_400_naming_the_parameter(chat_server, change, param):
    r = post(chat_server, ask("hello", max_tokens=5) | change)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param.split("[")[0].split(".")[-1] in error["message"]


def test_unsupported_parameter_message_says_it_is_unsupported(chat_server):
    error = post(chat_server, ask("hi") | {"functions": [{"name": "f"}]}).json()
    assert "not supported" in error["error"]["message"]
    # neutral values of those parameters are accepted (some clients always send them)
    ok = post(chat_server, ask("hello", max_tokens=2) | {"tools": None, "response_format": {"type": "text"},
                                                        "logit_bias": {}, "modalities": ["text"]})
    assert ok.status_code == 200


def test_integral_floats_are_integers(chat_server):
    """JSON has one number type and JSON Schema's integer includes 2.0, which some clients send for 2."""
    r = post(chat_server, ask("hello") | {"max_tokens": 2.0, "n": 1.0, "seed": 7.0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, "invalid_request"),
    (b"[1, 2]", 400, "invalid_request"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_request"),
    (b'{"model": "other", "messages": [{"role": "user", "content": "hi"}]}', 404, "model_not_found"),
])
def test_malformed_bodies(chat_server, body, status, code):
    r = httpx.post(chat_server.url + CHAT, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_prompt_longer_than_context_is_400_with_numbers(chat_server):
    r = post(chat_server, ask("hello " * 300, max_tokens=10))
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    n = error["message"].split()[1]  # the one prompt-budget message, as the CLI and Python give it
    assert error["message"] == f"prompt: {n} tokens + 10 new tokens = {int(n) + 10} exceed the context window of " \
                               f"256 tokens; shorten the prompt or ask for fewer new tokens"
    assert error["param"] == "messages"
    r = post(chat_server, ask("hello " * 300))  # without max_tokens: the prompt alone does not fit
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["message"] == f"prompt: {n} tokens leave no room for a reply in the context window " \
                                           f"of 256 tokens; shorten the prompt"


def test_body_size_cap(models):
    with serve(models["chat"], max_body_bytes=2000) as srv:
        big = ask("x" * 3000)
        r = post(srv, big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the cap is enforced while reading
            data = json.dumps(big).encode()
            for i in range(0, len(data), 500):
                yield data[i:i + 500]

        r = httpx.post(srv.url + CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert post(srv, ask("hello", max_tokens=2)).status_code == 200


def test_unknown_routes_and_methods_use_the_error_object(chat_server):
    r = httpx.get(chat_server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.delete(chat_server.url + CHAT)
    assert r.status_code == 405 and "POST" in r.headers["allow"] and "error" in r.json()


# ------------------------------------------------------------------------------------------------ batching

async def _concurrently(url: str, bodies: list[dict]) -> list[str]:
    async with httpx.AsyncClient(timeout=120) as client:
        responses = await asyncio.gather(*(client.post(url + CHAT, json=b) for b in bodies))
    return [r.json()["choices"][0]["message"]["content"] for r in responses]


def test_output_does_not_depend_on_the_batch(models):
    prompts = [f"question {i}: " + "why " * i for i in range(8)]  # different lengths, so different positions
    greedy = [ask(p, max_tokens=40) for p in prompts]
    seeded = [ask(p, max_tokens=40, temperature=1.0, seed=100 + i) for i, p in enumerate(prompts)]
    with serve(models["random"], max_batch_size=8) as srv:
        alone = [post(srv, b).json()["choices"][0]["message"]["content"] for b in greedy + seeded]
        assert srv.app.state.scheduler.peak_batch == 1
        together = asyncio.run(_concurrently(srv.url, greedy)) + asyncio.run(_concurrently(srv.url, seeded))
        assert srv.app.state.scheduler.peak_batch >= 4  # they really were decoded together
    assert together == alone


def test_no_state_leaks_between_requests(models):
    probe = ask("what did the last user say?", max_tokens=30)
    with serve(models["random"]) as srv:
        first = post(srv, probe).json()["choices"][0]["message"]["content"]
        post(srv, ask("my password is hunter2 " * 10, max_tokens=30))
        assert post(srv, probe).json()["choices"][0]["message"]["content"] == first


def test_client_disconnect_stops_generation(models):
    with serve(models["random"], slow=0.02) as srv:
        scheduler = srv.app.state.scheduler
        with httpx.stream("POST", srv.url + CHAT, json=ask("go on", max_tokens=200, stream=True)) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        deadline = time.monotonic() + 5
        while scheduler.outstanding and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.outstanding == 0
        generated = scheduler.generated_tokens
        time.sleep(0.3)
        assert scheduler.generated_tokens == generated < 100  # nothing more is decoded for the gone client
        with pytest.raises(httpx.ReadTimeout):  # the same for a client that gives up on a non-streamed reply
            httpx.post(srv.url + CHAT, json=ask("go on", max_tokens=200), timeout=0.5)
        deadline = time.monotonic() + 5
        while scheduler.outstanding and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.outstanding == 0 and scheduler.generated_tokens < generated + 100


def test_full_queue_is_429(models):
    with serve(models["random"], max_batch_size=1, max_queue=1, slow=0.02) as srv:
        with httpx.stream("POST", srv.url + CHAT, json=ask("a", max_tokens=200, stream=True)), \
                httpx.stream("POST", srv.url + CHAT, json=ask("b", max_tokens=200, stream=True)):
            deadline = time.monotonic() + 5
            while srv.app.state.scheduler.outstanding < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = post(srv, ask("c", max_tokens=5))
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            r = post(srv, ask("d", max_tokens=5, n=2))  # n counts: two sequences never fit a capacity of 2 in use
            assert r.status_code == 429
        deadline = time.monotonic() + 5
        while srv.app.state.scheduler.outstanding and time.monotonic() < deadline:
            time.sleep(0.02)
        assert post(srv, ask("c", max_tokens=5)).status_code == 200


# ------------------------------------------------------------------------------------------------ security

def test_api_key_on_every_endpoint_but_health_and_page(models, monkeypatch):
    import hmac

    from chatforge.serve import security

    compared, real = [], hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    with serve(models["chat"], api_key="k-123456") as srv:
        for method, path in [("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("POST", CHAT),
                             ("POST", "/v1/completions"), ("GET", "/openapi.json")]:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic k-123456"}):
                r = httpx.request(method, srv.url + path, headers=headers, json={})
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert (b"wrong", b"k-123456") in compared  # constant-time comparison
        good = {"authorization": "Bearer k-123456"}
        assert httpx.get(srv.url + "/v1/models", headers=good).status_code == 200
        assert post(srv, ask("hello", max_tokens=3), headers=good).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/").status_code == 200
        assert httpx.get(srv.url + "/static/app.js").status_code == 200
        assert "bearer" in httpx.get(srv.url + "/openapi.json", headers=good).json()["components"]["securitySchemes"]


def test_bind_check():
    from chatforge.errors import ChatforgeError
    from chatforge.serve.security import check_bind

    for host in ("127.0.0.1", "127.5.5.5", "::1", "[::1]", "localhost"):
        check_bind(host, None, False)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        with pytest.raises(ChatforgeError, match="without an API key"):
            check_bind(host, None, False)
        check_bind(host, "key", False)
        check_bind(host, None, True)


def _cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "chatforge.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


def test_cli_refuses_public_bind_without_key(models):
    p = _cli(models["chat"], "--host", "0.0.0.0")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert err.startswith("error: serve: refusing to listen on 0.0.0.0 without an API key")


def test_cli_refuses_an_unknown_kv_cache_dtype_before_loading(models):
    p = _cli(models["chat"], "--kv-cache-dtype", "int3")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert err == "error: serve: --kv-cache-dtype must be one of fp32, bf16, fp16, got 'int3'\n"


@pytest.mark.slow
def test_cli_serves_with_key_from_environment(models):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = _cli(models["chat"], "--port", str(port), "--served-model-name", "mine", env={"CHATFORGE_API_KEY": "env-key"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() else "timeout"
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        models_list = httpx.get(url + "/v1/models", headers={"authorization": "Bearer env-key"}).json()
        assert models_list["data"][0]["id"] == "mine"
    finally:
        p.terminate()
        p.communicate(timeout=30)


def test_cors_is_off_unless_an_origin_is_given(models, chat_server):
    origin = {"origin": "http://elsewhere.example"}
    r = httpx.get(chat_server.url + "/v1/models", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    preflight = {**origin, "access-control-request-method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(chat_server.url + CHAT, headers=preflight).headers
    with serve(models["chat"], cors_origin=["http://app.example"]) as srv:
        ok = httpx.options(srv.url + CHAT, headers={**preflight, "origin": "http://app.example"})
        assert ok.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(srv.url + CHAT, headers=preflight)
        assert "access-control-allow-origin" not in other.headers


def test_page_is_self_contained_and_locked_down(chat_server):
    import re

    r = httpx.get(chat_server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"<script(?![^>]*\bsrc=)", r.text), "no inline script"
    assert not re.search(r"(src|href)=\"(https?:)?//", r.text), "nothing from other sites"
    js = httpx.get(chat_server.url + "/static/app.js").text
    # never raw HTML from a string, nothing taken from the URL
    assert not re.search(r"\.(inner|outer)HTML|insertAdjacentHTML|document\.write|\blocation\b|\beval\(", js)
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/index.html", "/static/..%2fschemas.py"):
        assert httpx.get(chat_server.url + path).status_code == 404, path


# ------------------------------------------------------------------------------------------------ names and messages

def test_model_is_optional_with_one_served_model(chat_server):
    body = ask("hello", max_tokens=100)
    del body["model"]
    r = post(chat_server, body)
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    assert r.json()["choices"][0]["message"]["content"] == REPLIES["hello"]
    r = post(chat_server, {"prompt": "Hello", "max_tokens": 3}, "/v1/completions")
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    assert post(chat_server, ask("hello") | {"model": "other"}).status_code == 404  # a wrong name is still wrong


def test_five_stop_strings_say_at_most_four(chat_server):
    error = post(chat_server, ask("hello", stop=["a", "b", "c", "d", "e"])).json()["error"]
    assert (error["message"], error["param"]) == ("Invalid value for 'stop': at most 4 stop strings, got 5.", "stop")


def test_served_name_comes_from_the_run(tmp_path):
    from chatforge.serve.app import served_name

    for folder in ("shop/final", "shop/best", "imported"):
        (tmp_path / folder).mkdir(parents=True)
    assert served_name(str(tmp_path / "shop" / "final")) == "shop"
    assert served_name(str(tmp_path / "shop" / "final") + "/") == "shop"
    assert served_name(str(tmp_path / "shop" / "best")) == "shop-best"
    assert served_name(str(tmp_path / "imported")) == "imported"
    assert served_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert served_name("models/SmolLM2-135M.Q4_1.gguf") == "SmolLM2-135M.Q4_1"


def test_page_title_names_the_served_model(chat_server):
    assert "<title>tiny · chatforge</title>" in httpx.get(chat_server.url + "/").text
