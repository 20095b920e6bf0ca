"""Writing folders: every model folder, adapter and GGUF conversion goes through io.atomic_folder, so a folder is
there whole or not at all, and it gets the usual permissions (umask), whoever wrote it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.io import atomic_folder, atomic_path, atomic_write_bytes
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.weights.folder import load_model, save_model
from chatforge.weights.loader import load
from chatforge.weights.lora import apply_lora, save_adapter
from test_gguf import tiny_hf_model, write_gguf
from conftest import chat_tokenizer, hf_folder
from test_lora import base_folder


@pytest.fixture
def umask():
    """Set the umask for one test and put the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def modes(folder: Path) -> tuple[int, set[int]]:
    """(the folder's permission bits, the set of its files' permission bits)."""
    return stat.S_IMODE(folder.stat().st_mode), {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def write_every_kind(tmp_path: Path) -> dict[str, Path]:
    """A folder from save_model, save_adapter, `chatforge import` of a transformers folder and of a GGUF file."""
    out = {"save_model": base_folder(tmp_path, "llama")}
    loaded = load(str(out["save_model"]))
    peft_model = apply_lora(loaded.model, {"r": 2}, base_name_or_path=loaded.source)
    out["save_adapter"] = save_adapter(peft_model, tmp_path / "adapter", tokenizer=loaded.tokenizer)
    src, _ = hf_folder(tmp_path, "qwen2")
    out["import"] = tmp_path / "imported"
    assert main(["import", str(src), "--out", str(out["import"])]) == 0
    gguf = write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"))
    out["import gguf"] = tmp_path / "imported-gguf"
    assert main(["import", str(gguf), "--out", str(out["import gguf"])]) == 0
    return out


def test_saved_folders_get_the_usual_permissions(tmp_path, umask, capsys):
    umask(0o022)
    for kind, folder in write_every_kind(tmp_path / "shared").items():
        assert modes(folder) == (0o755, {0o644}), kind  # readable by another user or a service account
    assert hidden(tmp_path / "shared") == []  # no temporary folder left next to them
    umask(0o077)  # the umask decides, not the writer
    for kind, folder in write_every_kind(tmp_path / "private").items():
        assert modes(folder) == (0o700, {0o600}), kind


def test_single_files_get_the_usual_permissions(tmp_path, umask):
    """atomic_path and atomic_write_bytes: safetensors' save_file writes 0600 on its own (a retrained moderation
    model was unreadable to other users); the umask decides, not the writer."""
    from safetensors.torch import save_file

    for mask, want in ((0o022, 0o644), (0o077, 0o600)):
        umask(mask)
        folder = tmp_path / f"m{mask:o}"
        with atomic_path(folder / "w.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, tmp)
        atomic_write_bytes(folder / "b.json", b"{}")
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == \
            {"w.safetensors": want, "b.json": want}


def test_a_failure_mid_write_leaves_no_partial_folder(tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []
    # a real failure inside save_model, after config.json is written: safetensors refuses a head that shares the
    # embedding's memory while the config says the two are separate
    tokenizer = chat_tokenizer()
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, d_model=32, tie_embeddings=False))
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(RuntimeError, match="share memory"):
        save_model(model, tokenizer, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
    # replacing a folder: a failed write keeps the old one whole
    good = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, d_model=32))
    save_model(good, tokenizer, tmp_path / "model")
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    with pytest.raises(RuntimeError, match="share memory"):
        save_model(model, tokenizer, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before and hidden(tmp_path) == []
    x = torch.randint(0, tokenizer.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "model")(x), good.eval()(x))


def test_atomic_folder_refuses_a_non_empty_target_without_replace(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(ChatforgeError, match="out: cannot write the folder"):
        with atomic_folder(tmp_path / "out", replace=False) as tmp:
            (tmp / "config.json").write_text("{}")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me" and hidden(tmp_path) == []
