"""Where to run and in which precision: CUDA when present, else CPU; bf16 autocast where the hardware has it."""

from __future__ import annotations

import contextlib

import torch

from chatforge.errors import ChatforgeError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ChatforgeError(f"device: unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ChatforgeError(f"device: {name} requested but CUDA is not available")
    return device


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # fast only with AVX-512 BF16 / AMX; the check is cheap and cached by torch
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    return False


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Sapphire Rapids and later), where oneDNN multiplies bf16 in tiles."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.13; absent: assume none
    return bool(amx is not None and amx())


# The one dtype vocabulary of every command and config (transformers' "float32" names stay inside config.json).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 where supported, else fp32; otherwise one of DTYPES."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if name not in DTYPES:
        raise ChatforgeError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type right now, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def release_host_memory() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc's malloc_trim; nothing elsewhere).

    glibc keeps freed multi-MiB blocks in its heap for reuse, so swapping a model's weights for smaller ones (a dtype
    change, quantization) leaves the process as large as before; after a load this keeps a server's resident size to
    what it holds."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def _peak_cache() -> "Path":
    import os
    from pathlib import Path

    root = os.environ.get("CHATFORGE_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chatforge"
    return base / "matmul_peak.json"


def _peak_key(device: torch.device, dtype: torch.dtype) -> str:
    import platform

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"
    return f"{device.type}|{name}|{torch.get_num_threads()} threads|{str(dtype).removeprefix('torch.')}|" \
           f"torch {torch.__version__}"


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.4) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device`: the best of repeated timings within `seconds`.

    It is the denominator of model-FLOPs utilisation (MFU), so it is measured on this machine, with this thread
    count, rather than read from a data sheet (a CPU's bf16 peak depends on AVX-512 BF16 / AMX being used)."""
    import time

    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up: kernel selection, page faults
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    reps = 10 if device.type == "cuda" else 2
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n ** 3 / best


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The best matmul peak (FLOP/s) measured on this device, dtype and thread count: measured at each start (0.4 s)
    and the best kept in ~/.cache/chatforge/matmul_peak.json. A shared machine measured at a busy moment gives a low
    peak; keeping the best means such a run still divides by the machine's real peak (MFU cannot read far above
    100%), and MFU only changes between runs when a better peak has been seen."""
    import json

    from chatforge.io import atomic_write_text

    path, key = _peak_cache(), _peak_key(device, dtype)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    peak = measure_matmul_peak(device, dtype)
    best = cached.get(key)
    if isinstance(best, (int, float)) and best >= peak:
        return float(best)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cached | {key: peak}, indent=1) + "\n")
    except OSError:  # a read-only home still trains; it measures again next time
        pass
    return peak
