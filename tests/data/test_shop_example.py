"""examples/shop, the domain dataset the fine-tuning recipe ships with: the files are what make_shop.py builds, no
held-out question is asked in training, and every reply about a fact states it the way the fact check expects."""

import importlib.util
import json
from pathlib import Path

from chatforge.eval.facts import fact_ok, normalise, read_facts

SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop"


def make_shop():
    spec = importlib.util.spec_from_file_location("make_shop", SHOP / "make_shop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHOP / name).read_text(encoding="utf-8").splitlines()]


def test_shipped_files_are_what_the_generator_builds(tmp_path, monkeypatch):
    module = make_shop()
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.main()
    for name in ("conversations.jsonl", "facts.jsonl", "slots.json"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (SHOP / name).read_text(encoding="utf-8"), name


def test_held_out_questions_never_train_and_every_training_question_is_asked():
    module = make_shop()
    dialogs = rows("conversations.jsonl")
    asked = {normalise(m["content"]) for d in dialogs for m in d["messages"] if m["role"] == "user"}
    checks = read_facts(str(SHOP / "facts.jsonl"))
    assert len(dialogs) == 200 and len(checks) == 60
    assert {c["lang"] for c in checks} == {"en", "zh"}
    assert not [c for c in checks if normalise(c["messages"][-1]["content"]) in asked]
    for fact in module.FACTS.values():
        for lang in ("en", "zh"):
            assert {normalise(a) for a in fact["ask"][lang]} <= asked
            assert len(fact["ask"][lang]) >= 9


def test_every_answer_states_its_fact_as_the_check_expects():
    module = make_shop()
    for name, fact in module.FACTS.items():
        for lang in ("en", "zh"):
            for answer in fact["answer"][lang]:
                assert fact_ok(answer, fact["expect"][lang]), (name, answer)
