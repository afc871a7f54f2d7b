"""What this machine offers for training: GPUs through NVML, CPU cores and RAM.

    probe() -> {"gpus": [{"index", "name", "total_bytes", "free_bytes", "compute_capability", "bf16"}],
                "cpu": {"cores", "ram_total_bytes", "ram_available_bytes"}, "hostname",
                "packages": {"bitsandbytes": bool}}

A training worker adds "matmul_speed" (autotune/precision.py: its measured bf16 vs fp32 matmul speed), which needs
torch and so is not measured here.

NVML rather than torch: the web process and the worker heartbeat call this, and neither should pay for (or
hold) a CUDA context. Indexes follow CUDA_VISIBLE_DEVICES when it is set, so they are the ones torch will use.
probe() never raises: a missing driver, library or permission leaves that part empty or zero.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

BF16_MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere and newer have bfloat16 tensor cores


def probe() -> dict:
    return {
        "gpus": _never_raising(probe_gpus, []),
        "cpu": _never_raising(probe_cpu, {"cores": 1, "ram_total_bytes": 0, "ram_available_bytes": 0}),
        "hostname": _hostname(),
        "packages": {"bitsandbytes": _installed("bitsandbytes")},
    }


def _installed(package: str) -> bool:
    """Whether the package can be imported here, without importing it (bitsandbytes would load CUDA)."""
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _never_raising(function, fallback):
    try:
        return function()
    except Exception as exc:  # noqa: BLE001 - a heartbeat must report what it can rather than die
        log.warning("%s failed: %s", function.__name__, exc)
        return fallback


# ------------------------------------------------------------------------ GPUs


def probe_gpus() -> list[dict]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError or OSError: no driver, no GPU
        log.debug("NVML unavailable: %s", exc)
        return []
    try:
        return _visible_gpus(pynvml)
    except Exception as exc:  # noqa: BLE001 - a GPU that vanished or a driver hiccup must not break a heartbeat
        log.warning("GPU probe failed: %s", exc)
        return []
    finally:
        _quietly(pynvml.nvmlShutdown)


def _visible_gpus(pynvml) -> list[dict]:
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    selected = _cuda_visible(handles, pynvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return [_describe(position, handle, pynvml) for position, handle in enumerate(selected)]


def _cuda_visible(handles: list, pynvml, visible: str | None) -> list:
    """The devices CUDA exposes, in CUDA's order: CUDA_VISIBLE_DEVICES lists NVML indexes or UUID prefixes."""
    if visible is None:
        return handles
    chosen = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            if int(entry) >= len(handles):
                break  # CUDA stops at the first invalid entry
            chosen.append(handles[int(entry)])
            continue
        match = [h for h in handles if _text(pynvml.nvmlDeviceGetUUID(h)).startswith(entry)] if entry else []
        if len(match) != 1:
            break
        chosen.append(match[0])
    return chosen


def _describe(position: int, handle, pynvml) -> dict:
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    entry = {
        "index": position,
        "name": _text(pynvml.nvmlDeviceGetName(handle)),
        "total_bytes": int(memory.total),
        "free_bytes": int(memory.free),
        "compute_capability": f"{major}.{minor}",
        "bf16": (major, minor) >= BF16_MIN_COMPUTE_CAPABILITY,
    }
    reserved = serving_reserved_bytes(position)
    if reserved:
        entry["serving_reserved_bytes"] = reserved
    return entry


def serving_reserved_bytes(index: int) -> int:
    """GPU memory that vLLM servers being started by the inference server will take (serving.vllm_process writes
    the file named by TUNEDECK_SERVING_RESERVED_FILE); 0 when there is none."""
    import json

    path = os.environ.get("TUNEDECK_SERVING_RESERVED_FILE")
    try:
        return int(json.loads(Path(path).read_text()).get(str(index), 0)) if path else 0
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _quietly(function):
    try:
        function()
    except Exception:  # noqa: BLE001 - shutting NVML down is best effort
        pass


# ------------------------------------------------------------------------ CPU and RAM


def probe_cpu() -> dict:
    total, available = _ram()
    room = _cgroup_memory_room()
    if room is not None:  # a container sees the host's RAM but may only use its own limit
        total = min(total or room[0], room[0])
        available = min(available or room[1], room[1])
    return {"cores": _cores(), "ram_total_bytes": int(total), "ram_available_bytes": int(available)}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _ram() -> tuple[int, int]:
    try:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.total), int(memory.available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported: read /proc
        return _proc_meminfo()


def _proc_meminfo() -> tuple[int, int]:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kib = {k: int(v.split()[0]) for k, v in fields.items() if v.split()}
        return kib.get("MemTotal", 0) * 1024, kib.get("MemAvailable", kib.get("MemFree", 0)) * 1024
    except (OSError, ValueError):
        return 0, 0


def _cgroup_memory_room(root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """(limit, room left) under a cgroup v2 memory limit, or None when unlimited or unknown. Reclaimable page
    cache (inactive_file) counts as room, as MemAvailable does."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        usage = int((root / "memory.current").read_text().strip())
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines() if " " in line)
        reclaimable = int(stat.get("inactive_file", 0))
        return int(limit), max(0, int(limit) - usage + reclaimable)
    except (OSError, ValueError):
        return None


def _hostname() -> str:
    try:
        return socket.gethostname()
    except OSError:
        return "unknown"
