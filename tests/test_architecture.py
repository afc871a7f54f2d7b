"""The layering rules of docs/internals.md, read off the source with `ast` (nothing is imported):

- no import loop between the project's modules, counting imports inside functions too (a loop that only closes
  at run time still ties the modules together and breaks as soon as one import moves to the top);
- no import loop between the project's packages either: finetune is the base library, autotune (planning) and
  serving build on it, the web side (tunedeck, jobs) on those, bench on everything; finetune never imports autotune;
- autotune/ and finetune/ never import Django, Celery or the web side (jobs/, tunedeck/), at any depth;
- a module the web process loads never imports torch, transformers or peft while it is being imported, directly or
  through the project modules it imports at module level. The modules only workers load are listed below;
- nor does it load a worker-only module that way, and a real start of the web process (Django set up, every URL's
  view imported) finds none of them, nor the training libraries, in sys.modules.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tunedeck", "jobs", "autotune", "finetune", "serving")
GRAPH_PACKAGES = PACKAGES + ("bench",)  # the package graph also covers the benches, which sit on top of everything
# tunedeck (the Django project: settings, urls, the Celery app, the CLI) and jobs (its app) load each other by
# design (the urls load the app's views, the app loads the project's Celery app), so they count as one package.
PACKAGE_OF = {"tunedeck": "web", "jobs": "web"}
PURE_PACKAGES = ("autotune", "finetune", "serving")
WEB_PACKAGES = ("tunedeck", "jobs")
NOT_FOR_PURE = ("django", "celery", "rest_framework", "drf_spectacular", "jobs", "tunedeck")
HEAVY = ("torch", "transformers", "peft")

# Modules of jobs/ that only worker processes import; the web process never loads them, so they may import the
# training libraries at module level (today none does; each imports them inside the functions that train).
WORKER_ONLY = {
    "jobs.tasks": "loaded by Celery workers (autodiscovery); the web sends tasks by name through jobs.queue",
    "jobs.runner": "the training side of a job, called only by jobs.tasks.train_job",
    "jobs.rank_launch": "starts a job's ranks through torchrun (jobs.runner)",
    "jobs.node_join": "a job across several workers: node 0's placement and a joining worker's side (jobs.tasks)",
    "jobs.inference_server": "the inference server process (manage.py serve_inference), the one that serves models",
    "jobs.management.commands.serve_inference": "starts the inference server process",
    "jobs.services.dataset_processing": "processes an upload under its lease (jobs.tasks, the worker heartbeat)",
    "jobs.services.worker_planning": "a worker's inventory and replanning for it (jobs.runner, the heartbeat)",
    "jobs.services.version_recording": "records the adapter a worker trained (jobs.runner)",
    "jobs.deploy_worker": "merges a version and hands it to the inference server (jobs.tasks.deploy_version)",
    "jobs.services.hub_download": "downloads a base model from the Hugging Face Hub (jobs.tasks, the heartbeat)",
    "jobs.services.evaluation_runs": "runs a queued evaluation (jobs.tasks)",
    "jobs.services.search_stage": "runs a job's search trials, its own and helpers' (jobs.runner, jobs.tasks)",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(packages=PACKAGES) -> dict[str, Path]:
    modules = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                modules[module_name(path)] = path
    return modules


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    if not level:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, *, module_level_only: bool) -> set[str]:
    """Dotted names this module imports; `from pkg import name` yields pkg.name too, in case it is a module."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = set()

    def visit(node, inside_function):
        for child in ast.iter_child_nodes(node):
            nested = inside_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if module_level_only and nested:
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                source = _absolute(module, is_package, child.level, child.module)
                found.add(source)
                found.update(f"{source}.{alias.name}" for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def project_edges(modules, *, module_level_only=False) -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from pkg import module` counts as importing that module)."""
    edges = {}
    for module, path in modules.items():
        targets = set()
        for name in imports_of(module, path, module_level_only=module_level_only):
            if name in modules:
                targets.add(name)
            elif name.rpartition(".")[0] in modules and name.rpartition(".")[0] not in targets:
                targets.add(name.rpartition(".")[0])  # `from jobs.models import X`: the module jobs.models
        # `from pkg import sub` also lists pkg; keep it only when no submodule of it was named.
        edges[module] = {t for t in targets if t != module and not any(o.startswith(t + ".") for o in targets)}
    return edges


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return cycles


def _top(name: str) -> str:
    return name.split(".")[0]


def package_of(module: str) -> str:
    return PACKAGE_OF.get(_top(module), _top(module))


def package_edges(edges: dict[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    """package -> {each other package it imports: the module imports that make the edge}, from the module graph."""
    graph: dict[str, dict[str, list[str]]] = {}
    for module, targets in sorted(edges.items()):
        imported = graph.setdefault(package_of(module), {})
        for target in sorted(targets):
            if package_of(target) != package_of(module):
                imported.setdefault(package_of(target), []).append(f"{module} -> {target}")
    return graph


def test_the_checker_finds_a_loop_and_ignores_a_chain():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_checker_reads_relative_and_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from . import queue\nfrom .models import X\n\ndef f():\n    from .tasks import t\n")
    assert imports_of("jobs.m", source, module_level_only=False) >= {"jobs.queue", "jobs.models", "jobs.tasks"}
    assert "jobs.tasks" not in imports_of("jobs.m", source, module_level_only=True)


def test_the_checker_finds_a_loop_between_packages():
    graph = package_edges({"a.x": {"b.y"}, "b.y": set(), "b.z": {"a.w"}, "a.w": set(), "c.m": {"a.x"}})
    assert graph == {"a": {"b": ["a.x -> b.y"]}, "b": {"a": ["b.z -> a.w"]}, "c": {"a": ["c.m -> a.x"]}}
    assert import_cycles({p: set(t) for p, t in graph.items()}) == [["a", "b"]]
    # The Django project and its app are one package: their mutual imports are no loop.
    assert package_edges({"tunedeck.urls": {"jobs.views"}, "jobs.apps": {"tunedeck.celery"}}) == {"web": {}}


def test_no_import_loop_between_packages():
    """Two packages that import each other (a lazy import counts) are one package in two folders: neither can be
    used, tested or reasoned about without the other."""
    graph = package_edges(project_edges(project_modules(GRAPH_PACKAGES)))
    assert {"finetune", "autotune", "serving", "web", "bench"} <= set(graph)
    loops = import_cycles({package: set(imported) for package, imported in graph.items()})
    routes = {f"{a} -> {b}": graph[a][b][:3] for loop in loops for a in loop for b in loop if b in graph[a]}
    assert loops == [], routes


def test_finetune_never_imports_autotune():
    """finetune is the base library and autotune plans on top of it: what both need (the optimizer table, the fused
    loss's chunk rule) lives in finetune, and a hardware measurement or the search lives in autotune."""
    modules = project_modules()
    wrong = [f"{module} imports {name}" for module, path in modules.items() if _top(module) == "finetune"
             for name in sorted(imports_of(module, path, module_level_only=False)) if _top(name) == "autotune"]
    assert wrong == []


def test_no_import_loop_between_modules():
    modules = project_modules()
    assert {"jobs.tasks", "jobs.queue", "jobs.services", "tunedeck.cli"} <= set(modules)
    assert import_cycles(project_edges(modules)) == []


def test_relative_imports_name_modules_that_exist():
    """A lazy `from .metrics import x` left behind when code moves to another package fails only when it runs."""
    modules = project_modules()
    wrong = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                source = _absolute(module, path.name == "__init__.py", node.level, node.module)
                if source not in modules:
                    wrong.append(f"{module}:{node.lineno} imports from {source}, which does not exist")
    assert wrong == []


def test_autotune_and_finetune_never_import_the_web_side():
    modules = project_modules()
    wrong = []
    for module, path in modules.items():
        if _top(module) in PURE_PACKAGES:
            for name in imports_of(module, path, module_level_only=False):
                if _top(name) in NOT_FOR_PURE:
                    wrong.append(f"{module} imports {name}")
    assert wrong == []


def loaded_at_import(module: str, edges: dict[str, set[str]]):
    """(project module, the import route to it) for each module that importing `module` loads."""
    seen, todo = set(), [(module, [module])]
    while todo:
        current, route = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        yield current, route
        todo.extend((nxt, route + [nxt]) for nxt in edges[current])


def web_modules(modules) -> list[str]:
    return [m for m in modules if _top(m) in WEB_PACKAGES and m not in WORKER_ONLY]


def test_web_modules_never_load_torch_transformers_or_peft_at_import():
    modules = project_modules()
    assert set(WORKER_ONLY) <= set(modules), "a worker-only module was renamed: update WORKER_ONLY"
    edges = project_edges(modules, module_level_only=True)
    heavy_imports = {m: {n for n in imports_of(m, p, module_level_only=True) if _top(n) in HEAVY}
                     for m, p in modules.items()}
    wrong = [" -> ".join(route) + f" imports {name}" for module in web_modules(modules)
             for current, route in loaded_at_import(module, edges) for name in sorted(heavy_imports[current])]
    assert wrong == []


def test_web_modules_do_not_load_worker_only_modules_at_import():
    """Directly or through another module: `from jobs import services` must not bring the worker side with it."""
    modules = project_modules()
    edges = project_edges(modules, module_level_only=True)
    wrong = [" -> ".join(route) for module in web_modules(modules)
             for current, route in loaded_at_import(module, edges) if current in WORKER_ONLY]
    assert wrong == []


def test_the_web_process_loads_no_worker_only_module():
    code = ("import json, sys, django; django.setup(); import tunedeck.wsgi, tunedeck.urls; "
            "from django.urls import get_resolver; get_resolver().url_patterns; "
            f"print(json.dumps(sorted(m for m in sys.modules if m in {sorted(WORKER_ONLY)!r} "
            f"or m.split('.')[0] in {HEAVY!r})))")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tunedeck.settings"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


def test_the_command_line_client_starts_without_django_or_celery():
    code = "import tunedeck.cli, sys; assert 'django' not in sys.modules and 'celery' not in sys.modules, " \
           "sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'celery'))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
