"""Plans are made for a worker that consumes the training queue, and the worker that picks a job replans when
the plan was made for other hardware."""
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import services
from jobs.models import Dataset, FineTuneJob, JobEvent, Worker
from jobs.services import worker_planning

pytestmark = pytest.mark.django_db

H100 = {"gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_bytes": 80 * 2**30,
                  "free_bytes": 79 * 2**30, "compute_capability": "9.0", "bf16": True}],
        "cpu": {"cores": 16, "ram_total_bytes": 128 * 2**30, "ram_available_bytes": 120 * 2**30}}
DATASET_WORKER = {"gpus": [], "cpu": {"cores": 4, "ram_total_bytes": 16 * 2**30, "ram_available_bytes": 8 * 2**30}}


def _dataset(user, base):
    return Dataset.objects.create(owner=user, name="d", content_hash="x", file_path="/nonexistent", status="ready",
                                  schema="messages", rows=1000, train_rows=900,
                                  token_stats={"min": 20, "p50": 200, "p95": 400, "p99": 500, "max": 600},
                                  base_model=base)


def _worker(hostname, inventory, queues, seconds_ago=0):
    return Worker.objects.create(hostname=hostname, inventory=inventory, queues=queues,
                                 last_heartbeat=timezone.now() - timedelta(seconds=seconds_ago))


def test_the_training_worker_is_planned_for_even_when_the_dataset_worker_beat_last(user, tiny_base_model):
    _worker("gpu@box", H100, "gpu", seconds_ago=5)
    _worker("cpu@box", DATASET_WORKER, "default", seconds_ago=0)
    plan = services.make_plan(tiny_base_model, _dataset(user, tiny_base_model), "lora")
    assert plan["hardware"] == {"device": "cuda", "name": "NVIDIA H100 80GB HBM3", "worker": "gpu@box",
                                "source": "live"}
    assert plan["device"] == "cuda" and plan["dtype"] == "bf16"
    assert not plan["reasons"][0].startswith("No worker")


def test_without_a_live_training_worker_the_last_known_one_is_used_and_said(user, tiny_base_model):
    _worker("gpu@box", H100, "gpu,default", seconds_ago=3600)
    _worker("cpu@box", DATASET_WORKER, "default", seconds_ago=0)
    plan = services.make_plan(tiny_base_model, _dataset(user, tiny_base_model), "lora")
    assert plan["hardware"]["source"] == "last_known" and plan["hardware"]["name"] == "NVIDIA H100 80GB HBM3"
    assert plan["reasons"][0].startswith("No worker consuming the 'gpu' queue is alive: planned for the hardware "
                                         "of gpu@box")


def test_with_no_training_worker_ever_the_web_host_cpu_is_used_and_said(user, tiny_base_model):
    _worker("cpu@box", H100, "default")  # a GPU box that only processes datasets does not count
    plan = services.make_plan(tiny_base_model, _dataset(user, tiny_base_model), "lora")
    assert plan["hardware"]["source"] == "web_host" and plan["device"] == "cpu"
    assert "has ever reported: planned for this web host's CPU" in plan["reasons"][0]


def _queued_job(user, base, plan):
    return FineTuneJob.objects.create(owner=user, base_model=base, dataset=_dataset(user, base), plan=plan,
                                      method="lora", adapter_name="a")


def test_a_worker_with_other_hardware_replans_and_says_why(user, tiny_base_model):
    job = _queued_job(user, tiny_base_model, services.make_plan(tiny_base_model, None, "lora", gpu=H100))
    message = worker_planning.replan_for_worker(job, DATASET_WORKER, "cpu-trainer@box")
    job.refresh_from_db()
    assert job.plan["device"] == "cpu" and job.plan["hardware"]["name"] == "CPU (4 cores)"
    assert job.plan["hardware"]["worker"] == "cpu-trainer@box"
    event = JobEvent.objects.get(job=job, kind="replanned")
    assert event.message == message
    assert message.startswith("Planned for NVIDIA H100 80GB HBM3 (cuda), but cpu-trainer@box has CPU (4 cores) (cpu):"
                              " replanned for it: ")
    assert "device cuda -> cpu" in message and "dtype bf16 -> fp32" in message


def test_the_same_hardware_keeps_the_plan(user, tiny_base_model):
    plan = services.make_plan(tiny_base_model, None, "lora", gpu=H100)
    job = _queued_job(user, tiny_base_model, plan)
    assert worker_planning.replan_for_worker(job, H100, "gpu@box") is None
    job.refresh_from_db()
    assert job.plan == plan and not JobEvent.objects.filter(job=job).exists()


def test_a_job_with_checkpoints_keeps_its_plan(user, tiny_base_model):
    job = _queued_job(user, tiny_base_model, services.make_plan(tiny_base_model, None, "lora", gpu=H100))
    (job.checkpoint_dir / "checkpoints" / "step-1").mkdir(parents=True)
    message = worker_planning.replan_for_worker(job, DATASET_WORKER, "cpu-trainer@box")
    assert "the plan is kept" in message
    job.refresh_from_db()
    assert job.plan["device"] == "cuda"


def test_a_training_worker_reports_its_matmul_speed_and_a_dataset_worker_does_not(settings, tmp_path):
    settings.DATA_DIR = tmp_path
    trainer = worker_planning.worker_inventory("gpu,default")
    assert [e["device"] for e in trainer["matmul_speed"]] == ["cpu"]
    assert trainer["matmul_speed"][0]["bf16_speedup"] > 0
    assert (tmp_path / "matmul-speed.json").is_file()  # measured once, kept for the next heartbeat
    assert "matmul_speed" not in worker_planning.worker_inventory("default")


def test_the_heartbeat_reports_the_cpu_load_and_the_plan_says_when_the_machine_is_loaded():
    from jobs.plan_display import worker_notes

    load = worker_planning.worker_inventory("default")["cpu"]["load_1m"]
    assert isinstance(load, float) and load >= 0, "the 1-minute load average, next to the core count"
    busy_cpu = {**DATASET_WORKER, "cpu": {**DATASET_WORKER["cpu"], "load_1m": 3.9}}
    worker = _worker("cpu-box", busy_cpu, "gpu,default")
    cpu_plan = {"method": "lora", "device": "cpu"}
    assert any("cpu-box's CPUs busy (load 3.9 on 4 cores): the machine is loaded" in n for n in worker_notes(cpu_plan))

    worker.inventory = {**DATASET_WORKER, "cpu": {**DATASET_WORKER["cpu"], "load_1m": 0.5}}
    worker.save()
    assert not any("loaded" in n for n in worker_notes(cpu_plan)), "a quiet machine is not called loaded"

    worker.inventory = {**H100, "cpu": {**H100["cpu"], "load_1m": 40.0}}
    worker.save()
    assert not any("CPUs busy" in n for n in worker_notes({"method": "lora", "device": "cuda"})), \
        "a GPU plan on a GPU host is not slowed by the CPU load"

    worker.inventory, worker.last_heartbeat = busy_cpu, timezone.now() - timedelta(hours=1)
    worker.save()
    assert not any("loaded" in n for n in worker_notes(cpu_plan)), "a worker that stopped beating says nothing"
