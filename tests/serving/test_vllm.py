"""Engine choice per method, the vLLM supervisor when vLLM is broken (it gives up and reports, never hangs), and
the built-in server's parameter refusals. The real vLLM server is exercised in tests/web/test_vllm_serving.py."""
import json
import sys
import threading
from pathlib import Path

import pytest

from serving.builtin import BuiltinEngine
from serving.engine import ADAPTER, MERGED, ServedModel, choose
from serving.vllm import VllmEngine
from serving.vllm_process import EngineSettings, VllmSupervisor, gpu_memory_fraction, max_lora_rank
from tests.finetune.adapter_factory import make_adapter

VLLM_PYTHON = sys.executable  # any interpreter file: the engine choice only checks that it is there
BUILTIN, VLLM = "builtin", "vllm"


def choose_engine(kind, model_dir, adapter_dir=None, *, vllm_python=VLLM_PYTHON, device="cpu") -> dict:
    """The inference server's choice between vLLM and the built-in engine, as a dict."""
    gpus = [{"index": 0, "total_bytes": 2**34, "free_bytes": 2**34}] if device == "cuda" else []
    engines = [VllmEngine(python=vllm_python, gpus=gpus), BuiltinEngine()]
    model = (ServedModel("m", MERGED, model_dir=Path(model_dir)) if kind == "merged" else
             ServedModel("m", ADAPTER, adapter_dir=Path(adapter_dir), base_path=Path(model_dir)))
    _, choice = choose(engines, model)
    return {"engine": choice.engine, "reason": choice.reason, "warning": choice.warning}


def smollm_like(folder: Path, head_dim=64) -> Path:
    """A config.json with SmolLM2's shape (no weights): enough for the engine choice."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 9 * head_dim, "num_attention_heads": 9,
        "max_position_embeddings": 2048}))
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-adapters")
    return {m: make_adapter(tiny_model_dir, root / m, m) for m in ("lora", "dora", "ia3", "prefix", "prompt")}


def test_engine_choice_per_method(adapters, tmp_path):
    base = smollm_like(tmp_path / "base")
    engines = {m: choose_engine("adapter", base, a, vllm_python=VLLM_PYTHON) for m, a in adapters.items()}
    assert engines["lora"]["engine"] == VLLM and "loaded at run time" in engines["lora"]["reason"]
    for method in ("dora", "ia3", "prefix", "prompt"):
        assert engines[method]["engine"] == BUILTIN, (method, engines[method])
        assert "vLLM cannot serve" in engines[method]["reason"]
    assert "DoRA" in engines["dora"]["reason"] and "IA3" in engines["ia3"]["reason"]
    merged = choose_engine("merged", base, vllm_python=VLLM_PYTHON)
    assert merged["engine"] == VLLM and "its own" in merged["reason"]


def test_bottleneck_and_qlora_adapters_stay_builtin(tmp_path):
    base = smollm_like(tmp_path / "base")
    bottleneck = tmp_path / "bottleneck"
    bottleneck.mkdir()
    (bottleneck / "adapter_config.json").write_text(json.dumps({"peft_type": "BOTTLENECK_ADAPTER"}))
    (bottleneck / "adapter_model.safetensors").write_bytes(b"")
    (bottleneck / "tunedeck.json").write_text(json.dumps({"method": "adapter"}))
    choice = choose_engine("adapter", base, bottleneck, vllm_python=VLLM_PYTHON)
    assert choice["engine"] == BUILTIN and "bottleneck adapter layers" in choice["reason"]
    qlora = tmp_path / "qlora"
    qlora.mkdir()
    (qlora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (qlora / "adapter_model.safetensors").write_bytes(b"")
    (qlora / "tunedeck.json").write_text(json.dumps({"method": "qlora"}))
    choice = choose_engine("adapter", base, qlora, vllm_python=VLLM_PYTHON)
    assert choice["engine"] == BUILTIN and "4-bit" in choice["reason"]


def test_models_vllm_cannot_run_and_a_missing_vllm_stay_builtin_with_a_warning(tiny_model_dir, tmp_path):
    # The tiny test model's head size (16) has no vLLM CPU kernel.
    tiny = choose_engine("merged", tiny_model_dir, vllm_python=VLLM_PYTHON, device="cpu")
    assert tiny["engine"] == BUILTIN and "head size 16" in tiny["reason"] and not tiny["warning"]
    missing = choose_engine("merged", smollm_like(tmp_path / "m"), vllm_python=str(tmp_path / "no-venv/python"))
    assert missing["engine"] == BUILTIN
    assert "scripts/setup-vllm.sh" in missing["warning"] and "built-in server serves it" in missing["warning"]


def test_lora_ranks_and_gpu_share():
    assert [max_lora_rank(r) for r in (1, 8, 9, 64, 65, 1000)] == [8, 8, 16, 64, 128, 512]
    gpu = {"total_bytes": 80 * 2**30, "free_bytes": 40 * 2**30}
    fraction = gpu_memory_fraction("/nonexistent", gpu, kv_cache_bytes=4 * 2**30)
    assert 0.05 < fraction < 0.1  # 4 GiB of KV + overhead of 80 GiB, not vLLM's default 0.9
    assert gpu_memory_fraction("/nonexistent", {"total_bytes": 80 * 2**30, "free_bytes": 2**30}, 8 * 2**30) < 0.02


def test_cpu_thread_binding_uses_every_core_of_a_small_host():
    from serving.vllm_process import cpu_thread_binding

    # vLLM's own binding keeps one of two cores for its scheduler: the model would run on one core.
    assert cpu_thread_binding("auto", [0, 1]) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1"}
    assert cpu_thread_binding("auto", list(range(32))) == {}
    assert cpu_thread_binding("all", [3, 1, 2]) == {"VLLM_CPU_OMP_THREADS_BIND": "1,2,3"}
    assert cpu_thread_binding("vllm", [0, 1]) == {}
    with pytest.raises(ValueError, match="auto, all or vllm"):
        cpu_thread_binding("both")


def test_a_broken_vllm_is_retried_then_reported_as_failed(tmp_path):
    """The training venv's python has no vllm module: the server exits at once; after a retry the supervisor
    gives up and reports the reason with the end of vLLM's log (the inference server then falls back)."""
    failed, ready = [], []
    done = threading.Event()
    settings = EngineSettings(python=sys.executable, log_dir=tmp_path / "logs", startup_timeout=60)
    supervisor = VllmSupervisor(settings, on_ready=ready.append,
                                on_failed=lambda name, reason: (failed.append((name, reason)), done.set()),
                                poll_seconds=0.2)
    model = smollm_like(tmp_path / "merged")
    supervisor.add_merged("pinger", model)
    assert supervisor.progress("pinger")["state"] == "starting"
    supervisor.start()
    try:
        assert done.wait(60), "the supervisor never gave up on a vLLM that cannot start"
    finally:
        supervisor.stop()
    assert ready == []
    [(name, reason)] = failed
    assert name == "pinger" and "exited with code" in reason and "No module named 'vllm'" in reason
    assert "pinger" not in supervisor and supervisor.servers == {}
    log = (tmp_path / "logs").glob("vllm-merged_pinger.log")
    assert next(log).read_text().count("== ") >= 2  # started twice: one retry


def test_the_planner_leaves_out_gpu_memory_promised_to_starting_vllm_servers(tmp_path, monkeypatch):
    from autotune.probe import serving_reserved_bytes
    from autotune.select import Notes, choose_target

    gpu = {"index": 0, "name": "GPU", "total_bytes": 80 * 2**30, "free_bytes": 60 * 2**30, "bf16": True}
    notes = Notes()
    plain = choose_target({"gpus": [gpu]}, {}, {}, notes)
    reserved = choose_target({"gpus": [{**gpu, "serving_reserved_bytes": 20 * 2**30}]}, {}, {}, notes)
    assert plain.free_bytes - reserved.free_bytes == 20 * 2**30
    assert any("promised to vLLM servers" in r for r in notes.reasons)
    # The supervisor's file, read by the probe.
    monkeypatch.setenv("TUNEDECK_SERVING_RESERVED_FILE", str(tmp_path / "reserved.json"))
    assert serving_reserved_bytes(0) == 0
    (tmp_path / "reserved.json").write_text(json.dumps({"0": 123}))
    assert serving_reserved_bytes(0) == 123 and serving_reserved_bytes(1) == 0
