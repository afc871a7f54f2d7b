"""Measured fit-check peaks calibrate later plans for the same architecture and GPU model."""
import pytest

from jobs import services
from jobs.models import Dataset, FineTuneJob

pytestmark = pytest.mark.django_db

GPU = {"gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_bytes": 80 * 2**30,
                 "free_bytes": 79 * 2**30, "compute_capability": "9.0", "bf16": True}],
       "cpu": {"cores": 16, "ram_total_bytes": 128 * 2**30, "ram_available_bytes": 120 * 2**30}}


def _ready_dataset(user, base):
    return Dataset.objects.create(owner=user, name="d", content_hash="x", file_path="/nonexistent", status="ready",
                                  schema="messages", rows=1000, train_rows=900,
                                  token_stats={"min": 20, "p50": 200, "p95": 400, "p99": 500, "max": 600},
                                  base_model=base)


def _finished_job(user, base, dataset, plan, measured, device_name):
    return FineTuneJob.objects.create(
        owner=user, base_model=base, dataset=dataset, plan=plan, adapter_name="a", status="succeeded",
        metrics={"fit_check": {"measured_bytes": measured, "micro_batch": plan["micro_batch"],
                               "device_name": device_name, "fits": True}},
    )


def test_fit_checks_calibrate_the_next_plan(user, tiny_base_model):
    dataset = _ready_dataset(user, tiny_base_model)
    first = services.make_plan(tiny_base_model, dataset, "lora", gpu=GPU)
    assert "calibration" not in first
    breakdown = first["memory"]["breakdown"]
    dynamic = breakdown["activations"] + breakdown["logits"]
    fixed = sum(v for k, v in breakdown.items() if k not in ("activations", "logits", "allocator_headroom"))
    # The worker measured 1.5x the estimated activations on an H100; a job on another GPU does not count.
    _finished_job(user, tiny_base_model, dataset, first, int(fixed + 1.5 * dynamic), "NVIDIA H100 80GB HBM3")
    _finished_job(user, tiny_base_model, dataset, first, int(fixed + 9 * dynamic), "NVIDIA A10G")

    second = services.make_plan(tiny_base_model, dataset, "lora", gpu=GPU)
    assert second["calibration"] == {"activation_scale": 1.5, "jobs": 1, "device_name": "NVIDIA H100 80GB HBM3"}
    assert second["memory"]["breakdown"]["activations"] > breakdown["activations"] * 1.4
    # The scale was measured over activations plus logits, so both are scaled: the calibrated estimate, less its
    # fragmentation margin (which the fit check does not measure), is the measured peak.
    assert second["memory"]["breakdown"]["logits"] > breakdown["logits"] * 1.4
    calibrated = second["memory"]["breakdown"]
    others = sum(v for k, v in calibrated.items() if k != "allocator_headroom")
    assert others == pytest.approx(fixed + 1.5 * dynamic, rel=1e-3)
    assert any("measured by the fit check" in r for r in second["reasons"])


def test_replanned_jobs_do_not_calibrate(user, tiny_base_model):
    dataset = _ready_dataset(user, tiny_base_model)
    plan = services.make_plan(tiny_base_model, dataset, "lora", gpu=GPU)
    _finished_job(user, tiny_base_model, dataset, {**plan, "fit_history": [{}]}, 10**12, "NVIDIA H100 80GB HBM3")
    assert "calibration" not in services.make_plan(tiny_base_model, dataset, "lora", gpu=GPU)
