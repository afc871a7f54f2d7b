"""Adapter versions behind the pages and the REST API: the one parser of version id lists, mark the line's
champion, delete (refused while deployed; stopped and failed deployments keep their records)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import ProtectedError
from django.utils import timezone

from .deploy import merged_dir_for
from .gguf_exports import gguf_dir
from .models import MAX_ID, AdapterLine, AdapterVersion, Deployment, ObjectNotFound
from .services import InputError

log = logging.getLogger(__name__)

INACTIVE = [Deployment.Status.STOPPED, Deployment.Status.FAILED]
MAX_VERSIONS = 4  # compared or evaluated side by side


def parse_version_ids(raw, *, at_least=1, action="compare") -> list[int]:
    """Version ids as pages and API send them: a JSON list, repeated query parameters, a comma-separated string
    or one id. Unique, in the order given, at_least to MAX_VERSIONS of them; else InputError on the field ids."""
    chunks = raw if isinstance(raw, (list, tuple)) else [raw]
    ids = []
    for chunk in chunks:
        for part in chunk.split(",") if isinstance(chunk, str) else [chunk]:
            if isinstance(part, str) and not part.strip():
                continue
            number = _version_id(part)
            if number not in ids:
                ids.append(number)
    if not at_least <= len(ids) <= MAX_VERSIONS:
        raise InputError(f"Choose {at_least} to {MAX_VERSIONS} versions to {action}.", field="ids")
    return ids


def _version_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise InputError("ids must be version ids, e.g. 3,5.", field="ids")
    number = int(value)
    if not 0 < number <= MAX_ID:
        raise InputError("ids must be positive version ids.", field="ids")
    return number


def owned_versions(user, ids, *related) -> list[AdapterVersion]:
    """The user's versions with these ids, in this order; ObjectNotFound names the first one missing."""
    found = {v.pk: v for v in AdapterVersion.objects.owned_by(user).select_related(*related).filter(pk__in=ids)}
    missing = [i for i in ids if i not in found]
    if missing:
        raise ObjectNotFound(f"No adapter version {missing[0]}.")
    return [found[i] for i in ids]


class VersionInUse(Exception):
    """The version has a deployment that is not stopped or failed."""

    def __init__(self, message, deployments):
        super().__init__(message)
        self.deployments = deployments


def set_champion(version: AdapterVersion, *, unset: bool = False) -> AdapterLine:
    """Makes the version its line's champion (or, with unset, clears it if it is the champion)."""
    with transaction.atomic():
        line = AdapterLine.objects.select_for_update().get(pk=version.line_id)
        if unset:
            if line.champion_id == version.pk:
                line.champion = None
                line.save(update_fields=["champion"])
        elif line.champion_id != version.pk:
            line.champion = version
            line.save(update_fields=["champion"])
    version.line = line
    return line


def _inside(path: str, root: Path) -> Path | None:
    if not path:
        return None
    try:
        resolved = Path(path).resolve()
        resolved.relative_to(Path(root).resolve())
    except (OSError, ValueError):
        return None
    return resolved if resolved != Path(root).resolve() else None


def delete_version(version: AdapterVersion) -> list[Deployment]:
    """Deletes the version and, after commit, its adapter folder and merged folders. Its stopped and failed
    deployments are kept (name, history, details) with version None and details["deleted_version"]; they are
    returned. Refused (VersionInUse) while a deployment of it is merging, loading or live."""
    with transaction.atomic():
        locked = AdapterVersion.objects.select_for_update().select_related("line").filter(pk=version.pk).first()
        if locked is None:
            return []
        deployments = list(Deployment.objects.select_for_update().filter(version=locked))
        active = [d for d in deployments if d.status not in INACTIVE]
        if active:
            names = ", ".join(f"{d.name} ({d.status})" for d in active)
            raise VersionInUse(f"{version.label} is deployed: {names}. Stop the deployment first.", active)
        folders = _folders_of(locked, deployments)
        for deployment in deployments:
            _keep_without_version(deployment, locked)
        try:
            locked.delete()
        except ProtectedError as exc:  # a deployment created meanwhile
            raise VersionInUse(f"{version.label} has just been deployed; stop the deployment first.", []) from exc
        transaction.on_commit(lambda: _remove_folders(folders))
    return deployments


def deleted_message(version: AdapterVersion, kept: list[Deployment]) -> str:
    """'Deleted support v2; the deployment support (stopped) keeps its record.'"""
    if not kept:
        return f"Deleted {version.label}."
    names = ", ".join(f"{d.name} ({d.status})" for d in kept)
    if len(kept) == 1:
        return f"Deleted {version.label}; the deployment {names} keeps its record."
    return f"Deleted {version.label}; the deployments {names} keep their records."


def kept_deployments(version: AdapterVersion) -> list[Deployment]:
    """The stopped and failed deployments of the version: deleting it keeps their records (the confirmation page
    names them)."""
    return list(version.deployments.filter(status__in=INACTIVE).order_by("name"))


def _keep_without_version(deployment: Deployment, version: AdapterVersion) -> None:
    """Detaches a stopped or failed deployment from the version being deleted, saying which version it served.
    Its merged folder goes with the version, so it no longer has one."""
    deleted = {"id": version.pk, "label": version.label, "line_id": version.line_id,
               "deleted_at": timezone.now().isoformat()}
    deployment.details = {**deployment.details, "deleted_version": deleted}
    deployment.version = None
    deployment.path = ""
    deployment.save(update_fields=["version", "path", "details"])


def _folders_of(version: AdapterVersion, deployments) -> list[Path]:
    """The version's adapter folder, its merged model (kept per version, so also when no deployment points at it
    any more) and that model's GGUF files: every one inside the data directories, never anything else."""
    merged = {str(merged_dir_for(version))} | {d.path for d in deployments if d.path}
    candidates = [(p, settings.DEPLOYMENT_DIR) for m in merged for p in (m, gguf_dir(m))]
    candidates.append((version.path, settings.ADAPTER_DIR))
    return [p for p in (_inside(path, root) for path, root in candidates) if p]


def _remove_folders(folders):
    for folder in folders:
        try:
            shutil.rmtree(folder, ignore_errors=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", folder, exc)
