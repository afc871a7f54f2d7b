"""Simulated users browsing a running Tunedeck server: N threads, each with the logged-in session, GET the pages and
API lists in a loop for a while; prints the request count, errors and p50/p95/p99/max latency.

    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --username demo --password demo --users 50 --seconds 30

(One login is shared by all the simulated users: the login form is rate limited per address.)"""
from __future__ import annotations

import argparse
import re
import statistics
import threading
import time

import requests

PAGES = ["/", "/jobs/", "/datasets/", "/versions/", "/workers/", "/api/v1/jobs", "/api/v1/datasets",
         "/api/v1/adapter-versions"]


def log_in(base: str, username: str, password: str) -> requests.Session:
    session = requests.Session()
    page = session.get(f"{base}/login/", timeout=30)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    done = session.post(f"{base}/login/", data={"username": username, "password": password,
                                                "csrfmiddlewaretoken": token}, timeout=30, allow_redirects=False)
    if done.status_code != 302:
        raise SystemExit(f"login failed: HTTP {done.status_code}")
    return session


def percentile(sorted_values, fraction):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def run_load(base: str, session: requests.Session, users=50, seconds=30.0, extra_pages=(), stop=None,
             think_seconds=0.5) -> dict:
    """Runs `users` browsing threads for `seconds` (or until stop() is true), each pausing think_seconds between
    pages as a person reading them would; returns latency statistics (ms)."""
    pages = list(PAGES) + list(extra_pages)
    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.monotonic() + seconds

    def user(index):
        own = requests.Session()
        own.cookies.update(session.cookies)
        i = index
        while time.monotonic() < deadline and not (stop and stop()):
            path = pages[i % len(pages)]
            i += 1
            started = time.perf_counter()
            try:
                status = own.get(base + path, timeout=60).status_code
            except requests.RequestException as exc:
                status = repr(exc)
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                if status != 200:
                    errors.append((path, status))
            time.sleep(think_seconds)

    threads = [threading.Thread(target=user, args=(n,), daemon=True) for n in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    values = sorted(latencies)
    return {"users": users, "requests": len(values), "errors": errors,
            "p50_ms": percentile(values, 0.50), "p95_ms": percentile(values, 0.95),
            "p99_ms": percentile(values, 0.99), "max_ms": values[-1] if values else float("nan"),
            "mean_ms": statistics.fmean(values) if values else float("nan")}


def report(stats: dict) -> str:
    return (f"{stats['users']} users, {stats['requests']} requests, {len(stats['errors'])} errors: "
            f"p50 {stats['p50_ms']:.0f} ms, p95 {stats['p95_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms, "
            f"max {stats['max_ms']:.0f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--username", default="demo")
    parser.add_argument("--password", default="demo")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--think", type=float, default=0.5, help="seconds each user pauses between pages")
    args = parser.parse_args()
    base = args.url.rstrip("/")
    print(report(run_load(base, log_in(base, args.username, args.password), args.users, args.seconds,
                                think_seconds=args.think)))


if __name__ == "__main__":
    main()
