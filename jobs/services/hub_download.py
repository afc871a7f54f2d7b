"""Worker side: pulling a base model from the Hugging Face Hub (started by jobs/hub_pulls.py) under a lease, with
progress, cancellation and resume, then the same validation as a registered folder. Only Celery workers import this
module (jobs/tasks.py, the heartbeat in jobs/worker_signals.py); tests/test_architecture.py holds the web process
to that.

Files go into `<folder>.partial` (finetune.hub keeps a partial file there and resumes it with a Range request
after a restart), and the finished folder is renamed into place, so a folder that exists is complete. A GGUF
repository is converted into a safetensors folder as the default model is (finetune.modelstore)."""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone

from finetune.errors import ModelFolderError

from .. import queue
from ..base_models import base_model_fields
from ..errors import InputError
from ..hub_pulls import ACTIVE, PULL_TASK
from ..hub_tokens import token_for
from ..models import BaseModel

log = logging.getLogger(__name__)
PROGRESS_WRITE_SECONDS = 0.5


class PullCancelled(Exception):
    """The row left the active states (cancelled or deleted) while its files were downloading."""


def recover_stuck_pulls() -> dict:
    """Pulls whose worker stopped renewing the lease (it died or restarted): sent again, to resume where their
    files stopped, until HUB_PULL_MAX_ATTEMPTS; then failed with the reason. Called from every worker's heartbeat."""
    stale = timezone.now() - timedelta(seconds=settings.HUB_PULL_LEASE_SECONDS)
    outcome = {"requeued": [], "failed": []}
    for pk, attempts in BaseModel.objects.filter(status__in=ACTIVE, heartbeat_at__lt=stale).values_list(
            "pk", "attempts"):
        lost = BaseModel.objects.filter(pk=pk, status__in=ACTIVE, heartbeat_at__lt=stale)
        if attempts >= settings.HUB_PULL_MAX_ATTEMPTS:
            if lost.update(status="failed", error=f"The download stopped {attempts} times without finishing (the "
                                                  "worker handling it stopped answering). Pull it again."):
                outcome["failed"].append(pk)
        elif lost.update(heartbeat_at=None):
            queue.send(PULL_TASK, pk)
            outcome["requeued"].append(pk)
    if outcome["requeued"] or outcome["failed"]:
        log.warning("stuck model pulls: %s", outcome)
    return outcome


def pull_base_model(model_id: int):
    """Downloads, converts if GGUF, validates. Every way out leaves the row ready, failed or cancelled."""
    from ..periodic import run_every

    if not _claim(model_id):
        return None  # finished, cancelled, deleted, or a live worker has it (a duplicate message)
    model = BaseModel.objects.get(pk=model_id)
    stopped = threading.Event()
    renew = threading.Thread(target=run_every, daemon=True, args=(
        settings.HUB_PULL_LEASE_SECONDS / 4, lambda: BaseModel.objects.filter(
            pk=model_id, status__in=ACTIVE).update(heartbeat_at=timezone.now()), stopped, "model pull lease"),
        kwargs={"wait_first": True})
    renew.start()
    try:
        _pull(model)
    except PullCancelled:
        _discard_partial(model)
    except (ModelFolderError, InputError) as exc:
        _finish(model_id, status="failed", error=str(exc))
    except Exception as exc:  # a bug must not leave the pull downloading forever
        log.exception("pulling base model %s failed", model_id)
        _finish(model_id, status="failed", error=f"The pull failed unexpectedly ({type(exc).__name__}); pull it "
                                                 "again, and report it if it fails the same way.")
    finally:
        stopped.set()
    return model_id


def _claim(model_id: int) -> bool:
    now = timezone.now()
    stale = now - timedelta(seconds=settings.HUB_PULL_LEASE_SECONDS)
    return bool(BaseModel.objects.filter(
        Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=stale), pk=model_id, status__in=ACTIVE,
    ).update(heartbeat_at=now, attempts=F("attempts") + 1, status="downloading"))


def _pull(model: BaseModel) -> None:
    folder = Path(model.path)
    if not _complete(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _folder_lock(folder):  # two rows (two users' gated pulls) of one folder download it once
            if not _complete(folder):
                _download_into_place(model, folder)
    if not BaseModel.objects.filter(pk=model.pk, status__in=ACTIVE).update(
            status="validating", bytes_done=F("bytes_total"), heartbeat_at=timezone.now()):
        raise PullCancelled()
    _validate(model, folder)


def _download_into_place(model: BaseModel, folder: Path) -> None:
    from finetune.hub import download_file

    partial = folder.with_name(folder.name + ".partial")
    token, _ = token_for(model.pulled_by, model.token_source)
    tracker = _Progress(model.pk)
    for entry in model.files:
        download_file(model.hub_endpoint, model.hub_repo, model.hub_commit, entry["name"], partial, token,
                      progress_class=tracker.bar_class())
        tracker.file_done(entry["size"])
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # where partial files were kept
    gguf = [e["name"] for e in model.files if e["name"].lower().endswith(".gguf")]
    if gguf:
        _convert_gguf(partial, partial / gguf[0])
    os.rename(partial, folder)


def _convert_gguf(partial: Path, gguf_path: Path) -> None:
    """The GGUF file becomes a safetensors folder, as the default model does (finetune.modelstore)."""
    from finetune.modelstore import _convert_gguf as convert

    converted = partial.with_name(partial.name + "-converted")
    shutil.rmtree(converted, ignore_errors=True)
    convert(gguf_path, converted)
    gguf_path.unlink()
    for item in converted.iterdir():
        os.replace(item, partial / item.name)
    converted.rmdir()


def _validate(model: BaseModel, folder: Path) -> None:
    from finetune.modelstore import inspect_model_folder

    try:
        info = inspect_model_folder(str(folder), allow_remote_code=model.trust_remote_code)
    except ModelFolderError as exc:
        raise ModelFolderError(f"The downloaded model is not usable: {exc}") from None
    fields = base_model_fields(info)
    _finish(model.pk, status="ready", error="", dtype=info.get("dtype") or "", size_bytes=_folder_bytes(folder),
            **fields)


def _finish(model_id: int, **fields) -> None:
    # A pull cancelled meanwhile stays cancelled.
    BaseModel.objects.filter(pk=model_id, status__in=ACTIVE).update(heartbeat_at=None, **fields)


def _discard_partial(model: BaseModel) -> None:
    others = BaseModel.objects.filter(path=model.path, status__in=ACTIVE).exclude(pk=model.pk).exists()
    if not others:
        shutil.rmtree(Path(model.path).with_name(Path(model.path).name + ".partial"), ignore_errors=True)
    BaseModel.objects.filter(pk=model.pk).update(heartbeat_at=None, bytes_done=0)


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextmanager
def _folder_lock(folder: Path):
    with open(folder.with_name(folder.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Progress:
    """Bytes done across the pull's files, written to the row at most every PROGRESS_WRITE_SECONDS; the write
    also finds out that the pull was cancelled, and stops the download mid-file."""

    def __init__(self, model_id: int):
        self.model_id, self.finished_bytes, self.current, self.written_at = model_id, 0, 0, 0.0

    def file_done(self, size: int) -> None:
        self.finished_bytes += size
        self.current = 0
        self.write(force=True)

    def write(self, force=False) -> None:
        now = time.monotonic()
        if not force and now - self.written_at < PROGRESS_WRITE_SECONDS:
            return
        self.written_at = now
        if not BaseModel.objects.filter(pk=self.model_id, status__in=ACTIVE).update(
                bytes_done=self.finished_bytes + self.current, heartbeat_at=timezone.now()):
            raise PullCancelled()

    def bar_class(self):
        """A progress-bar class for finetune.hub.download_file (made with total= and initial=, update(n) per chunk)."""
        tracker = self

        class Bar:
            def __init__(self, *args, initial=0, **kwargs):
                tracker.current = initial or 0  # a resumed partial file starts where it stopped

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                tracker.current += n
                tracker.write()

            def close(self):
                pass

        return Bar
