"""LoRA through peft, freezing, and adapters that transformers + peft load as they are.

chatforge's GPT names its layers like transformers' Llama (model.layers.N.self_attn.q_proj, ...), so for the Llama
family (Llama, Mistral, Qwen2, SmolLM2) peft's own adapter files are already the ones `PeftModel.from_pretrained`
expects on the matching transformers model. GPT-2 is the exception: transformers fuses q, k and v into one Conv1D
(c_attn). Separate q/k/v adapters of rank r are exactly one c_attn adapter of rank 3r (A stacked, B block-diagonal),
so adapters are written in transformers' GPT-2 layout and split back on loading; nothing is refused or approximated.

When training added tokens (a base tokenizer given the chat tokens), the embeddings train too and the adapter
carries the resized embedding and head, as peft's save_embedding_layers does, so a user resizes the transformers
model to the adapter's tokenizer (`resize_token_embeddings(len(tokenizer))`) and loads it.

Facts about the base model come in as arguments (the ids it never saw, the name an adapter records as its base),
from the loader's result; nothing is read from attributes set on the module.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dataclasses import asdict

from chatforge.config import LORA_ALL, LoraSpec
from chatforge.errors import ChatforgeError
from chatforge.io import atomic_folder, read_json

if TYPE_CHECKING:
    import torch

    from chatforge.model.gpt import GPT
    from chatforge.tokenizer import Tokenizer

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULTS = asdict(LoraSpec())  # the `lora:` section's defaults, for a dict given in Python (one place: config)
_PREFIX = "base_model.model."  # peft's key prefix in adapter files
# chatforge GPT-2 module -> transformers GPT2 module (q/k/v all go into c_attn)
_GPT2_MODULES = {"o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}
_GPT2_EMBEDDINGS = {"model.embed_tokens.weight": "transformer.wte.weight", "lm_head.weight": "lm_head.weight"}


# ---------------------------------------------------------------- freezing


def _mask_rows(weight: torch.nn.Parameter, rows: list[int]) -> None:
    """Keep `weight` trainable but let gradient reach only `rows` (the embeddings of newly added tokens)."""
    import torch

    mask = torch.zeros(weight.shape[0], 1, device=weight.device, dtype=weight.dtype)
    mask[rows] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask.to(grad.dtype))


def freeze(model: GPT, freeze_embeddings: bool = False, freeze_blocks: int = 0,
           new_token_ids: Sequence[int] = ()) -> None:
    """Fine-tune less of a pretrained model: its input embeddings and/or its first `freeze_blocks` blocks.

    Rows of tokens the pretrained model never saw (new_token_ids, from the loader: chat tokens added, say) stay
    trainable with frozen embeddings, since they start untrained. An untied output head is not an input embedding and stays trainable; a tied one is the embedding.
    Note: an optimizer that applies weight decay to the embedding would still shrink the frozen rows.
    """
    n = model.config.n_layer
    if not 0 <= freeze_blocks <= n:
        raise ChatforgeError(f"freeze_blocks: must be between 0 and the model's {n} blocks, got {freeze_blocks}")
    for block in list(model.model.layers)[:freeze_blocks]:
        block.requires_grad_(False)
    if freeze_embeddings:
        model.model.embed_tokens.requires_grad_(False)
        if hasattr(model.model, "embed_positions"):
            model.model.embed_positions.requires_grad_(False)
        if new_token_ids:
            _mask_rows(model.model.embed_tokens.weight, list(new_token_ids))


# ---------------------------------------------------------------- applying LoRA


def _lora_config(model: GPT, lora_cfg: dict, freeze_blocks: int):
    """peft's LoraConfig in chatforge's module names, from the `lora:` section of a training config."""
    from peft import LoraConfig

    unknown = sorted(set(lora_cfg) - set(DEFAULTS))
    if unknown:
        raise ChatforgeError(f"lora.{unknown[0]}: unknown field (known: {', '.join(DEFAULTS)})")
    cfg = DEFAULTS | dict(lora_cfg)
    r, alpha, dropout, targets = cfg["r"], cfg["alpha"], cfg["dropout"], cfg["target_modules"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ChatforgeError(f"lora.r: must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ChatforgeError(f"lora.alpha: must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ChatforgeError(f"lora.dropout: must be in [0, 1), got {dropout!r}")
    present = [p for p in PROJECTIONS if hasattr(model.model.layers[0].self_attn, p)
               or hasattr(model.model.layers[0].mlp, p)]
    if targets == LORA_ALL:
        targets = present  # every projection in the blocks; never the (often tied) output head
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets:
        raise ChatforgeError("lora.target_modules: must be a non-empty list of module names or \"all-linear\"")
    for t in targets:
        if t not in present:
            raise ChatforgeError(f"lora.target_modules: no module {t!r} in this {model.config.family} model "
                                 f"(available: {', '.join(present)}, or all-linear)")
    n = model.config.n_layer
    if not 0 <= freeze_blocks < n:
        raise ChatforgeError(f"freeze_blocks: must be between 0 and {n - 1} for LoRA on a {n}-block model, "
                             f"got {freeze_blocks}")
    layers = list(range(freeze_blocks, n)) if freeze_blocks else None
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=sorted(set(targets)),
                      bias="none", layers_to_transform=layers, layers_pattern="layers" if layers else None)


def apply_lora(model: GPT, lora_cfg: dict, freeze_embeddings: bool = False, freeze_blocks: int = 0,
               new_token_ids: Sequence[int] = (), base_name_or_path: str | None = None):
    """Wrap the model in peft LoRA adapters; only the adapters train, plus the embeddings when tokens were added.

    lora_cfg: {r, alpha, dropout, target_modules} (defaults: 8, 16, 0.05, q/k/v/o_proj; "all-linear" = every
    projection in the blocks). freeze_blocks leaves the first k blocks without adapters. The pretrained embeddings
    stay frozen, unless new_token_ids lists tokens the base never saw: those start untrained, so the embedding (and
    an untied head) then trains in full, as peft's modules_to_save would, and is saved with the adapter.
    freeze_embeddings is then honoured by training only the new rows. base_name_or_path (the loader's
    Loaded.source) is what the saved adapter names as its base. Returns the peft model; call it like the GPT.
    """
    from peft import get_peft_model

    config = _lora_config(model, lora_cfg, freeze_blocks)
    peft_model = get_peft_model(model, config)
    _fast_dropout(peft_model)
    peft_model.peft_config["default"].base_model_name_or_path = base_name_or_path
    new_ids = list(new_token_ids)
    if new_ids:
        heads = [model.model.embed_tokens.weight] + ([] if model.config.tie_embeddings else [model.lm_head.weight])
        for weight in heads:
            if freeze_embeddings:
                _mask_rows(weight, new_ids)
            else:
                weight.requires_grad_(True)
    return peft_model


def _fast_dropout(peft_model) -> None:
    """peft's adapter dropout (nn.Dropout) becomes model/dropout.Dropout: the same rate, a 2x faster mask on CPU."""
    import torch

    from chatforge.model.dropout import Dropout

    for module in peft_model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, layer in drops.items():
                if type(layer) is torch.nn.Dropout and layer.p > 0:
                    drops[name] = Dropout(layer.p)


def autocast_inputs(model, device_type: str):
    """Under autocast, peft's adapters take their layer's input as it comes (the compute dtype) instead of casting it
    to their fp32 weights' dtype, which autocast casts straight back for the matmul: two copies of every adapted
    layer's input a step. Outside autocast (or for a model without adapters) nothing changes: a bf16 base with fp32
    adapters needs peft's cast there."""
    from chatforge.device import autocast_dtype

    if autocast_dtype(device_type) is None or getattr(getattr(model, "module", model), "peft_config", None) is None:
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


# ---------------------------------------------------------------- GPT-2 layout


def _module_key(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> ('model.layers.3', 'self_attn.q_proj')"""
    parts = key.removeprefix(_PREFIX).split(".")
    if len(parts) < 6 or parts[:2] != ["model", "layers"] or parts[-2] not in ("lora_A", "lora_B"):
        return None
    return ".".join(parts[:3]), ".".join(parts[3:-2])


def _pattern_value(pattern: dict, name: str, default):
    """rank_pattern / alpha_pattern lookup as peft does it: the key is a regex matched against the module's end."""
    import re

    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _gpt2_to_hf(sd: dict, config) -> tuple[dict, object]:
    """chatforge GPT-2 adapter (q/k/v separate) -> transformers GPT2 adapter (fused c_attn), exactly."""
    import torch

    config = copy.deepcopy(config)
    out: dict = {}
    fused: dict[str, dict] = {}  # layer -> {"q": (A, B, scale), ...}
    targets = set()
    for key, value in sd.items():
        if key.removeprefix(_PREFIX) in _GPT2_EMBEDDINGS:
            out[_PREFIX + _GPT2_EMBEDDINGS[key.removeprefix(_PREFIX)]] = value
            continue
        layer, module = _module_key(key)
        i = layer.split(".")[-1]
        leaf = module.split(".")[-1]
        ab = key.split(".")[-2]
        if leaf in ("q_proj", "k_proj", "v_proj"):
            fused.setdefault(i, {}).setdefault(leaf[0], {})[ab] = value
            continue
        hf = _GPT2_MODULES[leaf]
        targets.add(hf)
        out[f"{_PREFIX}transformer.h.{i}.{hf}.{ab}.weight"] = value
    rank_pattern, alpha_pattern = {}, {}
    for i, parts in fused.items():
        order = [x for x in "qkv" if x in parts]
        d = parts[order[0]]["lora_B"].shape[0]
        ranks = [parts[x]["lora_A"].shape[0] for x in order]
        names = [f"model.layers.{i}.self_attn.{x}_proj" for x in order]
        scales = [_pattern_value(config.alpha_pattern, n, config.lora_alpha)
                  / _pattern_value(config.rank_pattern, n, config.r) for n in names]
        total = sum(ranks)
        a = torch.cat([parts[x]["lora_A"] for x in order])
        b = torch.zeros(3 * d, total, dtype=a.dtype)
        col = 0
        for x, rank, scale in zip(order, ranks, scales):
            row = "qkv".index(x) * d
            b[row:row + d, col:col + rank] = parts[x]["lora_B"] * (scale / scales[0])
            col += rank
        out[f"{_PREFIX}transformer.h.{i}.attn.c_attn.lora_A.weight"] = a
        out[f"{_PREFIX}transformer.h.{i}.attn.c_attn.lora_B.weight"] = b
        rank_pattern[rf"h\.{i}\.attn\.c_attn"] = total  # peft reads pattern keys as regexes
        alpha_pattern[rf"h\.{i}\.attn\.c_attn"] = scales[0] * total
        targets.add("c_attn")
    if len(set(rank_pattern.values())) == 1 and len(set(alpha_pattern.values())) == 1:  # the usual case: one rule
        rank_pattern = {"c_attn": next(iter(rank_pattern.values()))}
        alpha_pattern = {"c_attn": next(iter(alpha_pattern.values()))}
    config.target_modules = sorted(targets)
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    config.fan_in_fan_out = True
    if config.layers_to_transform is not None:
        config.layers_pattern = "h"
    return out, config


def _gpt2_from_hf(sd: dict, config, d_model: int) -> tuple[dict, object]:
    """transformers GPT2 adapter -> chatforge GPT-2 adapter: c_attn's A serves q, k and v, B is split by rows."""
    config = copy.deepcopy(config)
    reverse = {v: k for k, v in _GPT2_MODULES.items()}
    emb = {v: k for k, v in _GPT2_EMBEDDINGS.items()}
    out: dict = {}
    targets, rank_pattern, alpha_pattern = set(), {}, {}
    for key, value in sd.items():
        name = key.removeprefix(_PREFIX)
        if name in emb:
            out[_PREFIX + emb[name]] = value
            continue
        parts = name.split(".")  # transformer.h.3.attn.c_attn.lora_A.weight
        if parts[:2] != ["transformer", "h"] or parts[-2] not in ("lora_A", "lora_B"):
            raise ChatforgeError(f"{ADAPTER_WEIGHTS}: unexpected tensor {key} for a GPT-2 adapter")
        i, module, ab = parts[2], ".".join(parts[3:-2]), parts[-2]
        rank = _pattern_value(config.rank_pattern, f"transformer.h.{i}.{module}", config.r)
        alpha = _pattern_value(config.alpha_pattern, f"transformer.h.{i}.{module}", config.lora_alpha)
        if module == "attn.c_attn":
            for j, x in enumerate("qkv"):
                piece = value if ab == "lora_A" else value[j * d_model:(j + 1) * d_model]
                out[f"{_PREFIX}model.layers.{i}.self_attn.{x}_proj.{ab}.weight"] = piece
                targets.add(f"{x}_proj")
                rank_pattern[rf"layers\.{i}\.self_attn\.{x}_proj"] = rank
                alpha_pattern[rf"layers\.{i}\.self_attn\.{x}_proj"] = alpha
        elif module in reverse:
            ours = reverse[module]
            section = "self_attn" if ours == "o_proj" else "mlp"
            out[f"{_PREFIX}model.layers.{i}.{section}.{ours}.{ab}.weight"] = value
            targets.add(ours)
            rank_pattern[rf"layers\.{i}\.{section}\.{ours}"] = rank
            alpha_pattern[rf"layers\.{i}\.{section}\.{ours}"] = alpha
        else:
            raise ChatforgeError(f"{ADAPTER_WEIGHTS}: LoRA on GPT-2 module {module!r} is not supported")
    config.target_modules = sorted(targets)
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    config.fan_in_fan_out = False
    if config.layers_to_transform is not None:
        config.layers_pattern = "layers"
    return out, config


# ---------------------------------------------------------------- saving and loading adapters


def save_adapter(model, folder: str | os.PathLike, base_name_or_path: str | None = None,
                 tokenizer: Tokenizer | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (+ the tokenizer) in peft's transformers layout, as one
    folder through io.atomic_folder (replacing one that is there).

    base_name_or_path defaults to what apply_lora recorded (the init model). When the embedding trains (apply_lora
    was given tokens the base never saw), the whole embedding and head are carried; pass the tokenizer then, so the
    adapter folder says which vocabulary its resized embedding belongs to.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    base = model.get_base_model()
    config = copy.deepcopy(model.peft_config["default"])
    sd = get_peft_model_state_dict(model, save_embedding_layers=False)  # "auto" would query the model hub
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    if base.model.embed_tokens.weight.requires_grad:  # new or resized rows trained: carry embedding and head
        if tokenizer is None:
            raise ValueError("save_adapter: the model has added tokens; pass the tokenizer that holds them")
        sd[_PREFIX + "model.embed_tokens.weight"] = base.model.embed_tokens.weight.detach().cpu().clone()
        sd[_PREFIX + "lm_head.weight"] = base.lm_head.weight.detach().cpu().clone()
    if base.config.family == "gpt2":
        sd, config = _gpt2_to_hf(sd, config)
    config.base_model_name_or_path = base_name_or_path or config.base_model_name_or_path
    config.task_type = "CAUSAL_LM"  # transformers' PeftModelForCausalLM / AutoPeftModelForCausalLM
    config.inference_mode = True
    data = config.to_dict()
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        if tokenizer is not None:
            tokenizer.save(str(tmp))
        save_file(sd, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True))
    return folder


def _read_adapter(folder: Path):
    from peft import LoraConfig, PeftType

    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise ChatforgeError(f"{folder}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    data = read_json(path)
    if data.get("peft_type") != PeftType.LORA.value:
        raise ChatforgeError(f"{path}: unsupported adapter type {data.get('peft_type')!r} (chatforge loads LORA)")
    if data.get("trainable_token_indices") or data.get("modules_to_save"):
        raise ChatforgeError(f"{path}: adapters with trainable_token_indices or modules_to_save are not supported")
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except Exception as e:  # peft validates fields with ValueError/TypeError
        raise ChatforgeError(f"{path}: invalid adapter config ({str(e).splitlines()[0][:200]})") from None
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ChatforgeError(f"{folder}: no {ADAPTER_WEIGHTS}")
    from safetensors.torch import load_file

    try:
        sd = load_file(str(weights))
    except Exception as e:
        raise ChatforgeError(f"{weights}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return config, sd


def load_adapter(model: GPT, folder: str | os.PathLike, merge: bool = False):
    """Put a saved adapter (chatforge's or peft's from transformers) on a chatforge model.

    Returns the peft model, or with merge the plain GPT with the adapter folded into its weights (what inference
    and `chatforge merge` want: no extra matmuls per token).
    """
    import torch
    from peft import PeftModel, set_peft_model_state_dict

    from chatforge.model.vocab import resize_vocab

    folder = Path(folder)
    config, sd = _read_adapter(folder)
    if model.config.family == "gpt2":
        if config.use_dora or config.use_rslora:  # the c_attn split assumes plain LoRA scaling (alpha / r)
            raise ChatforgeError(f"{folder / ADAPTER_CONFIG}: DoRA and rsLoRA adapters are not supported for GPT-2")
        sd, config = _gpt2_from_hf(sd, config, model.config.d_model)
    embed = sd.pop(_PREFIX + "model.embed_tokens.weight", None)
    head = sd.pop(_PREFIX + "lm_head.weight", None)
    if embed is not None:  # the adapter was trained with added tokens: take its embedding and head
        if embed.shape[1] != model.config.d_model or embed.shape[0] < model.config.vocab_size:
            raise ChatforgeError(f"{folder}: the adapter's embedding {tuple(embed.shape)} does not fit the base "
                                 f"model's ({model.config.vocab_size}, {model.config.d_model})")
        resize_vocab(model, embed.shape[0])
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(embed)
            if head is not None and not model.config.tie_embeddings:
                if head.shape != model.lm_head.weight.shape:
                    raise ChatforgeError(f"{folder}: the adapter's output head {tuple(head.shape)} does not fit "
                                         f"the base model's {tuple(model.lm_head.weight.shape)}")
                model.lm_head.weight.copy_(head)
    config.task_type, config.inference_mode = None, True
    wanted_prefix = _PREFIX + "model.layers."
    strays = [k for k in sd if not k.startswith(wanted_prefix)]
    if strays:
        raise ChatforgeError(f"{folder / ADAPTER_WEIGHTS}: unexpected tensor {strays[0]} (chatforge loads LoRA on "
                             f"the transformer blocks only)")
    try:
        peft_model = PeftModel(model, config)
        result = set_peft_model_state_dict(peft_model, sd)
    except (ValueError, RuntimeError) as e:  # target modules or shapes that don't fit this base
        raise ChatforgeError(f"{folder}: the adapter does not fit this base model "
                             f"({str(e).splitlines()[0][:200]})") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ChatforgeError(f"{folder}: the adapter does not fit this base model (missing {missing[:2]}, "
                             f"unexpected {list(result.unexpected_keys)[:2]})")
    peft_model.eval()
    if not merge:
        return peft_model
    merged = peft_model.merge_and_unload()
    merged.requires_grad_(True)  # peft froze the base while wrapping it; a plain model trains in full, as one loaded
    return merged


def resolve_adapter(path: str | os.PathLike) -> tuple[str, str] | None:
    """(base model, adapter folder) when `path` is an adapter folder, else None.

    The base is what the adapter names: a model folder, a .gguf file, a known model name or another adapter folder
    (a relative path is taken relative to the adapter folder when it does not exist from here).
    """
    folder = Path(path).expanduser()
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        return None
    base = read_json(config_path).get("base_model_name_or_path")
    if not base:
        raise ChatforgeError(f"{config_path}: base_model_name_or_path is not set; merge the adapter with "
                             f"`chatforge merge BASE {path} --out DIR`")
    if not Path(base).expanduser().exists() and (folder / base).exists():
        base = str(folder / base)
    return base, str(folder)
