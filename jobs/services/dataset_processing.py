"""Worker side: processing a dataset (validate, normalise, split, count tokens, render a preview) under a lease
that a thread renews while it runs, and the recovery of datasets whose worker died. Only Celery workers import
this module (jobs/tasks.py, the heartbeat in jobs/worker_signals.py); tests/test_architecture.py holds the web
process to that."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from finetune.errors import DatasetError

from .. import queue
from ..base_models import default_base_model
from ..models import Dataset

log = logging.getLogger(__name__)


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

    from ..periodic import run_every

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
              "file_name": dataset.original_filename or None, "max_row_bytes": settings.DATASET_MAX_ROW_BYTES,
              "max_decompressed_bytes": settings.DATASET_MAX_DECOMPRESSED_BYTES,
              "context_tokens": _context_tokens(dataset)}
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
    except data.UnknownLayout as exc:  # the columns and first rows let the page offer a column mapping
        return _mark_dataset_invalid(dataset, _unknown_layout_message(dataset, exc.columns),
                                     {"columns": exc.columns, "sample_rows": exc.sample, "schema_candidates": []})
    except DatasetError as exc:
        return _mark_dataset_invalid(dataset, str(exc), {})
    dataset.format = report.get("format") or ""
    dataset.schema = report.get("schema") or ""
    dataset.rows = report.get("valid_rows", 0)
    dataset.report = report
    if report.get("status") != "ready":
        return _mark_dataset_invalid(dataset, _summarise_problems(report, dataset.pk), report)

    try:
        n_train, n_val = _train_and_validation(data, dataset, report, out_dir, budget)
    except DatasetError as exc:
        return _mark_dataset_invalid(dataset, str(exc), report)
    return _finish_ready(data, dataset, report, progress, out_dir, n_train, n_val)


def _context_tokens(dataset: Dataset) -> int | None:
    """The base model's context, which "far longer than the context" warnings measure against."""
    base = dataset.base_model or default_base_model()
    config = (base.config or {}) if base else {}
    return config.get("max_position_embeddings") or config.get("n_positions") or None


def _train_and_validation(data, dataset: Dataset, report: dict, out_dir: Path, budget: dict) -> tuple[int, int]:
    """Writes train.jsonl and validation.jsonl: the user's own validation file processed like the upload, or a
    split of the upload. A validation file with problems raises DatasetError, its report kept in report."""
    train_path, val_path = out_dir / "train.jsonl", out_dir / "validation.jsonl"
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
            raise DatasetError("The validation file: " + _summarise_problems(val_report))
        shutil.copyfile(out_dir / "normalised.jsonl", train_path)
        return dataset.rows, val_report.get("valid_rows", 0)
    return data.split_dataset(
        out_dir / "normalised.jsonl",
        train_path,
        val_path,
        fraction=dataset.validation_fraction,
        seed=dataset.split_seed,
    )


def _finish_ready(data, dataset: Dataset, report: dict, progress, out_dir: Path, n_train: int, n_val: int):
    """After the split: the overlap between train and validation, token statistics and the preview; ready, unless
    the rows have tools the base model's chat template cannot render."""
    train_path, val_path = out_dir / "train.jsonl", out_dir / "validation.jsonl"
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


MAPPING_HINT = ('map your columns with the "Map your columns" form on this page, or through the API: POST '
                '{{"schema": ..., "column_map": {{"prompt": "your column", ...}}}} to /api/v1/datasets/{pk}/reprocess.')


def _unknown_layout_message(dataset: Dataset, columns: list[str]) -> str:
    from finetune.data.problems import describe_columns

    return (f"The columns {describe_columns(columns)} match no known layout, so Tunedeck cannot tell which column "
            "is the prompt, the answer or the conversation: " + MAPPING_HINT.format(pk=dataset.pk))


def _summarise_problems(report: dict, pk: int | None = None) -> str:
    counts = report.get("problem_counts") or {}
    bad = {k: v for k, v in counts.items() if k != "duplicate" and v}
    if bad:
        parts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(bad.items()))
        message = f"{sum(bad.values())} rows have problems ({parts}). Fix them, or drop those rows and use the rest."
        if bad.get("missing_field") and pk is not None:  # often a field under another column name
            message += " If a column holds a missing field under another name, " + MAPPING_HINT.format(pk=pk)
        return message
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
