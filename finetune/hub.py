"""Base models from the Hugging Face Hub: what a repository holds (before anything large is downloaded), which of its
files a fine-tune needs, and the download of those files into a plain model folder, resumable.

Pure Python over `huggingface_hub` (no Django, no torch): the web process calls `describe_repo` to show the size,
licence and architecture before a user confirms; a worker calls `download_files`. The endpoint is always passed in
(settings.HUB_ENDPOINT, from HF_ENDPOINT), so a test or an internal mirror serves the same client code.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from .errors import ModelFolderError

REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
# Files a fine-tune needs beside the safetensors weights: config, tokenizer, chat template, licence and card.
NEEDED_FILES = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "model.safetensors.index.json", "README.md",
}
LICENCE_FILE = re.compile(r"^(LICEN[SC]E|USE_POLICY|NOTICE)(\.[A-Za-z]+)?$", re.IGNORECASE)
GGUF_PREFERENCE = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")  # least lossy first


class HubError(ModelFolderError):
    """A repository that cannot be pulled, in the user's terms (never quoting a token)."""


def check_repo_id(repo_id: str, revision: str = "") -> tuple[str, str]:
    repo_id, revision = (repo_id or "").strip(), (revision or "").strip() or "main"
    if repo_id.startswith(("https://huggingface.co/", "http://huggingface.co/")):
        repo_id = repo_id.split("huggingface.co/", 1)[1].strip("/")
    if not REPO_ID.match(repo_id) or ".." in repo_id:
        raise HubError(f"{repo_id!r} is not a Hub model id; give one like Qwen/Qwen2.5-0.5B-Instruct.")
    if not REVISION.match(revision) or ".." in revision:
        raise HubError(f"{revision!r} is not a revision; give a branch, tag or commit hash (or leave it empty).")
    return repo_id, revision


def select_files(siblings: list[dict], trust_remote_code: bool = False) -> tuple[list[dict], str]:
    """(files to download as {"name", "size"}, kind): kind "safetensors" or "gguf". Only top-level files: no
    pickled .bin weights, no sub-folders (original/, onnx/), no Python unless remote code is trusted."""
    top = [s for s in siblings if "/" not in s["name"]]
    weights = [s for s in top if s["name"].endswith(".safetensors")]
    extra = [s for s in top if s["name"] in NEEDED_FILES or LICENCE_FILE.match(s["name"])
             or (trust_remote_code and s["name"].endswith(".py"))]
    if weights:
        return sorted(weights + extra, key=lambda s: s["name"]), "safetensors"
    ggufs = [s for s in top if s["name"].lower().endswith(".gguf")]
    if ggufs:
        return [_preferred_gguf(ggufs)] + [s for s in extra if s["name"] in ("README.md",)], "gguf"
    if any(s["name"].endswith((".bin", ".pt", ".pth")) for s in top):
        raise HubError("The repository has only pickled PyTorch weights (.bin); Tunedeck loads safetensors only, "
                       "which cannot run code when loaded. Look for a safetensors version of the model.")
    raise HubError("The repository has no model weights (no .safetensors or .gguf file at its top level).")


def _preferred_gguf(ggufs: list[dict]) -> dict:
    def rank(sibling):
        name = sibling["name"].lower()
        return next((i for i, tag in enumerate(GGUF_PREFERENCE) if tag in name), len(GGUF_PREFERENCE))

    return min(ggufs, key=lambda s: (rank(s), s["size"]))


def describe_repo(endpoint: str, repo_id: str, revision: str, token: str | None,
                  trust_remote_code: bool = False) -> dict:
    """What the Hub says about a repository at a revision, and its config.json (a few kilobytes) read: commit,
    files to fetch with their sizes, licence, gated/private, architecture. Raises HubError."""
    from huggingface_hub import HfApi

    repo_id, revision = check_repo_id(repo_id, revision)
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True,
                                                   token=token or False)
    except Exception as exc:  # noqa: BLE001 - every client error becomes a sentence below
        raise HubError(hub_error_message(exc, repo_id, revision, bool(token), endpoint)) from None
    siblings = [{"name": s.rfilename, "size": int((s.lfs.size if s.lfs else s.size) or 0)} for s in info.siblings or []]
    files, kind = select_files(siblings, trust_remote_code)
    config = _read_config(endpoint, repo_id, info.sha, token, siblings) if kind == "safetensors" else {}
    return {
        "repo_id": repo_id, "revision": revision, "commit": info.sha, "kind": kind, "files": files,
        "total_bytes": sum(f["size"] for f in files), "license": license_of(info),
        "gated": bool(info.gated), "private": bool(info.private), "config": config,
        "architecture": (config.get("architectures") or [""])[0] if config else "",
        "parameters": int(info.safetensors.total) if info.safetensors else 0,
    }


def license_of(info) -> str:
    card = getattr(info, "card_data", None)
    licence = getattr(card, "license", None) if card is not None else None
    if isinstance(licence, list):
        licence = ", ".join(str(x) for x in licence)
    if not licence:
        licence = next((t.split(":", 1)[1] for t in info.tags or [] if t.startswith("license:")), "")
    return str(licence or "")[:200]


def _read_config(endpoint, repo_id, commit, token, siblings) -> dict:
    from .modelstore import _check_architecture

    if not any(s["name"] == "config.json" for s in siblings):
        raise HubError("The repository has no config.json, so it is not a Hugging Face transformers model.")
    with tempfile.TemporaryDirectory(prefix="tunedeck-hub-config-") as scratch:
        path = download_file(endpoint, repo_id, commit, "config.json", scratch, token)
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HubError(f"config.json of {repo_id} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise HubError(f"config.json of {repo_id} is not a JSON object.")
    _check_architecture(config, allow_remote_code=any(s["name"].endswith(".py") for s in siblings))
    return config


PARTIAL_DIR = Path(".cache") / "huggingface" / "download"  # under local_dir; removed once a pull is complete
WRITE_CHUNK = 1024 * 1024  # what a killed worker can lose of a file, at most


def download_file(endpoint, repo_id, commit, name, local_dir, token, progress_class=None) -> str:
    """One file into local_dir, resumable: the bytes arrive in local_dir/PARTIAL_DIR/<name>.incomplete, which a
    later call (another worker, after this one died) continues with a Range request, then move into place.
    huggingface_hub's own hf_hub_download cannot do that: since 2.x it downloads to a fresh per-process temporary
    file. The URL pins the commit, so a partial file is always of the same content. Raises HubError."""
    target = Path(local_dir) / name
    if target.is_file():
        return str(target)
    incomplete = Path(local_dir) / PARTIAL_DIR / f"{name}.incomplete"
    incomplete.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch_resuming(endpoint, repo_id, commit, name, incomplete, token, progress_class)
    except HubError:
        raise
    except Exception as exc:
        if type(exc).__name__ == "PullCancelled":
            raise
        raise HubError(hub_error_message(exc, repo_id, commit, bool(token), endpoint)) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    incomplete.replace(target)
    return str(target)


def _fetch_resuming(endpoint, repo_id, commit, name, incomplete: Path, token, progress_class) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    have = incomplete.stat().st_size if incomplete.exists() else 0
    headers = build_hf_headers(token=token or False, library_name="tunedeck")
    if have:
        headers["Range"] = f"bytes={have}-"
    url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
    with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=60) as response:
        if response.status_code == 416 and have:  # asked past the end: the file was complete already
            return
        hf_raise_for_status(response)
        if response.status_code != 206:
            have = 0  # the server sent the whole file: start over
        total = have + int(response.headers.get("Content-Length") or 0)
        bar = progress_class(total=total, initial=have) if progress_class else None
        with open(incomplete, "ab" if have else "wb") as out:
            for chunk in response.iter_bytes(chunk_size=WRITE_CHUNK):
                out.write(chunk)
                out.flush()
                if bar is not None:
                    bar.update(len(chunk))
    if incomplete.stat().st_size != total:
        raise HubError(f"{name} of {repo_id} arrived incomplete ({incomplete.stat().st_size} of {total} bytes); "
                       "pull it again to resume.")


def hub_error_message(exc: Exception, repo_id: str, revision: str, had_token: bool, endpoint: str) -> str:
    """The client's exception as a sentence in the user's terms. Only the exception's type decides the words:
    its own text may carry request details, so it is never quoted."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        if had_token:
            return (f"{repo_id} is a gated model and the Hub token used has no access to it: accept the model's "
                    "licence on its Hub page with the account the token belongs to.")
        return (f"{repo_id} is a gated model: accept its licence on the Hub, then set a Hugging Face access token "
                "(yours on the Models page, or ask an administrator for a site token).")
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r}; give a branch, tag or commit that exists."
    if isinstance(exc, errors.RepositoryNotFoundError):
        extra = "" if had_token else " If it is private or gated, set a Hugging Face access token first."
        return f"No model {repo_id!r} was found on the Hub at {endpoint}.{extra}"
    if isinstance(exc, errors.EntryNotFoundError):
        return f"A file listed for {repo_id} could not be downloaded (the Hub says it does not exist)."
    if isinstance(exc, errors.HfHubHTTPError):
        code = getattr(getattr(exc, "response", None), "status_code", "?")
        return f"The Hub at {endpoint} refused the request for {repo_id} (HTTP {code}); try again later."
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return "The disk of the data directory filled up while downloading; free space and retry the pull."
    return (f"Could not reach the Hub at {endpoint} for {repo_id} ({type(exc).__name__}). An offline server "
            "cannot pull models: copy the model folder onto it and have an administrator register it.")
