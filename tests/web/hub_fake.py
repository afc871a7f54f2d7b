"""A local HTTP server that answers as the Hugging Face Hub does for what huggingface_hub 2.x asks when it pulls a
model: GET /api/models/<id>/revision/<rev>?blobs=True (the file list with sizes), HEAD and GET
/<id>/resolve/<rev>/<file> (X-Repo-Commit, ETag, Content-Length; Range requests answered 206), and the Hub's error
headers (X-Error-Code RepoNotFound, GatedRepo, RevisionNotFound). Pointing settings.HUB_ENDPOINT at it runs the real
client code offline. A gated repository wants `Authorization: Bearer <its token>`; a slow one trickles its files
(`delay` seconds after each `chunk` bytes past the first `slow_after` bytes of a file; `slow_files` limits that to
some files), and `ranges` records every Range
request (a resumed download)."""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeRepo:
    def __init__(self, files: dict[str, bytes], *, gated=False, token=None, license="apache-2.0", delay=0.0,
                 chunk=256 * 1024, slow_files=None, slow_after=0):
        self.files, self.gated, self.token, self.license, self.delay = files, gated, token, license, delay
        self.chunk, self.slow_files, self.slow_after = chunk, slow_files, slow_after
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        self.commit = digest.hexdigest()  # a commit hash: 40 hex digits, as the client checks


def model_files(folder: Path, **extra: bytes) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
    files.update(extra)
    return files


class FakeHub:
    def __init__(self):
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, authorization)
        self.ranges: list[tuple[str, str]] = []  # (path, Range header) of every ranged GET
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.answer(self, head=False)

            def do_HEAD(self):
                hub.answer(self, head=True)

        return Handler

    def answer(self, req, head: bool):
        path = unquote(urlparse(req.path).path)
        self.requests.append((req.command, path, req.headers.get("Authorization", "")))
        if path.startswith("/api/models/"):
            repo_id, _, revision = path[len("/api/models/"):].partition("/revision/")
            return self._api(req, repo_id, revision)
        if "/resolve/" in path:
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            revision, _, name = rest.partition("/")
            return self._file(req, repo_id, revision, name, head)
        return self._error(req, 404, "RepoNotFound", head)

    def _repo(self, req, repo_id, revision, head=False):
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(req, 401, "RepoNotFound", head)
            return None
        if revision not in ("main", repo.commit):
            self._error(req, 404, "RevisionNotFound", head)
            return None
        return repo

    def _api(self, req, repo_id, revision):
        repo = self._repo(req, repo_id, revision)
        if repo is None:
            return
        siblings = [{"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest(),
                     **({"lfs": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}}
                        if name.endswith((".safetensors", ".bin", ".gguf")) else {})}
                    for name, data in sorted(repo.files.items())]
        body = json.dumps({"id": repo_id, "sha": repo.commit, "private": False, "gated": "manual" if repo.gated
                           else False, "tags": [f"license:{repo.license}"], "cardData": {"license": repo.license},
                           "siblings": siblings}).encode()
        self._send(req, 200, body, {"Content-Type": "application/json"}, head=False)

    def _file(self, req, repo_id, revision, name, head):
        repo = self._repo(req, repo_id, revision, head)
        if repo is None:
            return
        if repo.gated and req.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(req, 401, "GatedRepo", head)
        data = repo.files.get(name)
        if data is None:
            return self._error(req, 404, "EntryNotFound", head)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start = 0
        ranged = req.headers.get("Range", "")
        if ranged.startswith("bytes="):
            start = int(ranged[6:].split("-")[0] or 0)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if not head:
                self.ranges.append((f"/{repo_id}/resolve/{revision}/{name}", ranged))
        slow = repo.slow_files is None or name in repo.slow_files
        self._send(req, 206 if ranged else 200, data[start:], headers, head, delay=repo.delay if slow else 0.0,
                   step=repo.chunk if slow else 256 * 1024, fast_bytes=max(0, repo.slow_after - start))

    def _error(self, req, code, error_code, head):
        self._send(req, code, json.dumps({"error": error_code}).encode(),
                   {"X-Error-Code": error_code, "Content-Type": "application/json"}, head)

    @staticmethod
    def _send(req, code, body, headers, head, delay=0.0, step=256 * 1024, fast_bytes=0):
        req.send_response(code)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if head:
            return
        try:
            req.wfile.write(body[:fast_bytes])
            for offset in range(fast_bytes, len(body), step):
                req.wfile.write(body[offset:offset + step])
                if delay:
                    time.sleep(delay)
        except (BrokenPipeError, ConnectionResetError):
            return


def pointed_at(hub, settings):
    """The body of a fixture that points the platform at this fake Hub (pytest-django's settings fixture) and removes
    what the pulls stored afterwards."""
    import shutil

    from django.conf import settings as django_settings

    settings.HUB_ENDPOINT = hub.url
    settings.HUB_DISK_RESERVE_BYTES = 1024 * 1024
    yield hub.url
    shutil.rmtree(Path(django_settings.MODEL_DIR) / "hub", ignore_errors=True)


def api_for(user):
    """A REST client authenticated as user with a fresh API token."""
    from django.test import Client

    from jobs.models import ApiToken

    return Client(HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(user)[1]}")
