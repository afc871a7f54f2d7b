"""Business logic behind the pages, the API and the Celery tasks. Plain functions; nothing here imports torch
(the worker-only parts import the training libraries inside the functions that need them)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from finetune.errors import DatasetError

from . import queue
from .base_models import (  # noqa: F401 (callers use services.*)
    ADMINS_ONLY,
    base_model_fields,
    configured_model_roots,
    default_base_model,
    may_register_folders,
    register_base_model,
)
from .errors import InputError, NotAllowed  # noqa: F401 (re-exported: views and tasks import them from here)
from .models import (
    METHODS,
    AdapterLine,
    AdapterVersion,
    BaseModel,
    Dataset,
    FineTuneJob,
    JobEvent,
    JobStatus,
    Worker,
)
from .search import SEARCH_OVERRIDES, attach_budget, split_search_options  # issue 20 (search)

log = logging.getLogger(__name__)

SCHEMAS = ["messages", "sharegpt", "prompt_completion", "alpaca", "text", "preference", "kto"]
COPY_CHUNK = 1024 * 1024


# ---------------------------------------------------------------- datasets


def _store_upload(uploaded, dest_dir: Path) -> tuple[str, int, Path]:
    """Copies an upload chunk by chunk into a temp file under dest_dir, hashing as it goes.
    The user's file name is never used as a path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".upload-")
    with os.fdopen(fd, "wb") as out:
        for chunk in uploaded.chunks(COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return digest.hexdigest(), size, Path(tmp)


def _json_value(value, field: str):
    """Forms send JSON text; the API sends the object itself."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise InputError(f"{field} is not valid JSON: {exc.msg}.", field=field) from exc


def _clean_column_map(column_map) -> dict:
    if column_map in (None, "", {}):
        return {}
    column_map = _json_value(column_map, "column_map")
    if not isinstance(column_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in column_map.items()
    ):
        raise InputError(
            'column_map must map field names to your column names, e.g. {"prompt": "question"}.', field="column_map"
        )
    from finetune.data import check_options

    try:
        check_options(None, column_map)  # an unknown field is refused now, not after the upload is processed
    except DatasetError as exc:
        raise InputError(str(exc), field="column_map") from exc
    return column_map


def _clean_fraction(value) -> float:
    if value in (None, ""):
        return 0.1
    try:
        fraction = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError("validation_fraction must be a number between 0 and 0.5.", field="validation_fraction") from exc
    if not 0 <= fraction <= 0.5:
        raise InputError("validation_fraction must be between 0 and 0.5.", field="validation_fraction")
    return fraction


DATA_SUFFIXES = (".gz", ".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".parquet", ".txt")


def dataset_name_from_file(filename) -> str:
    """'support-chats.jsonl.gz' -> 'support-chats': the name a user would give it."""
    name = Path(filename or "dataset").name
    for suffix in DATA_SUFFIXES:  # in this order, so .jsonl.gz loses both
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name[:200] or "dataset"


def create_dataset(
    user,
    uploaded,
    *,
    name="",
    base_model: BaseModel | None = None,
    validation_file=None,
    validation_fraction=None,
    schema="",
    column_map=None,
    drop_invalid=False,
) -> tuple[Dataset, bool]:
    """Stores an uploaded file as an immutable dataset version keyed by its content hash, and queues its
    validation. Re-uploading the same file with the same settings returns the existing version."""
    if uploaded is None:
        raise InputError("Choose a file to upload.", field="file")
    if uploaded.size == 0:
        raise InputError("The file is empty.", field="file")
    schema = (schema or "").strip()
    if schema and schema not in SCHEMAS:
        raise InputError(f"Unknown schema {schema!r}; choose one of {', '.join(SCHEMAS)}.", field="schema")
    column_map = _clean_column_map(column_map)
    fraction = _clean_fraction(validation_fraction)
    base_model = base_model or default_base_model()

    user_dir = settings.DATASET_DIR / f"user-{user.pk}"
    content_hash, size, tmp = _store_upload(uploaded, user_dir)
    val_hash, val_tmp = "", None
    try:
        if validation_file is not None:
            if validation_file.size == 0:
                raise InputError("The validation file is empty.", field="validation_file")
            val_hash, _, val_tmp = _store_upload(validation_file, user_dir)
        options = json.dumps(
            [val_hash, fraction, schema, column_map, bool(drop_invalid), base_model.pk if base_model else None],
            sort_keys=True,
        )
        options_hash = hashlib.sha256(options.encode()).hexdigest()
        existing = Dataset.objects.filter(owner=user, content_hash=content_hash, options_hash=options_hash).first()
        if existing:
            if name.strip() and name.strip() != existing.name:  # the same file under a new name takes the name
                existing.name = name.strip()[:200]
                existing.save(update_fields=["name"])
            return existing, False
        version_dir = user_dir / f"{content_hash[:16]}-{options_hash[:8]}"
        version_dir.mkdir(parents=True, exist_ok=True)
        source = version_dir / "source"
        os.replace(tmp, source)
        tmp = None
        val_source = ""
        if val_tmp is not None:
            val_source = str(version_dir / "validation-source")
            os.replace(val_tmp, val_source)
            val_tmp = None
        display = name.strip() or dataset_name_from_file(uploaded.name)
        with transaction.atomic():
            dataset = Dataset.objects.create(
                owner=user,
                name=display,
                original_filename=Path(uploaded.name or "").name[:300],
                content_hash=content_hash,
                options_hash=options_hash,
                file_path=str(source),
                size_bytes=size,
                validation_file_path=val_source,
                validation_fraction=fraction,
                base_model=base_model,
                schema_override=schema,
                column_map=column_map,
                drop_invalid=bool(drop_invalid),
            )
            transaction.on_commit(lambda: queue.send_dataset_processing(dataset.pk, size))
        return dataset, True
    finally:
        for leftover in (tmp, val_tmp):
            if leftover is not None and Path(leftover).exists():
                Path(leftover).unlink()


def retry_dataset(dataset: Dataset) -> Dataset:
    """Processes a dataset again from its stored file (after a failure, a dead worker, or just to re-check).
    Refused only while a live worker is processing it."""
    with transaction.atomic():
        dataset = Dataset.objects.select_for_update().get(pk=dataset.pk)
        if dataset.status == Dataset.Status.VALIDATING and _lease_is_live(dataset):
            raise InputError(f"Dataset {dataset.pk} is being processed right now "
                             f"({dataset.progress:.0%} done); wait for it to finish.", code="conflict")
        if not Path(dataset.file_path).is_file():
            raise InputError("The dataset's stored file is gone; upload it again.", code="conflict")
        dataset.status, dataset.progress, dataset.error = Dataset.Status.VALIDATING, 0.0, ""
        dataset.heartbeat_at, dataset.attempts = None, 0
        dataset.save(update_fields=["status", "progress", "error", "heartbeat_at", "attempts"])
        transaction.on_commit(lambda: queue.send_dataset_processing(dataset.pk, dataset.size_bytes))
    return dataset


def delete_dataset(dataset: Dataset):
    """Deletes a dataset version and its files, whatever its status (a worker still processing it stops writing:
    its updates find no row). Refused while jobs use it: they keep it for their lineage."""
    from django.db.models import ProtectedError

    used = FineTuneJob.objects.filter(dataset=dataset).count()
    if used:
        raise InputError(f"Dataset {dataset.pk} is used by {used} job(s) and their adapter versions; it is kept "
                         "for their lineage.", code="conflict")
    source, processed = Path(dataset.file_path), Path(dataset.file_path).parent / f"processed-{dataset.pk}"
    try:
        with transaction.atomic():
            dataset.delete()
            shared = Dataset.objects.filter(file_path=str(source)).exists()
    except ProtectedError:
        raise InputError("The dataset is in use; it is kept for their lineage.", code="conflict") from None
    root = Path(settings.DATASET_DIR).resolve()
    for folder in [processed] if shared else [processed, source.parent]:
        folder = folder.resolve()
        if root in folder.parents and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def _lease_is_live(dataset: Dataset) -> bool:
    from datetime import timedelta

    stale = timezone.now() - timedelta(seconds=settings.DATASET_LEASE_SECONDS)
    return dataset.heartbeat_at is not None and dataset.heartbeat_at >= stale


def recover_stuck_datasets() -> dict:
    """Datasets whose processing worker stopped renewing its lease (it died): processed again once, then marked
    invalid with the reason. Called from every worker's heartbeat."""
    from datetime import timedelta

    stale = timezone.now() - timedelta(seconds=settings.DATASET_LEASE_SECONDS)
    stuck = Dataset.objects.filter(status=Dataset.Status.VALIDATING, heartbeat_at__lt=stale)
    outcome = {"requeued": [], "failed": []}
    for pk, attempts, size in stuck.values_list("pk", "attempts", "size_bytes"):
        lost = Dataset.objects.filter(pk=pk, status=Dataset.Status.VALIDATING, heartbeat_at__lt=stale)
        if attempts >= settings.DATASET_MAX_ATTEMPTS:
            if lost.update(status=Dataset.Status.INVALID, progress=1.0, error=(
                    f"Processing stopped {attempts} times without finishing (the worker handling it stopped "
                    "answering). Retry it, or split the file into smaller ones.")):
                outcome["failed"].append(pk)
        elif lost.update(heartbeat_at=None, progress=0.0):
            queue.send_dataset_processing(pk, size)
            outcome["requeued"].append(pk)
    if outcome["requeued"] or outcome["failed"]:
        log.warning("stuck datasets: %s", outcome)
    return outcome


def _claim_dataset(dataset_id: int) -> bool:
    """Takes the dataset's processing lease; False when it is done or another live worker has it."""
    from datetime import timedelta

    from django.db.models import F, Q

    now = timezone.now()
    stale = now - timedelta(seconds=settings.DATASET_LEASE_SECONDS)
    return bool(Dataset.objects.filter(
        Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=stale), pk=dataset_id, status=Dataset.Status.VALIDATING,
    ).update(heartbeat_at=now, attempts=F("attempts") + 1))


def reprocess_dataset_dropping_invalid(user, dataset: Dataset) -> Dataset:
    """The user's consent to drop the rows that failed: a new version of the same file with drop_invalid on."""
    if dataset.status != Dataset.Status.INVALID:
        raise InputError("Only an invalid dataset can be re-checked with its bad rows dropped.")
    options = json.dumps([dataset.options_hash, "drop_invalid"], sort_keys=True)
    options_hash = hashlib.sha256(options.encode()).hexdigest()
    existing = Dataset.objects.filter(owner=user, content_hash=dataset.content_hash, options_hash=options_hash).first()
    if existing:
        return existing
    with transaction.atomic():
        new = Dataset.objects.create(
            owner=user,
            name=dataset.name,
            original_filename=dataset.original_filename,
            content_hash=dataset.content_hash,
            options_hash=options_hash,
            file_path=dataset.file_path,
            size_bytes=dataset.size_bytes,
            validation_file_path=dataset.validation_file_path,
            validation_fraction=dataset.validation_fraction,
            base_model=dataset.base_model,
            schema_override=dataset.schema_override,
            column_map=dataset.column_map,
            drop_invalid=True,
        )
        transaction.on_commit(lambda: queue.send_dataset_processing(new.pk, new.size_bytes))
    return new


def _dataset_progress_writer(dataset_id):
    last = [0.0]

    def write(fraction):
        fraction = max(0.0, min(1.0, float(fraction)))
        if fraction - last[0] >= 0.02 or fraction >= 1.0:
            last[0] = fraction
            Dataset.objects.filter(pk=dataset_id).update(progress=fraction)

    return write


def process_dataset(dataset_id: int):
    """Worker side: validate, normalise, split, count tokens and render a preview. Every way out leaves the
    dataset ready or invalid with the reason; a worker that dies is noticed by recover_stuck_datasets."""
    import threading

    from .periodic import run_every

    if not _claim_dataset(dataset_id):
        return None  # finished already, deleted, or a live worker has it (a duplicate message)
    dataset = Dataset.objects.get(pk=dataset_id)
    stopped = threading.Event()
    beat = threading.Thread(target=run_every, daemon=True, args=(
        settings.DATASET_LEASE_SECONDS / 4, lambda: Dataset.objects.filter(
            pk=dataset_id, status=Dataset.Status.VALIDATING).update(heartbeat_at=timezone.now()),
        stopped, "dataset lease"), kwargs={"wait_first": True})
    beat.start()
    try:
        return _process_dataset(dataset)
    except Exception as exc:  # a bug must not leave the dataset validating forever
        log.exception("processing dataset %s failed", dataset_id)
        return _mark_dataset_invalid(dataset, f"Processing failed unexpectedly ({type(exc).__name__}: {exc}). "
                                              "Retry it; if it fails again, report it with the file.", {})
    finally:
        stopped.set()


def _process_dataset(dataset: Dataset):
    from finetune import data

    out_dir = Path(dataset.file_path).parent / f"processed-{dataset.pk}"
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = _dataset_progress_writer(dataset.pk)
    budget = {"max_rows": settings.DATASET_MAX_ROWS, "max_seconds": settings.DATASET_MAX_SECONDS,
              "file_name": dataset.original_filename or None}
    try:
        report = data.process_dataset(
            dataset.file_path,
            out_dir / "normalised.jsonl",
            schema=dataset.schema_override or None,
            column_map=dataset.column_map or None,
            drop_invalid=dataset.drop_invalid,
            progress=lambda f: progress(f * 0.7),
            **budget,
        ).to_dict()
    except DatasetError as exc:
        return _mark_dataset_invalid(dataset, str(exc), {})
    dataset.format = report.get("format") or ""
    dataset.schema = report.get("schema") or ""
    dataset.rows = report.get("valid_rows", 0)
    dataset.report = report
    if report.get("status") != "ready":
        return _mark_dataset_invalid(dataset, _summarise_problems(report), report)

    train_path, val_path = out_dir / "train.jsonl", out_dir / "validation.jsonl"
    try:
        if dataset.validation_file_path:
            val_report = data.process_dataset(
                dataset.validation_file_path,
                val_path,
                schema=dataset.schema,
                column_map=dataset.column_map or None,
                drop_invalid=dataset.drop_invalid,
                **budget,
            ).to_dict()
            report["validation_report"] = val_report
            if val_report.get("status") != "ready":
                return _mark_dataset_invalid(
                    dataset, "The validation file: " + _summarise_problems(val_report), report
                )
            shutil.copyfile(out_dir / "normalised.jsonl", train_path)
            n_train, n_val = dataset.rows, val_report.get("valid_rows", 0)
        else:
            n_train, n_val = data.split_dataset(
                out_dir / "normalised.jsonl",
                train_path,
                val_path,
                fraction=dataset.validation_fraction,
                seed=dataset.split_seed,
            )
    except DatasetError as exc:
        return _mark_dataset_invalid(dataset, str(exc), report)
    if n_val:
        report["overlap"] = data.overlap_report(train_path, val_path)
    progress(0.8)
    dataset.train_rows, dataset.validation_rows = n_train, n_val
    dataset.train_path, dataset.validation_path = str(train_path), str(val_path) if n_val else ""
    tokenizer = _base_tokenizer(dataset)
    refusal = _tools_refusal(report, tokenizer, dataset)
    if refusal:
        return _mark_dataset_invalid(dataset, refusal, report)
    dataset.token_stats, dataset.preview = _token_stats_and_preview(dataset, train_path, tokenizer)
    dataset.report = report
    dataset.status = Dataset.Status.READY
    dataset.progress = 1.0
    dataset.error = ""
    _save_result(dataset)
    return dataset


RESULT_FIELDS = ["status", "error", "report", "progress", "format", "schema", "rows", "train_rows",
                 "validation_rows", "train_path", "validation_path", "token_stats", "preview"]


def _save_result(dataset: Dataset):
    """Writes the outcome only while the dataset is still being processed by us: a row deleted meanwhile is not
    brought back (a plain save() would insert it again)."""
    values = {name: getattr(dataset, name) for name in RESULT_FIELDS}
    Dataset.objects.filter(pk=dataset.pk, status=Dataset.Status.VALIDATING).update(heartbeat_at=None, **values)


def _mark_dataset_invalid(dataset: Dataset, message: str, report: dict):
    dataset.status = Dataset.Status.INVALID
    dataset.error = message
    dataset.report = report or dataset.report
    dataset.progress = 1.0
    _save_result(dataset)
    return dataset


def _base_tokenizer(dataset: Dataset):
    base = dataset.base_model or default_base_model()
    if base is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(base.path, trust_remote_code=base.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - statistics are a convenience; training loads it again
        log.warning("tokenizer of %s failed to load: %s", base.name, exc)
        return None


def _tools_refusal(report: dict, tokenizer, dataset: Dataset) -> str | None:
    """Tool definitions and tool-call turns need a chat template that renders them; refuse rather than drop."""
    if not report.get("tool_rows") or tokenizer is None:
        return None
    from finetune.tokenize import supports_tools

    if supports_tools(tokenizer):
        return None
    base = dataset.base_model or default_base_model()
    return (f"{report['tool_rows']} rows have tool definitions (the 'tools' column) or tool-call turns "
            "('tool_calls', 'tool'/'function_call'/'observation' roles), but the chat template of "
            f"{base.name if base else 'the base model'} has no tools support, so they cannot be rendered as the "
            "model would see them. Choose a base model whose template supports tools, or remove those rows.")


def _summarise_problems(report: dict) -> str:
    counts = report.get("problem_counts") or {}
    bad = {k: v for k, v in counts.items() if k != "duplicate" and v}
    if bad:
        parts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(bad.items()))
        return f"{sum(bad.values())} rows have problems ({parts}). Fix them, or drop those rows and use the rest."
    if not report.get("valid_rows"):
        return report.get("reason") or "The file has no usable rows."
    return report.get("reason") or "The dataset is not usable."


def _bounded_token_stats(data, train_path: Path, tokenizer, rows: int) -> dict:
    """Token statistics under the time budget: past DATASET_TOKEN_STATS_SECONDS the rows counted so far stand
    for the whole file, and the statistics say so (counted < rows)."""
    import time

    deadline = time.monotonic() + settings.DATASET_TOKEN_STATS_SECONDS
    lengths = []
    for n in data.token_lengths(data.iter_examples(train_path), tokenizer):
        lengths.append(n)
        if len(lengths) % 1000 == 0 and time.monotonic() > deadline:
            break
    stats = data.token_stats(lengths)
    stats["counted"], stats["rows"] = len(lengths), rows
    if len(lengths) < rows:
        stats["note"] = (f"Tokens counted on the first {len(lengths):,} of {rows:,} rows (the time limit for "
                         "statistics); training tokenises every row.")
    return stats


def _token_stats_and_preview(dataset: Dataset, train_path: Path, tokenizer):
    """Counts tokens under the dataset's base model tokenizer; a missing tokenizer is not fatal."""
    from finetune import data

    base = dataset.base_model or default_base_model()
    if base is None or tokenizer is None:
        return {}, []
    try:
        from finetune.tokenize import preview_segments

        stats = _bounded_token_stats(data, train_path, tokenizer, dataset.train_rows)
        preview = []
        for i, example in enumerate(data.iter_examples(train_path)):
            if i >= 3:
                break
            preview.append(preview_segments(example, tokenizer, max_seq_len=2048))
        stats["tokenizer"] = base.name
        return stats, preview
    except Exception as exc:  # noqa: BLE001 - statistics are a convenience; training re-tokenises anyway
        log.warning("token statistics failed for dataset %s: %s", dataset.pk, exc)
        return {"error": f"Token statistics failed: {exc}"}, []


# ---------------------------------------------------------------- plans and jobs

OVERRIDE_TYPES = {
    "rank": int,
    "alpha": float,
    "dropout": float,
    "micro_batch": int,
    "grad_accum": int,
    "max_seq_len": int,
    "gradient_checkpointing": bool,
    "learning_rate": float,
    "epochs": float,
    "max_steps": int,
    "target_modules": list,
    "num_virtual_tokens": int,
    "adapter_bottleneck": int,
    "dpo_beta": float,
    "kto_beta": float,
    "seed": int,
    "eval_every_steps": int,
    "early_stopping_patience": int,  # 0: train to the end
    "checkpoint_every_steps": int,
    "checkpoint_every_minutes": float,
    "warmup_ratio": float,
    "weight_decay": float,
    "packing": bool,
    "completion_only": bool,
    "device": str,
    "dtype": str,
    "optimizer": str,
    "max_eval_generations": int,
    "max_new_tokens": int,
}
POSITIVE = {"rank", "micro_batch", "grad_accum", "max_seq_len", "epochs", "max_steps", "num_virtual_tokens",
            "adapter_bottleneck", "learning_rate", "eval_every_steps", "checkpoint_every_steps", "max_new_tokens"}
# issue 20 (search): search=false, search_minutes, search_trials travel with the overrides (jobs/search.py)
OVERRIDE_TYPES.update(SEARCH_OVERRIDES)
POSITIVE |= {"search_minutes", "search_trials"}


def clean_overrides(overrides) -> dict:
    if overrides in (None, ""):
        return {}
    overrides = _json_value(overrides, "overrides")
    if not isinstance(overrides, dict):
        raise InputError("overrides must be an object of plan fields.", field="overrides")
    clean = {}
    for key, value in overrides.items():
        if value in (None, ""):
            continue
        kind = OVERRIDE_TYPES.get(key)
        if kind is None:
            raise InputError(
                f"Unknown override {key!r}; known: {', '.join(sorted(OVERRIDE_TYPES))}.", field="overrides"
            )
        clean[key] = _coerce(key, value, kind)
    return clean


def _coerce(key, value, kind):
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError
            return value
        if isinstance(value, bool):
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        result = kind(value)
    except (TypeError, ValueError):
        raise InputError(f"Override {key!r} must be {kind.__name__}, not {value!r}.", field="overrides") from None
    if kind in (int, float):
        if result != result or result in (float("inf"), float("-inf")):
            raise InputError(f"Override {key!r} must be a finite number.", field="overrides")
        if key in POSITIVE and result <= 0:
            raise InputError(f"Override {key!r} must be greater than 0.", field="overrides")
        if result < 0:
            raise InputError(f"Override {key!r} must not be negative.", field="overrides")
    return result


def clean_method(method) -> str:
    method = (method or "auto").strip().lower()
    if method not in ["auto", *METHODS]:
        raise InputError(f"Unknown method {method!r}; choose auto or one of {', '.join(METHODS)}.", field="method")
    return method


def training_queue() -> str:
    """The Celery queue training jobs are routed to (settings.CELERY_TASK_ROUTES)."""
    route = (settings.CELERY_TASK_ROUTES or {}).get("jobs.tasks.train_job") or {}
    return route.get("queue") or settings.CELERY_TASK_DEFAULT_QUEUE


def consumes_training_queue(worker: Worker) -> bool:
    return training_queue() in [q.strip() for q in (worker.queues or "").split(",")]


def worker_inventory(queues: str) -> dict:
    """What a worker reports in its heartbeat: the probe, plus (on a worker that trains) its measured bf16 vs fp32
    matmul speed, taken once and kept in the data folder."""
    from autotune import probe

    inventory = probe()
    if training_queue() in [q.strip() for q in (queues or "").split(",")]:
        try:
            from finetune.precision import matmul_speed

            inventory["matmul_speed"] = matmul_speed(settings.DATA_DIR)
        except Exception as exc:  # noqa: BLE001 - no torch or a broken device: plan without the measurement
            log.warning("matmul speed not measured: %s", exc)
    return inventory


def current_inventory() -> tuple[dict, dict]:
    """(inventory, where it came from) for planning a training job: the freshest live worker that consumes the
    training queue; without one, the last one that ever reported; without any, this machine's CPU. The second
    item is {"worker", "source": live | last_known | web_host, "note"}, note being a sentence unless live."""
    workers = [w for w in Worker.objects.order_by("-last_heartbeat")[:50] if w.inventory and consumes_training_queue(w)]
    now = timezone.now()
    live = next((w for w in workers if w.is_alive(now)), None)
    if live is not None:
        return live.inventory, {"worker": live.hostname, "source": "live", "note": ""}
    queue = training_queue()
    if workers:
        last = workers[0]
        seen = last.last_heartbeat.strftime("%Y-%m-%d %H:%M UTC")
        note = (f"No worker consuming the {queue!r} queue is alive: planned for the hardware of {last.hostname}, "
                f"the last training worker seen (at {seen}); the worker that picks the job checks the plan "
                f"against its own hardware and replans if it differs.")
        return last.inventory, {"worker": last.hostname, "source": "last_known", "note": note}
    from autotune import probe

    inventory = probe()
    inventory["gpus"] = []  # the web process is not where training runs
    note = (f"No worker consuming the {queue!r} queue has ever reported: planned for this web host's CPU; the worker "
            f"that picks the job checks the plan against its own hardware and replans if it differs.")
    return inventory, {"worker": "", "source": "web_host", "note": note}


def make_plan(base_model: BaseModel, dataset: Dataset | None, method="auto", overrides=None, gpu=None) -> dict:
    from autotune import select

    method = clean_method(method)
    overrides, search_options = split_search_options(clean_overrides(overrides))  # issue 20 (search)
    if dataset is not None and dataset.status != Dataset.Status.READY:
        raise InputError(f"Dataset {dataset.name!r} is {dataset.status}, not ready.", field="dataset")
    if dataset is not None:
        _check_method_fits_schema(method, dataset)
    if gpu is not None and not isinstance(gpu, dict):
        raise InputError("gpu must be an inventory object like {\"gpus\": [...]}.", field="gpu")
    if gpu:
        inventory, origin = gpu, {"worker": "", "source": "given", "note": ""}
    else:
        inventory, origin = current_inventory()
    stats = {"rows": dataset.train_rows if dataset else 0, "token_stats": dataset.token_stats if dataset else {}}
    if dataset is not None and method == "auto":
        method = {"preference": "dpo", "kto": "kto"}.get(dataset.schema, method)
    calibration = measured_calibration(base_model, _device_name(inventory))
    preferences = {"method": method, "overrides": overrides}
    if calibration:
        # Measured over activations plus logits, so it scales both (estimate's calibration keys).
        scale = calibration["activation_scale"]
        preferences["calibration"] = {"activation_scale": scale, "logits_scale": scale}
    try:
        plan = select(inventory, base_model.config, stats, preferences)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"Could not plan for this model: {exc}", field="base_model") from exc
    plan["hardware"] = {**plan.get("hardware", {}), "worker": origin["worker"], "source": origin["source"]}
    if origin["note"]:
        plan["reasons"].insert(0, origin["note"])
    if calibration:
        plan["calibration"] = calibration
        plan.setdefault("reasons", []).append(
            f"Activation and logits memory scaled by {calibration['activation_scale']:.2f}: measured by the fit check of "
            f"{calibration['jobs']} earlier job(s) of this architecture on {calibration['device_name']}."
        )
    return attach_budget(plan, base_model, dataset, search_options, method)  # issue 20 (search): plan["search"]


def replan_for_worker(job: FineTuneJob, inventory: dict, hostname: str) -> str | None:
    """Before the fit check: when the job's plan was made for other hardware than this worker's, plans it again
    for this worker, saves the plan and records why. Returns the event's message, or None when the plan stands.
    A job with checkpoints keeps its plan (resuming needs the shapes it was saved with)."""
    from autotune.select import planned_hardware

    planned = (job.plan or {}).get("hardware") or {}
    here = planned_hardware(inventory, job.overrides)
    if not planned or (planned.get("device"), planned.get("name")) == (here["device"], here["name"]):
        return None
    where = f"{planned.get('name')} ({planned.get('device')})"
    if any((job.checkpoint_dir / "checkpoints").glob("*")):
        message = (f"Planned for {where}, but {hostname} has {here['name']}; the plan is kept because the job "
                   f"resumes from a checkpoint saved with it.")
        JobEvent.objects.create(job=job, kind="replan_skipped", message=message, data={"planned": planned, "here": here})
        return message
    old = job.plan
    plan = make_plan(job.base_model, job.dataset, job.method, job.overrides, gpu=inventory)
    plan["hardware"]["worker"] = hostname
    changes = [f"{key} {old.get(key)} -> {plan.get(key)}" for key in REPLAN_FIELDS if old.get(key) != plan.get(key)]
    message = (f"Planned for {where}, but {hostname} has {here['name']} ({here['device']}): replanned for it"
               f"{': ' + ', '.join(changes) if changes else ', with the same settings'}.")
    FineTuneJob.objects.filter(pk=job.pk).update(plan=plan)
    job.plan = plan
    JobEvent.objects.create(job=job, kind="replanned", message=message,
                            data={"planned": planned, "here": here, "changes": changes})
    return message


REPLAN_FIELDS = ("method", "device", "dtype", "micro_batch", "grad_accum", "max_seq_len", "gradient_checkpointing",
                 "optimizer")


CALIBRATION_JOBS = 5


def _device_name(inventory: dict) -> str:
    gpus = [g for g in (inventory or {}).get("gpus") or [] if isinstance(g, dict)]
    if not gpus:
        return "cpu"
    return str(max(gpus, key=lambda g: g.get("free_bytes") or 0).get("name") or "")


def measured_calibration(base_model: BaseModel, device_name: str) -> dict | None:
    """How far the estimator's activation memory was off on this (architecture, GPU model) pair, from the fit
    checks of recent jobs: the median of measured/estimated activations, clamped to a sane range."""
    recent = (
        FineTuneJob.objects.filter(
            base_model__architecture=base_model.architecture, metrics__fit_check__device_name=device_name
        )
        .order_by("-created_at")
        .values_list("metrics", "plan")[:CALIBRATION_JOBS]
    )
    scales = []
    for metrics, plan in recent:
        check = (metrics or {}).get("fit_check") or {}
        breakdown = ((plan or {}).get("memory") or {}).get("breakdown") or {}
        dynamic = (breakdown.get("activations") or 0) + (breakdown.get("logits") or 0)
        fixed = sum(v for k, v in breakdown.items() if k not in ("activations", "logits", "allocator_headroom"))
        replanned = bool((plan or {}).get("fit_history"))  # its memory breakdown describes the plan it replaced
        if replanned or not dynamic or not check.get("measured_bytes"):
            continue
        scales.append(max(0.5, min(3.0, (check["measured_bytes"] - fixed) / dynamic)))
    if not scales:
        return None
    scales.sort()
    return {"activation_scale": round(scales[len(scales) // 2], 3), "jobs": len(scales), "device_name": device_name}


def _check_method_fits_schema(method, dataset):
    if method == "dpo" and dataset.schema != "preference":
        raise InputError(
            "DPO needs a preference dataset (prompt/chosen/rejected); this one is " f"{dataset.schema}.",
            field="method",
        )
    if method not in ("dpo", "auto") and dataset.schema == "preference":
        raise InputError("A preference dataset trains with method dpo (or auto).", field="method")
    if method == "kto" and dataset.schema != "kto":
        raise InputError("KTO needs rows labelled desirable or undesirable (a kto_tag or label column); this "
                         f"dataset is {dataset.schema}.", field="method")
    if method not in ("kto", "auto") and dataset.schema == "kto":
        raise InputError("This dataset labels answers desirable or undesirable (its kto_tag/label column): it "
                         "trains with method kto (or auto), so undesirable answers are not learned as good ones.",
                         field="method")


def _clean_adapter_name(name, dataset) -> str:
    name = (name or "").strip() or f"{Path(dataset.name).stem[:60] or 'adapter'}"
    if len(name) > 200:
        raise InputError("adapter_name is longer than 200 characters.", field="adapter_name")
    return name


def create_job(user, base_model: BaseModel, dataset: Dataset, method="auto", overrides=None, adapter_name="") -> FineTuneJob:
    plan = make_plan(base_model, dataset, method, overrides)
    with transaction.atomic():
        job = FineTuneJob.objects.create(
            owner=user,
            base_model=base_model,
            dataset=dataset,
            method=clean_method(method),
            overrides=clean_overrides(overrides),
            plan=plan,
            adapter_name=_clean_adapter_name(adapter_name, dataset),
        )
        JobEvent.objects.create(job=job, kind="queued", message="Queued for a worker.")
        transaction.on_commit(lambda: queue.send_training(job.pk))
    return job


def request_cancel(job: FineTuneJob) -> FineTuneJob:
    """Queued jobs are cancelled at once; running ones stop at the worker's next check (within seconds)."""
    with transaction.atomic():
        job = FineTuneJob.objects.select_for_update().get(pk=job.pk)
        if job.status == JobStatus.QUEUED:
            job.status = JobStatus.CANCELLED
            job.finished_at = timezone.now()
            job.cancel_requested = True
            job.save(update_fields=["status", "finished_at", "cancel_requested"])
            JobEvent.objects.create(job=job, kind="cancelled", message="Cancelled before it started.")
        elif job.status == JobStatus.RUNNING and not job.cancel_requested:
            job.cancel_requested = True
            job.save(update_fields=["cancel_requested"])
            JobEvent.objects.create(job=job, kind="cancel_requested", message="Cancel requested; stopping.")
    return job


def retry_job(job: FineTuneJob) -> FineTuneJob:
    """A failed or cancelled job goes back to the queue and resumes from its last checkpoint."""
    with transaction.atomic():
        job = FineTuneJob.objects.select_for_update().get(pk=job.pk)
        if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise InputError(f"Only failed or cancelled jobs can be retried; this one is {job.status}.")
        job.status = JobStatus.QUEUED
        job.cancel_requested = False
        job.error = ""
        job.finished_at = None
        job.lease_token = ""
        job.save()
        JobEvent.objects.create(job=job, kind="queued", message="Retried: resumes from the last checkpoint.")
        transaction.on_commit(lambda: queue.send_training(job.pk))
    return job


# ---------------------------------------------------------------- adapter versions


def record_adapter_version(job: FineTuneJob, adapter_dir: Path, result_metrics: dict, generations, plan) -> AdapterVersion:
    """Moves the trained adapter into the store and records it as the next version of its line."""
    with transaction.atomic():
        line, _ = AdapterLine.objects.get_or_create(owner=job.owner, name=job.adapter_name)
        line = AdapterLine.objects.select_for_update().get(pk=line.pk)
        number = (line.versions.order_by("-version").values_list("version", flat=True).first() or 0) + 1
        dest = settings.ADAPTER_DIR / f"user-{job.owner_id}" / f"line-{line.pk}" / f"v{number}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(adapter_dir), dest)
        version = AdapterVersion.objects.create(
            owner=job.owner,
            line=line,
            version=number,
            job=job,
            base_model=job.base_model,
            dataset=job.dataset,
            method=plan.get("method", job.method),
            path=str(dest),
            plan=plan,
            metrics=result_metrics,
            generations=generations or [],
            lineage=_lineage(job, dest, plan),
        )
    return version


LINEAGE_CURVE_POINTS = 300


def _lineage(job: FineTuneJob, adapter_dir: Path, plan: dict) -> dict:
    from finetune.evaluate import library_versions

    from .metrics import as_series, downsampled_points

    meta = {}
    meta_path = adapter_dir / "tunedeck.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
    return {
        "base_model": {"id": job.base_model_id, "name": job.base_model.name, "sha256": job.base_model.sha256},
        "dataset": {
            "id": job.dataset_id,
            "name": job.dataset.name,
            "content_hash": job.dataset.content_hash,
            "options_hash": job.dataset.options_hash,
            "schema": job.dataset.schema,
            "train_rows": job.dataset.train_rows,
            "validation_rows": job.dataset.validation_rows,
        },
        "plan": plan,
        # Runs on the worker that trained: these are the versions that made the adapter (metadata only, no import).
        "libraries": meta.get("libraries") or library_versions(),
        "created_by": job.owner.get_username(),
        "created_at": timezone.now().isoformat(),
        "job": job.pk,
        # A copy of the curves, so the version keeps them whatever happens to the job's metric rows.
        "curves": as_series(downsampled_points(job, LINEAGE_CURVE_POINTS)),
    }
