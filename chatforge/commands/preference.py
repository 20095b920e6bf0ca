"""`chatforge score` (rate replies with a reward model) and generate's best-of-N output."""

from __future__ import annotations

import json
import sys

from chatforge.errors import ChatforgeError


def score_command(model: str, input: str, batch_size: int = 8, device: str = "auto") -> int:
    """Rate replies with a reward model (a folder trained with stage: reward): one score per line of INPUT.

    Args:
        model: the reward model folder.
        input: a JSONL file of conversations {"messages": [..., assistant reply]} (each gets a score) or of pairs
            {prompt, chosen, rejected} (each gets both scores, and the pair accuracy is printed at the end).
        batch_size: conversations scored together.
        device: auto, cpu, cuda.
    """
    from chatforge.data.preference import is_pair, read_record
    from chatforge.data.sources import read_data_file
    from chatforge.device import pick_device
    from chatforge.model.reward import score_conversations
    from chatforge.weights.reward import load_reward_model

    rm, tok = load_reward_model(model, device=str(pick_device(device)))
    records = [read_record(raw, "messages", loc) for loc, raw in read_data_file(input, "messages")]  # or .cfenc
    if not records:
        raise ChatforgeError(f"{input}: no records to score")
    convs, kinds = [], []
    for r in records:
        if is_pair(r):
            convs += [r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]]
            kinds.append("pair")
        else:
            convs.append(r["messages"])
            kinds.append("conversation")
    scores = iter(score_conversations(rm, tok, convs, batch_size))
    right = pairs = 0
    for kind in kinds:
        if kind == "pair":
            chosen, rejected = next(scores), next(scores)
            pairs += 1
            right += chosen > rejected
            print(json.dumps({"chosen": round(chosen, 6), "rejected": round(rejected, 6)}))
        else:
            print(json.dumps({"score": round(next(scores), 6)}))
    if pairs:
        print(f"pair accuracy: {right / pairs:.3f} ({right}/{pairs})", file=sys.stderr)
    return 0


def print_best_of(bot, messages: list[dict] | None, sampling: dict, n: int, reward: str | None, device: str,
                  output=None) -> None:
    """generate --best-of N --reward MODEL: the best reply (through the output chain `output`, as every reply) on
    stdout; every candidate's score and finish, and the tokens all N cost, on stderr."""
    from chatforge.generation.best_of import best_of_n
    from chatforge.weights.reward import load_reward_model

    if reward is None:
        raise ChatforgeError("--best-of: needs --reward MODEL (a reward model folder, trained with stage: reward)")
    if messages is None:
        raise ChatforgeError("--best-of: scores chat replies; it cannot be used with --raw")
    rm, tok = load_reward_model(reward, device=str(bot.engine.device))
    seed = sampling.pop("seed", None)
    best = best_of_n(bot, rm, tok, messages, n=n, seed=seed, output=output, **sampling)
    print(best.reply)
    for i, (c, s, f) in enumerate(zip(best.candidates, best.scores, best.finish_reasons)):
        mark = "*" if i == best.best_index else " "
        print(f"{mark} [{i + 1}] score {s:+.4f} (finish: {f}): {c[:80]!r}", file=sys.stderr)
    print(f"({n} candidates, {best.completion_tokens} tokens generated in all)", file=sys.stderr)
