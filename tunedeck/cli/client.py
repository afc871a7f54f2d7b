"""Talking to the server: the stored login (config file), the HTTP client and the one-line error it raises.

Exit codes: 0 done; 1 the server refused (an API error, a failed job or deployment, an invalid dataset);
2 usage (bad arguments, not logged in, a missing local file); 3 the server cannot be reached; 4 the job was
cancelled; 130 interrupted."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import requests

EXIT_API, EXIT_USAGE, EXIT_CONNECTION, EXIT_CANCELLED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
API = "/api/v1"
TIMEOUT = (10, 120)  # connect, read


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_API):
        super().__init__(message)
        self.code = code


def config_path() -> Path:
    if os.environ.get("TUNEDECK_CONFIG"):
        return Path(os.environ["TUNEDECK_CONFIG"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "tunedeck" / "config.json"


def load_config() -> dict:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise CliError(f"Cannot read the config file {path} ({exc}); run `tunedeck login` again.", EXIT_USAGE) from None
    return data if isinstance(data, dict) else {}


def save_config(data: dict) -> Path:
    """Writes the config readable by its owner only (it holds a token): mode 0600, folder 0700."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.chmod(path, 0o600)
    return path


def normalise_url(url: str) -> str:
    url = (url or "").strip().rstrip("/")
    if not url:
        raise CliError("Give the server's URL, e.g. --url http://127.0.0.1:8000", EXIT_USAGE)
    if not re.match(r"^https?://", url):
        url = "http://" + url
    for suffix in ("/api/v1", "/api"):
        url = url.removesuffix(suffix)
    return url


def connection_settings() -> tuple[str, str]:
    config = load_config()
    url = os.environ.get("TUNEDECK_URL") or config.get("url")
    token = os.environ.get("TUNEDECK_TOKEN") or config.get("token")
    if not url or not token:
        raise CliError("Not logged in: run `tunedeck login --url URL --username NAME` "
                       "(or set TUNEDECK_URL and TUNEDECK_TOKEN).", EXIT_USAGE)
    return normalise_url(url), token


def error_message(response: requests.Response) -> str:
    """One line from the API's {"error": {"code", "message", "details"}} (or OpenAI's {"error": {"message"}})."""
    message = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message") or error.get("code")
        elif isinstance(error, str):
            message = error
        elif isinstance(body.get("detail"), str):
            message = body["detail"]
    if not message:
        text = re.sub(r"<[^>]+>", " ", response.text or "")
        text = " ".join(text.split())[:200]
        message = f"HTTP {response.status_code} {response.reason or ''}".strip() + (f": {text}" if text else "")
    if response.status_code == 401 and "login" not in message.lower():
        message += " Run `tunedeck login` to get a new token."
    return " ".join(str(message).split())


class Client:
    def __init__(self, url: str, token: str | None = None):
        self.url = url
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "tunedeck-cli"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    @classmethod
    def from_config(cls) -> Client:
        return cls(*connection_settings())

    def request(self, method: str, path: str, *, expect_json=True, timeout=TIMEOUT, **kwargs):
        url = path if path.startswith("http") else self.url + (path if path.startswith("/v1") else API + path)
        try:
            response = self.session.request(method, url, timeout=timeout, **kwargs)
        except requests.exceptions.Timeout:
            raise CliError(f"{self.url} did not answer in time.", EXIT_CONNECTION) from None
        except requests.exceptions.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else type(exc).__name__
            raise CliError(f"Cannot connect to {self.url} ({reason}). Is the server running?",
                           EXIT_CONNECTION) from None
        except requests.exceptions.RequestException as exc:
            raise CliError(f"Request to {url} failed: {exc}", EXIT_CONNECTION) from None
        if response.status_code >= 400:
            raise CliError(error_message(response), EXIT_API)
        if not expect_json or kwargs.get("stream"):
            return response
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise CliError(f"{url} answered with something that is not JSON (HTTP {response.status_code}); "
                           "is the URL a Tunedeck server?") from None

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)

    def delete(self, path, **kwargs):
        return self.request("DELETE", path, **kwargs)

    def list(self, path, params=None, limit=1000) -> tuple[list, int]:
        """Every page of a paginated list, up to limit items; returns (items, total)."""
        params = {**(params or {}), "page_size": 200}
        items, total, page = [], 0, 1
        while True:
            body = self.get(path, params={**params, "page": page})
            if not isinstance(body, dict) or "results" not in body:
                return (body or []), len(body or [])
            items += body["results"]
            total = body.get("count", len(items))
            if not body.get("next") or len(items) >= limit:
                return items[:limit], total
            page += 1
