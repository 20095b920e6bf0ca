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

Cost: the same decode with and without a constraint at batch 1 and 8, interleaved `--repeats` times; a JSON schema
that cannot finish within `--tokens` tokens keeps every row decoding the same number of tokens. Reported: ms per
decoded token (median, decode steps only), the overhead ratio, and the share of decode wall time spent in the
constraint (mask, masking the logits, advancing the matcher): on a shared machine the share is the steadier figure.

    python benchmarks/tool_calls.py [--limit N] [--tokens 48] [--repeats 3] [--model smollm2-135m-instruct]
                                    [--adapter runs/tools-smollm2-lora/final] [--set prompts|heldout|both]
"""

from __future__ import annotations

import argparse
import json
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
    """ms per decoded token with and without a constraint, and the mask's own share of the constrained wall time."""
    from chatforge.generation import constraint as cmod
    from chatforge.generation.engine import Engine, SamplingParams

    engine = Engine(bot.model, bot.tokenizer, max_batch_size=batch)
    prompt = bot.tokenizer.render([{"role": "user", "content": "List forty short notes about bread."}],
                                  add_generation_prompt=True)[0]
    long = cmod.Constraint.json_schema(LONG)
    spent = [0.0]
    mask_logits, advance = cmod.Matcher.mask_logits, cmod.Matcher.advance

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return wrapper

    def run(constrained: bool) -> tuple[float, float, int]:
        """Decode steps only (the prefill step is not timed): ms per token, mask share, tokens decoded."""
        params = SamplingParams(temperature=0.0, max_new_tokens=tokens, constraint=long if constrained else None)
        for _ in range(batch):
            engine.add_request(prompt, params)
        engine.step()  # prefill (and each row's first token)
        spent[0], n = 0.0, 0
        t0 = time.perf_counter()
        while engine.has_work():
            n += len(engine.step())
        wall = time.perf_counter() - t0
        return 1000 * wall / n, spent[0] / wall, n

    cmod.Matcher.mask_logits, cmod.Matcher.advance = timed(mask_logits), timed(advance)
    try:
        run(True), run(False)  # warm-up: llguidance's tokenizer trie, the engine's cache
        free, guided, share, counts = [], [], [], set()
        for _ in range(repeats):
            ms, _, n_free = run(False)
            free.append(ms)
            ms, s, n_guided = run(True)
            guided.append(ms)
            share.append(s)
            counts.add((n_free, n_guided))
    finally:
        cmod.Matcher.mask_logits, cmod.Matcher.advance = mask_logits, advance
    f, g = statistics.median(free), statistics.median(guided)
    return {"batch": batch, "free_ms": f, "guided_ms": g, "overhead": g / f - 1, "mask_share": statistics.median(share),
            "tokens": sorted(counts)}


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
    print("\n| batch | free ms/token | constrained ms/token | overhead | mask share of wall | tokens (free, constrained) |")
    print("|---|---|---|---|---|---|")
    for batch in (1, 8):
        c = cost(bot, batch, args.tokens, args.repeats)
        print(f"| {batch} | {c['free_ms']:.1f} | {c['guided_ms']:.1f} | {c['overhead']:+.1%} | {c['mask_share']:.2%} | {c['tokens']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
