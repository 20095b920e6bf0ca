"""Decode speed of SmolLM2-135M-Instruct per lever, beside transformers and llama.cpp, in one run.

A ~170-token chat prompt, 128 greedy tokens. For each row: first-token latency (prefill + first token), decode
tokens/s at batch 1 and at batch 8 (aggregate, after the prefills), and peak RSS. Each row runs in its own process
(one after another, same threads), so peak RSS is that row's alone; the machine is shared and noisy, so compare
rows of the same run only, as ratios. chatforge rows go through the engine (sampling and streaming included):
fp32, bf16, int8 weight-only and int8 dynamic (torchao), int4 weight-only (groups of 32: torch's CPU kernel), each
eager or compiled (decode.compile_decode, frozen).
transformers runs the same weights (the folder chatforge converted from the packaged GGUF); llama.cpp
(llama-cpp-python, the `bench` extra) runs the packaged Q4_1 GGUF itself, at batch 1 only. On a CPU with AMX
(Sapphire Rapids and later) a native llama-cpp-python 0.3.36 build segfaults in its AMX backend on any prompt of two
tokens or more (ggml-org/llama.cpp#20824); build it without AMX (its batch-1 decode runs on AVX-512 VNNI either way):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON
      -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF
      -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install --force-reinstall --no-deps "llama-cpp-python==0.3.36"

    python benchmarks/decode_speed.py                       # every row
    python benchmarks/decode_speed.py --rows bf16,int8-dyn+compile,llama.cpp --threads 2
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time

MODEL = "smollm2-135m-instruct"
ROWS = ["transformers-fp32", "transformers-bf16", "fp32", "bf16", "bf16+compile", "int8-wo", "int8-wo+compile",
        "int8-dyn", "int8-dyn+compile", "int4-wo", "int4-wo+compile", "llama.cpp"]
SYSTEM = ("You are a patient, precise assistant for a small bakery. You answer in plain English, in full sentences, "
          "without lists or headings, and you never invent prices, opening hours or ingredients that the customer "
          "has not been told about. When you are unsure, you say so and suggest asking the staff in the shop.")
USER = ("Hello! My daughter turns seven next Saturday and she has asked for a chocolate cake shaped like a cat. "
        "We will have about twelve children and six adults at the party, and two of the children cannot eat nuts. "
        "Could you tell me, in a long and friendly answer, how you would plan the cake, how big it should be, how "
        "to keep it safe for the children with nut allergies, and what we should ask the bakery when we order it? "
        "Please also write a short, cheerful message we could put on the cake.")


def prompt_ids():
    from chatforge.weights.loader import load_tokenizer

    tok = load_tokenizer(MODEL)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    return tok.render(messages, add_generation_prompt=True)[0]


def peak_rss_mib() -> float:
    """This process's peak (VmHWM): getrusage's ru_maxrss survives fork + exec, so it could be the parent's."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def run_chatforge(row: str, new_tokens: int, batch8: bool) -> dict:
    import torch

    from chatforge.generation import decode
    from chatforge.generation.engine import Engine, SamplingParams
    from chatforge.weights.loader import load

    lever, _, compiled = row.partition("+")
    # quantized rows keep their activations in bf16 where this CPU computes it natively, else in fp32
    dtype = lever if lever in ("fp32", "bf16") else "auto"
    # quantized as chat and serve load it (on CPU: while reading, so the fp32 weights are never all resident)
    loaded = load(MODEL, dtype=dtype, quantize=lever if lever.startswith("int") else None)
    model, tok = loaded.model, loaded.tokenizer
    ids = prompt_ids()
    # No prefix cache (every timed request repeats the prompt, which would otherwise be prefilled only once) and no
    # chunked prefill (all prompts prefill in the first, untimed step), so b8 is decode alone, as transformers' is.
    # Without b8 the engine has one row, as `chatforge chat` does (8 rows would put each b1 run on the next row).
    rows = 8 if batch8 else 1
    engine = Engine(model, tok, max_batch_size=rows, prefix_cache=False, prefill_chunk=None)
    out = {}
    if compiled:
        decode.compile_decode(model)
        # Warm every kv bucket the timed runs reach (prompt + new tokens), one bucket per call so that each
        # bucket's compile time shows; the graphs match the engine's cache (rows, context length).
        reach, bucket = len(ids) + new_tokens, decode.KV_BUCKET
        out["compile_s"] = [decode.warmup(model, batch_sizes=(1, 8) if batch8 else (1,), rows=rows,
                                          max_len=engine.context_length, reach=min(r, reach))
                            for r in range(bucket, reach + bucket, bucket)]
        out["warmup_s"] = sum(out["compile_s"])

    def timed(batch: int) -> tuple[float, float, int]:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
        for _ in range(batch):
            engine.add_request(ids, params)
        t0 = time.perf_counter()
        events = engine.step()  # the prefills and each row's first token
        n = len(events)
        t1 = time.perf_counter()
        while engine.has_work():
            new = engine.step()
            n += len(new)
            events += new
        t2 = time.perf_counter()
        if batch == 1:
            out["ids_b1"] = [t for _, d in events for t in d.token_ids]
        return t1 - t0, (n - batch) / (t2 - t1), n // batch

    with torch.inference_mode():
        timed(1)  # warm caches and allocator
        out["first_token_s"], out["tok_s_b1"], out["tokens_b1"] = timed(1)
        if batch8:
            _, out["tok_s_b8"], out["tokens_b8"] = timed(8)
    return out


def run_transformers(row: str, new_tokens: int, batch8: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from chatforge.weights.loader import model_folder, resolve

    dtype = torch.float32 if row.endswith("fp32") else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_folder(resolve(MODEL)), dtype=dtype).eval()
    ids = torch.tensor([prompt_ids()])
    out = {}

    def gen(x, n):
        t0 = time.perf_counter()
        model.generate(x, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        return time.perf_counter() - t0

    with torch.inference_mode():
        gen(ids, 2)
        out["first_token_s"] = gen(ids, 1)
        out["tok_s_b1"] = (new_tokens - 1) / (gen(ids, new_tokens) - out["first_token_s"])
        out["tokens_b1"] = new_tokens
        if batch8:
            x = ids.expand(8, -1)
            first = gen(x, 1)
            out["tok_s_b8"] = 8 * (new_tokens - 1) / (gen(x, new_tokens) - first)
            out["tokens_b8"] = new_tokens
    return out


def run_llama_cpp(row: str, new_tokens: int, batch8: bool, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from chatforge.weights.gguf import find_packaged_gguf

    ids = prompt_ids()
    llm = Llama(model_path=find_packaged_gguf(MODEL), n_ctx=1024, n_batch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)

    def once() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return t1 - t0, (new_tokens - 1) / (time.perf_counter() - t1)

    once()
    first, rate = once()
    return {"first_token_s": first, "tok_s_b1": rate, "tokens_b1": new_tokens}


def run_row(row: str, new_tokens: int, batch8: bool, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    if row == "llama.cpp":
        out = run_llama_cpp(row, new_tokens, batch8, threads)
    elif row.startswith("transformers"):
        out = run_transformers(row, new_tokens, batch8)
    else:
        out = run_chatforge(row, new_tokens, batch8)
    return out | {"peak_rss_mib": peak_rss_mib()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-batch8", action="store_true")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # run one row in this process and print its JSON
    args = ap.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.new_tokens, not args.no_batch8, args.threads)))
        return 0
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows: {', '.join(unknown)}")
    import torch

    from chatforge.device import bf16_supported

    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"SmolLM2-135M-Instruct, {len(prompt_ids())}-token prompt, {args.new_tokens} greedy tokens, "
          f"{args.threads} threads; load: {open('/proc/loadavg').read().split()[0]}; CPU: {cpu} "
          f"(bf16 {'native' if bf16_supported(torch.device('cpu')) else 'emulated: int rows run fp32'})", flush=True)
    results = {}
    for row in rows:
        cmd = [sys.executable, __file__, "--row", row, "--new-tokens", str(args.new_tokens),
               "--threads", str(args.threads)] + (["--no-batch8"] if args.no_batch8 else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            if proc.returncode < 0:  # killed by a signal: a segfault leaves no Python error behind
                last = f"killed by {signal.Signals(-proc.returncode).name}" + \
                    ("; on an AMX CPU build llama-cpp-python without AMX (this script's docstring)"
                     if row == "llama.cpp" else "")
            print(f"{row}: failed ({last[:160]})", flush=True)
            continue
        results[row] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{row}: {results[row]}", file=sys.stderr, flush=True)
    ref_tf = results.get("transformers-fp32", {})
    ref_ll = results.get("llama.cpp", {})
    head = (f"{'row':<18} {'first tok ms':>12} {'b1 tok/s':>9} {'b8 tok/s':>9} {'RSS MiB':>8} {'warmup s':>8} "
            f"{'b1 vs tf32':>10} {'b1 vs llama':>11} {'first vs llama':>14}")
    print(head)
    print("-" * len(head))
    for row, r in results.items():
        b8 = r.get("tok_s_b8")
        cells = [f"{row:<18}", f"{r['first_token_s'] * 1e3:>12.1f}", f"{r['tok_s_b1']:>9.1f}",
                 f"{b8:>9.1f}" if b8 else f"{'-':>9}", f"{r['peak_rss_mib']:>8.0f}",
                 f"{r['warmup_s']:>8.1f}" if "warmup_s" in r else f"{'-':>8}",
                 f"{r['tok_s_b1'] / ref_tf['tok_s_b1']:>9.2f}x" if ref_tf else f"{'-':>10}",
                 f"{r['tok_s_b1'] / ref_ll['tok_s_b1']:>10.2f}x" if ref_ll else f"{'-':>11}",
                 f"{r['first_token_s'] / ref_ll['first_token_s']:>13.2f}x" if ref_ll else f"{'-':>14}"]
        print(" ".join(cells))
    compiled = {row: " + ".join(f"{t:.0f}" for t in r["compile_s"]) for row, r in results.items() if "compile_s" in r}
    if compiled:
        from chatforge.generation.decode import KV_BUCKET

        print(f"warm-up seconds per kv bucket of {KV_BUCKET} slots (a compile, or a load from the disk cache): "
              f"{compiled}")
    groups: dict[tuple, list[str]] = {}  # rows by the greedy b1 tokens they produced
    for row, r in results.items():
        groups.setdefault(tuple(r.get("ids_b1") or [row]), []).append(row)
    if len(groups) > 1:
        print("rows with the same greedy b1 tokens: " + "; ".join(", ".join(g) for g in groups.values()))
    short = {row: (r["tokens_b1"], r.get("tokens_b8")) for row, r in results.items()
             if r["tokens_b1"] < args.new_tokens}
    if short:
        print(f"rows that stopped early (end of turn): {short}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
