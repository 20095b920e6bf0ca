"""Reward-model folders in transformers' sequence-classification layout (what TRL's RewardTrainer writes).

config.json is the backbone's config with architectures *ForSequenceClassification and num_labels 1;
model.safetensors holds the backbone's weights under their usual names plus `score.weight` (1, d_model), so
`AutoModelForSequenceClassification.from_pretrained(folder)` loads it and scores as chatforge does. A model trained
with LoRA is written merged (base + adapter delta), since a reward folder is loaded on its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

from chatforge.errors import ChatforgeError
from chatforge.io import atomic_folder, read_json

HEAD = "score.weight"


def is_reward_folder(folder: str | os.PathLike) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    arch = read_json(path).get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in arch)


def merged_state_dict(core) -> dict:
    """The core's state dict with every peft LoRA layer folded in (base weight + its delta), under plain names;
    the training model is not touched."""
    import torch

    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft absent: no adapters to fold
        LoraLayer = ()
    sd = {}
    folded = {}
    for name, module in core.named_modules():
        if LoraLayer and isinstance(module, LoraLayer):
            base = module.get_base_layer()
            delta = sum((module.get_delta_weight(a) for a in module.active_adapters), torch.zeros_like(base.weight))
            folded[name + ".weight"] = (base.weight + delta).detach()
    for key, value in core.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        sd[plain] = folded.get(plain, value.detach())
    return sd


def save_reward_model(core, tokenizer, folder: str | os.PathLike) -> Path:
    """Write a reward-model folder (atomically) from a GPT whose lm_head is the scalar head."""
    import torch
    from safetensors.torch import save_file

    from chatforge.weights.folder import config_to_hf, state_dict_to_hf

    sd = merged_state_dict(core)
    head = sd.pop("lm_head.weight")
    plain = SimpleNamespace(state_dict=lambda: sd, config=core.config)  # the backbone, without the head
    tensors = {k: v.to("cpu", torch.float32).contiguous() for k, v in state_dict_to_hf(plain).items()}
    tensors.pop("lm_head.weight", None)
    tensors[HEAD] = head.to("cpu", torch.float32).contiguous()
    ids = {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": tokenizer.eos_id,
           "pad_token_id": tokenizer.pad_id}
    config = config_to_hf(core.config, ids)
    config["architectures"] = [config["architectures"][0].replace("LMHeadModel", "ForSequenceClassification")
                               .replace("ForCausalLM", "ForSequenceClassification")]
    config |= {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "dtype": "float32"}
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp))
    return folder


def load_reward_model(folder: str | os.PathLike, device: str = "cpu", dtype=None):
    """(GPT with its scalar head, tokenizer) from a reward-model folder."""
    import torch

    from chatforge.model.gpt import GPT
    from chatforge.model.reward import attach_scalar_head
    from chatforge.weights.folder import read_config, read_tokenizer, read_weights, state_dict_from_hf

    folder = Path(folder)
    if not is_reward_folder(folder):
        raise ChatforgeError(f"{folder}: not a reward model folder (config.json architectures is not "
                             "*ForSequenceClassification; train one with stage: reward)")
    config = read_config(folder)
    weights = read_weights(folder)
    if HEAD not in weights:
        raise ChatforgeError(f"{folder}: model.safetensors has no {HEAD} (the reward head)")
    head = weights.pop(HEAD)
    with torch.device("meta"):
        model = GPT(config)
    sd = state_dict_from_hf(weights, config)
    sd.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - {"lm_head.weight"}
    missing = sorted(expected - set(sd))
    if missing:
        raise ChatforgeError(f"{folder}: weights do not match config.json (missing {missing[:3]})")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False, assign=True)
    attach_scalar_head(model, head.float())
    tokenizer = read_tokenizer(folder)
    if tokenizer is None:
        raise ChatforgeError(f"{folder}: the reward model folder has no tokenizer")
    return model.to(device=device, dtype=dtype or torch.float32).eval(), tokenizer
