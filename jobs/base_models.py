"""Base models: the platform's default, and server folders an administrator registers.

Registering a server folder is an admin action, and only folders inside the configured model roots
(settings.MODEL_ROOTS, from TUNEDECK_MODEL_ROOTS) that lie outside the data directory qualify: the data directory
holds every user's uploads, adapters and merged models, so a folder there would hand one user's fine-tune, trained
on their private data, to another. An ordinary user is refused before the path is looked at, with the same words
whatever it names, so the answer says nothing about the server's disk."""
from __future__ import annotations

from pathlib import Path

from django.conf import settings

from finetune.errors import ModelFolderError

from .errors import InputError, NotAllowed
from .models import BaseModel

ADMINS_ONLY = ("Registering a folder on the server as a base model is for administrators; "
               "ask one to register the model you need.")


def may_register_folders(user) -> bool:
    """None is the server's own command line (manage.py), which only someone with a shell on the server runs."""
    return user is None or bool(getattr(user, "is_staff", False))


def register_base_model(actor, name: str, path: str, *, owner=None, trust_remote_code=False) -> BaseModel:
    """Validates a local Hugging Face folder and records it for owner (None: shared with every user). actor is who
    asks (None: the server's command line). Nothing is stored if the folder is not usable."""
    from finetune.modelstore import inspect_model_folder

    if not may_register_folders(actor):
        raise NotAllowed(ADMINS_ONLY)
    name = (name or "").strip()
    if not name:
        raise InputError("Give the model a name.", field="name")
    folder = allowed_model_folder(path)
    try:
        info = inspect_model_folder(str(folder), allow_remote_code=trust_remote_code)
    except ModelFolderError as exc:
        raise InputError(str(exc), field="path") from exc
    return BaseModel.objects.create(
        owner=owner,
        name=name,
        path=str(folder),
        trust_remote_code=trust_remote_code,
        **base_model_fields(info),
    )


def allowed_model_folder(path: str) -> Path:
    """The resolved folder, if it lies inside a model root and outside the data directory. Symbolic links are
    followed first, so a link inside a root is judged by where it points."""
    raw = str(path or "").strip()
    if not raw:
        raise InputError("Give the path of a Hugging Face model folder on the server.", field="path")
    roots = [Path(r) for r in configured_model_roots()]
    if not roots:
        raise InputError("No model roots are configured, so no server folder can be registered: set "
                         "TUNEDECK_MODEL_ROOTS to the folders that hold model folders (several separated by ':').",
                         field="path")
    if not Path(raw).is_absolute():
        raise InputError(f"Give an absolute path (one starting with /), inside {_roots_text(roots)}.", field="path")
    folder = Path(raw).resolve()
    data_dir = Path(settings.DATA_DIR).resolve()
    if _within(folder, data_dir) or _within(data_dir, folder):
        raise InputError("That folder is inside Tunedeck's data directory (or holds it), where users' uploads, "
                         "adapters and merged models live; it cannot be registered as a base model.", field="path")
    if not any(_within(folder, root) for root in roots):
        raise InputError(f"{raw} is not inside a model root ({_roots_text(roots)}); put the model folder there or "
                         "add its parent to TUNEDECK_MODEL_ROOTS.", field="path")
    return folder


def check_usable(model: BaseModel) -> None:
    """Refuses a base model whose folder lies in the data directory outside its models folder (where the default
    model and the platform's own imports live): such a row was registered by a user before registering folders
    became an admin action, and may be another user's fine-tune."""
    folder = Path(model.path).resolve()
    data_dir, models_dir = Path(settings.DATA_DIR).resolve(), Path(settings.MODEL_DIR).resolve()
    if _within(folder, data_dir) and not _within(folder, models_dir):
        raise InputError(f"The base model {model.name!r} points inside Tunedeck's data directory, where users' own "
                         "files live, so it cannot be trained on; an administrator can register the model again "
                         "from a model root.", field="base_model")


def check_ready(model: BaseModel) -> None:
    """A model pulled from the Hub can be planned for from its config.json at once, but trained only when ready."""
    if model.status != "ready":
        raise InputError(f"The base model {model.name!r} is {model.status}, not ready: wait for its download to "
                         "finish (the Models page shows its progress), or pick a ready model.", field="base_model",
                         code="conflict")


def configured_model_roots() -> list[str]:
    return [str(Path(r).resolve()) for r in settings.MODEL_ROOTS]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _roots_text(roots: list[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def base_model_fields(info: dict) -> dict:
    """The BaseModel fields read off a model folder by finetune.modelstore (inspect or import)."""
    return dict(
        architecture=info.get("architecture", ""),
        model_type=info.get("model_type", ""),
        parameters=info.get("parameters", 0),
        config=info.get("config", {}),
        sha256=info.get("sha256", ""),
        has_chat_template=bool(info.get("has_chat_template")),
    )


def default_base_model() -> BaseModel | None:
    return BaseModel.objects.filter(is_default=True).first()
