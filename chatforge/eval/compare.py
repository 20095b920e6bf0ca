"""What a cheaper way to run a model costs in quality: held-out perplexity and greedy-token agreement against a
reference (bf16), on the same records and the same fixed prompts. `chatforge eval --compare` calls
`compare_variants`; a quantization method is recommended only when its perplexity stays within 2% of bf16.

Greedy agreement is teacher-forced: the reference generates greedily from each prompt, and the candidate is scored
on how often its own argmax at each of those positions is the reference's token. Unlike comparing free-running
replies, one early divergence does not decide the rest.
"""

from __future__ import annotations

import torch

from chatforge.errors import ChatforgeError

VARIANTS = ("bf16", "int8-wo", "int8-dyn")  # the first is the reference


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
        loss = loss_of(model)
        agreement, n = greedy_agreement(model, prompts, continuations)
        result["candidates"][name] = loss | {"ppl_change": loss["ppl"] / ref["ppl"] - 1,
                                             "greedy_agreement": agreement, "agreement_tokens": n}
    return result


def load_variant(name_or_path: str, variant: str, device: str = "cpu"):
    """The model and tokenizer for one variant: a dtype (fp32, bf16) or a quantization method on bf16 weights."""
    from chatforge.model.quantize import METHODS, quantize
    from chatforge.weights.loader import load

    if variant not in METHODS + ("fp32", "bf16", "fp16"):
        raise ChatforgeError(f"compare: unknown variant {variant!r} (use fp32, bf16, fp16, {', '.join(METHODS)})")
    loaded = load(name_or_path, device=device, dtype=variant if variant in ("fp32", "bf16", "fp16") else "bf16")
    if variant in METHODS:
        quantize(loaded.model, variant)
    return loaded.model, loaded.tokenizer


def compare_variants(name_or_path: str, variants: tuple[str, ...] = VARIANTS, data: str = "builtin", *,
                     max_samples: int = 100, n_prompts: int = 16, new_tokens: int = 32, seq_len: int = 512,
                     seed: int = 0, val_fraction: float = 0.1, device: str = "cpu") -> dict:
    """`compare` for one model in several variants (the first is the reference) on `data`'s held-out split; the
    fixed prompts are the first n_prompts held-out conversations up to their last assistant turn."""
    from chatforge.data import load_dataset
    from chatforge.eval.evaluate import pick_records, split_for_generation

    if len(variants) < 2:
        raise ChatforgeError("compare: give a reference and at least one variant to compare with it")
    _, val, _ = load_dataset(data, val_fraction, seed)
    records = pick_records(val, max_samples, seed)
    if not records:
        raise ChatforgeError(f"{data}: the held-out split is empty")
    reference, tokenizer = load_variant(name_or_path, variants[0], device)
    cuts = [split_for_generation(r["messages"]) for r in records if "messages" in r]
    prompts = [tokenizer.render(c[0], add_generation_prompt=True)[0] for c in cuts if c][:n_prompts]
    candidates = {v: load_variant(name_or_path, v, device)[0] for v in variants[1:]}
    result = compare(reference, candidates, tokenizer, records, prompts, seq_len=seq_len, new_tokens=new_tokens)
    return result | {"model": str(name_or_path), "data": data, "reference_variant": variants[0]}
