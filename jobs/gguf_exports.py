"""GGUF downloads of a merged deployment (f16, q8_0) and its Ollama Modelfile.

The worker writes them right after a merge (deploy_worker.run_deploy calls write_for_deployment once the deployment is
handed to the inference server, so they never delay `live`); the page and GET /api/v1/deployments/<id>/gguf/<kind>
serve them. They sit beside the merged folder (`<merged>-gguf/`), so the merged-model zip stays safetensors only.
"""
from __future__ import annotations

import logging
from pathlib import Path

from django.http import FileResponse

from .models import Deployment

log = logging.getLogger(__name__)

KINDS = {"f16": "application/octet-stream", "q8_0": "application/octet-stream", "modelfile": "text/plain"}


def gguf_dir(merged_path) -> Path:
    return Path(str(merged_path).rstrip("/") + "-gguf")


def write_for_deployment(deployment_id: int, revision: int, merged_path: str, name: str) -> None:
    """Worker side: writes the GGUF files for a merged model (kept when already there for the same merge) and
    notes them, or the reason there are none, on the deployment. Never fails the deployment."""
    from finetune.errors import TunedeckError
    from serving.gguf_export import GGUF_TYPES, export_gguf

    from .serving_engines import note

    out_dir = gguf_dir(merged_path)
    existing = {k: p for k in GGUF_TYPES if (p := next(out_dir.glob(f"*-{k}.gguf"), None))}
    try:
        merged_at = max(p.stat().st_mtime for p in Path(merged_path).glob("*.safetensors"))
        if len(existing) == len(GGUF_TYPES) and all(p.stat().st_mtime >= merged_at for p in existing.values()):
            files = {k: p.name for k, p in existing.items()}
        else:
            files = {k: Path(p).name for k, p in export_gguf(merged_path, out_dir, name=name).items()}
        files["modelfile"] = "Modelfile"
        note(deployment_id, revision, gguf=files, gguf_error=None)
    except (TunedeckError, OSError, ValueError) as exc:
        log.warning("no GGUF for deployment %s: %s", deployment_id, exc)
        note(deployment_id, revision, gguf=None, gguf_error=str(exc))


def gguf_problem(deployment: Deployment, kind: str):
    """(code, message, http status) when that GGUF download is not there, else None."""
    if kind not in KINDS:
        return "not_found", f"Unknown GGUF download {kind!r}; choose f16, q8_0 or modelfile.", 404
    if deployment.version_id is None:  # its version was deleted, with the merged model and these files
        return "gone", f"{deployment.version_label or 'Its version'} was deleted, with its GGUF files.", 410
    if not deployment.path:
        return ("not_merged", ("GGUF files are made from the merged model; this deployment serves the adapter "
                               "unmerged. Deploy it merged to get them."), 409)
    details = deployment.details or {}
    if details.get("gguf_error"):
        return "not_exportable", f"No GGUF export for this model: {details['gguf_error']}", 409
    name = (details.get("gguf") or {}).get(kind)
    if not name:
        return "not_ready", "The GGUF files are still being written; try again in a minute.", 409
    if not (gguf_dir(deployment.path) / name).is_file():
        return "gone", "The GGUF files are missing on the server.", 410
    return None


def gguf_response(deployment: Deployment, kind: str) -> FileResponse:
    path = gguf_dir(deployment.path) / deployment.details["gguf"][kind]
    response = FileResponse(path.open("rb"), as_attachment=True, filename=path.name, content_type=KINDS[kind])
    return response
