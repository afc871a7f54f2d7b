"""A full disk while saving a checkpoint: the job fails with a message naming the problem, the previous
checkpoint stays intact, and a retry once there is room resumes from it. The disk is "filled" with a file-size
limit (RLIMIT_FSIZE) on the worker processes: writes past it fail with EFBIG, as a full disk fails with ENOSPC."""
import hashlib
import resource
from pathlib import Path

import psutil
import pytest
from helpers import events, job_state, make_job, send_train, start_worker, wait_for, wait_for_worker_ready

from jobs import queue, services
from jobs.models import AdapterVersion, JobStatus

LIMIT = 100 * 1024  # above the tiny model's trainable weights and the worker log, below its optimizer state


def limit_file_size(proc, limit):
    for pid in [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]:
        hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]  # only the soft limit: raising it back is allowed
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_checkpoint_save_on_a_full_disk_keeps_the_previous_one(tmp_path):
    """In-process: the second save fails cleanly and the first checkpoint is untouched and loadable."""
    import subprocess
    import sys

    code = f"""
import resource, torch
from finetune import checkpoint
from finetune.errors import TrainingError
model = torch.nn.Linear(64, 64)
for p in model.parameters(): p.requires_grad_(True)
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 64)).sum().backward(); opt.step()
root = {str(tmp_path)!r}
first = checkpoint.save(root, model, opt, {{"step": 1}}, {{}})
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
try:
    checkpoint.save(root, model, opt, {{"step": 2}}, {{}})
except checkpoint.DiskFullError as exc:
    print("DISKFULL", exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DISKFULL The disk is full: could not write the checkpoint at step 2" in done.stdout, done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]  # no half-written step-2, no temp folder
    import torch

    for name in ("trainable.pt", "optimizer.pt", "rng.pt"):
        torch.load(tmp_path / "step-1" / name, weights_only=True)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_job_fails_clearly_on_a_full_disk_and_resumes_after(tmp_path, user, dataset, private_redis, workers,
                                                            monkeypatch):
    # The worker re-sends queued jobs after 2 s: the retry below reaches it through its own (private) broker.
    worker = start_worker("diskfull", tmp_path / "worker.log", broker_url=private_redis.url,
                          extra_env={"TUNEDECK_RESEND_SECONDS": "2"})
    workers.append(worker)
    # Steps enough that the run is still going when the limit lands, however fast this machine trains.
    job = make_job(user, dataset, max_steps=400, checkpoint_every_steps=5)
    wait_for_worker_ready(worker)
    send_train(job.pk, private_redis.url)
    wait_for(lambda: events(job.pk, "checkpoint"), timeout=120, what="a first checkpoint", log_proc=worker)
    limit_file_size(worker, LIMIT)

    failed = wait_for(lambda: (j := job_state(job.pk)).status != JobStatus.RUNNING and j, timeout=120,
                      what="the job to fail", log_proc=worker)
    assert failed.status == JobStatus.FAILED
    assert failed.error.startswith("The disk is full: could not write the checkpoint at step"), failed.error
    assert "retry the job" in failed.error
    root = job.checkpoint_dir / "checkpoints"
    folders = sorted(p.name for p in root.iterdir())
    assert folders and all(name.startswith("step-") for name in folders), folders  # no temp folder left
    kept = root / max(folders, key=lambda n: int(n.split("-")[1]))
    before = digest(kept)
    assert {"trainable.pt", "optimizer.pt", "rng.pt", "state.json"} <= set(before)

    limit_file_size(worker, resource.RLIM_INFINITY)  # room again
    # retry_job publishes to the tests' shared broker, where the session's worker (if an earlier test started
    # it) could take the job before a purge: that message is held back, and the worker's resend delivers it.
    held_back = []
    monkeypatch.setattr(queue, "send_training", held_back.append)
    services.retry_job(failed)
    assert held_back == [job.pk]
    done = wait_for(lambda: (j := job_state(job.pk)).status in (JobStatus.SUCCEEDED, JobStatus.FAILED) and j,
                    timeout=180, what="the retried job", log_proc=worker)
    assert done.status == JobStatus.SUCCEEDED, done.error
    resumed = events(job.pk, "resumed")
    assert len(resumed) == 1 and resumed[0].data["step"] == int(kept.name.split("-")[1])
    assert AdapterVersion.objects.filter(job=job).count() == 1
