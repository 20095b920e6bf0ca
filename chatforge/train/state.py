"""The resume state of a run: trainable weights, optimizer, RNG states, data position and counters. No pickles.

Layout: out_dir/state/step-000120/ holds trainable.safetensors (the parameters being trained), optimizer.safetensors
(every optimizer state tensor, keyed "state.<param index>.<name>"), rng.safetensors (torch generator states) and
trainer.json (step, data position, best val loss, Python/numpy RNG, optimizer hyperparameters). A step folder is
written under a temporary name and renamed when complete; only then does out_dir/state/latest.json move to it
(atomic replace), and only after that are older step folders deleted. A kill at any instant therefore leaves
latest.json naming a complete folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chatforge.errors import ChatforgeError
from chatforge.io import atomic_folder, atomic_write_text

LATEST = "latest.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with requires_grad, by name (a tied weight once); frozen ones are rebuilt from init on resume."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_state(state_dir: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               trainer: dict, dist=None) -> Path:
    """Write step-N atomically, point latest.json at it, then delete older steps. Returns the step folder.

    dist (distributed.Dist): every rank calls this; weights and optimizer go into a DCP folder (dcp/) that each rank
    writes its shards into, and rank 0 alone writes the rest, renames and moves latest.json."""
    state_dir = Path(state_dir)
    main = dist is None or dist.main
    if main:
        state_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    k = 1
    while (state_dir / name).exists():  # the same step saved again (end of a run): never touch the one in use
        name, k = f"step-{step:07d}-{k}", k + 1
    final = state_dir / name
    if main:
        with atomic_folder(final, replace=False) as tmp:  # the one folder writer: complete or absent
            _write_state(_shared_path(tmp, dist), step, model, optimizer, trainer, dist, main)
    else:
        _write_state(_shared_path(None, dist), step, model, optimizer, trainer, dist, main)
    if not main:
        return final
    atomic_write_text(state_dir / LATEST, json.dumps({"step": step, "path": name}) + "\n")
    for old in state_dir.iterdir():
        if old.name != name and (old.name.startswith("step-") or old.name.startswith(".step-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _shared_path(tmp: Path | None, dist) -> Path:
    """Rank 0's temporary step folder, told to every rank (DCP writes each rank's shards into it)."""
    if dist is None:
        return tmp
    import torch.distributed as td

    shared = [str(tmp) if tmp is not None else None]
    td.broadcast_object_list(shared, src=0)
    return Path(shared[0])


def _write_state(tmp: Path, step: int, model, optimizer, trainer: dict, dist, main: bool) -> None:
    from safetensors.torch import save_file

    if dist is not None:
        from chatforge.train.distributed import save_checkpoint

        save_checkpoint(tmp / "dcp", model, optimizer)  # collective: returns once every rank has written
        opt_meta = {"dcp": True}
    else:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    if main:
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(trainer | {"step": step, "optimizer": opt_meta,
                                                                "rng": rng_meta}))


def latest_state(state_dir: str | os.PathLike) -> Path | None:
    """The step folder latest.json points to, or None when there is no saved state."""
    pointer = Path(state_dir) / LATEST
    if not pointer.exists():
        return None
    try:
        folder = Path(state_dir) / json.loads(pointer.read_text())["path"]
    except (ValueError, KeyError) as e:
        raise ChatforgeError(f"{pointer}: unreadable resume pointer ({e})")
    if not (folder / "trainer.json").exists():
        raise ChatforgeError(f"{pointer}: points to {folder.name}, which is missing or incomplete")
    return folder


def load_state(folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG states in place; returns trainer.json (step, data position, ...)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "dcp").is_dir():  # written by a distributed run: loads on any number of processes
        from chatforge.train.distributed import load_checkpoint

        try:
            trainer = json.loads((folder / "trainer.json").read_text())
            rng_tensors = load_file(str(folder / "rng.safetensors"))
            load_checkpoint(folder / "dcp", model, optimizer)
        except (OSError, ValueError, RuntimeError) as e:
            raise ChatforgeError(f"{folder}: cannot read the distributed resume state ({str(e).splitlines()[0]}); "
                                 "was the config changed since the run started?")
        set_rng_state(rng_tensors, trainer["rng"])
        return trainer
    try:
        trainer = json.loads((folder / "trainer.json").read_text())
        weights = load_file(str(folder / "trainable.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
        rng_tensors = load_file(str(folder / "rng.safetensors"))
    except (OSError, ValueError) as e:
        raise ChatforgeError(f"{folder}: cannot read resume state ({e})")
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        diff = sorted(set(weights) ^ expected)[:3]
        raise ChatforgeError(f"{folder}: saved weights do not match the model built from the config (e.g. {diff}); "
                             "was the config changed since the run started?")
    with torch.no_grad():
        for n, t in weights.items():
            if params[n].shape != t.shape:
                raise ChatforgeError(f"{folder}: {n} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(t)
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, trainer["optimizer"]))
    set_rng_state(rng_tensors, trainer["rng"])
    return trainer


@dataclass
class Progress:
    """The counters of a run, saved in trainer.json with every resume state."""

    step: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    elapsed_s: float = 0.0
    compute_s: float = 0.0
    best_val: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0
    last_val: dict | None = None
    warmup_progress: float | None = None  # share of a time-only budget the warm-up took (once it has run)

    def trainer(self, data_state: dict) -> dict:
        """trainer.json's fields (save_state adds the step, optimizer and RNG)."""
        return {"tokens": self.tokens, "trained_tokens": self.trained_tokens, "elapsed_s": self.elapsed_s,
                "compute_s": self.compute_s, "best_val": None if math.isinf(self.best_val) else self.best_val,
                "best_step": self.best_step, "bad_evals": self.bad_evals, "last_val": self.last_val,
                "warmup_progress": self.warmup_progress, "data": data_state}

    @classmethod
    def from_trainer(cls, st: dict) -> "Progress":
        return cls(step=st["step"], tokens=st["tokens"], trained_tokens=st["trained_tokens"],
                   elapsed_s=st["elapsed_s"], compute_s=st["compute_s"],
                   best_val=math.inf if st["best_val"] is None else st["best_val"], best_step=st["best_step"],
                   bad_evals=st["bad_evals"], last_val=st.get("last_val"), warmup_progress=st.get("warmup_progress"))
