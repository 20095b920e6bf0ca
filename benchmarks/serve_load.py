"""Serving under load: aggregate generated tokens/s and time to first token with 1, 4, 16 and 64 concurrent streaming
clients, and the server's peak resident memory.

Starts `chatforge serve` in its own process on loopback (a random "nano" model unless --model is given), then runs
each concurrency level for about --duration seconds: every client sends streaming chat requests one after another
(closed loop), over --prompts distinct prompts (a shared system prompt, then a question). A reply is complete when its stream ends
properly ([DONE], a finish_reason, usage counting its tokens); it is also compared with the same request answered
alone beforehand (greedy): in fp32 it must be identical; in bf16 a batch's different rounding may change a
near-tied token, so that column is reported, not required. A refused request (429) counts as refused, not complete.

    python benchmarks/serve_load.py --model smollm2-135m-instruct --dtype bf16
        # prints the table; exit 1 if a reply is incomplete or refused, or 16 clients get less than 8x the
        # aggregate tokens/s of one
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

TARGET_SPEEDUP = 8.0  # 16 clients against 1 (issue 10)
TARGET_LEVEL = 16
SYSTEM = "You are a helpful assistant who answers questions about the weather in a friendly, concise way."
QUESTIONS = ["tell me about the weather today", "will it rain tomorrow", "what should I wear when it is cold",
             "why is the sky blue", "how do clouds form", "what is a heat wave", "is it windy at the coast",
             "how hot is the desert at night", "what causes thunder", "when does snow fall",
             "how do I read a weather map", "what is humidity", "why are sunsets red", "what is fog",
             "how fast is a hurricane", "what is a rainbow made of"]


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


def start_server(model: str, port: int, max_batch_size: int, max_queue: int, dtype: str | None,
                 quantize: str | None, threads: int | None, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "chatforge.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", "--max-batch-size", str(max_batch_size), "--max-queue", str(max_queue),
           *extra]
    if dtype:
        cmd += ["--dtype", dtype]
    if quantize:
        cmd += ["--quantize", quantize]
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


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def body(prompt: str, max_tokens: int, stream: bool) -> dict:
    b = {"model": "bench", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
         "max_tokens": max_tokens, "temperature": 0}
    if stream:
        b |= {"stream": True, "stream_options": {"include_usage": True}}
    return b


async def stream_one(client, url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming request: its text, token count (from usage), time to first token and whether it ended properly."""
    start = time.perf_counter()
    ttft, text, usage, finish, done = None, [], None, None, False
    async with client.stream("POST", url + "/v1/chat/completions", json=body(prompt, max_tokens, True)) as r:
        if r.status_code != 200:
            return {"ok": False, "refused": r.status_code == 429, "text": "", "tokens": 0, "ttft": None}
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
    return {"ok": done and finish is not None and usage is not None, "refused": False, "text": "".join(text),
            "tokens": usage["completion_tokens"] if usage else 0, "ttft": ttft}


async def run_level(url: str, clients: int, duration: float, max_tokens: int, prompts: list[str],
                    timeout: float) -> tuple[float, list[dict]]:
    """Closed loop: every client sends requests one after another until `duration` seconds have passed (at least
    one each), so the server's batch stays as full as the clients make it; the wall time includes the last replies."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one_client(c: int) -> list[dict]:
            out = []
            while not out or time.perf_counter() - start < duration:
                prompt = prompts[(c + len(out)) % len(prompts)]  # each client walks the list from its own start
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
    ap.add_argument("--model", help="model folder or known name, e.g. smollm2-135m-instruct (default: a random "
                                    "model of --preset)")
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--clients", default="1,4,16,64", help="concurrency levels, comma-separated")
    ap.add_argument("--duration", type=float, default=30,
                    help="seconds per level: each client sends requests one after another until then")
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts (each answered alone first)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quantize", default=None, help="int8-wo, int8-dyn, ... (chatforge serve --quantize)")
    ap.add_argument("--kv-cache-dtype", default=None, help="chatforge serve --kv-cache-dtype (default: the model's)")
    ap.add_argument("--no-guard", action="store_true",
                    help="serve with --no-guard (the guard holds back a reply's first letters until they are safe, "
                         "which the time to first content includes)")
    ap.add_argument("--server-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="torch threads of the server; the default leaves half the CPUs to the load generator, "
                         "which runs on the same machine (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per level")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    exact = args.dtype in (None, "fp32") and not args.quantize  # bf16 batches may round a near-tie differently

    import httpx

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / args.preset)
            build_model(Path(model), args.preset)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(model, port, args.max_batch_size, args.max_queue, args.dtype, args.quantize,
                            args.server_threads, (["--no-guard"] if args.no_guard else [])
                            + (["--kv-cache-dtype", args.kv_cache_dtype] if args.kv_cache_dtype else []))
        try:
            wait_ready(url, proc)
            rss_idle = peak_rss_mib(proc.pid)
            prompts = [QUESTIONS[i % len(QUESTIONS)] + (f" (question {i})" if i >= len(QUESTIONS) else "")
                       for i in range(args.prompts)]
            # Reference replies, one request at a time (also warms the server up).
            reference = {}
            with httpx.Client(timeout=args.timeout) as c:
                for p in prompts:
                    r = c.post(url + "/v1/chat/completions", json=body(p, args.max_tokens, False)).json()
                    reference[p] = r["choices"][0]["message"]["content"]
            rows = []
            for clients in levels:
                load = os.getloadavg()[0]
                wall, results = asyncio.run(run_level(url, clients, args.duration, args.max_tokens, prompts,
                                                      args.timeout))
                tokens = sum(r["tokens"] for r in results)
                ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
                rows.append({"clients": clients, "requests": len(results), "complete": sum(r["ok"] for r in results),
                             "same": sum(r["ok"] and r["text"] == reference[r["prompt"]] for r in results),
                             "refused": sum(r["refused"] for r in results), "tokens": tokens, "wall": wall,
                             "tok_s": tokens / wall, "p50": percentile(ttfts, 0.5) * 1000,
                             "p95": percentile(ttfts, 0.95) * 1000, "load": load})
            rss_peak = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    load_after = os.getloadavg()
    print(f"model: {args.model or 'random ' + args.preset}, dtype {args.dtype or 'default'}, quantize "
          f"{args.quantize or 'none'}, kv cache {args.kv_cache_dtype or 'model dtype'}, max_tokens {args.max_tokens}, greedy, {args.prompts} distinct prompts, {args.duration:.0f} s per level, "
          f"guard {'off' if args.no_guard else 'on'}, server "
          f"batch {args.max_batch_size} queue {args.max_queue}, {args.server_threads or 'default'} server threads, "
          f"{os.cpu_count()} CPUs, loopback; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print("| clients | requests | complete | refused | same as alone | tokens | wall s | aggregate tok/s | "
          "vs 1 client | p50 TTFT ms | p95 TTFT ms | load avg |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    by = {r["clients"]: r for r in rows}
    for r in rows:
        ratio = f"{r['tok_s'] / by[1]['tok_s']:.1f}x" if 1 in by else "-"
        print(f"| {r['clients']} | {r['requests']} | {r['complete']}/{r['requests']} | {r['refused']} | "
              f"{r['same']}/{r['requests']} | {r['tokens']} | {r['wall']:.2f} | {r['tok_s']:.1f} | {ratio} | "
              f"{r['p50']:.0f} | {r['p95']:.0f} | {r['load']:.1f} |")
    print(f"\nserver peak RSS (VmHWM): {rss_idle:.0f} MiB after load, {rss_peak:.0f} MiB after the run")
    failed = any(r["complete"] != r["requests"] or r["refused"] for r in rows)
    if exact:
        failed |= any(r["same"] != r["requests"] for r in rows)
    if 1 in by and TARGET_LEVEL in by:
        speedup = by[TARGET_LEVEL]["tok_s"] / by[1]["tok_s"]
        verdict = "ok" if speedup >= TARGET_SPEEDUP else f"BELOW the {TARGET_SPEEDUP:.0f}x target"
        print(f"{TARGET_LEVEL} clients vs 1: {speedup:.1f}x aggregate tokens/s ({verdict})")
        failed |= speedup < TARGET_SPEEDUP
    if failed:
        print("FAILED: incomplete, refused or (fp32) different replies, or too little speedup", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
