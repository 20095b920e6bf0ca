"""The training config: typed, validated sections read from YAML plus `key=value` overrides, saved next to the run.

Every field has a default, so a recipe only states what differs. Everything is checked when the YAML is read, before
any data or model is loaded: unknown keys (with "did you mean ...?", also for the names other tools use, such as
`learning_rate`), wrong types, impossible values and impossible model shapes are errors that read
`file:line: field: reason` (or `override 'key=value': field: reason`). The `model:` section is checked against
ModelConfig, `lora:` is a LoraSpec, and tune's `search:` block is typed as SearchRange / SearchChoice entries.
Command-line overrides and tune trials go through the same path (`overrides` strings, or typed `values`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field

from chatforge.errors import ChatforgeError

STAGES = ("pretrain", "sft", "dpo", "reward")  # dpo, reward: train/preference.py
LOSS_TYPES = ("sigmoid", "ipo")
REFERENCES = ("auto", "frozen", "adapter-off", "precomputed")
LORA_ALL = "all-linear"  # lora.target_modules: every projection in the blocks

# Names other tools use (transformers, peft, nanoGPT, litgpt) -> chatforge's, for "did you mean ...?".
ALIASES = {
    "learning_rate": "lr", "lrate": "lr", "lr_rate": "lr", "min_learning_rate": "min_lr", "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps",
    "max_iters": "max_steps", "num_steps": "max_steps", "train_steps": "max_steps", "block_size": "seq_len",
    "max_seq_length": "seq_len", "context_length": "seq_len", "max_length": "seq_len",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "max_grad_norm": "grad_clip", "output_dir": "out_dir",
    "eval_steps": "eval_every", "eval_interval": "eval_every", "save_steps": "save_every",
    "logging_steps": "log_every", "dataset": "data", "model_name_or_path": "init", "base_model": "init",
    "num_hidden_layers": "n_layer", "num_layers": "n_layer", "hidden_size": "d_model", "n_embd": "d_model",
    "num_attention_heads": "n_head", "n_heads": "n_head", "num_key_value_heads": "n_kv_head",
    "intermediate_size": "d_ff", "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps",
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
}


@dataclass
class LoraSpec:
    """The `lora:` section: peft LoRA adapters on the blocks' projections (weights/lora.py applies them)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def check(self, bad) -> None:
        if self.r < 1:
            raise bad("lora.r", f"must be a positive integer, got {self.r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise bad("lora.alpha", f"must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != LORA_ALL:
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise bad("lora.target_modules", f"must be a non-empty list of module names or {LORA_ALL!r}")


@dataclass
class PerturbSpec:
    """The `perturbation:` section: robust training. Each user turn is perturbed with probability `rate` by one of
    `kinds` (data/perturb.py), re-drawn every epoch from (seed, epoch, record), so a resumed run sees the same text."""

    rate: float = 0.1
    kinds: list[str] = field(default_factory=lambda: ["typo", "swap", "homoglyph", "zero_width", "casing",
                                                      "whitespace"])

    def check(self, bad) -> None:
        from chatforge.data.perturb import KINDS

        if not 0.0 <= self.rate <= 1.0:
            raise bad("perturbation.rate", f"must be in [0, 1], got {self.rate}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise bad("perturbation.kinds", f"unknown kind {unknown[0]!r} (known: {', '.join(KINDS)})" if unknown
                      else f"must list at least one of {', '.join(KINDS)}")


@dataclass
class ReplaySpec:
    """The `replay:` section: general dialogs mixed into fine-tuning so the model keeps what it could (data/replay.py).
    `share` of each epoch's training records come from the train split of `data` (split as `val_fraction` splits it,
    so its held-out conversations stay out), each cut to its first `max_messages` messages, ending on a reply. Each
    epoch takes dialogs no earlier epoch had, for `epochs` epochs, then they come round again: a fixed few replayed
    every epoch are memorised and stop holding the model to general dialog."""

    data: str = "builtin:chitchat"
    share: float = 0.25
    max_messages: int | None = 6
    val_fraction: float = 0.1
    epochs: int = 32

    def check(self, bad, cfg) -> None:
        if cfg.stage not in ("pretrain", "sft"):
            raise bad("replay", f"stage {cfg.stage} is not supported (pretrain and sft are: replay adds dialogs, "
                                "not preference pairs)")
        if cfg.perturbation is not None:
            raise bad("replay", "cannot be used with perturbation: perturbation re-encodes a fixed record set "
                                "each epoch, replay changes the set each epoch")
        if self.epochs < 1:
            raise bad("replay.epochs", f"must be at least 1, got {self.epochs}")
        if not 0.0 < self.share < 1.0:
            raise bad("replay.share", f"must be between 0 and 1 (exclusive), got {self.share}")
        if self.max_messages is not None and self.max_messages < 2:
            raise bad("replay.max_messages", f"must be at least 2 (a question and its reply), got {self.max_messages}")
        if not 0.0 < self.val_fraction < 1.0:
            raise bad("replay.val_fraction", f"must be between 0 and 1 (exclusive), got {self.val_fraction}")


@dataclass
class PrivacySpec:
    """The `privacy:` section: differentially private training (DP-SGD through Opacus, train/dp.py). The privacy
    unit is one training record (conversation), or with unit: user every record sharing a `user` field (a person
    whose secret recurs across their conversations is protected as one). Give target_epsilon (the noise is
    calibrated to spend it over the step budget) or noise_multiplier (epsilon is whatever the steps spend); delta
    None: 1 / the number of units."""

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0  # each record's gradient is clipped to this L2 norm
    delta: float | None = None
    accountant: str = "rdp"  # rdp | prv (Opacus accountants)
    clipping: str = "flat"  # flat: per-sample gradients of every layer, clipped together
    unit: str = "record"  # record | user: whose gradient is clipped and sampled as one (batch_size counts units)

    def check(self, bad, cfg) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise bad("privacy", "give exactly one of target_epsilon and noise_multiplier")
        for name in ("target_epsilon", "noise_multiplier", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise bad(f"privacy.{name}", f"must be a positive number, got {value}")
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise bad("privacy.delta", f"must be in (0, 1), got {self.delta}")
        if self.accountant not in ("rdp", "prv"):
            raise bad("privacy.accountant", f"must be rdp or prv, got {self.accountant!r}")
        if self.unit not in ("record", "user"):
            raise bad("privacy.unit", f"must be record or user, got {self.unit!r}")
        if self.clipping not in ("flat", "ghost"):
            raise bad("privacy.clipping", f"must be flat or ghost, got {self.clipping!r}")
        if cfg.stage not in ("pretrain", "sft"):
            raise bad("privacy", f"stage {cfg.stage} is not supported (pretrain and sft are: their loss is a sum "
                                 "over each record's own tokens)")
        if self.target_epsilon is not None and not (cfg.max_steps or cfg.max_tokens):
            raise bad("privacy.target_epsilon", "needs max_steps or max_tokens: the noise is calibrated to the "
                                                "number of steps, which a time budget does not fix")
        refusals = {"compile": "a compiled model hides the layers whose per-sample gradients Opacus computes",
                    "gradient_checkpointing": "it re-runs the forward pass inside backward, which Opacus's "
                                              "per-sample hooks cannot follow",
                    "perturbation": "records re-drawn each epoch are not the records the accountant counts",
                    "replay": "replay dialogs drawn anew each epoch are not the records the accountant counts"}
        for name, why in refusals.items():
            if getattr(cfg, name) and getattr(cfg, name) != "auto":  # compile: auto stays eager with privacy
                raise bad(name, f"cannot be used with privacy: {why}")


@dataclass
class SearchRange:
    """A `search:` entry {low, high, log, step}: Optuna suggests a number in [low, high]."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False  # low, high and step are integers and the field is an integer: suggest_int


@dataclass
class SearchChoice:
    """A `search:` entry {choices: [...]}: Optuna picks one of them."""

    choices: list


@dataclass
class TrainConfig:
    """One training run. `chatforge train --config FILE.yaml key=value ...` fills it."""

    stage: str = "sft"  # pretrain: loss on every token | sft: loss on assistant tokens (+ their closing end-of-turn)
    data: str = "builtin"  # a prepared folder, a raw file/folder, or builtin[:language[/category]]
    val_fraction: float = 0.1
    tokenizer: str | None = None  # a tokenizer/model folder; None: the init model's, else train one on the train split
    vocab_size: int = 4096  # for a tokenizer trained here
    init: str | None = None  # None: from scratch; a model folder, a .gguf file or a known model name: fine-tune it
    model: dict = field(default_factory=lambda: {"preset": "nano"})  # preset + ModelConfig field overrides (scratch)
    out_dir: str = "runs/train"
    seq_len: int = 256  # tokens per row: the positions the model sees at once (a row stores seq_len + 1 ids)
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3  # the peak: reached at the last warm-up step, then a cosine to min_lr at the end of the budget
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 50
    max_steps: int | None = 1000  # the budget is whichever of max_steps / max_tokens / max_time_s runs out first
    max_tokens: int | None = None  # token positions processed (batch_size * grad_accum * seq_len per step)
    max_time_s: float | None = None  # training seconds, a hard stop; the cosine follows them only as the sole budget
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0  # None or 0: no clipping
    eval_every: int = 100
    eval_batches: int | None = 50  # None: the whole validation split
    save_every: int = 500
    early_stop_patience: int | None = None  # stop after this many evaluations without a better val loss
    dropout: float | None = None  # None: the model's own (0 for a preset, the checkpoint's for init)
    dtype: str = "auto"  # auto: bf16 autocast where the hardware has it, else fp32
    compile: bool | str = "auto"  # torch.compile the step: true | false | auto (where it pays: train/speed.py)
    distributed: str = "ddp"  # under torchrun: ddp (a replica per process) | fsdp (FSDP2: weights/optimizer sharded)
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None  # torch CPU threads; None: torch's default
    lora: LoraSpec | None = None  # e.g. {r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}
    freeze_embeddings: bool = False
    freeze_blocks: int = 0  # freeze the first N transformer blocks
    gradient_checkpointing: bool = False
    sample_prompts: list[str] = field(default_factory=list)  # greedy replies shown at the end (samples.json)
    sample_val_prompts: int = 0  # also reply to the first user turn of this many validation conversations
    log_every: int = 10  # progress bar refresh; metrics.jsonl gets every step
    # preference stages (dpo, reward; train/preference.py)
    beta: float = 0.1  # dpo: strength of the pull towards the reference (the implicit reward's scale)
    loss_type: str = "sigmoid"  # dpo: sigmoid (DPO) | ipo (IPO, on per-token mean log-probs)
    label_smoothing: float = 0.0  # dpo sigmoid: assumed share of flipped labels (conservative DPO)
    rpo_alpha: float = 0.0  # dpo: weight of the chosen reply's per-token NLL added to the loss (RPO; TRL's rpo_alpha)
    reference: str = "auto"  # dpo: frozen | adapter-off | precomputed; auto: adapter-off with lora, else frozen
    perturbation: PerturbSpec | None = None  # robust training: e.g. {rate: 0.1, kinds: [typo, homoglyph]}
    privacy: PrivacySpec | None = None  # DP-SGD: e.g. {target_epsilon: 8, max_grad_norm: 1.0} (train/dp.py)
    replay: ReplaySpec | None = None  # against forgetting: e.g. {data: builtin:chitchat, share: 0.25}

    def __post_init__(self) -> None:
        _check_types(self, lambda name: "config")
        self.validate()

    def validate(self, locate=lambda name: "config") -> None:
        """Cross-field checks that a type check cannot make; locate(field) says where the field was set."""
        def bad(name: str, why: str) -> ChatforgeError:
            return ChatforgeError(f"{locate(name)}: {name}: {why}")

        if self.stage not in STAGES:
            raise bad("stage", f"must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens", "max_time_s", "eval_batches", "early_stop_patience", "num_threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise bad(name, f"must be positive (or null), got {value}")
        if self.max_steps is None and self.max_tokens is None and self.max_time_s is None:
            raise bad("max_steps", "set at least one budget: max_steps, max_tokens or max_time_s")
        if not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        for name in ("lr", "weight_decay", "beta1", "beta2"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, f"must be a finite non-negative number, got {getattr(self, name)}")
        if self.lr == 0:
            raise bad("lr", "must be positive, got 0")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise bad("min_lr", f"must be between 0 and lr ({self.lr}), got {self.min_lr}")
        for name in ("warmup_steps", "freeze_blocks", "sample_val_prompts"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise bad("dtype", f"must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise bad("distributed", f"must be ddp or fsdp, got {self.distributed!r}")
        if self.distributed == "fsdp" and self.lora is not None:
            raise bad("distributed", "fsdp shards full training; LoRA's adapters are small, use ddp")
        if isinstance(self.compile, str) and self.compile != "auto":
            raise bad("compile", f"must be true, false or auto, got {self.compile!r}")
        if self.vocab_size < 261 and self.tokenizer is None and self.init is None:
            raise bad("vocab_size", f"must be more than 260 (4 specials + 256 bytes), got {self.vocab_size}")
        if self.lora is not None:
            self.lora.check(bad)
        if self.perturbation is not None:
            self.perturbation.check(bad)
        if self.privacy is not None:
            self.privacy.check(bad, self)
        if self.replay is not None:
            self.replay.check(bad, self)
        self._check_preference(bad)
        self._check_model(bad, locate)

    def _check_preference(self, bad) -> None:
        if not math.isfinite(self.beta) or self.beta <= 0:
            raise bad("beta", f"must be a positive number, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise bad("loss_type", f"must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise bad("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if not math.isfinite(self.rpo_alpha) or self.rpo_alpha < 0:
            raise bad("rpo_alpha", f"must be a number >= 0, got {self.rpo_alpha}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise bad("label_smoothing", "applies to loss_type sigmoid only")
        if self.reference not in REFERENCES:
            raise bad("reference", f"must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.reference == "adapter-off" and self.lora is None:
            raise bad("reference", "adapter-off needs lora: (the reference is the base without the adapter)")
        if self.stage == "dpo" and self.init is None:
            raise bad("init", "stage dpo fine-tunes a model: set init: to a model folder or known model name")
        if self.stage == "reward" and self.sample_prompts:
            raise bad("sample_prompts", "a reward model scores replies, it does not generate them")

    def _check_model(self, bad, locate) -> None:
        """The model section builds a model (scratch), or is empty but for a preset (init keeps its shape)."""
        if self.init is not None:
            shape = sorted(set(self.model) - {"preset"})
            if shape:
                raise bad(f"model.{shape[0]}", "a fine-tuned model keeps the init model's shape; "
                          "remove model: (set dropout: at the top level)")
            return
        from chatforge.model.gpt import PRESETS
        from chatforge.model.shape import model_config

        preset = self.model.get("preset")
        if preset is not None and preset not in PRESETS:
            raise bad("model.preset", f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        try:  # the tokenizer's vocabulary is not known yet; the shape rules do not depend on it
            model_config(self.model, self.vocab_size, self.seq_len, self.dropout)
        except ChatforgeError as e:
            name = str(e).split(":")[0]
            raise ChatforgeError(f"{locate(name)}: {e}") from None

    @property
    def final_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the YAML that reproduces this run (`chatforge train --config out_dir/config.yaml`)."""
        import yaml

        from chatforge.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


# ---------------------------------------------------------------- type checking

def _suggest(key: str, known) -> str:
    known = list(known)
    alias = ALIASES.get(str(key))
    close = [alias] if alias in known else difflib.get_close_matches(str(key), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_fields() -> dict[str, typing.Any]:
    """ModelConfig's fields that a `model:` section may set (the vocabulary comes from the tokenizer)."""
    from chatforge.model.gpt import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    return {"preset": str} | {k: v for k, v in hints.items() if k not in ("vocab_size", "extra")}


def _check_keys(section: dict, known, prefix: str, what: str, where) -> None:
    for key in section:
        if key not in known:
            hint = _suggest(key, known) or f" (known: {', '.join(known)})"
            if prefix == "model." and key == "vocab_size":
                hint = " (the tokenizer sets it: use vocab_size: at the top level)"
            raise ChatforgeError(f"{where(prefix + str(key))}: {prefix}{key}: unknown {what}{hint}")


def _expected(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, name: str, where):
    """value converted to annotation tp, or ChatforgeError naming the field. Floats accept YAML's '1e-3' strings;
    a mapping becomes the section's dataclass (LoraSpec)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        section = next((a for a in inner if dataclasses.is_dataclass(a)), None)
        if section is not None and isinstance(value, dict):
            return _build(section, value, name + ".", where)  # its own errors name the field inside
        for tp_inner in inner:
            try:
                return _coerce(value, tp_inner, name, where)
            except ChatforgeError:
                pass
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return _build(tp, value, name + ".", where)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is not None and float(number).is_integer():  # 1e6 in YAML is a float
            return int(number)
    elif tp is float:
        number = _number(value)
        if number is not None:
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif origin is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    section = dataclasses.is_dataclass(tp) or any(dataclasses.is_dataclass(a) for a in args)
    what = "a mapping" if section else _expected(tp)
    raise ChatforgeError(f"{where(name)}: {name}: expected {what}, got {value!r}")


def _number(value) -> float | int | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _build(cls, raw: dict, prefix: str, where):
    """A section dataclass from a mapping: unknown keys and wrong types named with their location."""
    hints = typing.get_type_hints(cls)
    _check_keys(raw, list(hints), prefix, "field", where)
    return cls(**{k: _coerce(v, hints[k], prefix + k, where) for k, v in raw.items()})


def _check_types(cfg: TrainConfig, where) -> None:
    for name, tp in typing.get_type_hints(TrainConfig).items():
        value = _coerce(getattr(cfg, name), tp, name, where)
        if name == "model":
            fields = _model_fields()
            _check_keys(value, list(fields), "model.", "model field", where)
            value = {k: _coerce(v, fields[k], f"model.{k}", where) for k, v in value.items()}
        setattr(cfg, name, value)


# ---------------------------------------------------------------- YAML, overrides, search

def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line in the YAML text, to point errors at the right line."""
    import yaml

    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _read_yaml(path: str) -> tuple[dict, dict[str, int]]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ChatforgeError(f"{path}: config file not found")
    except IsADirectoryError:
        raise ChatforgeError(f"{path}: is a folder, not a YAML config file")
    except OSError as e:
        raise ChatforgeError(f"{path}: cannot read ({e.strerror})")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ChatforgeError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e})")
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ChatforgeError(f"{path}:1: expected a mapping of config keys, got {type(loaded).__name__}")
    return loaded, _key_lines(text)


def _parse_override(item: str) -> tuple[str, object]:
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ChatforgeError(f"override {item!r}: expected key=value (e.g. lr=3e-4 or model.n_layer=6)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ChatforgeError(f"override {item!r}: value is not valid YAML ({str(e).splitlines()[0]})")
    return key.strip(), value


def _set(raw: dict, dotted: str, value, label: str) -> None:
    """raw[a][b] = value for dotted 'a.b'; a section that is unset starts from its default."""
    keys = dotted.split(".")
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    top = keys[0]
    if top not in known:
        raise ChatforgeError(f"{label}: {top}: unknown config key{_suggest(top, known)}")
    if len(keys) == 1:
        raw[top] = value
        return
    if top not in ("model", "lora", "perturbation", "privacy", "replay"):
        raise ChatforgeError(f"{label}: {top} is not a mapping, use {top}=VALUE")
    node = raw.get(top)
    if node is None:
        node = dict(TrainConfig.__dataclass_fields__["model"].default_factory()) if top == "model" else {}
    elif not isinstance(node, dict):
        node = dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node
    node = raw[top] = dict(node)
    for k in keys[1:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ChatforgeError(f"{label}: {k} is not a mapping")
    node[keys[-1]] = value


def _load(path: str | None, overrides, values: dict | None, with_search: bool) -> tuple[TrainConfig, dict | None]:
    raw, lines = _read_yaml(str(path)) if path else ({}, {})
    source = str(path) if path else "config"
    search = raw.pop("search", None) if with_search else None
    search_set = with_search and "search" in lines
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in raw:
        if key not in known:
            where = f"{source}:{lines[key]}" if key in lines else source
            raise ChatforgeError(f"{where}: {key}: unknown config key{_suggest(str(key), known)}")
    file_prompts = raw.get("sample_prompts")
    set_by: dict[str, str] = {}  # top-level key -> the override that set it last
    for item in overrides:
        dotted, value = _parse_override(item)
        _set(raw, dotted, value, f"override {item!r}")
        set_by[dotted.split(".")[0]] = f"override {item!r}"
    for dotted, value in (values or {}).items():
        _set(raw, dotted, value, f"value {dotted}={value!r}")
        set_by[dotted.split(".")[0]] = f"value {dotted}={value!r}"

    def locate(name: str) -> str:
        top = name.split(".")[0]
        if top in set_by:
            return set_by[top]
        line = lines.get(name) or lines.get(top)
        return f"{source}:{line}" if line else source

    cfg = TrainConfig.__new__(TrainConfig)
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(TrainConfig)}
    for name, default in defaults.items():
        setattr(cfg, name, raw.get(name, default))
    _check_types(cfg, locate)
    if "data" in set_by and file_prompts and "sample_prompts" not in set_by:
        # A recipe's prompts are about the recipe's data: with the user's data, ask what its validation split asks.
        cfg.sample_val_prompts = max(cfg.sample_val_prompts, len(cfg.sample_prompts))
        cfg.sample_prompts = []
    cfg.validate(locate)
    if search_set:
        return cfg, parse_search(search, lambda name: f"{source}:{lines.get(name) or lines['search']}")
    return cfg, None


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = (), values: dict | None = None
                ) -> TrainConfig:
    """TrainConfig from a YAML file (or the defaults when path is None), then `a.b=value` override strings and
    typed `values` ({"a.b": value}) applied in order, all checked as the file's own keys are."""
    return _load(path, overrides, values, with_search=False)[0]


def load_train_yaml(path: str, overrides: list[str] | tuple[str, ...] = (), values: dict | None = None
                    ) -> tuple[TrainConfig, dict[str, SearchRange | SearchChoice] | None]:
    """(TrainConfig, its `search:` block or None) from a training YAML that may carry one (`chatforge tune`)."""
    return _load(path, overrides, values, with_search=True)


def _field_type(name: str):
    """The annotation of a dotted config key (lr, model.d_model, lora.r), or None when there is no such key."""
    top, _, rest = name.partition(".")
    hints = typing.get_type_hints(TrainConfig)
    if top not in hints:
        return None
    if not rest:
        return hints[top]
    sections = {"lora": LoraSpec, "perturbation": PerturbSpec, "privacy": PrivacySpec, "replay": ReplaySpec}
    sub = _model_fields() if top == "model" else typing.get_type_hints(sections[top]) if top in sections else {}
    return sub.get(rest)


def parse_search(search, where) -> dict[str, SearchRange | SearchChoice]:
    """The `search:` block: dotted config key -> SearchRange or SearchChoice; where(name) locates an entry."""
    if not isinstance(search, dict) or not search:
        raise ChatforgeError(f"{where('search')}: search: expected a mapping of config keys to ranges, e.g. "
                             "lr: {low: 1e-4, high: 3e-3, log: true}")
    out: dict[str, SearchRange | SearchChoice] = {}
    for name, spec in search.items():
        at = where(f"search.{name}")

        def bad(why: str) -> ChatforgeError:
            return ChatforgeError(f"{at}: search.{name}: {why}")

        tp = _field_type(str(name))
        if tp is None:
            top = str(name).split(".")[0]
            raise bad(f"unknown config key {top!r}" if "." not in str(name) or _field_type(top) is None
                      else "unknown field")
        if not isinstance(spec, dict):
            raise bad(f"expected {{low, high}} or {{choices: [...]}}, got {spec!r}")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"] or set(spec) - {"choices"}:
                raise bad("choices must be a non-empty list (and alone)")
            for choice in spec["choices"]:
                _coerce(choice, tp, f"search.{name}", lambda _n: at)
            out[name] = SearchChoice(list(spec["choices"]))
            continue
        out[name] = _search_range(spec, tp, bad)
    return out


def _search_range(spec: dict, tp, bad) -> SearchRange:
    extra = set(spec) - {"low", "high", "log", "step"}
    if extra or "low" not in spec or "high" not in spec:
        raise bad(f"expected keys low, high (and optionally log, step), got {sorted(spec)}")
    low, high = _number(spec["low"]), _number(spec["high"])
    if low is None or high is None or not low < high:
        raise bad(f"need numbers low < high, got {spec['low']!r}, {spec['high']!r}")
    inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if inner[0] not in (int, float):
        raise bad(f"a range needs a numeric field; use choices: [...] for {_expected(tp)}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise bad("a log range needs low > 0")
    step = spec.get("step")
    if step is not None and (_number(step) is None or _number(step) <= 0):
        raise bad(f"step must be a positive number, got {step!r}")
    integer = all(isinstance(x, int) for x in (low, high)) and (step is None or isinstance(step, int))
    if inner[0] is int and not integer:
        raise bad(f"{_expected(tp)} field: low, high and step must be integers")
    return SearchRange(low, high, log, step, integer)
