import sys
import types

import pytest

from autotune import probe
from autotune.probe import _cgroup_memory_room, probe_gpus

GB = 10**9


class NVMLError(Exception):
    pass


def fake_nvml(devices, fail_init=False):
    """A stand-in for pynvml with `devices` as (name, total, free, (major, minor), uuid)."""
    module = types.ModuleType("pynvml")
    module.NVMLError = NVMLError
    module.shutdowns = 0

    def init():
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    def shutdown():
        module.shutdowns += 1

    module.nvmlInit = init
    module.nvmlShutdown = shutdown
    module.nvmlDeviceGetCount = lambda: len(devices)
    module.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    module.nvmlDeviceGetName = lambda h: h[0].encode()  # older bindings return bytes
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h[1], free=h[2], used=h[1] - h[2])
    module.nvmlDeviceGetCudaComputeCapability = lambda h: h[3]
    module.nvmlDeviceGetUUID = lambda h: h[4]
    return module


H100 = ("NVIDIA H100 80GB HBM3", 85 * GB, 84 * GB, (9, 0), "GPU-aaaa")
T4 = ("Tesla T4", 16 * GB, 15 * GB, (7, 5), "GPU-bbbb")


def test_probe_reports_every_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([H100, T4]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = probe_gpus()
    assert gpus == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_bytes": 85 * GB, "free_bytes": 84 * GB,
         "compute_capability": "9.0", "bf16": True},
        {"index": 1, "name": "Tesla T4", "total_bytes": 16 * GB, "free_bytes": 15 * GB,
         "compute_capability": "7.5", "bf16": False},
    ]
    assert sys.modules["pynvml"].shutdowns == 1


def test_cuda_visible_devices_renumbers_like_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([H100, T4]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [(g["index"], g["name"]) for g in probe_gpus()] == [(0, "Tesla T4")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,7")
    assert [g["name"] for g in probe_gpus()] == ["NVIDIA H100 80GB HBM3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert probe_gpus() == []


def test_no_driver_means_no_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([H100], fail_init=True))
    assert probe_gpus() == []


def test_a_failing_query_means_no_gpus_and_still_shuts_down(monkeypatch):
    nvml = fake_nvml([H100])
    nvml.nvmlDeviceGetMemoryInfo = lambda h: (_ for _ in ()).throw(NVMLError("GPU is lost"))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert probe_gpus() == []
    assert nvml.shutdowns == 1


def test_missing_pynvml_means_no_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert probe_gpus() == []


def test_probe_on_this_machine_has_the_documented_shape():
    inventory = probe()
    assert set(inventory) == {"gpus", "cpu", "hostname", "packages"}
    assert isinstance(inventory["packages"]["bitsandbytes"], bool)
    assert set(inventory["cpu"]) == {"cores", "ram_total_bytes", "ram_available_bytes"}
    assert inventory["cpu"]["cores"] >= 1
    assert 0 < inventory["cpu"]["ram_available_bytes"] <= inventory["cpu"]["ram_total_bytes"]
    for gpu in inventory["gpus"]:
        assert set(gpu) == {"index", "name", "total_bytes", "free_bytes", "compute_capability", "bf16"}


def test_probe_never_raises(monkeypatch):
    module = sys.modules["autotune.probe"]  # the package attribute is the function
    monkeypatch.setattr(module, "_ram", lambda: 1 / 0)
    inventory = probe()
    assert inventory["cpu"]["ram_available_bytes"] == 0


def test_cgroup_limit_counts_reclaimable_cache(tmp_path):
    (tmp_path / "memory.max").write_text("8000000000\n")
    (tmp_path / "memory.current").write_text("5000000000\n")
    (tmp_path / "memory.stat").write_text("anon 3000000000\ninactive_file 1000000000\n")
    assert _cgroup_memory_room(tmp_path) == (8 * GB, 4 * GB)
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_memory_room(tmp_path) is None
    assert _cgroup_memory_room(tmp_path / "missing") is None


@pytest.mark.parametrize("capability,bf16", [((8, 0), True), ((8, 6), True), ((7, 5), False), ((9, 0), True)])
def test_bf16_follows_compute_capability(monkeypatch, capability, bf16):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([("GPU", GB, GB, capability, "GPU-c")]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert probe_gpus()[0]["bf16"] is bf16
