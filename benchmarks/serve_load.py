"""Serving under load: aggregate generated tokens/s and time to first token with 1, 4 and 16 concurrent streaming clients.

Starts `chatforge serve` in its own process on loopback (a random "nano" model unless --model is given), then runs
each concurrency level on the same work: --requests streaming chat requests with distinct prompts, shared out among
the clients, each client sending its share one after another. Every reply is checked against the same request answered alone beforehand (greedy, so it must be identical):
a server that drops or truncates some of many concurrent streams fails here, not just in speed.

    python benchmarks/serve_load.py                 # prints the table; exit 1 if a reply is incomplete or 16 clients
                                                    # get less than 3x the tokens/s of one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SPEEDUP = 3.0


def build_model(folder: Path, preset: str) -> None:
    """A random model of the given preset with a small trained tokenizer: speed does not depend on the weights."""
    import random

    import torch

    from chatforge.weights.folder import save_model
    from chatforge.model.gpt import GPT, config_from_preset
    from chatforge.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = ("the a model token server client stream batch reply chat fast slow tell me about how why what when "
             "weather today good day hello there thanks please code python story time").split()
    texts = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(2000)]
    tok = train_tokenizer(texts, vocab_size=1024, min_frequency=2)
    torch.manual_seed(0)
    save_model(GPT(config_from_preset(preset, vocab_size=tok.vocab_size)), tok, folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch_size: int, dtype: str | None,
                 threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "chatforge.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", "--max-batch-size", str(max_batch_size), "--max-queue", "64"]
    if dtype:
        cmd += ["--dtype", dtype]
    env = {k: v for k, v in os.environ.items() if k != "CHATFORGE_API_KEY"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server process
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start in time")


def body(prompt: str, max_tokens: int, stream: bool) -> dict:
    b = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
         "temperature": 0}
    if stream:
        b |= {"stream": True, "stream_options": {"include_usage": True}}
    return b


async def stream_one(client, url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming request: its text, token count (from usage), time to first token and whether it ended properly."""
    start = time.perf_counter()
    ttft, text, usage, finish, done = None, [], None, None, False
    async with client.stream("POST", url + "/v1/chat/completions", json=body(prompt, max_tokens, True)) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}", "text": "", "tokens": 0, "ttft": None}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(piece)
                finish = choice.get("finish_reason") or finish
    return {"ok": done and finish is not None and usage is not None, "text": "".join(text),
            "tokens": usage["completion_tokens"] if usage else 0, "ttft": ttft}


async def run_level(url: str, clients: int, per_client: int, max_tokens: int, prompts: list[str],
                    timeout: float) -> tuple[float, list[dict]]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one_client(c: int) -> list[dict]:
            out = []
            for r in range(per_client):
                prompt = prompts[(c * per_client + r) % len(prompts)]
                result = await stream_one(client, url, prompt, max_tokens)
                result["prompt"] = prompt
                out.append(result)
            return out

        start = time.perf_counter()
        per_client = await asyncio.wait_for(asyncio.gather(*(one_client(c) for c in range(clients))), timeout)
        wall = time.perf_counter() - start
    return wall, [r for rs in per_client for r in rs]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: a random model of --preset)")
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    ap.add_argument("--requests", type=int, default=48, help="requests per level, shared out among its clients")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--server-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="torch threads of the server; the default leaves half the CPUs to the load generator, "
                         "which runs on the same machine (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per level")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / args.preset)
            build_model(Path(model), args.preset)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(model, port, args.max_batch_size, args.dtype, args.server_threads)
        try:
            wait_ready(url, proc)
            prompts = [f"request {i}: tell me about " + "the weather " * (i % 7) for i in range(args.requests)]
            # Reference replies, one request at a time (also warms the server up).
            reference = {}
            with httpx.Client(timeout=args.timeout) as c:
                for p in prompts:
                    r = c.post(url + "/v1/chat/completions", json=body(p, args.max_tokens, False)).json()
                    reference[p] = r["choices"][0]["message"]["content"]
            rows = []
            for clients in levels:
                wall, results = asyncio.run(run_level(url, clients, max(1, args.requests // clients),
                                                      args.max_tokens, prompts, args.timeout))
                complete = sum(r["ok"] and r["text"] == reference[r["prompt"]] for r in results)
                tokens = sum(r["tokens"] for r in results)
                ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
                rows.append({"clients": clients, "requests": len(results), "complete": complete, "tokens": tokens,
                             "wall": wall, "tok_s": tokens / wall, "p50": percentile(ttfts, 0.5) * 1000,
                             "p95": percentile(ttfts, 0.95) * 1000})
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"model: {args.model or 'random ' + args.preset}, max_tokens {args.max_tokens}, greedy, "
          f"{args.requests} streaming requests per level, server batch {args.max_batch_size}, "
          f"{args.server_threads or 'default'} server threads, {os.cpu_count()} CPUs, loopback")
    print("| clients | requests | complete replies | tokens | wall s | aggregate tok/s | p50 TTFT ms | p95 TTFT ms |")
    print("|--------:|---------:|-----------------:|-------:|-------:|----------------:|------------:|------------:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['complete']}/{r['requests']} | {r['tokens']} | "
              f"{r['wall']:.2f} | {r['tok_s']:.0f} | {r['p50']:.0f} | {r['p95']:.0f} |")
    failed = any(r["complete"] != r["requests"] for r in rows)
    by = {r["clients"]: r for r in rows}
    if 1 in by and max(levels) > 1:
        top = max(levels)
        speedup = by[top]["tok_s"] / by[1]["tok_s"]
        verdict = "ok" if speedup >= TARGET_SPEEDUP else f"BELOW the {TARGET_SPEEDUP:.0f}x target"
        print(f"\n{top} clients vs 1: {speedup:.1f}x aggregate tokens/s ({verdict})")
        failed |= speedup < TARGET_SPEEDUP
    if failed:
        print("FAILED: incomplete replies or too little speedup", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
