"""`chatforge eval`: metric maths on hand-made examples, multiple-choice scoring against the model's own logits,
determinism, and the command end to end on a tiny saved model."""

import json

import pytest
import torch

from chatforge.weights.folder import save_model
from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.eval.evaluate import (
    distinct_n, generation_metrics, lcs_length, mc_eval, read_mc, rouge_l, score_choices, split_for_generation, words,
)
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.tokenizer import train_tokenizer

DIALOGS = [
    ("Hello there", "Hi! How can I help you today?"),
    ("What is your name?", "I am a small chat model."),
    ("Tell me a joke", "Why did the chicken cross the road? To get to the other side."),
    ("How are you?", "I am fine, thank you."),
    ("你好", "你好！很高兴见到你。"),
    ("What is AI?", "Artificial intelligence is the study of machines that think."),
    ("Good night", "Good night, sleep well."),
    ("Do you like music?", "I like all kinds of music."),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny random model folder and a conversations file."""
    root = tmp_path_factory.mktemp("eval")
    texts = [t for pair in DIALOGS for t in pair] * 3
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=96))
    folder = save_model(model, tok, root / "model")
    torch.manual_seed(1)
    other = save_model(GPT(model.config), tok, root / "other")
    data = root / "dialogs.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in DIALOGS))
    return {"root": root, "model": folder, "other": other, "data": data, "tok": tok, "net": model}


# ---------------------------------------------------------------- metric maths

def test_words_split_cjk_into_characters_and_drop_punctuation():
    assert words("Hello, World! It's 2024.") == ["hello", "world", "it", "s", "2024"]
    assert words("我爱Python编程") == ["我", "爱", "python", "编", "程"]


def test_lcs_length():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], list("abc")) == 0


def test_rouge_l_exact_values():
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # P = 2/3, R = 2/4 -> F = 2PR / (P + R) = 4/7
    assert rouge_l("the cat sat", "the big cat ran") == pytest.approx(4 / 7)
    assert rouge_l("我爱北京", "我爱上海") == pytest.approx(0.5)
    assert rouge_l("Hello, world!", "hello world") == 1.0
    assert rouge_l("", "hello") == 0.0 and rouge_l("a", "b") == 0.0


def test_distinct_n_exact_values():
    assert distinct_n(["a b a", "a c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a", "a c"], 2) == pytest.approx(3 / 3)
    assert distinct_n(["go go go go"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["", "x"], 2) == 0.0


def test_generation_metrics_counts_and_sacrebleu_parity():
    import sacrebleu

    hyps, refs = ["the cat sat on the mat", "hello"], ["the cat is on the mat", "hello there"]
    m = generation_metrics(hyps, refs, reply_tokens=[7, 3], ended_with_eot=[True, False], reference_tokens=[6, 2])
    assert m["eot_rate"] == 0.5 and m["mean_reply_tokens"] == 5.0 and m["mean_reference_tokens"] == 4.0
    assert m["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score and m["bleu_tokenize"] == "13a"
    assert m["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert m["rouge_l"] == pytest.approx(100 * (5 / 6 + rouge_l("hello", "hello there")) / 2)
    zh = generation_metrics(["我爱北京"], ["我爱上海"], [4], [True])
    assert zh["bleu_tokenize"] == "zh"
    assert zh["bleu"] == sacrebleu.corpus_bleu(["我爱北京"], [["我爱上海"]], tokenize="zh").score


def test_split_for_generation_takes_the_last_assistant_reply():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert split_for_generation(msgs) == (msgs[:3], "d")
    assert split_for_generation(msgs[:1]) is None


# ---------------------------------------------------------------- multiple choice

def test_mc_scores_equal_a_hand_computation_from_the_logits(tiny):
    tok, model = tiny["tok"], tiny["net"].eval()
    question, choices = "What is your name?", ["I am a small chat model.", "Hello", "你好！"]
    scores = score_choices(model, tok, question, choices, torch.device("cpu"))
    prefix, _ = tok.render([{"role": "user", "content": question}], add_generation_prompt=True)
    for choice, score in zip(choices, scores):
        ids, _ = tok.render([{"role": "user", "content": question}, {"role": "assistant", "content": choice}])
        # the reply's own tokens sit between the generation prompt and "<|im_end|>\n"
        reply = range(len(prefix), len(ids) - 2)
        assert tok.decode(ids[reply.start:reply.stop]) == choice
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        assert score == pytest.approx(sum(float(logp[p - 1, ids[p]]) for p in reply), abs=1e-4)


def test_mc_accuracy_and_byte_normalisation(tiny, tmp_path):
    tok, model = tiny["tok"], tiny["net"].eval()
    items = [("What is AI?", ["a", "machines that think"]), ("Hello there", ["Hi!", "Good night, sleep well."])]
    path = tmp_path / "mc.jsonl"
    expected_acc = expected_norm = 0
    lines = []
    for i, (q, choices) in enumerate(items):
        s = score_choices(model, tok, q, choices, torch.device("cpu"))
        norm = [x / len(c.encode()) for x, c in zip(s, choices)]
        answer = i % 2  # a fixed answer; the model is random, so what matters is agreement with the hand argmax
        expected_acc += int(max(range(2), key=s.__getitem__) == answer)
        expected_norm += int(max(range(2), key=norm.__getitem__) == answer)
        lines.append(json.dumps({"question": q, "choices": choices, "answer": choices[answer] if i else answer}))
    path.write_text("\n".join(lines) + "\n")
    r = mc_eval(model, tok, str(path), torch.device("cpu"))
    assert (r["acc"], r["acc_norm"], r["questions"]) == (expected_acc / 2, expected_norm / 2, 2)
    assert r["chance"] == 0.5


def test_mc_file_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"]}\n')
    with pytest.raises(ChatforgeError, match=r"bad.jsonl:2: choices"):
        read_mc(str(path))
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": "c"}\n')
    with pytest.raises(ChatforgeError, match=r"bad.jsonl:1: answer"):
        read_mc(str(path))


# ---------------------------------------------------------------- the command

def test_eval_command_end_to_end_is_deterministic(tiny, tmp_path, capsys):
    args = ["eval", str(tiny["model"]), "--data", str(tiny["data"]), "--split", "all", "--max-new-tokens", "8",
            "--batch-size", "3", "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "a.json")]) == 0
    table = capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "b.json")]) == 0
    a, b = (tmp_path / "a.json").read_text(), (tmp_path / "b.json").read_text()
    assert a == b
    r = json.loads(a)
    assert r["records"] == len(DIALOGS) and r["generation"]["replies"] == len(DIALOGS)
    assert r["generation"]["bleu_tokenize"] == "zh"  # one reference is Chinese
    assert 0 <= r["generation"]["eot_rate"] <= 1 and r["loss"]["tokens"] > 0
    assert r["loss"]["ppl"] == pytest.approx(2.718281828 ** r["loss"]["loss"])
    assert "| bits per byte |" in table and (tmp_path / "a.md").read_text().strip() == table.strip()
    # the replies are the ones chat gives: same template, same engine, greedy
    from chatforge.generation.bot import Bot

    bot = Bot.load(str(tiny["model"]))
    ex = r["examples"][0]
    assert bot.chat(ex["messages"], temperature=0.0, max_new_tokens=8) == ex["reply"]


def test_eval_compare_puts_two_models_side_by_side(tiny, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert main(["eval", str(tiny["model"]), "--compare", str(tiny["other"]), "--data", str(tiny["data"]), "--split",
                 "all", "--max-samples", "4", "--no-generate", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert [r["model"] for r in res] == [str(tiny["model"]), str(tiny["other"])]
    assert res[0]["loss"]["tokens"] == res[1]["loss"]["tokens"]  # the very same samples
    assert res[0]["loss"]["loss"] != res[1]["loss"]["loss"]
    assert capsys.readouterr().out.splitlines()[0] == "| metric | model | other |"


def test_eval_errors_exit_2(tiny, capsys):
    assert main(["eval", str(tiny["root"] / "missing")]) == 2
    assert main(["eval", str(tiny["model"]), "--data", str(tiny["data"]), "--split", "test"]) == 2
    assert "--split" in capsys.readouterr().err
