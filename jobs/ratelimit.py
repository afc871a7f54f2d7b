"""Rate limits the web process applies before any view runs: login forms and inference requests.

Counters are fixed windows in Django's cache (settings.CACHES: per process by default, shared when
TUNEDECK_CACHE_URL points at Redis). Rates are "N/period" strings, e.g. "10/min"; "0" or "" turns a limit off.

- Login: failed POSTs to the login page and the admin login (anything but the redirect of a successful login),
  counted per client address and per username, so neither one address nor a botnet trying one account gets more
  guesses than the rate. Over it, every login POST is answered 429 with Retry-After until the window ends.
- Inference: POSTs under /v1/ (chat/completions, completions), counted per API token (or per address without
  one). Over it: 429 in OpenAI's error shape, which OpenAI clients understand and retry after Retry-After.

The API's own token endpoint (POST /api/v1/auth/token) has DRF's LoginThrottle in jobs/api/views.py.
"""
from __future__ import annotations

import hashlib
import time

from django.conf import settings
from django.core.cache import cache
from django.http import HttpResponse, JsonResponse
from django.urls import NoReverseMatch, reverse

PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
           "d": 86400, "day": 86400}


def parse_rate(rate) -> tuple[int, int] | None:
    """'10/min' -> (10, 60); '' or '0' -> None (no limit)."""
    if not rate or str(rate).strip() in ("0", "none", "off"):
        return None
    count, _, period = str(rate).partition("/")
    seconds = PERIODS.get(period.strip().lower() or "min")
    if seconds is None:
        raise ValueError(f"Unknown rate period in {rate!r}; use s, min, hour or day.")
    return int(count), seconds


def _key(scope: str, ident: str, period: int, now: float) -> str:
    digest = hashlib.sha256(ident.encode()).hexdigest()[:32]
    return f"tunedeck:ratelimit:{scope}:{digest}:{int(now // period)}"


def _wait(period: int, now: float) -> int:
    return int(period - now % period) + 1


def hit(scope: str, ident: str, rate) -> int | None:
    """Counts one request; returns seconds to wait if this one is over the limit, else None."""
    parsed = parse_rate(rate)
    if parsed is None:
        return None
    limit, period = parsed
    now = time.time()
    key = _key(scope, ident, period, now)
    cache.add(key, 0, timeout=period + 1)
    try:
        count = cache.incr(key)
    except ValueError:  # the window expired between add and incr
        cache.set(key, 1, timeout=period + 1)
        count = 1
    return _wait(period, now) if count > limit else None


def exhausted(scope: str, ident: str, rate) -> int | None:
    """Seconds to wait if the limit is already used up in this window (counts nothing), else None."""
    parsed = parse_rate(rate)
    if parsed is None:
        return None
    limit, period = parsed
    now = time.time()
    return _wait(period, now) if (cache.get(_key(scope, ident, period, now)) or 0) >= limit else None


def client_address(request) -> str:
    # REMOTE_ADDR only: X-Forwarded-For is whatever the client says unless a proxy rewrites it.
    return request.META.get("REMOTE_ADDR", "") or "unknown"


def _login_paths() -> set[str]:
    paths = set()
    for name in ("login", "admin:login"):
        try:
            paths.add(reverse(name))
        except NoReverseMatch:
            pass
    return paths


class RateLimitMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response
        self.login_paths = None

    def __call__(self, request):
        if request.method == "POST":
            if self.login_paths is None:
                self.login_paths = _login_paths()
            if request.path_info in self.login_paths:
                return self._login(request)
            if request.path_info.startswith("/v1/"):
                refused = self._inference(request)
                if refused is not None:
                    return refused
        return self.get_response(request)

    def _login(self, request):
        rate = settings.TUNEDECK_LOGIN_RATE
        idents = [("login-addr", client_address(request))]
        username = (request.POST.get("username") or "").strip().lower()
        if username:
            idents.append(("login-user", username))
        waits = [w for w in (exhausted(scope, ident, rate) for scope, ident in idents) if w]
        if not waits:
            response = self.get_response(request)
            if response.status_code != 302:  # a successful login redirects; anything else was a failed guess
                for scope, ident in idents:
                    hit(scope, ident, rate)
            return response
        wait = max(waits)
        response = HttpResponse(
            "<!doctype html><title>Too many login attempts</title><h1>Too many login attempts</h1>"
            f"<p>Wait {wait} seconds, then try again.</p>",
            status=429,
        )
        response["Retry-After"] = str(wait)
        return response

    def _inference(self, request):
        auth = request.META.get("HTTP_AUTHORIZATION", "")
        ident = f"token:{auth}" if auth else f"addr:{client_address(request)}"
        wait = hit("inference", ident, settings.TUNEDECK_INFERENCE_RATE)
        if wait is None:
            return None
        response = JsonResponse(
            {"error": {"message": f"Rate limit reached for inference ({settings.TUNEDECK_INFERENCE_RATE}); "
                                  f"retry in {wait} seconds.",
                       "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
            status=429,
        )
        response["Retry-After"] = str(wait)
        return response
