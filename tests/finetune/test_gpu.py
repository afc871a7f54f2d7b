"""On a CUDA GPU (skipped elsewhere; run through the device tool): every method trains a few steps in bf16, and
the tokens per second and peak memory of each are printed for the closing note.

    .venv/bin/pytest -q -s -m gpu tests/finetune/test_gpu.py
"""
import time

import pytest

from finetune.train import TrainSpec, train
from tinymodel import learnable_chat_rows, write_jsonl



def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Skipped here as well as by tests/conftest.py: bench/gpu_suite.sh runs this file with --noconftest, since the GPU
# machine has no Django.
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny random Llama of tests/conftest.py, built here too so this file needs no conftest."""
    from tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))

METHODS = ["lora", "qlora", "dora", "ia3", "prefix", "prompt", "adapter"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-data")
    return (write_jsonl(folder / "t.jsonl", learnable_chat_rows(64)),
            write_jsonl(folder / "e.jsonl", learnable_chat_rows(8)))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_the_gpu(tiny_model_dir, files, tmp_path, method):
    import torch

    torch.cuda.reset_peak_memory_stats()
    spec = TrainSpec.from_plan(
        {"method": method, "rank": 8, "alpha": 16, "micro_batch": 8, "max_seq_len": 128, "max_steps": 20,
         "learning_rate": {"ia3": 3e-2, "prefix": 1e-2, "prompt": 3e-2}.get(method, 2e-3), "device": "cuda",
         "max_eval_generations": 1, "max_new_tokens": 8},
        base_model_path=str(tiny_model_dir), train_file=str(files[0]), eval_file=str(files[1]),
        output_dir=str(tmp_path / "adapter"))
    start = time.perf_counter()
    result = train(spec)
    seconds = time.perf_counter() - start
    assert result.status == "succeeded"
    assert result.metrics["device"].startswith("cuda")
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"]
    print(f"\n{method}: {result.metrics['tokens_per_second']:.0f} tok/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB, {seconds:.1f}s, "
          f"kernels {result.metrics.get('kernels')}, loss {result.metrics.get('loss_path')}")


def test_dpo_trains_on_the_gpu(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"Say {w}", "chosen": w, "rejected": w[::-1]} for w in ("alpha", "bravo", "charlie") * 8]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    spec = TrainSpec.from_plan({"method": "dpo", "rank": 8, "alpha": 16, "micro_batch": 4, "max_steps": 10,
                                "learning_rate": 5e-4, "device": "cuda"},
                               base_model_path=str(tiny_model_dir), train_file=str(data), eval_file=str(data),
                               output_dir=str(tmp_path / "adapter"))
    result = train(spec)
    assert result.status == "succeeded" and result.metrics["reward_accuracy"] >= 0.5
