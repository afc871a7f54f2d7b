"""docs/internals.md's "Where to add" table is true: every file it names exists, every row names the test that
shows it, and the rows whose proof is a rule rather than an example (a queue, a page) are checked here for every
queue and page the project has, so the next one added the documented way passes and one added any other way fails.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from django.conf import settings
from django.urls import URLPattern, URLResolver

ROOT = Path(__file__).resolve().parents[1]
INTERNALS = ROOT / "docs" / "internals.md"


def where_to_add_rows() -> list[tuple[str, str, str]]:
    text = INTERNALS.read_text()
    section = text.split("## Where to add", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and not set(cells[0]) <= {"-", " "} and cells[0] != "to add":
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def named_paths(cell: str) -> list[str]:
    """Repository paths quoted in a cell: `dir/file.py` or `tests/x.py::test_name` (placeholders like <name>
    name a folder that must exist)."""
    paths = []
    for quoted in re.findall(r"`([^`]+)`", cell):
        quoted = quoted.split("::")[0]
        if "/" in quoted and not quoted.startswith(("settings.", "/")) and " " not in quoted:
            paths.append(quoted.split("<")[0].rstrip("/") if "<" in quoted else quoted)
    return paths


def test_the_table_names_what_a_newcomer_adds():
    kinds = " ".join(row[0] for row in where_to_add_rows())
    for kind in ("method", "dataset layout", "serving engine", "queue", "page"):
        assert kind in kinds, f"docs/internals.md's Where to add has no row for {kind}"


@pytest.mark.parametrize("row", where_to_add_rows(), ids=lambda row: row[0])
def test_each_row_names_files_that_exist_and_a_test(row):
    kind, place, proof = row
    for path in named_paths(place) + named_paths(proof):
        assert (ROOT / path).exists(), f"{kind}: {path} does not exist"
    tests = [p for p in named_paths(proof) if p.startswith("tests/")]
    assert tests, f"{kind}: the row names no test"
    for quoted in re.findall(r"`(tests/[^`]+::[^`]+)`", proof):
        file, name = quoted.split("::", 1)
        assert f"def {name.split('[')[0]}(" in (ROOT / file).read_text(), f"{kind}: {quoted} is not a test"


# ---------------------------------------------------------------- a queue: a route in settings, a worker for it


def run_sh_queues() -> set[str]:
    queues = set()
    for line in (ROOT / "scripts" / "run.sh").read_text().splitlines():
        words = shlex.split(line.split("#", 1)[0]) if "celery" in line and " worker" in line else []
        if "-Q" in words:
            queues.update(words[words.index("-Q") + 1].split(","))
    return queues


def routed_queues() -> set[str]:
    queues = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values()}
    return queues | {settings.DATASET_QUEUE, settings.DATASET_LARGE_QUEUE}  # jobs.queue.dataset_queue's two


def test_every_routed_queue_has_a_worker_in_the_one_command_run():
    missing = routed_queues() - run_sh_queues()
    assert not missing, f"scripts/run.sh starts no worker for the queues {sorted(missing)}: their tasks would wait forever"


def test_the_test_workers_take_every_routed_queue():
    import inspect

    from tests import conftest

    default = inspect.signature(conftest.start_worker).parameters["queues"].default
    missing = routed_queues() - set(default.split(","))
    assert not missing, f"the tests' workers would never run tasks routed to {sorted(missing)}"


def test_every_routed_task_exists():
    from jobs import tasks

    for name in settings.CELERY_TASK_ROUTES:
        module, _, attribute = name.rpartition(".")
        assert module == "jobs.tasks" and hasattr(tasks, attribute), f"{name} is routed but is not a task"


# ---------------------------------------------------------------- a page: a view, its path, login first

# Paths anyone may open: the health check, and the pages that are only ever reached by a POST or htmx fragment
# still answer an anonymous visitor with the login redirect (checked below), so only these are public.
PUBLIC = {"healthz"}


def page_patterns():
    from jobs import urls

    for entry in urls.urlpatterns:
        assert not isinstance(entry, URLResolver), "jobs/urls.py lists pages, not includes"
        if isinstance(entry, URLPattern) and entry.name not in PUBLIC:
            yield entry


def concrete(pattern: URLPattern) -> str:
    route = str(pattern.pattern)
    route = re.sub(r"<int:\w+>", "1", route)
    return "/" + re.sub(r"<(?:str:)?\w+>", "x", route)


@pytest.mark.django_db
def test_every_page_asks_an_anonymous_visitor_to_log_in(client):
    for pattern in page_patterns():
        url = concrete(pattern)
        response = client.get(url)
        assert response.status_code in (302, 401, 403, 405), f"{url} ({pattern.name}) answered {response.status_code}"
        if response.status_code == 302:
            assert "/login" in response["Location"], f"{url} ({pattern.name}) redirects to {response['Location']}"


def test_every_page_view_lives_in_a_views_module():
    for pattern in page_patterns():
        module = pattern.callback.__module__
        assert module.startswith("jobs.") and module.endswith("views"), (
            f"{pattern.name}: {module}.{pattern.callback.__name__} is not in a jobs/*views.py module")
