"""`chatforge serve`: flags -> a checked bind, a loaded Bot, the app (chatforge/serve/) run by uvicorn."""

from __future__ import annotations

import os

from chatforge.errors import ChatforgeError


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                  allow_insecure_public: bool = False, max_batch_size: int = 8, max_queue: int = 64,
                  max_tokens_cap: int = 4096, max_prompt_tokens: int = 0, max_n: int = 8,
                  max_body_bytes: int = 1_000_000, served_model_name: str | None = None,
                  cors_origin: list[str] | None = None, device: str = "auto", dtype: str | None = None,
                  quantize: str | None = None, guard: bool = True, guard_policy: str | None = None,
                  redact_pii: bool = True, key_file: str | None = None, passphrase: bool = False,
                  reward: str | None = None, best_of: int = 1, compile: bool = False,
                  kv_cache_dtype: str | None = None) -> int:
    """Serve a model with an OpenAI-compatible API (/v1/chat/completions, /v1/completions) and a chat page at /.

    Requests that arrive together are decoded together (continuous batching). Without an API key the server only
    listens on loopback.

    Args:
        model: model folder, .gguf file or known model name.
        host: address to listen on; anything but loopback needs an API key (or --allow-insecure-public).
        port: TCP port.
        api_key: require 'Authorization: Bearer KEY' on every endpoint but /health and the page's files; prefer the
            CHATFORGE_API_KEY environment variable (a command line is visible to other users of the machine).
        allow_insecure_public: listen on a non-loopback address without an API key (anyone who can reach it can use it).
        max_batch_size: sequences decoded together.
        max_queue: sequences that may wait for a slot beyond the batch; more are refused with 429.
        max_tokens_cap: the most tokens one reply may ask for (max_tokens).
        max_prompt_tokens: the most prompt tokens a request may send (0: the model's context length).
        max_n: the most choices (n) one request may ask for.
        max_body_bytes: the largest request body accepted (413 beyond).
        served_model_name: the model id clients send and the page's title; unset: the run's name for a training
            run's final/ or best/ folder, else the folder's (or file's, or known model's) name.
        cors_origin: browser origins allowed to call the API from other sites (CORS is off without it).
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: fp32, bf16 or fp16; unset: fp32 on CPU, bf16 on a GPU that supports it.
        quantize: int8-dyn, int8-wo or int4-wo (weight quantization; int4-wo: 4-bit groups of 32, the output head
            int8; CPU or CUDA).
        guard: check prompts and replies with the safety guard: a refused prompt is answered with the refusal and
            finish_reason content_filter, a flagged reply stops there; /v1/moderations (--no-guard: all off).
        guard_policy: a YAML/JSON guard policy (rules per category, refusal message).
        redact_pii: replace e-mail addresses, phone numbers, ID and card numbers, IBANs and IPs in replies, streamed
            ones included (--no-redact-pii: replies as generated).
        key_file: key of an encrypted model folder (base64, mode 0600); default: CHATFORGE_KEY. The model is
            decrypted into memory only.
        passphrase: the model was encrypted with a passphrase: CHATFORGE_PASSPHRASE, else asked for.
        reward: a reward model folder (trained with stage: reward): chat completions then accept best_of (that
            many candidates sampled, the n the reward model scores highest returned; not with stream=true).
        best_of: with --reward, the candidates a non-streamed, sampled chat completion gets when it does not set
            best_of (rejection sampling on every reply); 1: only requests that ask for it.
        compile: decode through a torch.compile'd step, compiled by a warm-up before the server listens (minutes the
            first time on a machine, then read from the disk cache); /health reports the warm-up seconds.
        kv_cache_dtype: fp32, bf16 or fp16 keys and values in the KV cache; unset: the model's dtype. bf16 halves an
            fp32 model's cache (SmolLM2-135M: 23 instead of 46 KiB a position and row); where bf16 is emulated
            (AVX2) batch-1 decode pays for it (int8-wo: 19.9 instead of 21.5 tokens/s, measured).
    """
    from chatforge.serve.app import check_best_of, check_limits, served_name
    from chatforge.serve.security import check_bind

    key = api_key or os.environ.get("CHATFORGE_API_KEY") or None
    check_bind(host, key, allow_insecure_public)  # before anything slow: a refusal should be instant
    if not 0 <= port <= 65535:
        raise ChatforgeError(f"serve: --port must be 0..65535, got {port}")
    check_limits(max_batch_size=max_batch_size, max_queue=max_queue, max_tokens_cap=max_tokens_cap, max_n=max_n,
                  max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, best_of=best_of)
    check_best_of(best_of, max_n, reward is not None)
    from chatforge.device import DTYPES

    if kv_cache_dtype is not None and kv_cache_dtype not in DTYPES:
        raise ChatforgeError(f"serve: --kv-cache-dtype must be one of {', '.join(DTYPES)}, got {kv_cache_dtype!r}")

    import uvicorn

    from chatforge.commands.chat import load_bot, output_chain
    from chatforge.serve.app import create_app

    chain = output_chain(guard, redact_pii, guard_policy)
    bot = load_bot(model, device=device, dtype=dtype, quantize=quantize, key_file=key_file, passphrase=passphrase,
                   max_batch_size=max_batch_size, compile=compile, kv_dtype=kv_cache_dtype)
    rm = None
    if reward is not None:
        from chatforge.weights.reward import load_reward_model

        rm = load_reward_model(reward, device=str(bot.engine.device))
    name = served_model_name or served_name(model)
    app = create_app(bot, model_name=name, api_key=key, max_queue=max_queue, max_tokens_cap=max_tokens_cap,
                     max_prompt_tokens=max_prompt_tokens, max_n=max_n, max_body_bytes=max_body_bytes,
                     cors_origin=cors_origin, output=chain if chain.active else None, reward=rm, best_of=best_of)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name!r} on http://{shown}:{port}/ (chat page at /, API at /v1; "
          f"API key {'required' if key else 'off'}; batch {max_batch_size}, queue {max_queue}; guard "
          f"{'on' if chain.guard else 'off'}, PII redaction {'on' if chain.scrubber else 'off'}; best_of "
          f"{f'by {reward} (default {best_of})' if rm else 'off'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False, server_header=False,
                timeout_graceful_shutdown=5)
    return 0
