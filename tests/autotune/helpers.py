"""Inventories and dataset statistics shared by the autotune tests."""
from autotune.shapes import load_reference_config

GB = 10**9


def gpu_inventory(free_bytes, name="NVIDIA H100 80GB HBM3", capability="9.0", bf16=True, total_bytes=None):
    return {
        "gpus": [{"index": 0, "name": name, "total_bytes": total_bytes or max(free_bytes, 1), "free_bytes": free_bytes,
                  "compute_capability": capability, "bf16": bf16}],
        "cpu": {"cores": 16, "ram_total_bytes": 128 * GB, "ram_available_bytes": 120 * GB},
        "hostname": "test",
    }


def cpu_inventory(available_bytes=24 * GB):
    return {"gpus": [], "cpu": {"cores": 2, "ram_total_bytes": 32 * GB, "ram_available_bytes": available_bytes}}


def dataset(rows=5000, p99=1000, longest=3000):
    return {"rows": rows, "token_stats": {"count": rows, "min": 10, "p50": p99 // 3, "p95": p99 * 3 // 4,
                                          "p99": p99, "max": longest}}


def config(name):
    return load_reference_config(name)
