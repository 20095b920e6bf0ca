"""The training config: one dataclass, read from YAML plus `key=value` overrides, saved next to the run.

Every field has a default, so a recipe only states what differs. Unknown keys and wrong types are errors that name
the file, the line and the field: a typo such as `lr_rate: 1e-3` must not silently train with the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field

from chatforge.errors import ChatforgeError

STAGES = ("pretrain", "sft")


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
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
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
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None  # torch CPU threads; None: torch's default
    lora: dict | None = None  # e.g. {r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}
    freeze_embeddings: bool = False
    freeze_blocks: int = 0  # freeze the first N transformer blocks
    gradient_checkpointing: bool = False
    sample_prompts: list[str] = field(default_factory=list)  # greedy replies printed at the end
    log_every: int = 10  # progress bar refresh; metrics.jsonl gets every step

    def __post_init__(self) -> None:
        _check_types(self, lambda name: f"config: {name}")
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
        if self.warmup_steps < 0:
            raise bad("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise bad("dtype", f"must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if self.freeze_blocks < 0:
            raise bad("freeze_blocks", f"must be >= 0, got {self.freeze_blocks}")
        if self.vocab_size < 261 and self.tokenizer is None and self.init is None:
            raise bad("vocab_size", f"must be more than 260 (4 specials + 256 bytes), got {self.vocab_size}")
        if self.init is None:
            from chatforge.model.gpt import PRESETS, ModelConfig

            known = {f.name for f in dataclasses.fields(ModelConfig)} | {"preset"}
            for key in self.model:
                if key not in known:
                    raise bad(f"model.{key}", f"unknown model field{_suggest(key, known)}")
            preset = self.model.get("preset")
            if preset is not None and preset not in PRESETS:
                raise bad("model.preset", f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        else:
            shape = sorted(set(self.model) - {"preset"})
            if shape:
                raise bad(f"model.{shape[0]}", "a fine-tuned model keeps the init model's shape; "
                          "remove model: (set dropout: at the top level)")

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
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _hints() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(value, tp, name: str, where):
    """value converted to annotation tp, or ChatforgeError naming the field. Floats accept YAML's '1e-3' strings."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 in YAML is a float
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
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
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp)
    if expected is None:
        expected = "a mapping" if (tp is dict or origin is dict) else "a list of strings"
    raise ChatforgeError(f"{where(name)}: expected {expected}, got {value!r}")


def _check_types(cfg: TrainConfig, where) -> None:
    for name, tp in _hints().items():
        setattr(cfg, name, _coerce(getattr(cfg, name), tp, name, where))


# ---------------------------------------------------------------- YAML + overrides

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


def _parse_override(item: str) -> tuple[list[str], object]:
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ChatforgeError(f"override {item!r}: expected key=value (e.g. lr=3e-4 or model.n_layer=6)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ChatforgeError(f"override {item!r}: value is not valid YAML ({str(e).splitlines()[0]})")
    return key.strip().split("."), value


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (or the defaults when path is None) with `a.b=value` overrides applied in order."""
    import yaml

    raw: dict = {}
    lines: dict[str, int] = {}
    source = str(path) if path else "config"
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ChatforgeError(f"{path}: config file not found")
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
        raw, lines = loaded, _key_lines(text)

    known = set(_hints())
    where_of: dict[str, str] = {}  # top-level key -> where its value came from, for error messages
    for key in raw:
        where_of[key] = f"{source}:{lines[key]}" if key in lines else source
        if key not in known:
            raise ChatforgeError(f"{where_of[key]}: unknown config key {key!r}{_suggest(str(key), known)}")

    for item in overrides:
        keys, value = _parse_override(item)
        top = keys[0]
        if top not in known:
            raise ChatforgeError(f"override {item!r}: unknown config key {top!r}{_suggest(top, known)}")
        where_of[top] = f"override {item!r}"
        if len(keys) == 1:
            raw[top] = value
            continue
        if top not in ("model", "lora"):
            raise ChatforgeError(f"override {item!r}: {top} is not a mapping, use {top}=VALUE")
        node = raw.get(top)
        if node is None:
            node = dict(TrainConfig().model) if top == "model" else {}
        node = raw[top] = dict(node)
        for k in keys[1:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ChatforgeError(f"override {item!r}: {k} is not a mapping")
        node[keys[-1]] = value

    defaults = TrainConfig()
    values = {f.name: raw.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig.__new__(TrainConfig)
    for name, value in values.items():
        setattr(cfg, name, value)

    def locate(name: str) -> str:
        top = name.split(".")[0]
        if where_of.get(top, "").startswith("override"):
            return where_of[top]
        line = lines.get(name) or lines.get(top)
        return f"{source}:{line}" if line else source

    _check_types(cfg, lambda name: f"{locate(name)}: {name}")
    cfg.validate(locate)
    return cfg
