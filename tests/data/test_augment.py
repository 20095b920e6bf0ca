"""Augmentation: exact seeded output of each method, provenance on every copy, the paraphrase filter, and prepare's
rules for copies (de-duplicated against originals, split by source: no copy of a validation conversation trains)."""

import json
import random

import pytest
import torch

from chatforge.data.augment import (
    AUGMENTED_OF_VALIDATION, add_noise, conversation_id, keep_paraphrase, noise_copies, paraphrase_copies,
    punctuation, read_slots, template_copies, width,
)
from chatforge.data.prepare import build, prepare
from chatforge.errors import ChatforgeError


def conv(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"messages": messages}


def users(record):
    return [m["content"] for m in record["messages"] if m["role"] == "user"]


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- noise

def test_punctuation_and_width_exact():
    rng = random.Random(0)
    assert punctuation("Where is your shop?", rng) == "Where is your shop"
    assert punctuation("你们几点开门？", rng) == "你们几点开门"
    assert width("Is 9:00 ok?", rng) == "Is ９:００ ok?"  # digits first: what an IME in full-width mode changes
    assert width("你们几点开门？周二营业吗，几点到几点？", rng) == "你们几点开门?周二营业吗,几点到几点?"
    assert width("Where is your shop?", random.Random(0)) == "Where is your ｓｈｏｐ?"


def test_add_noise_seeded_exact():
    assert add_noise("What are your opening hours?", random.Random(1)) == "What are yiur opening hours?"
    assert add_noise("What are your opening hours?", random.Random(1)) == add_noise(
        "What are your opening hours?", random.Random(1))
    assert add_noise("", random.Random(0)) == ""  # nothing applies: unchanged


def test_noise_copies_touch_only_user_turns_and_record_provenance():
    record = conv("Are you open on Tuesday?", "Yes, Tuesday 9:00 to 21:00.")
    copies = noise_copies(record, "shop.jsonl:7", 2, random.Random(0))
    assert [users(c) for c in copies] == [["Are you opeen ｏｎ Tuesday?"], ["Are you Open on Tuesday"]]
    for c in copies:
        assert c["messages"][1] == record["messages"][1]  # the reply the model learns stays as written
        assert c["meta"] == {"method": "noise", "source": "shop.jsonl:7", "source_id": conversation_id(record)}


# ---------------------------------------------------------------- template

SLOTS = {"weekday": ["Monday", "Tuesday", "Wednesday"], "day": ["Mon", "Tue"], "teapot_zh": ["青瓷茶壶", "青瓷壶"]}


def test_template_swaps_slot_values_in_user_turns_exact():
    record = conv("Are you open on Tuesday?", "Yes, Tuesday 9:00 to 21:00.")
    copies = template_copies(record, "f:1", SLOTS, 2, random.Random(0))
    assert [users(c) for c in copies] == [["Are you open on Wednesday?"], ["Are you open on Monday?"]]
    assert all(c["messages"][1]["content"] == "Yes, Tuesday 9:00 to 21:00." for c in copies)
    assert all(c["meta"]["method"] == "template" and c["meta"]["source"] == "f:1" for c in copies)


def test_template_word_edges_cjk_and_consistency():
    # "Mon" is a value, but not inside "Monday"; Chinese values match inside text; a value repeated in two user
    # turns gets the same replacement in both.
    record = conv("Is Monday ok? 青瓷茶壶多少钱？", "Yes.", "Monday then.", "See you.")
    for c in template_copies(record, "f:1", SLOTS, 3, random.Random(2)):
        first, second = users(c)
        day = first.split()[1]
        assert day in ("Tuesday", "Wednesday") and second == f"{day} then."
        assert "青瓷壶多少钱" in first
    assert template_copies(conv("Hello", "Hi"), "f:1", SLOTS, 2, random.Random(0)) == []


def test_read_slots_errors(tmp_path):
    (tmp_path / "s.json").write_text('{"day": ["Mon"]}')
    with pytest.raises(ChatforgeError) as e:
        read_slots(str(tmp_path / "s.json"))
    assert str(e.value) == f"{tmp_path}/s.json: slot 'day': expected a list of at least two distinct non-empty strings"


# ---------------------------------------------------------------- paraphrase filter

@pytest.mark.parametrize("original, candidate, expected", [
    ("When are you open?", 'Question: "What are your opening hours?"\nThanks', ("What are your opening hours?", "kept")),
    ("When are you open?", "  ", (None, "empty")),
    ("When are you open?", "when are you OPEN", (None, "identical")),
    ("几点开门？", "几点开门?", (None, "identical")),  # width and punctuation do not make a paraphrase
    ("几点开门？", "What time do you open?", (None, "language changed")),
    ("When are you open?", "你们几点开门？", (None, "language changed")),
    ("几点开门？", "问题：请问你们早上什么时候营业？", ("请问你们早上什么时候营业？", "kept")),
    ("Open?", "x" * 40, (None, "too long")),
    ("Is the Celadon Teapot expensive?", "The Celadon Teapot is indeed quite expensive.", (None, "not a question")),
    ("青瓷茶壶贵吗？", "青瓷茶壶很贵。", (None, "not a question")),
    ("Thanks!", "Thank you very much.", ("Thank you very much.", "kept")),  # only a question must stay one
])
def test_keep_paraphrase(original, candidate, expected):
    assert keep_paraphrase(original, candidate) == expected


def test_paraphrase_copies_use_the_table_and_record_provenance():
    record = conv("When are you open?", "9:00 to 21:00.", "Thanks!", "You're welcome.")
    table = {"When are you open?": ["What are your hours?", "What time do you open?"]}
    copies = paraphrase_copies(record, "f:3", table, 2, random.Random(0))
    assert sorted(users(c)[0] for c in copies) == ["What are your hours?", "What time do you open?"]
    assert all(users(c)[1] == "Thanks!" for c in copies)  # no paraphrase: the turn stays
    assert all(c["meta"] == {"method": "paraphrase", "source": "f:3", "source_id": conversation_id(record)}
               for c in copies)
    assert paraphrase_copies(record, "f:3", {}, 2, random.Random(0)) == []


def test_paraphrases_by_a_model_are_filtered_and_counted():
    from chatforge.generation.bot import Bot
    from chatforge.model.gpt import GPT, ModelConfig
    from chatforge.tokenizer import train_tokenizer
    from chatforge.tools.augment import paraphrases

    texts = ["When are you open?", "你们几点开门？"]
    tok = train_tokenizer(texts * 5 + ["Rewrite this question 请用不同的说法改写"] * 5, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=256))
    kept, decisions = paraphrases(Bot(model, tok), texts, n=3, seed=0, max_new_tokens=6)
    assert sum(decisions.values()) == 6  # every candidate has one decision
    for text, paras in kept.items():
        assert all(keep_paraphrase(text, p) == (p, "kept") for p in paras)
    again, _ = paraphrases(Bot(model, tok), texts, n=3, seed=0, max_new_tokens=6)
    assert again == kept  # seeded


# ---------------------------------------------------------------- prepare: split by source

def shop(n=20):
    return [conv(f"Question number {i}: when do you open?", f"Answer {i}: at 9:00.") for i in range(n)]


def copies_of(records, locations):
    out = []
    for r, loc in zip(records, locations):
        out += noise_copies(r, loc, 2, random.Random(0))
    return out


def test_prepare_never_trains_on_a_copy_of_a_validation_conversation(tmp_path):
    originals = shop()
    write(tmp_path / "orig.jsonl", originals)
    plain_train, plain_val, _ = build([str(tmp_path / "orig.jsonl")])
    folder = tmp_path / "aug"
    folder.mkdir()
    write(folder / "original.jsonl", originals)
    write(folder / "augmented.jsonl", copies_of(originals, [f"orig.jsonl:{i + 1}" for i in range(len(originals))]))
    train, val, report = build([str(folder)])
    assert val == plain_val  # the originals are split exactly as without augmentation
    val_ids = {conversation_id(r) for r in val}
    train_copies = [r for r in train if "meta" in r]
    assert train_copies and all(r["meta"]["source_id"] not in val_ids for r in train_copies)
    assert [r for r in train if "meta" not in r] == plain_train
    assert report.dropped[AUGMENTED_OF_VALIDATION] == 2 * len(val)
    assert report.read == report.kept + sum(report.dropped.values())


def test_prepare_drops_a_copy_identical_to_an_original_and_keeps_the_original(tmp_path):
    originals = shop(4)
    folder = tmp_path / "aug"
    folder.mkdir()
    # a copy whose text equals an original, listed before the originals (augmented.jsonl sorts first)
    same = {"messages": originals[1]["messages"], "meta": {"method": "noise", "source": "x", "source_id":
                                                             conversation_id(originals[0])}}
    write(folder / "augmented.jsonl", [same])
    write(folder / "original.jsonl", originals)
    train, val, report = build([str(folder)])
    assert report.dropped["duplicate"] == 1
    assert sorted(json.dumps(r) for r in train + val) == sorted(json.dumps(r) for r in originals)


def test_prepare_written_train_file_keeps_provenance(tmp_path):
    originals = shop()
    folder = tmp_path / "aug"
    folder.mkdir()
    write(folder / "original.jsonl", originals)
    write(folder / "augmented.jsonl", copies_of(originals, [f"o:{i}" for i in range(len(originals))]))
    prepare([str(folder)], str(tmp_path / "out"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    metas = [r["meta"] for r in rows if "meta" in r]
    assert metas and all(set(m) == {"method", "source", "source_id"} for m in metas)
    assert all("meta" not in json.loads(line) for line in (tmp_path / "out" / "val.jsonl").read_text().splitlines())


def test_prepare_refuses_copies_without_their_originals(tmp_path):
    path = write(tmp_path / "augmented.jsonl", copies_of(shop(2), ["o:1", "o:2"]))
    with pytest.raises(ChatforgeError) as e:
        build([str(path)])
    assert "augmented copy of conversation" in str(e.value) and "pass the original data too" in str(e.value)
    assert str(e.value).startswith(f"{path}:1: ")
