"""The training config is checked when it is read: every section typed, every error `file:line: field: reason`,
and overrides, typed values and tune's search block through the same path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.config import LoraSpec, SearchChoice, SearchRange, TrainConfig, load_config, load_train_yaml
from chatforge.errors import ChatforgeError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "chatforge" / "configs"


def error(path, text: str, overrides=()) -> str:
    path.write_text(text)
    with pytest.raises(ChatforgeError) as e:
        load_config(str(path), list(overrides))
    return str(e.value)


def test_config_errors_name_the_file_line_and_field(tmp_path):
    p = tmp_path / "run.yaml"
    assert error(p, "stage: sft\nlr: 3e-4\nbatch_sise: 8\n") == \
        f"{p}:3: batch_sise: unknown config key (did you mean 'batch_size'?)"
    assert error(p, "stage: sft\nmax_steps: lots\n") == f"{p}:2: max_steps: expected an integer, got 'lots'"
    assert error(p, "model:\n  preset: nano\n  n_layers: 3\n") == \
        f"{p}:3: model.n_layers: unknown model field (did you mean 'n_layer'?)"
    assert error(p, "stage: finetune\n") == f"{p}:1: stage: must be one of pretrain, sft, dpo, reward, got 'finetune'"
    with pytest.raises(ChatforgeError, match=r"^override 'lrate=1': lrate: unknown config key \(did you mean 'lr'\?\)$"):
        load_config(None, ["lrate=1"])
    with pytest.raises(ChatforgeError, match=r"^override 'lr=nan': lr: must be a finite"):
        load_config(None, ["lr=nan"])
    p.write_text("lr: 3e-4\nmodel:\n  preset: nano\n")  # YAML reads 3e-4 as a string; we take it as a number
    cfg = load_config(str(p), ["model.n_layer=6", "lora.r=8", "max_tokens=1e6", "sample_prompts=[hi, 你好]"])
    assert (cfg.lr, cfg.model, cfg.lora, cfg.max_tokens) == (3e-4, {"preset": "nano", "n_layer": 6}, LoraSpec(r=8),
                                                             10**6)
    assert cfg.sample_prompts == ["hi", "你好"]
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(str(tmp_path / "saved.yaml")) == cfg
    r = subprocess.run([sys.executable, "-m", "chatforge.cli", "train", "--config", str(p), "max_step=5"],
                       capture_output=True, text=True, cwd=ROOT)
    assert (r.returncode, r.stderr) == (2, "error: override 'max_step=5': max_step: unknown config key "
                                           "(did you mean 'max_steps'?)\n")


def test_names_from_other_tools_get_a_suggestion(tmp_path):
    p = tmp_path / "run.yaml"
    assert error(p, "stage: sft\nlearning_rate: 1e-3\n") == \
        f"{p}:2: learning_rate: unknown config key (did you mean 'lr'?)"
    assert error(p, "model:\n  hidden_size: 256\n") == \
        f"{p}:2: model.hidden_size: unknown model field (did you mean 'd_model'?)"
    assert error(p, "stage: sft\nlora:\n  rank: 8\n") == f"{p}:3: lora.rank: unknown field (did you mean 'r'?)"
    with pytest.raises(ChatforgeError, match=r"^override 'output_dir=x': output_dir: unknown config key "
                                             r"\(did you mean 'out_dir'\?\)$"):
        load_config(None, ["output_dir=x"])


def test_lora_and_model_sections_are_checked_when_read(tmp_path):
    """Before: `lora: {rr: 8}` loaded fine and failed only after the data and the model were loaded."""
    p = tmp_path / "run.yaml"
    assert error(p, "lr: 1e-3\nlora: {rr: 8}\n") == f"{p}:2: lora.rr: unknown field (did you mean 'r'?)"
    assert error(p, "lora:\n  alpha: 16\n  r: 0\n") == f"{p}:3: lora.r: must be a positive integer, got 0"
    assert error(p, "lora:\n  dropout: 1.5\n") == f"{p}:2: lora.dropout: must be in [0, 1), got 1.5"
    assert error(p, "lora:\n  alpha: big\n") == f"{p}:2: lora.alpha: expected a number, got 'big'"
    assert error(p, "lora: 8\n") == f"{p}:1: lora: expected a mapping, got 8"
    assert error(p, "model:\n  preset: nano\n  d_model: 100\n  n_head: 3\n") == \
        f"{p}:1: model: d_model 100 is not divisible by n_head 3"
    assert error(p, "model:\n  n_layer: two\n") == f"{p}:2: model.n_layer: expected an integer, got 'two'"
    assert error(p, "model:\n  vocab_size: 512\n") == (f"{p}:2: model.vocab_size: unknown model field (the "
                                                       "tokenizer sets it: use vocab_size: at the top level)")
    assert error(p, "seq_len: 512\nmodel:\n  max_seq_len: 256\n") == \
        f"{p}:3: model.max_seq_len: 256 is shorter than seq_len 512"
    assert error(p, "init: some/model\nmodel:\n  n_layer: 2\n") == (
        f"{p}:3: model.n_layer: a fine-tuned model keeps the init model's shape; remove model: (set dropout: at the "
        "top level)")
    assert error(p, "stage: sft\n", ["lora.r=-1"]) == "override 'lora.r=-1': lora.r: must be a positive integer, got -1"
    p.write_text("lora:\n  target_modules: all-linear\n")
    assert load_config(str(p)).lora == LoraSpec(target_modules="all-linear")
    assert TrainConfig(lora={"r": 4}).lora == LoraSpec(r=4)  # the dataclass itself checks too
    with pytest.raises(ChatforgeError, match=r"^config: lora.rank: unknown field \(did you mean 'r'\?\)$"):
        TrainConfig(lora={"rank": 4})


def test_typed_values_take_the_same_path_as_overrides(tmp_path):
    cfg = load_config(None, values={"lr": 2e-3, "model.d_model": 64, "lora.r": 4})
    assert (cfg.lr, cfg.model["d_model"], cfg.lora.r) == (2e-3, 64, 4)
    with pytest.raises(ChatforgeError) as e:
        load_config(None, values={"model.d_model": 17, "model.n_head": 2})
    assert str(e.value) == "value model.n_head=2: model: d_model 17 is not divisible by n_head 2"
    with pytest.raises(ChatforgeError, match=r"^value batch_size='x': batch_size: expected an integer, got 'x'$"):
        load_config(None, values={"batch_size": "x"})


def test_search_block_is_typed_with_a_line_per_entry(tmp_path):
    p = tmp_path / "tune.yaml"
    p.write_text("max_steps: 4\nsearch:\n  lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
                 "  model.n_layer: {low: 1, high: 4}\n  batch_size: {choices: [8, 16]}\n")
    cfg, space = load_train_yaml(str(p))
    assert cfg.max_steps == 4
    assert space == {"lr": SearchRange(1e-4, 1e-2, log=True), "model.n_layer": SearchRange(1, 4, integer=True),
                     "batch_size": SearchChoice([8, 16])}
    for entry, message in (
            ("  batch_size: {choices: [8, many]}", "4: search.batch_size: expected an integer, got 'many'"),
            ("  model.n_layers: {low: 1, high: 4}", "4: search.model.n_layers: unknown field"),
            ("  learning_rate: {low: 1, high: 4}", "4: search.learning_rate: unknown config key 'learning_rate'"),
            ("  batch_size: {low: 1.5, high: 4}", "4: search.batch_size: an integer field: low, high and step must "
                                                  "be integers"),
            ("  data: {low: 1, high: 4}", "4: search.data: a range needs a numeric field; use choices: [...] for a "
                                          "string")):
        p.write_text("max_steps: 4\nsearch:\n  lr: {low: 1.0e-4, high: 1.0e-2}\n" + entry + "\n")
        with pytest.raises(ChatforgeError) as e:
            load_train_yaml(str(p))
        assert str(e.value) == f"{p}:{message}"
    with pytest.raises(ChatforgeError, match=r"search: only chatforge tune|search: unknown config key"):
        load_config(str(p))


def test_a_recipes_sample_prompts_follow_the_users_data(tmp_path):
    """The LoRA recipe asks about printers; with data= pointing elsewhere it asks the user's validation split."""
    recipe = str(RECIPES / "sft-smollm2-lora.yaml")
    own = load_config(recipe)
    assert own.sample_prompts == ["My printer is not printing.", "What is an operating system?"]
    assert own.sample_val_prompts == 0
    moved = load_config(recipe, ["data=candles.jsonl"])
    assert (moved.sample_prompts, moved.sample_val_prompts) == ([], 2)
    chosen = load_config(recipe, ["data=candles.jsonl", "sample_prompts=['Do you ship to Spain?']"])
    assert (chosen.sample_prompts, chosen.sample_val_prompts) == (["Do you ship to Spain?"], 0)
    moved.save(tmp_path / "moved.yaml")  # the run's config.yaml reproduces the choice
    assert load_config(str(tmp_path / "moved.yaml")).sample_val_prompts == 2
