"""The fact check: scoring of fixed replies (EN and ZH, full-width forms, case), the file's validation errors, and
`chatforge eval --facts` end to end on a tiny random model (its replies are scored the same way as fixed ones)."""

import json

import pytest
import torch

from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.eval.facts import fact_check, fact_ok, read_facts, score
from chatforge.generation.bot import Bot
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.tokenizer import train_tokenizer
from chatforge.weights.folder import save_model

ITEMS = [
    {"messages": [{"role": "user", "content": "When are you open?"}], "expect": ["9:00", "21:00"]},
    {"messages": [{"role": "user", "content": "How can I pay?"}], "expect": ["Alipay", "WeChat Pay"]},
    {"messages": [{"role": "system", "content": "你是客服。"}, {"role": "user", "content": "几点开门？"}],
     "expect": ["9:00", "21:00"]},
    {"messages": [{"role": "user", "content": "满多少包邮？"}], "expect": ["199元"]},
]


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_fact_ok_normalises_width_and_case_and_needs_every_string():
    assert fact_ok("We open at ９：００ and close at ２１：００.", ["9:00", "21:00"])
    assert fact_ok("we take ALIPAY and wechat pay", ["Alipay", "WeChat Pay"])
    assert fact_ok("会员优惠１０％", ["10%"])
    assert fact_ok("满１９９元包邮", ["199元"])
    assert not fact_ok("We open at 9:00.", ["9:00", "21:00"])  # half a fact is no fact
    assert not fact_ok("", ["9:00"])
    assert not fact_ok("青瓷茶壶售价189元。", ["89元"])  # a number counts whole, not as the tail of another
    assert not fact_ok("Open 19:00 to 21:00.", ["9:00", "21:00"])
    assert not fact_ok("within 17 business days", ["7 business days"])
    assert fact_ok("营业时间是9:00到21:00。", ["9:00", "21:00"]) and fact_ok("price: $12.", ["$12"])


def test_score_fixed_replies_reports_en_and_zh_separately(tmp_path):
    items = read_facts(write(tmp_path / "f.jsonl", ITEMS))
    assert [i["lang"] for i in items] == ["en", "en", "zh", "zh"]  # told from the question's script
    replies = ["Monday to Saturday, 9:00 to 21:00.", "Cards only.", "营业时间是９:００到２１:００。", "满199元免运费。"]
    result = score(items, replies)
    assert result["by_lang"] == {"en": {"correct": 1, "total": 2, "accuracy": 0.5},
                                 "zh": {"correct": 2, "total": 2, "accuracy": 1.0}}
    assert (result["correct"], result["total"], result["accuracy"]) == (3, 4, 0.75)
    assert [r["ok"] for r in result["items"]] == [True, False, True, True]
    assert result["items"][2]["question"] == "几点开门？"


def test_explicit_lang_wins(tmp_path):
    items = read_facts(write(tmp_path / "f.jsonl", [dict(ITEMS[0], lang="de")]))
    assert items[0]["lang"] == "de"


@pytest.mark.parametrize("row, message", [
    ({"messages": [], "expect": ["x"]}, "f.jsonl:1: messages: expected a list of {role, content} objects"),
    ({"messages": [{"role": "assistant", "content": "hi"}], "expect": ["x"]},
     "f.jsonl:1: messages: the last message must be the user's question"),
    ({"messages": [{"role": "user", "content": "hi"}], "expect": []},
     "f.jsonl:1: expect: expected a non-empty list of non-empty strings"),
    ({"messages": [{"role": "user", "content": "hi"}], "expect": [" "]},
     "f.jsonl:1: expect: expected a non-empty list of non-empty strings"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, row, message):
    path = write(tmp_path / "f.jsonl", [row])
    with pytest.raises(ChatforgeError) as e:
        read_facts(path)
    assert str(e.value) == f"{tmp_path}/{message}"


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ChatforgeError, match="nope.jsonl: file not found"):
        read_facts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ChatforgeError, match="empty.jsonl: no questions"):
        read_facts(str(tmp_path / "empty.jsonl"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("facts")
    texts = [m["content"] for i in ITEMS for m in i["messages"]] + ["9:00 21:00 Alipay 199元"] * 3
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=96))
    return save_model(model, tok, root / "model"), root


def test_fact_check_scores_the_bots_own_greedy_replies(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    path = write(tmp_path / "f.jsonl", ITEMS)
    bot = Bot.load(str(folder))
    result = fact_check(bot, path, max_new_tokens=8)
    replies = bot.chat_batch([i["messages"] for i in ITEMS], max_new_tokens=8, temperature=0.0)
    assert [r["reply"] for r in result["items"]] == replies
    assert result == dict(score(read_facts(path), replies), file=path)
    assert fact_check(bot, path, max_new_tokens=8) == result  # greedy: the same every time


def test_eval_command_writes_fact_accuracy_per_language(tiny_folder, capsys):
    folder, root = tiny_folder
    path = write(root / "f.jsonl", ITEMS)
    out = root / "eval.json"
    assert main(["eval", str(folder), "--data", "", "--facts", path, "--max-new-tokens", "8", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["facts"]["by_lang"]) == {"en", "zh"}
    assert "| fact accuracy |" in table and "| fact accuracy, en |" in table and "| fact accuracy, zh |" in table
