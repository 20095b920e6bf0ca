"""Tool calling on real weights: SmolLM2-135M-Instruct on examples/tools (order status, opening hours, booking),
with and without constrained decoding, and what the constraint costs per decoded token.

Quality, greedy, the tools rendered into the prompt as the server does (generation/tools.py):
  free      no constraint: the model's own text, parsed for <tool_call> blocks
  auto      the tool_choice "auto" grammar: plain text or well-formed calls
  required  the tool_choice "required" grammar: at least one call
valid call: a reply whose first call names a known tool with arguments valid under its schema (jsonschema);
right function: that name is the expected one; argument accuracy: expected key/value pairs matched exactly, over all
prompts (a missing or invalid call scores 0). `--set heldout` adds make_dialogs.py's held-out split, whose no-tool
rows (chit-chat, thanks, a request without its order number) score "no call" when the reply calls nothing.
`--adapter PATH` (a LoRA adapter or model folder, e.g. the output of examples/tools/lora.yaml) adds its rows beside
the base model's.

Cost: the same decode free and constrained at batch 1 and 8, as a paired A/B stepped in turn in one process (and the
per-row mask path the engine had before, as a third arm); a JSON schema that cannot finish within `--tokens` tokens
keeps every row decoding the same number of tokens. Reported: ms per decoded token over decode steps (wall and
process CPU time), the overhead as the median of the per-run ratios, and the load average beside it. Run it with
`nice -n 5` and OMP_NUM_THREADS=1 on a shared machine.

    python benchmarks/tool_calls.py [--limit N] [--tokens 48] [--repeats 3] [--model smollm2-135m-instruct]
                                    [--adapter runs/tools-smollm2-lora/final] [--set prompts|heldout|both]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "tools"
LONG = {"type": "object", "properties": {"notes": {"type": "array", "minItems": 40,
                                                   "items": {"type": "string", "maxLength": 40}}},
        "required": ["notes"], "additionalProperties": False}


def load_set(limit: int | None, name: str = "prompts") -> tuple[list[dict], list[dict]]:
    tools = json.loads((EXAMPLES / "tools.json").read_text())
    rows = [json.loads(line) for line in (EXAMPLES / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    if limit and limit < len(rows):  # evenly spaced, so every tool (and the no-tool rows) keeps its share
        rows = [rows[i * len(rows) // limit] for i in range(limit)]
    return tools, rows


def score(rows: list[dict], texts: list[str], tools: list[dict]) -> dict:
    import jsonschema

    from chatforge.generation.tools import parse_reply

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    valid = right = no_call = 0
    args_score = 0.0
    for row, text in zip(rows, texts):
        reply = parse_reply(text, tools)
        if row["expected"] is None:  # no tool needed: right when nothing is called
            no_call += not reply.calls and not reply.invalid
            continue
        if not reply.calls:
            continue
        call = reply.calls[0]
        try:
            jsonschema.validate(call.arguments, schemas[call.name])
        except jsonschema.ValidationError:
            continue
        valid += 1
        want = row["expected"]
        if call.name != want["name"]:
            continue
        right += 1
        matched = sum(str(call.arguments.get(k)).strip().lower() == str(v).strip().lower()
                      for k, v in want["arguments"].items())
        args_score += matched / len(want["arguments"])
    n = sum(r["expected"] is not None for r in rows) or 1
    chat = len(rows) - sum(r["expected"] is not None for r in rows)
    return {"valid": valid / n, "right": right / n, "args": args_score / n, "no_call": no_call / chat if chat else None}


def quality(bot, tools: list[dict], rows: list[dict],
            modes: tuple[str, ...] = ("free", "auto", "required")) -> dict[str, tuple[dict, list[str], float]]:
    from chatforge.generation.engine import SamplingParams
    from chatforge.generation.tools import render_prompt, tool_constraint

    prompts = [render_prompt(bot.tokenizer, r["messages"], tools) for r in rows]
    out = {}
    for mode in modes:
        constraint = None if mode == "free" else tool_constraint(tools, mode, parallel=False)
        params = SamplingParams(temperature=0.0, max_new_tokens=80, constraint=constraint)
        t0 = time.perf_counter()
        texts = [c.text for c in bot.engine.generate_batch(prompts, [params] * len(prompts))]
        out[mode] = (score(rows, texts, tools), texts, time.perf_counter() - t0)
    return out


def cost(bot, batch: int, tokens: int, repeats: int) -> dict:
    """Paired A/B per step: engines on the one model decode the same prompt in `batch` rows, free, constrained
    (masks beside the forward: the engine's path) and constrained with per-row masks after the forward (the path
    before it), and are stepped in turn (A, B, C, A, B, C, ...) so load drift hits all alike. Decode steps only
    (each run's prefill step is not timed). ms per token from wall time and from process CPU time (all threads,
    the mask worker's included; what other processes' load inflates least); medians over `repeats` runs."""
    from chatforge.generation import constraint as cmod
    from chatforge.generation.engine import Engine, SamplingParams

    prompt = bot.tokenizer.render([{"role": "user", "content": "List forty short notes about bread."}],
                                  add_generation_prompt=True)[0]
    long = cmod.Constraint.json_schema(LONG)
    arms = {"free": None, "constrained": long, "per-row masks": long}
    engines = {k: Engine(bot.model, bot.tokenizer, max_batch_size=batch) for k in arms}
    start = cmod.StepMasks.start

    def step(name: str) -> int:
        if name != "per-row masks":
            return len(engines[name].step())
        cmod.StepMasks.start = classmethod(lambda cls, matchers: None)  # the engine falls back to Matcher.mask_logits
        try:
            return len(engines[name].step())
        finally:
            cmod.StepMasks.start = start

    def run() -> dict[str, tuple[float, float, int]]:
        wall, cpu, n = dict.fromkeys(arms, 0.0), dict.fromkeys(arms, 0.0), dict.fromkeys(arms, 0)
        for name, constraint in arms.items():
            params = SamplingParams(temperature=0.0, max_new_tokens=tokens, constraint=constraint)
            for _ in range(batch):
                engines[name].add_request(prompt, params)
            step(name)  # prefill (and each row's first token)
        while any(e.has_work() for e in engines.values()):
            for name in arms:
                if engines[name].has_work():
                    t, c = time.perf_counter(), time.process_time()
                    n[name] += step(name)
                    wall[name] += time.perf_counter() - t
                    cpu[name] += time.process_time() - c
        return {k: (1000 * wall[k] / n[k], 1000 * cpu[k] / n[k], n[k]) for k in arms}

    run()  # warm-up: llguidance's tokenizer trie, the engines' caches
    runs = [run() for _ in range(repeats)]
    out = {"batch": batch, "tokens": sorted({r[k][2] for r in runs for k in arms}), "load": os.getloadavg()[0]}
    for k in arms:
        out[k] = tuple(statistics.median(r[k][i] for r in runs) for i in (0, 1))
    for k in ("constrained", "per-row masks"):  # overhead: the median of the per-run ratios (paired)
        out[k + " overhead"] = tuple(statistics.median(r[k][i] / r["free"][i] - 1 for r in runs) for i in (0, 1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter (or model folder) scored beside --model")
    ap.add_argument("--set", choices=("prompts", "heldout", "both"), default="prompts")
    ap.add_argument("--limit", type=int, default=None, help="N evenly spaced prompts of each set")
    ap.add_argument("--tokens", type=int, default=48, help="decoded tokens per row in the cost runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="free,auto,required", help="decodings scored, comma-separated")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--show", type=int, default=3, help="replies to print per mode")
    args = ap.parse_args(argv)

    import torch

    from chatforge.generation.bot import Bot

    sets = ["prompts", "heldout"] if args.set == "both" else [args.set]
    models = [("base", args.model)] + ([("LoRA", args.adapter)] if args.adapter else [])
    print(f"models {', '.join(f'{k}={v}' for k, v in models)}; torch threads {torch.get_num_threads()}")
    table, shown, base = [], [], None
    for label, path in models if not args.skip_quality else models[:1]:
        bot = Bot.load(path, max_batch_size=8)
        base = base or bot  # the constraint's cost is measured on the base model
        if args.skip_quality:
            break
        for name in sets:
            tools, rows = load_set(args.limit, name)
            for mode, (s, texts, wall) in quality(bot, tools, rows, tuple(args.modes.split(","))).items():
                table.append((label, name, len(rows), mode, s, wall))
                print(f"  done: {label} {name} {mode} {s} in {wall:.0f} s", flush=True)  # a slow machine shows progress
                shown += [f"[{label} {name} {mode}] {r['messages'][-1]['content']!r} -> {t[:160]!r}"
                          for r, t in list(zip(rows, texts))[: args.show]]
    if table:
        print("\n| model | set (prompts) | decoding | valid call | right function | argument accuracy | no call when "
              "none is needed | wall s |")
        print("|---|---|---|---|---|---|---|---|")
        for label, name, n, mode, s, wall in table:
            chat = "-" if s["no_call"] is None else f"{s['no_call']:.0%}"
            print(f"| {label} | {name} ({n}) | {mode} | {s['valid']:.0%} | {s['right']:.0%} | {s['args']:.0%} | "
                  f"{chat} | {wall:.0f} |")
        print("\n".join(shown))
    if args.skip_cost:
        return 0
    bot = base or Bot.load(args.model, max_batch_size=8)
    print(f"\ncost: {args.tokens} tokens per row, {args.repeats} paired runs, torch threads {torch.get_num_threads()}")
    print("\n| batch | free ms/token wall (cpu) | constrained ms/token wall (cpu) | overhead wall | overhead cpu | "
          "per-row masks (before): overhead wall / cpu | tokens per arm | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in (1, 8):
        c = cost(bot, batch, args.tokens, args.repeats)
        (fw, fc), (gw, gc), (ow, oc), (pw, pc) = c["free"], c["constrained"], c["constrained overhead"], \
            c["per-row masks overhead"]
        print(f"| {batch} | {fw:.1f} ({fc:.1f}) | {gw:.1f} ({gc:.1f}) | {ow:+.1%} | {oc:+.1%} | {pw:+.1%} / {pc:+.1%} "
              f"| {c['tokens']} | {c['load']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
