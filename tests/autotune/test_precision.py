"""The worker's bf16 vs fp32 matmul measurement is taken once per device and torch version, then kept."""
import json

import pytest

from autotune.precision import CACHE_NAME, matmul_speed

torch = pytest.importorskip("torch")


def test_measured_once_and_kept(tmp_path):
    [first] = matmul_speed(tmp_path, ["cpu"])
    assert first["device"] == "cpu" and first["name"].startswith("CPU (")
    assert first["fp32_tflops"] > 0 and first["bf16_tflops"] > 0
    assert first["bf16_speedup"] == pytest.approx(first["bf16_tflops"] / first["fp32_tflops"], rel=0.01)
    cache = tmp_path / CACHE_NAME
    # A kept measurement is returned as it is (a changed value proves no new measurement was taken).
    cache.write_text(json.dumps([{**first, "bf16_speedup": 9.5}]))
    assert matmul_speed(tmp_path, ["cpu"])[0]["bf16_speedup"] == 9.5
    # Another torch version measures again.
    cache.write_text(json.dumps([{**first, "torch": "0.0"}]))
    again = matmul_speed(tmp_path, ["cpu"])[0]
    assert again["torch"] == torch.__version__ and len(json.loads(cache.read_text())) == 1
