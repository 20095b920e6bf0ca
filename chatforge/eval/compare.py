"""What a cheaper way to run a model costs in quality: held-out perplexity and greedy-token agreement against a
reference (bf16 where the device computes it natively, else fp32: `--dtype` names it), on the same records and the
same fixed prompts. `chatforge eval --compare` calls `compare_variants`; a quantization method is recommended only
when its perplexity stays within 2% of the reference.

Greedy agreement is teacher-forced: the reference generates greedily from each prompt, and the candidate is scored
on how often its own argmax at each of those positions is the reference's token. Unlike comparing free-running
replies, one early divergence does not decide the rest.
"""

from __future__ import annotations

import torch

from chatforge.errors import ChatforgeError

DTYPES = ("fp32", "bf16", "fp16")


def greedy_agreement(candidate, prompts: list[list[int]], continuations: list[list[int]]) -> tuple[float, int]:
    """Fraction of continuation tokens that are the candidate's argmax given the prompt and the tokens before."""
    device = next(candidate.parameters()).device
    same = total = 0
    with torch.inference_mode():
        for prompt, cont in zip(prompts, continuations):
            if not cont:
                continue
            ids = torch.tensor([prompt + cont[:-1]], device=device)
            guess = candidate(ids)[0, len(prompt) - 1:].argmax(-1).cpu()
            same += int((guess == torch.tensor(cont)).sum())
            total += len(cont)
    if total == 0:
        raise ChatforgeError("compare: the reference generated no tokens for the prompts")
    return same / total, total


def compare(reference, candidates: dict, tokenizer, records: list[dict], prompts: list[list[int]], *,
            seq_len: int = 512, batch_size: int = 4, new_tokens: int = 32) -> dict:
    """Perplexity of the reference and each candidate on `records`, and each candidate's greedy agreement with
    the reference's greedy continuations of `prompts`; ppl_change = ppl / reference ppl - 1."""
    from chatforge.generation.engine import Engine, SamplingParams
    from chatforge.train.loss import evaluate_loss

    def loss_of(model) -> dict:
        param = next(model.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        out = evaluate_loss(model, tokenizer, records, min(seq_len, model.config.max_seq_len), batch_size,
                            param.device, dtype)
        return {k: out[k] for k in ("ppl", "bpb", "tokens")}

    ref = loss_of(reference)
    engine = Engine(reference, tokenizer, max_batch_size=min(8, len(prompts)) or 1)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    continuations = [c.token_ids for c in engine.generate_batch(prompts, params)]
    result = {"reference": ref, "prompts": len(prompts), "new_tokens": new_tokens, "candidates": {}}
    for name, model in candidates.items():
        loss = ref if model is reference else loss_of(model)  # the same model on the same rows: the same loss
        agreement, n = greedy_agreement(model, prompts, continuations)
        result["candidates"][name] = loss | {"ppl_change": loss["ppl"] / ref["ppl"] - 1,
                                             "greedy_agreement": agreement, "agreement_tokens": n}
    return result


def variant_names() -> tuple[str, ...]:
    """What a variant may be: a dtype, or a model.quantize method applied to the bf16 weights."""
    from chatforge.model.quantize import METHODS

    return DTYPES + METHODS


def check_variant(variant: str) -> None:
    if variant not in variant_names():
        raise ChatforgeError(f"compare: unknown variant {variant!r} (use {', '.join(variant_names())})")


def load_variant(name_or_path: str, variant: str, device: str = "cpu", base: str = "bf16"):
    """The model and tokenizer for one variant: a dtype (fp32, bf16) or a quantization method on `base` weights."""
    from chatforge.model.quantize import METHODS, quantize
    from chatforge.weights.loader import load

    check_variant(variant)
    loaded = load(name_or_path, device=device, dtype=variant if variant in DTYPES else base)
    if variant in METHODS:
        quantize(loaded.model, variant)
    return loaded.model, loaded.tokenizer


def compare_variants(name_or_path: str, variants: tuple[str, ...] | list[str], records: list[dict],
                     prompt_messages: list[list[dict]], *, reference: str = "bf16", new_tokens: int = 32,
                     seq_len: int = 512, batch_size: int = 4, device: str = "cpu") -> dict:
    """`compare` for one model in several variants against `reference` (a dtype, whose weights the quantized
    variants take; or a quantization method on bf16): perplexity on the held-out `records`,
    greedy agreement on the fixed prompts (`prompt_messages`, rendered with the generation prompt). A variant
    equal to the reference is the same loaded model: its loss is the reference's, and its agreement, measured,
    checks that the teacher-forced forward pass and the engine's decode agree (it must come out 1)."""
    if not variants:
        raise ChatforgeError("compare: give at least one variant to compare with the reference")
    for v in (reference, *variants):  # every name checked before the first model loads
        check_variant(v)
    if not prompt_messages:
        raise ChatforgeError("compare: no prompts (no held-out conversation has an assistant reply)")
    base = reference if reference in DTYPES else "bf16"
    ref_model, tokenizer = load_variant(name_or_path, reference, device, base)
    prompts = [tokenizer.render(m, add_generation_prompt=True)[0] for m in prompt_messages]
    candidates = {v: ref_model if v == reference else load_variant(name_or_path, v, device, base)[0]
                  for v in variants}
    result = compare(ref_model, candidates, tokenizer, records, prompts, seq_len=seq_len, batch_size=batch_size,
                     new_tokens=new_tokens)
    return result | {"model": str(name_or_path), "records": len(records), "reference_variant": reference}


def compare_table(result: dict) -> str:
    """A Markdown table of `compare_variants`' result: one row per variant, the reference's first."""
    ref, name = result["reference"], result["reference_variant"]
    lines = [f"| variant | perplexity | ppl / {name} | bits per byte | greedy agreement vs {name} | "
             f"within 2% of {name} |", "|---|---:|---:|---:|---:|---|",
             f"| {name} (reference) | {ref['ppl']:.3f} | 1.0000 | {ref['bpb']:.4f} | - | - |"]
    for variant, c in result["candidates"].items():
        ratio = c["ppl"] / ref["ppl"]
        lines.append(f"| {variant} | {c['ppl']:.3f} | {ratio:.4f} | {c['bpb']:.4f} | {c['greedy_agreement']:.3f} "
                     f"({c['agreement_tokens']} tokens) | {'yes' if abs(ratio - 1) <= 0.02 else 'no'} |")
    lines.append("")
    lines.append(f"held out: {result.get('data', '?')} ({result.get('split', '?')} split), {result['records']} "
                 f"conversations, "
                 f"{ref['tokens']:,} assistant tokens scored; greedy agreement teacher-forced on the reference's "
                 f"greedy replies to {result['prompts']} prompts of up to {result['new_tokens']} tokens")
    return "\n".join(lines)
