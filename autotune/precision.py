"""How fast this worker's training device multiplies bf16 matrices against fp32, measured once and kept.

    matmul_speed(cache_dir) -> [{"device", "name", "size", "fp32_tflops", "bf16_tflops", "bf16_speedup", "torch"}]

The planner (autotune/select.py) picks bf16 where it is measurably faster than fp32, CPU included: a CPU with
AVX512-BF16 or AMX runs bf16 matmuls faster than fp32, one without emulates them slowly. A guess from CPU flags
would be wrong both ways (oneDNN's paths differ by shape and by torch version), so the worker times it: a square
matmul of SIZE (a 2k hidden size, typical of the layers training runs), best of a few repeats after a warm-up.
The result is cached in cache_dir per device and torch version, so each worker measures once.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

SIZE = 2048
CPU_SIZE = 512  # a CPU without bf16 units emulates it (0.9 s for one 512 matmul on this 2-core machine)
REPEATS = 5
BUDGET_SECONDS = 2.0  # per dtype: a slow path stops repeating once it has been timed for this long
CACHE_NAME = "matmul-speed.json"


def matmul_speed(cache_dir, devices: list[str] | None = None) -> list[dict]:
    """The measurement of every training device here (cuda:0 when CUDA is available, else the CPU), from the cache
    when it was taken with this torch version, else measured now and cached."""
    import torch

    devices = devices or (["cuda"] if torch.cuda.is_available() else ["cpu"])
    cache = Path(cache_dir) / CACHE_NAME
    known = _read(cache)
    results = []
    for device in devices:
        name = device_name(device)
        entry = next((e for e in known if e.get("device") == device and e.get("name") == name
                      and e.get("torch") == torch.__version__), None)
        if entry is None:
            entry = measure(device)
            known = [e for e in known if not (e.get("device") == device and e.get("name") == name)] + [entry]
            _write(cache, known)
        results.append(entry)
    return results


def device_name(device: str) -> str:
    """The name the inventory uses for this device: NVML's GPU name, or "CPU (n cores)" as the planner writes it."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    from .probe import probe_cpu

    return f"CPU ({probe_cpu()['cores']} cores)"


def measure(device: str, size: int | None = None, repeats: int = REPEATS) -> dict:
    import torch

    size = size or (SIZE if device == "cuda" else CPU_SIZE)
    seconds = {dtype: _best_seconds(device, size, dtype, repeats) for dtype in (torch.float32, torch.bfloat16)}
    flops = 2 * size**3
    fp32, bf16 = flops / seconds[torch.float32] / 1e12, flops / seconds[torch.bfloat16] / 1e12
    return {"device": device, "name": device_name(device), "size": size, "fp32_tflops": float(f"{fp32:.4g}"),
            "bf16_tflops": float(f"{bf16:.4g}"), "bf16_speedup": float(f"{bf16 / fp32:.3g}"),
            "torch": torch.__version__}


def _best_seconds(device: str, size: int, dtype, repeats: int) -> float:
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    best, spent = float("inf"), 0.0
    for i in range(repeats + 1):  # the first run warms up (kernel selection, page faults) and is not counted
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        elapsed = time.perf_counter() - start
        spent += elapsed
        if i:
            best = min(best, elapsed)
            if spent > BUDGET_SECONDS:
                break
    return best


def _sync(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _read(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
        return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []
    except (OSError, ValueError):
        return []


def _write(path: Path, entries: list[dict]):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(path)
    except OSError as exc:  # a read-only or full disk: measured again next time, never fatal
        log.warning("could not keep the matmul measurement in %s: %s", path, exc)
