"""Preference pairs: the accepted forms, file:line errors, cleaning, and rendering through the one renderer (the
prompt exactly as inference renders it, one end-of-turn token per reply)."""

from __future__ import annotations

import json

import pytest

from chatforge.data import load_dataset
from chatforge.data.preference import encode_pairs, preference_record, render_reply
from chatforge.data.prepare import prepare
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import train_tokenizer

U = {"role": "user", "content": "What is 2+2?"}
SYSTEM = {"role": "system", "content": "Be brief."}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write(tmp_path, rows) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_every_form_becomes_the_canonical_pair(tmp_path):
    expected = {"prompt": [U], "chosen": [a("4")], "rejected": [a("5")]}
    forms = [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
             {"messages": [U], "chosen": a("4"), "rejected": [a("5")]},
             {"chosen": [U, a("4")], "rejected": [U, a("5")]}]
    for form in forms:
        assert preference_record(form, "f:1") == expected
    # a shared multi-turn prefix with a system prompt: the prompt is everything up to the last shared user turn
    history = [SYSTEM, {"role": "user", "content": "Hi"}, a("Hello!"), U]
    rec = preference_record({"chosen": history + [a("4")], "rejected": history + [a("five")]}, "f:1")
    assert rec["prompt"] == history and rec["chosen"] == [a("4")]
    # replies may go on for several turns once they differ
    more = [{"role": "user", "content": "ok"}, a("bye")]
    rec = preference_record({"chosen": [U, a("4")] + more, "rejected": [U, a("5")] + more}, "f:1")
    assert rec == {"prompt": [U], "chosen": [a("4")] + more, "rejected": [a("5")] + more}
    out = prepare([write(tmp_path, forms)], str(tmp_path / "out"), val_fraction=0)
    assert out["kept"] == 1 and out["dropped"] == {"duplicate": 2}  # the three forms are one pair
    train, val, _ = load_dataset(str(tmp_path / "out"))
    assert train == [expected] and val == []


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "same", "rejected": "same"},
     "pairs.jsonl:1: chosen and rejected are the same reply; a pair needs two different replies"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "no"}, "pairs.jsonl:1: chosen reply is empty"),
    ({"prompt": "Hi", "chosen": "yes"}, "pairs.jsonl:1: missing field 'rejected'"),
    ({"chosen": [U, a("4")], "rejected": [{"role": "user", "content": "What is 3+3?"}, a("6")]},
     "pairs.jsonl:1: chosen and rejected share no prompt (no common messages ending with a user turn); a pair is "
     "two replies to the same prompt"),
    ({"chosen": [U, a("4"), {"role": "user", "content": "ok"}, a("a")],
      "rejected": [U, a("4"), {"role": "user", "content": "no"}, a("a")]},
     "pairs.jsonl:1: chosen and rejected differ before the reply (message 3); a pair must share its prompt"),
    ({"chosen": [U, a("4")], "rejected": [U, a("4"), {"role": "user", "content": "no"}, a("a")]},
     "pairs.jsonl:1: chosen has no reply after the shared prompt"),
    ({"messages": [U, a("x")], "chosen": "4", "rejected": "5"},
     "pairs.jsonl:1: the prompt must end with a user turn (the reply follows it)"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "4"}], "rejected": "5"},
     "pairs.jsonl:1: chosen message 1 has role 'user'; a reply starts with assistant"),
    ({"prompt": "Hi", "messages": [U], "chosen": "4", "rejected": "5"},
     "pairs.jsonl:1: give the prompt once: 'prompt' or 'messages', not both"),
    ({"prompt": "", "chosen": "4", "rejected": "5"}, "pairs.jsonl:1: prompt message 1 (user) is empty"),
])
def test_bad_pairs_name_file_line_and_reason(tmp_path, row, message):
    path = write(tmp_path, [row])
    with pytest.raises(ChatforgeError) as e:
        prepare([path], str(tmp_path / "out"))
    assert str(e.value).replace(str(tmp_path) + "/", "").startswith(message)


def test_a_bad_line_among_good_ones_names_its_line(tmp_path):
    rows = [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}] * 2 + ['{"prompt": "x", "chosen": 3, '
                                                                       '"rejected": "y"}']
    with pytest.raises(ChatforgeError, match=r"pairs\.jsonl:3: field 'chosen' must be a string, a message"):
        prepare([write(tmp_path, rows)], str(tmp_path / "out"))


def test_replies_equal_after_cleaning_are_dropped(tmp_path):
    rows = [{"prompt": "Hi", "chosen": "Hello  there", "rejected": "Hello there"},
            {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}]
    out = prepare([write(tmp_path, rows)], str(tmp_path / "out"), val_fraction=0)
    assert out["kept"] == 1 and out["dropped"] == {"empty": 1}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["What is 2+2? It is four. Be brief. Hello there, five"] * 5, vocab_size=300)


def test_the_prompt_is_rendered_exactly_as_at_inference_and_eos_appears_once(tok):
    prompt = [SYSTEM, U]
    for reply in ([a("It is four.")], [a("four"), {"role": "user", "content": "Hello"}, a("five")]):
        ids, mask, n = render_reply(tok, prompt, reply)
        inference, _ = tok.render(prompt, add_generation_prompt=True)
        assert ids[:n] == inference and not any(mask[:n])
        full, full_mask = tok.render(prompt + reply)
        assert ids == full  # nothing appended by hand
        trained = [i for i, m in zip(ids, mask) if m]
        assistant_turns = sum(m["role"] == "assistant" for m in reply)
        assert trained.count(tok.eos_id) == assistant_turns  # each reply turn's end-of-turn, once
        assert trained[-1] == tok.eos_id and ids.count(tok.eos_id) == len(prompt) + len(reply)
        last = max(i for i, m in enumerate(mask) if m)
        assert ids[last] == tok.eos_id
        assert tok.decode([i for i, m in zip(ids, mask) if m]).replace("<|im_end|>", "|").startswith(
            reply[0]["content"])


def test_encode_pairs_truncates_the_reply_and_drops_a_prompt_without_room(tok):
    long = {"prompt": [U], "chosen": [a("four " * 40)], "rejected": [a("five")]}
    short = {"prompt": [U], "chosen": [a("four")], "rejected": [a("five")]}
    huge = {"prompt": [{"role": "user", "content": "What " * 80}], "chosen": [a("four")], "rejected": [a("five")]}
    enc = encode_pairs([long, short, huge, {"messages": [U, a("4")]}], tok, 40)
    assert len(enc) == 2 and len(enc.chosen[0]) == 40
    assert enc.stats["truncated"] == 1 and enc.stats["dropped_no_trained_tokens"] == 1
    assert enc.stats["dropped_not_pairs"] == 1
