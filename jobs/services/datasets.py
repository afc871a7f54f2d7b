"""Datasets as the web side handles them: an upload stored as an immutable version keyed by its content hash,
retried, re-checked with its bad rows dropped, deleted. The processing itself runs on a worker
(jobs/services/dataset_processing.py)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from finetune.data import SCHEMAS
from finetune.errors import DatasetError

from .. import queue
from ..base_models import default_base_model
from ..errors import InputError
from ..models import BaseModel, Dataset, FineTuneJob
from .inputs import json_value

COPY_CHUNK = 1024 * 1024


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


def _clean_column_map(column_map) -> dict:
    if column_map in (None, "", {}):
        return {}
    column_map = json_value(column_map, "column_map")
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
    schema, column_map, fraction = _clean_upload_options(uploaded, schema, column_map, validation_fraction)
    base_model = base_model or default_base_model()

    user_dir = settings.DATASET_DIR / f"user-{user.pk}"
    content_hash, size, tmp = _store_upload(uploaded, user_dir)
    val_hash, val_tmp = "", None
    try:
        if validation_file is not None:
            if validation_file.size == 0:
                raise InputError("The validation file is empty.", field="validation_file")
            val_hash, _, val_tmp = _store_upload(validation_file, user_dir)
        options_hash = _options_hash(val_hash, fraction, schema, column_map, drop_invalid, base_model)
        existing = _existing_version(user, content_hash, options_hash, name)
        if existing:
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
        dataset = _save_new_version(
            user, uploaded, name, content_hash=content_hash, options_hash=options_hash, file_path=str(source),
            size_bytes=size, validation_file_path=val_source, validation_fraction=fraction, base_model=base_model,
            schema_override=schema, column_map=column_map, drop_invalid=bool(drop_invalid),
        )
        return dataset, True
    finally:
        for leftover in (tmp, val_tmp):
            if leftover is not None and Path(leftover).exists():
                Path(leftover).unlink()


def _options_hash(val_hash, fraction, schema, column_map, drop_invalid, base_model) -> str:
    """What makes two uploads of one file the same version: the settings it is processed with."""
    options = json.dumps(
        [val_hash, fraction, schema, column_map, bool(drop_invalid), base_model.pk if base_model else None],
        sort_keys=True,
    )
    return hashlib.sha256(options.encode()).hexdigest()


def _clean_upload_options(uploaded, schema, column_map, validation_fraction) -> tuple[str, dict, float]:
    if uploaded is None:
        raise InputError("Choose a file to upload.", field="file")
    if uploaded.size == 0:
        raise InputError("The file is empty.", field="file")
    schema = (schema or "").strip()
    if schema and schema not in SCHEMAS:
        raise InputError(f"Unknown schema {schema!r}; choose one of {', '.join(SCHEMAS)}.", field="schema")
    return schema, _clean_column_map(column_map), _clean_fraction(validation_fraction)


def _existing_version(user, content_hash, options_hash, name) -> Dataset | None:
    existing = Dataset.objects.filter(owner=user, content_hash=content_hash, options_hash=options_hash).first()
    if existing and name.strip() and name.strip() != existing.name:  # the same file under a new name takes the name
        existing.name = name.strip()[:200]
        existing.save(update_fields=["name"])
    return existing


def _save_new_version(user, uploaded, name, **fields) -> Dataset:
    """The row of a new version whose files are in place, and its processing queued once the row is committed."""
    display = name.strip() or dataset_name_from_file(uploaded.name)
    with transaction.atomic():
        dataset = Dataset.objects.create(
            owner=user, name=display, original_filename=Path(uploaded.name or "").name[:300], **fields
        )
        transaction.on_commit(lambda: queue.send_dataset_processing(dataset.pk, fields["size_bytes"]))
    return dataset


def retry_dataset(dataset: Dataset, **settings) -> Dataset:
    """Processes a dataset again from its stored file (after a failure, a dead worker, or just to re-check), with
    `settings` (schema_override, column_map, options_hash) changed first. Refused only while a live worker is
    processing it."""
    with transaction.atomic():
        dataset = Dataset.objects.select_for_update().get(pk=dataset.pk)
        if dataset.status == Dataset.Status.VALIDATING and _lease_is_live(dataset):
            raise InputError(f"Dataset {dataset.pk} is being processed right now "
                             f"({dataset.progress:.0%} done); wait for it to finish.", code="conflict")
        if not Path(dataset.file_path).is_file():
            raise InputError("The dataset's stored file is gone; upload it again.", code="conflict")
        for name, value in settings.items():
            setattr(dataset, name, value)
        dataset.status, dataset.progress, dataset.error = Dataset.Status.VALIDATING, 0.0, ""
        dataset.heartbeat_at, dataset.attempts = None, 0
        dataset.save(update_fields=["status", "progress", "error", "heartbeat_at", "attempts", *settings])
        transaction.on_commit(lambda: queue.send_dataset_processing(dataset.pk, dataset.size_bytes))
    return dataset


def delete_dataset(dataset: Dataset):
    """Deletes a dataset version and its files, whatever its status (a worker still processing it stops writing:
    its updates find no row). Refused while jobs use it: they keep it for their lineage."""
    from django.db.models import ProtectedError

    used = FineTuneJob.objects.filter(dataset=dataset).count()
    if used:
        raise InputError(f"Dataset {dataset.name!r} is used by {used} job(s) and their adapter versions; it is kept "
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


def reprocess_dataset_dropping_invalid(user, dataset: Dataset) -> Dataset:
    """The user's consent to drop the rows that failed: a new version of the same file with drop_invalid on."""
    if dataset.status != Dataset.Status.INVALID:
        raise InputError("Only an invalid dataset can be re-checked with its bad rows dropped.")
    options = json.dumps([dataset.options_hash, "drop_invalid"], sort_keys=True)
    options_hash = hashlib.sha256(options.encode()).hexdigest()
    existing = Dataset.objects.filter(owner=user, content_hash=dataset.content_hash, options_hash=options_hash).first()
    if existing:
        return existing
    return _sibling_version(dataset, options_hash=options_hash, drop_invalid=True)


def _sibling_version(dataset: Dataset, **changes) -> Dataset:
    """A new version of the same stored file with some settings changed, its processing queued."""
    fields = {name: getattr(dataset, name) for name in (
        "owner", "name", "original_filename", "content_hash", "file_path", "size_bytes", "validation_file_path",
        "validation_fraction", "base_model", "schema_override", "column_map", "drop_invalid")}
    with transaction.atomic():
        new = Dataset.objects.create(**{**fields, **changes})
        transaction.on_commit(lambda: queue.send_dataset_processing(new.pk, new.size_bytes))
    return new


# ---------------------------------------------------------------- a column mapping chosen after the upload


def recorded_columns(dataset: Dataset) -> list[str]:
    """The file's columns as its processing recorded them; an older dataset has to be processed again first."""
    columns = (dataset.report or {}).get("columns")
    if not columns:
        raise InputError("This dataset's columns were not recorded when it was processed; process it again "
                         "(Process again), then map its columns.", code="conflict")
    return columns


def clean_mapping(dataset: Dataset, schema, column_map, *, complete: bool = True) -> tuple[str, dict]:
    """The layout and column_map a user chose for a stored dataset, checked against the columns its processing
    recorded (the web never opens the file). complete=False lets a half-chosen mapping through, for the preview."""
    from finetune.data import check_mapping

    if schema is not None and not isinstance(schema, str):
        raise InputError(f"schema must be the name of a layout: one of {', '.join(SCHEMAS)}.", field="schema")
    schema = (schema or "").strip()
    if schema and schema not in SCHEMAS:
        raise InputError(f"Unknown schema {schema!r}; choose one of {', '.join(SCHEMAS)}.", field="schema")
    column_map = _clean_column_map(column_map)
    try:
        check_mapping(schema or None, column_map, recorded_columns(dataset), complete=complete)
    except DatasetError as exc:
        raise InputError(str(exc), field="column_map") from exc
    return schema, column_map


def mapping_preview(dataset: Dataset, schema, column_map) -> dict:
    """The first rows (from the report) normalised under a mapping: what the dataset page and the API show
    before processing again."""
    from finetune.data import preview_mapping

    schema, column_map = clean_mapping(dataset, schema, column_map, complete=False)
    if not schema:
        raise InputError("Choose the layout (schema) your rows are in.", field="schema")
    sample = (dataset.report or {}).get("sample_rows") or []
    rows = preview_mapping(sample, schema, column_map, recorded_columns(dataset))
    return {"schema": schema, "column_map": column_map, "columns": recorded_columns(dataset), "rows": rows}


def reprocess_with_mapping(user, dataset: Dataset, schema, column_map) -> Dataset:
    """Processes the stored file again with the user's layout and column_map: the same dataset, or a new version
    of it when jobs used this one (they keep what they trained on) or another version already has this mapping."""
    schema, column_map = clean_mapping(dataset, schema, column_map)
    val_hash = _file_hash(dataset.validation_file_path) if dataset.validation_file_path else ""
    options_hash = _options_hash(val_hash, dataset.validation_fraction, schema, column_map, dataset.drop_invalid,
                                 dataset.base_model)
    existing = Dataset.objects.filter(owner=user, content_hash=dataset.content_hash, options_hash=options_hash
                                      ).exclude(pk=dataset.pk).first()
    if existing:
        return existing
    settings = {"schema_override": schema, "column_map": column_map, "options_hash": options_hash}
    if FineTuneJob.objects.filter(dataset=dataset).exists():
        return _sibling_version(dataset, **settings)
    return retry_dataset(dataset, **settings)


def _file_hash(path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stored:
            for chunk in iter(lambda: stored.read(COPY_CHUNK), b""):
                digest.update(chunk)
    except OSError as exc:
        raise InputError("The dataset's stored validation file is gone; upload it again.", code="conflict") from exc
    return digest.hexdigest()

