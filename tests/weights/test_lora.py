"""LoRA: adapters chatforge trains load with peft onto the matching transformers model with the same outputs (and
peft's load in chatforge), merging gives a standalone folder equal to base + adapter, added chat tokens travel
with the adapter, and freezing keeps what it says fixed."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from chatforge.weights.folder import load_model, save_model
from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.weights.lora import apply_lora, freeze, load_adapter, resolve_adapter, save_adapter
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.weights.loader import load
from conftest import CHAT, assert_transformers_agrees, base_tokenizer_folder, chat_tokenizer, ids, max_diff

FAMILIES = {
    "gpt2": dict(family="gpt2", norm="layernorm", positions="learned", mlp="gelu", activation="gelu_tanh",
                 attn_bias=True, attn_out_bias=True, mlp_bias=True, n_layer=3, n_head=4, d_model=64, max_seq_len=128),
    "llama": dict(family="llama", n_layer=3, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64,
                  tie_embeddings=False),
    "qwen2": dict(family="qwen2", n_layer=3, n_head=4, n_kv_head=1, d_model=64, max_seq_len=64, attn_bias=True),
    "mistral": dict(family="mistral", n_layer=3, n_head=4, d_model=64, max_seq_len=64, sliding_window=8),
}
LORA = {"gpt2": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
        "llama": {"r": 4, "alpha": 16, "target_modules": "all-linear"},
        "qwen2": {"r": 2, "alpha": 4},
        "mistral": {"r": 8, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "up_proj"]}}


def base_folder(tmp_path: Path, family: str, tokenizer=None) -> Path:
    """A pretrained chatforge folder with random weights (norms and biases perturbed too)."""
    tokenizer = tokenizer or chat_tokenizer()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **FAMILIES[family]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return save_model(model, tokenizer, tmp_path / f"{family}-base")


def train_a_little(peft_model, tokenizer, steps: int = 3, lr: float = 1e-2) -> None:
    """Real optimizer steps on a chat, as training does, so adapters (and new rows) hold learned values."""
    x, mask = tokenizer.render(CHAT[:3])
    x, mask = torch.tensor([x]), torch.tensor([mask])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    peft_model.train()
    for _ in range(steps):
        logits = peft_model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:].bool()], x[:, 1:][mask[:, 1:].bool()])
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()


def trained_adapter(tmp_path: Path, family: str, freeze_blocks: int = 0):
    base = base_folder(tmp_path, family)
    loaded = load(str(base), chat_tokens=True)
    tokenizer = loaded.tokenizer
    peft_model = apply_lora(loaded.model, LORA[family], freeze_blocks=freeze_blocks,
                            new_token_ids=loaded.new_token_ids, base_name_or_path=loaded.source)
    train_a_little(peft_model, tokenizer)
    adapter = save_adapter(peft_model, tmp_path / f"{family}-adapter", tokenizer=tokenizer)
    return base, adapter, peft_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_loads_in_peft_and_transformers_with_same_outputs(tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    frozen = 1 if family in ("llama", "gpt2") else 0  # no adapters on block 0: layers_to_transform in the config
    base, adapter, peft_model = trained_adapter(tmp_path, family, freeze_blocks=frozen)
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "special_tokens_map.json", "tokenizer.json",
                                                         "tokenizer_config.json"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["task_type"] == "CAUSAL_LM"
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    x = ids(30, peft_model.config.vocab_size)
    with torch.no_grad():
        ours = peft_model(x)
        assert max_diff(ours, load_model(base)(x)) > 1e-2  # the adapter really changes the outputs
        assert max_diff(hf(x).logits, ours) <= 1e-4
        # and back: chatforge reads the saved adapter onto its own model, merged or not
        assert max_diff(load_adapter(load_model(base), adapter)(x), ours) <= 1e-4
        assert max_diff(load_adapter(load_model(base), adapter, merge=True)(x), ours) <= 1e-4


def test_lora_trains_only_adapters_and_skips_frozen_blocks(tmp_path):
    base = base_folder(tmp_path, "llama")
    loaded = load(str(base))
    model, tokenizer = loaded.model, loaded.tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = apply_lora(model, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, freeze_blocks=2)
    trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert trainable == [f"base_model.model.model.layers.2.self_attn.{m}_proj.lora_{ab}.default.weight"
                         for m in "qv" for ab in "AB"]
    train_a_little(peft_model, tokenizer)
    merged = peft_model.merge_and_unload()
    after = merged.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.v_proj.weight"]


def test_merge_command_equals_base_plus_adapter_and_loads_in_transformers(tmp_path, capsys):
    base, adapter, peft_model = trained_adapter(tmp_path, "qwen2")
    out = tmp_path / "merged"
    assert main(["merge", str(base), str(adapter), "--out", str(out)]) == 0
    merged = load_model(out)
    x = ids(30, merged.config.vocab_size)
    with torch.no_grad():
        assert max_diff(merged(x), peft_model(x)) <= 1e-4
    assert_transformers_agrees(out, merged)
    # an adapter folder is also a model to chatforge: its base comes from adapter_config.json
    assert resolve_adapter(adapter) == (str(base.resolve()), str(adapter))
    loaded = load(str(adapter))
    assert (loaded.folder, loaded.source) == (str(adapter), str(adapter.resolve()))
    with torch.no_grad():
        assert max_diff(loaded.model(x), peft_model(x)) <= 1e-4


def test_peft_adapter_from_transformers_loads_in_chatforge(tmp_path):
    """The other direction: an adapter peft trained on transformers' GPT-2 (fused c_attn) works on chatforge's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = base_folder(tmp_path, "gpt2")
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                        init_lora_weights=False, rank_pattern={"c_fc": 2})  # random B: a non-trivial adapter
    peft_hf = get_peft_model(hf, config).eval()
    peft_hf.save_pretrained(tmp_path / "hf-adapter")
    x = ids(30, hf.config.vocab_size)
    with torch.no_grad():
        ours = load_adapter(load_model(base), tmp_path / "hf-adapter", merge=True)
        assert max_diff(ours(x), peft_hf(x).logits) <= 1e-4


def test_added_chat_tokens_travel_with_the_adapter(tmp_path):
    """A base tokenizer without chat tokens: the new rows train, and transformers resized to the adapter's
    tokenizer + peft gives the same outputs; chatforge's merge carries the grown vocabulary."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.tokenizer import Tokenizer

    base_tok = Tokenizer.load(str(base_tokenizer_folder(tmp_path / "tok")))
    base = base_folder(tmp_path, "gpt2", tokenizer=base_tok)
    loaded = load(str(base), chat_tokens=True)
    model, tokenizer, new = loaded.model, loaded.tokenizer, list(loaded.new_token_ids)
    assert len(new) == 3
    original = load_model(base).model.embed_tokens.weight.detach().clone()
    peft_model = apply_lora(model, {"r": 4, "alpha": 8}, new_token_ids=new, base_name_or_path=loaded.source)
    train_a_little(peft_model, tokenizer)
    emb = model.model.embed_tokens.weight.detach()
    assert not torch.allclose(emb[new], emb[new[0] - 1:new[0]].expand(3, -1))  # the new rows learned
    adapter = save_adapter(peft_model, tmp_path / "adapter", tokenizer=tokenizer)

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    hf.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter)))
    hf = PeftModel.from_pretrained(hf, adapter).eval()
    chat_ids = tokenizer.render(CHAT, add_generation_prompt=True)[0]
    x = torch.tensor([chat_ids])
    with torch.no_grad():
        ours = peft_model(x)
        assert max_diff(hf(x).logits, ours) <= 1e-4
        again = load(str(adapter))
        assert again.tokenizer.vocab_size == tokenizer.vocab_size
        assert again.model.config.vocab_size == len(original) + 3
        assert max_diff(again.model(x), ours) <= 1e-4
    assert main(["merge", str(base), str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert max_diff(merged(x), ours) <= 1e-4
    assert_transformers_agrees(tmp_path / "merged", merged, tokenizer_ids=chat_ids)


def test_lora_with_frozen_embeddings_trains_only_the_new_token_rows(tmp_path):
    from chatforge.tokenizer import Tokenizer

    base_tok = Tokenizer.load(str(base_tokenizer_folder(tmp_path / "tok")))
    loaded = load(str(base_folder(tmp_path, "llama", tokenizer=base_tok)), chat_tokens=True)
    model, tokenizer, new = loaded.model, loaded.tokenizer, list(loaded.new_token_ids)
    before = {"embed": model.model.embed_tokens.weight.detach().clone(), "head": model.lm_head.weight.detach().clone()}
    peft_model = apply_lora(model, {"r": 4}, freeze_embeddings=True, new_token_ids=new)
    train_a_little(peft_model, tokenizer)
    old = [i for i in range(model.config.vocab_size) if i not in new]
    for name, weight in (("embed", model.model.embed_tokens.weight), ("head", model.lm_head.weight)):  # untied
        assert torch.equal(weight[old], before[name][old]), name
        assert not torch.equal(weight[new], before[name][new]), name


def test_full_fine_tuning_freezes_embeddings_and_first_blocks_but_trains_new_tokens(tmp_path):
    from chatforge.tokenizer import Tokenizer

    base_tok = Tokenizer.load(str(base_tokenizer_folder(tmp_path / "tok")))
    base = base_folder(tmp_path, "gpt2", tokenizer=base_tok)
    loaded = load(str(base), chat_tokens=True)
    model, tokenizer, new = loaded.model, loaded.tokenizer, list(loaded.new_token_ids)
    freeze(model, freeze_embeddings=True, freeze_blocks=1, new_token_ids=new)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_a_little(model, tokenizer)
    after = model.state_dict()
    old_rows = [i for i in range(model.config.vocab_size) if i not in new]
    assert torch.equal(after["model.embed_tokens.weight"][old_rows], before["model.embed_tokens.weight"][old_rows])
    assert not torch.equal(after["model.embed_tokens.weight"][new], before["model.embed_tokens.weight"][new])
    assert torch.equal(after["model.embed_positions.weight"], before["model.embed_positions.weight"])
    for k in before:
        if k.startswith("model.layers.0."):
            assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["model.layers.1.mlp.up_proj.weight"], before["model.layers.1.mlp.up_proj.weight"])


def test_bad_lora_settings_and_mismatched_adapters_are_one_line_errors(tmp_path, capsys):
    base = base_folder(tmp_path, "llama")
    with pytest.raises(ChatforgeError, match="lora.rank: unknown field"):
        apply_lora(load_model(base), {"rank": 8})
    with pytest.raises(ChatforgeError, match="lora.target_modules: no module 'c_attn'.*available: q_proj"):
        apply_lora(load_model(base), {"target_modules": ["c_attn"]})
    with pytest.raises(ChatforgeError, match="lora.r: must be a positive integer"):
        apply_lora(load_model(base), {"r": 0})
    with pytest.raises(ChatforgeError, match="freeze_blocks: must be between 0 and 2"):
        apply_lora(load_model(base), {}, freeze_blocks=3)
    _, adapter, _ = trained_adapter(tmp_path, "qwen2")  # d_model 64, 1 kv head: does not fit the llama base
    with pytest.raises(ChatforgeError, match="the adapter does not fit this base model"):
        load_adapter(load_model(base), adapter)
    capsys.readouterr()
    assert main(["merge", str(base), str(base), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a LoRA adapter folder" in err


@pytest.mark.parametrize("tokenizer_kind", ["chat", "base"])
def test_chatforge_train_lora_adapter_loads_everywhere(tmp_path, tokenizer_kind):
    """`chatforge train` with init + lora: the adapter names its base and carries its tokenizer; peft on
    transformers, chatforge (adapter folder as a model) and `chatforge merge` all give the same outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.load(str(base_tokenizer_folder(tmp_path / "tok"))) if tokenizer_kind == "base" else None
    base = base_folder(tmp_path, "gpt2" if tokenizer_kind == "base" else "llama", tokenizer=tok)
    run = tmp_path / "run"
    assert main(["train", f"init={base}", "data=builtin:english/tech_support", f"out_dir={run}", "lora.r=4",
                 "lora.alpha=8", "seq_len=64", "batch_size=4", "max_steps=3", "eval_every=3", "lr=1e-2",
                 "dtype=fp32", "warmup_steps=0"]) == 0
    adapter = run / "final"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    tokenizer = Tokenizer.load(str(adapter))
    assert tokenizer.has_chat_tokens()
    x = torch.tensor([tokenizer.render(CHAT, add_generation_prompt=True)[0]])
    model = load(str(adapter)).model  # what chatforge chat/generate/serve load for an adapter folder
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    hf.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter)))
    hf = PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        ours = model(x)
        assert max_diff(hf(x).logits, ours) <= 1e-4
    assert main(["merge", str(base), str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert max_diff(merged(x), ours) <= 1e-4
    assert_transformers_agrees(tmp_path / "merged", merged, tokenizer_ids=x[0].tolist())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_train_from_an_adapter_folder_starts_from_the_adapter(tmp_path, mode):
    """`init:` takes an adapter folder as chat does (the one loader): training starts from base + adapter. With a
    learning rate too small to move anything, the result equals the adapter's model and not the base's; a LoRA run
    on top names the adapter as its base, and loads back through both adapters."""
    from chatforge.weights.loader import resolve

    base, adapter, _ = trained_adapter(tmp_path, "llama")
    run = tmp_path / "run"
    args = ["train", f"init={adapter}", "data=builtin:english/tech_support", f"out_dir={run}", "seq_len=32",
            "batch_size=2", "max_steps=1", "eval_every=1", "eval_batches=1", "lr=1e-9", "weight_decay=0",
            "dropout=0", "dtype=fp32", "warmup_steps=0", "num_threads=1"] + (["lora.r=2"] if mode == "lora" else [])
    assert main(args) == 0
    final = run / "final"
    if mode == "lora":
        config = json.loads((final / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(adapter.resolve())
        chain = resolve(str(final))
        assert (chain.kind, chain.base.kind, chain.base.base.kind) == ("adapter", "adapter", "folder")
    else:
        assert resolve(str(final)).kind == "folder"
    started_from = load(str(adapter))
    x = torch.tensor([started_from.tokenizer.render(CHAT, add_generation_prompt=True)[0]])
    with torch.no_grad():
        trained = load(str(final)).model(x)
        assert max_diff(trained, started_from.model(x)) <= 1e-4
        assert max_diff(trained, load_model(base)(x)) > 1e-2


def test_adapters_take_autocast_inputs_uncast_with_the_same_loss_and_gradients(tmp_path):
    """In a bf16 training step the adapters read the bf16 norm output as it is (peft's cast to their fp32 weights,
    undone by autocast, is skipped inside autocast_inputs only): the same loss and gradients as with the cast; the
    adapters' dropout is chatforge's 16-bit one at the configured rate."""
    from chatforge.data.pack import Batch
    from chatforge.model.dropout import Dropout
    from chatforge.train.loss import token_loss
    from chatforge.train.speed import frozen_to
    from chatforge.weights.lora import autocast_inputs

    loaded = load(str(base_folder(tmp_path, "llama")))
    peft_model = apply_lora(loaded.model, {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"})
    drops = [m for m in peft_model.modules() if isinstance(m, Dropout)]
    assert len(drops) == 3 * 7 and {d.p for d in drops} == {0.1}
    with torch.no_grad():  # B starts at zero, which leaves A without a gradient
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    frozen_to(peft_model, torch.bfloat16)
    peft_model.eval()  # no dropout: the two runs see the same inputs
    x, mask = loaded.tokenizer.render(CHAT[:3])
    x, mask = torch.tensor([x]), torch.tensor([mask], dtype=torch.bool)
    batch = Batch(x[:, :-1], x[:, 1:], mask[:, 1:], torch.zeros_like(x[:, :-1]),
                  torch.arange(x.shape[1] - 1)[None], packed=False)
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    layers = [m for m in peft_model.modules() if hasattr(m, "cast_input_dtype_enabled")]

    def step(uncast: bool):
        peft_model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if uncast:
                loss = token_loss(peft_model, batch, torch.autocast("cpu", dtype=torch.bfloat16))[0]
            else:  # the same forward, peft casting each adapter's input to fp32 first
                loss = peft_model(batch.input_ids, only=batch.loss_mask, targets=batch.targets[batch.loss_mask])
        loss.backward()
        return float(loss), [p.grad.clone() for p in lora]

    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_inputs(peft_model, "cpu"):
        assert not any(m.cast_input_dtype_enabled for m in layers)
    assert all(m.cast_input_dtype_enabled for m in layers)  # restored; and outside autocast never touched:
    assert isinstance(autocast_inputs(peft_model, "cpu"), contextlib.nullcontext)
    (a, ga), (b, gb) = step(True), step(False)
    assert a == pytest.approx(b, rel=1e-3)
    for g1, g2 in zip(ga, gb):
        assert float((g1 - g2).norm() / g2.norm()) <= 0.02
