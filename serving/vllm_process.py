"""vLLM's server processes: one per merged model or shared base, their ports, keys, health, and a supervisor.

vLLM lives in an environment of its own (scripts/setup-vllm.sh makes .venv-vllm; its pins clash with the
training stack), so it runs as child processes of the inference server, never imported here:

- one OpenAI-compatible vLLM server per merged model, and one per base model that unmerged LoRA adapters share
  (started with --enable-lora; adapters are loaded at run time through POST /v1/load_lora_adapter, the least
  recently used unloaded beyond `max_adapters`);
- each listens on a free port of 127.0.0.1 and wants an API key only the supervisor knows, so nothing of vLLM's
  own API is reachable except through Tunedeck's /v1; the key reaches vLLM through its environment
  (VLLM_API_KEY), never its command line, which any local user can read in /proc/<pid>/cmdline;
- a monitor thread waits for each server's /health, reports when it answers (the deployment goes live), restarts
  a server that dies, and gives up on one that cannot start (the deployment then falls back to the next engine).

Which deployments vLLM serves, and relaying requests to these servers, is serving.vllm's.

Pure Python: no Django, no torch. Speaks HTTP with the standard library only.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import TunedeckError
from finetune.processes import signal_group

log = logging.getLogger("tunedeck.vllm")

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
STARTUP_FAILURES_BEFORE_GIVING_UP = 2


class VllmUnavailable(TunedeckError):
    """vLLM cannot serve this deployment (not installed, not started, or it died for good)."""


def max_lora_rank(rank: int) -> int:
    return next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])


def adapter_rank(adapter_dir) -> int:
    from finetune.merge import _read_json

    return int((_read_json(Path(adapter_dir) / "adapter_config.json") or {}).get("r") or 8)


# ---------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------


def folder_bytes(model_dir) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def gpu_memory_fraction(model_dir, gpu: dict, kv_cache_bytes: int, ceiling: float = 0.9) -> float:
    """vLLM's --gpu-memory-utilization for one server: weights, activations and a KV cache of kv_cache_bytes,
    as a share of the GPU's total memory, never more than what is free now (training may hold the rest)."""
    total = int(gpu.get("total_bytes") or 0)
    free = int(gpu.get("free_bytes") or 0)
    if total <= 0:
        return ceiling
    wanted = folder_bytes(model_dir) * 1.2 + kv_cache_bytes + 512 * 2**20  # + CUDA context and graphs
    return round(max(0.01, min(ceiling, wanted / total, free / total * 0.95)), 3)


# ---------------------------------------------------------------------------------------------------------
# One server process
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EngineSettings:
    python: str
    log_dir: Path
    device: str = "cpu"  # "cpu" or "cuda"
    kv_cache_gb: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU; the KV budget behind the GPU fraction on CUDA
    max_model_len: int = 2048
    max_loras: int = 16  # adapters in one batch
    max_adapters: int = 8  # adapters kept loaded per base (LRU)
    max_lora_rank: int = 64
    startup_timeout: float = 600.0
    dtype: str = "auto"
    gpu: dict = field(default_factory=dict)  # autotune.probe's entry for the GPU, on CUDA
    cpu_threads: str = "auto"  # on CPU: "all", "vllm" (its own binding) or "auto" (see cpu_thread_binding)
    max_servers: int = 0  # servers running at once; 0 follows the host (see VllmSupervisor.max_servers)
    extra_args: tuple = ()


@dataclass
class VllmServer:
    key: str  # "merged:<deployment>" or "base:<folder>"
    model_dir: Path
    served_name: str
    lora: bool
    settings: EngineSettings
    port: int = 0
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    process: subprocess.Popen | None = None
    state: str = "queued"  # queued -> starting -> ready; stopped, failed
    priority: float = 0.0  # queued servers start highest first (the inference server: when last used)
    cpus: list | None = None  # on CPU, the CPUs its model threads are bound to (None: all)
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    failures: int = 0
    restarts: int = 0
    error: str = ""
    adapters: OrderedDict = field(default_factory=OrderedDict)  # loaded lora name -> folder, LRU first
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.key)[-120:]
        return self.settings.log_dir / f"vllm-{safe}.log"

    def command(self) -> list[str]:
        s = self.settings
        cmd = [s.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", self.dtype(), "--max-model-len", str(self.context_length()),
               # The request decides how to decode, as in the OpenAI API (not the model's generation_config).
               "--generation-config", "vllm"]
        if self.lora:
            cmd += ["--enable-lora", "--max-loras", str(s.max_loras), "--max-cpu-loras",
                    str(max(s.max_loras, s.max_adapters)), "--max-lora-rank", str(s.max_lora_rank)]
        if s.device == "cuda":
            fraction = gpu_memory_fraction(self.model_dir, s.gpu, int(s.kv_cache_gb * 2**30))
            cmd += ["--gpu-memory-utilization", str(fraction)]
        return cmd + list(s.extra_args)

    def dtype(self) -> str:
        # vLLM turns float32 checkpoints into bfloat16 on CPU, which CPUs without bf16 instructions only emulate
        # (slowly); the built-in server runs such a model in float32 too.
        if self.settings.dtype == "auto" and self.settings.device == "cpu" and not cpu_has_bf16():
            return "float32"
        return self.settings.dtype

    def context_length(self) -> int:
        try:
            config = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return self.settings.max_model_len
        return min(self.settings.max_model_len, int(config.get("max_position_embeddings") or 2048))

    def environment(self) -> dict:
        env = dict(os.environ)
        for inherited in ("PYTHONPATH", "VIRTUAL_ENV", "DJANGO_SETTINGS_MODULE"):
            env.pop(inherited, None)  # the training venv's paths must not leak into vLLM's
        for secret in ("SECRET_KEY", "TUNEDECK_INTERNAL_TOKEN", "DATABASE_URL"):
            env.pop(secret, None)  # vLLM needs none of Tunedeck's own secrets
        env.update(
            VLLM_API_KEY=self.api_key,  # read by vLLM's OpenAI server; /proc/<pid>/environ is the owner's only
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_CPU_KVCACHE_SPACE=str(max(1, round(self.settings.kv_cache_gb))),
            VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        if self.settings.device == "cpu" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # A server given a slice of the host's CPUs keeps to it, whatever the mode says about all of them.
            mode = "all" if self.cpus is not None and self.settings.cpu_threads == "auto" else self.settings.cpu_threads
            env.update(cpu_thread_binding(mode, self.cpus))
        return env

    def start(self) -> None:
        self.port = _free_port()
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            shown = " ".join(self.command())
            out.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {shown}\n".encode())
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            env=self.environment(), start_new_session=True)
        remember_server(self.settings, self.process.pid)
        self.state, self.started_at, self.adapters = "starting", time.monotonic(), OrderedDict()
        log.info("started vLLM for %s on port %s (pid %s)", self.key, self.port, self.process.pid)

    def stop(self, grace: float = 15.0) -> None:
        process, self.process = self.process, None
        self.state = "stopped"
        if process is None or process.poll() is not None:
            return
        signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGKILL)
            process.wait()
        forget_server(self.settings, process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(line for line in text.splitlines()[-lines:])

    def post(self, path: str, payload: dict, timeout: float = 120) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True  # not Linux: leave the choice to vLLM
    return "avx512_bf16" in flags or "amx_bf16" in flags


SMALL_HOST_CPUS = 4
# On CPU hosts each vLLM server gets CPUs of its own, at least this many: servers that share cores compete (three
# on 2 cores took 7.6 minutes to answer, one alone 2 minutes), so a 2-core host runs one at a time.
CPUS_PER_SERVER = 4


def cpu_thread_binding(mode: str = "auto", cpus: list[int] | None = None) -> dict:
    """vLLM's CPU thread binding. Its own ("vllm") keeps one core per worker free for its scheduler, so on a
    2-core host the model runs on one core while the built-in server uses both. "all" binds the model's OpenMP
    threads to every CPU this process may use (the scheduler then shares them, idle while the model computes).
    "auto" is "all" on hosts with at most SMALL_HOST_CPUS CPUs, where one reserved core is a large share,
    and vLLM's own binding on larger ones. Measured with bench/serving_speed.py --vllm-cpu-threads."""
    if mode not in ("auto", "all", "vllm"):
        raise ValueError(f"vLLM CPU thread binding must be auto, all or vllm, not {mode!r}")
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if mode == "vllm" or (mode == "auto" and len(cpus) > SMALL_HOST_CPUS):
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cpus)}


def host_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------------------------------------
# Servers left by a killed inference server
# ---------------------------------------------------------------------------------------------------------
# Each vLLM server runs in its own process group, so an inference server killed outright (an out-of-memory kill,
# SIGKILL) cannot take its servers with it: they keep their port, memory and cores while the restarted inference
# server starts new ones beside them. Every server's process group is written down when it starts and crossed out
# when it stops; the next inference server ends whatever is still written down before it starts any.


def ledger_path(settings: EngineSettings) -> Path:
    return Path(settings.log_dir) / "vllm-servers.pids"


def _ledger(settings: EngineSettings) -> set[int]:
    try:
        return {int(line) for line in ledger_path(settings).read_text().split() if line.isdigit()}
    except FileNotFoundError:
        return set()


def _write_ledger(settings: EngineSettings, pids: set[int]) -> None:
    ledger_path(settings).parent.mkdir(parents=True, exist_ok=True)
    ledger_path(settings).write_text("".join(f"{pid}\n" for pid in sorted(pids)))


def remember_server(settings: EngineSettings, pid: int) -> None:
    _write_ledger(settings, _ledger(settings) | {pid})


def forget_server(settings: EngineSettings, pid: int) -> None:
    _write_ledger(settings, _ledger(settings) - {pid})


def _is_vllm_group(pid: int) -> bool:
    """Still running, still leading its own group, and a vLLM server (a recycled pid is left alone)."""
    try:
        if os.getpgid(pid) != pid:
            return False
        return b"vllm" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ProcessLookupError, PermissionError, FileNotFoundError, OSError):
        return False


def stop_leftover_servers(settings: EngineSettings, grace: float = 15.0) -> list[int]:
    """Ends the vLLM servers an earlier inference server started and never stopped; returns their pids."""
    leftover = [pid for pid in _ledger(settings) if _is_vllm_group(pid)]
    for pid in leftover:
        log.warning("ending vLLM server %s left by an inference server that was killed", pid)
        signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_is_vllm_group(pid) for pid in leftover) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in leftover:
        if _is_vllm_group(pid):
            signal_group(pid, signal.SIGKILL)
    _write_ledger(settings, set())
    return leftover


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------
# The supervisor
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Route:
    """Where a request for a deployment goes: the server's URL, its key, and the model name vLLM knows."""

    url: str
    api_key: str
    model: str


class VllmSupervisor:
    """Keeps one vLLM server per merged model or shared base, in step with the deployments given to it.

    `on_ready(name)` is called (from the monitor thread) when a deployment's server answers and its adapter is
    loaded; `on_failed(name, reason)` when its server cannot be started. Neither is called with a lock held.

    Servers start one at a time, highest `priority` first (the inference server gives the time a deployment was
    last used), and on a CPU host no more run at once than the host has CPUs for (`max_servers`), each bound to
    CPUs of its own; the others wait `queued`, and `progress` says why.
    """

    def __init__(self, settings: EngineSettings, *, on_ready=None, on_failed=None, poll_seconds: float = 1.0):
        self.settings = settings
        self.on_ready = on_ready or (lambda name: None)
        self.on_failed = on_failed or (lambda name, reason: None)
        self.poll_seconds = poll_seconds
        self.servers: dict[str, VllmServer] = {}
        self.deployments: dict[str, tuple[str, Path | None]] = {}  # name -> (server key, adapter folder)
        self.announced: set[str] = set()  # deployments reported ready since their server last started
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # --- deployments ------------------------------------------------------------------------------------

    def add_merged(self, name: str, model_dir, priority: float = 0.0) -> None:
        key = f"merged:{name}"
        with self._lock:
            self.deployments[name] = (key, None)
            self._queue(VllmServer(key, Path(model_dir), name, False, self.settings), priority)

    def add_adapter(self, name: str, base_dir, adapter_dir, priority: float = 0.0) -> None:
        rank = adapter_rank(adapter_dir)
        if rank > self.settings.max_lora_rank:
            raise VllmUnavailable(f"its LoRA rank {rank} is above this server's --max-lora-rank "
                                  f"{self.settings.max_lora_rank} (TUNEDECK_VLLM_MAX_LORA_RANK)")
        key = f"base:{Path(base_dir).resolve()}"
        with self._lock:
            self.deployments[name] = (key, Path(adapter_dir))
            self._queue(VllmServer(key, Path(base_dir), "base", True, self.settings), priority)
        self._announce_if_ready(name)

    def _queue(self, server: VllmServer, priority: float) -> None:
        """Queues a new server (or raises the priority of the one already there) and starts what may start."""
        existing = self.servers.setdefault(server.key, server)
        existing.priority = max(existing.priority, priority)
        self._start_next()

    def remove(self, name: str) -> None:
        with self._lock:
            key, _ = self.deployments.pop(name, (None, None))
            self.announced.discard(name)
            server = self.servers.get(key)
            if server is None:
                return
            if any(k == key for k, _ in self.deployments.values()):
                self._unload(server, name)
                return
            del self.servers[key]
        server.stop()
        log.info("stopped vLLM for %s", key)

    def is_ready(self, name: str) -> bool:
        """Its server answers and it was announced (an adapter loaded)."""
        with self._lock:
            return name in self.announced

    def __contains__(self, name: str) -> bool:
        return name in self.deployments

    def progress(self, name: str) -> dict:
        """How far the deployment's server is: state, seconds waited, restarts, the last lines of its log."""
        with self._lock:
            key, _ = self.deployments.get(name, (None, None))
            server = self.servers.get(key)
            if server is None:
                return {"state": "gone"}
            if server.state == "queued":
                return {"state": "waiting", "waited_s": round(time.monotonic() - server.queued_at, 1),
                        "position": self._queue_position(server), "why": self._waiting_reason()}
            return {"state": server.state, "waited_s": round(time.monotonic() - server.started_at, 1),
                    "restarts": server.restarts, "port": server.port, "log_tail": server.log_tail(3)}

    # --- one at a time, as many as the host has CPUs for -------------------------------------------------

    def max_servers(self) -> int:
        """How many servers may run at once: settings.max_servers, else on a CPU host one per CPUS_PER_SERVER
        CPUs (at least one); on a GPU as many as its memory takes (each server's share is set at its start)."""
        if self.settings.max_servers > 0:
            return self.settings.max_servers
        if self.settings.device != "cpu":
            return 1_000_000
        return max(1, len(host_cpus()) // CPUS_PER_SERVER)

    def _start_next(self) -> None:
        """Starts the queued server of highest priority, unless one is starting or the host holds no more."""
        with self._lock:
            running = [s for s in self.servers.values() if s.state in ("starting", "ready")]
            queued = [s for s in self.servers.values() if s.state == "queued"]
            if not queued or any(s.state == "starting" for s in running) or len(running) >= self.max_servers():
                return
            server = max(queued, key=lambda s: (s.priority, -s.queued_at))
            server.cpus = self._free_cpus(running) if self.settings.device == "cpu" else None
            self._start(server)

    def _free_cpus(self, running: list[VllmServer]) -> list[int] | None:
        """The CPUs of a slice no running server holds: the host's CPUs cut into max_servers slices."""
        cpus, slots = host_cpus(), self.max_servers()
        if slots <= 1:
            return None  # one server: every CPU, as cpu_thread_binding decides
        size = len(cpus) // slots
        slices = [cpus[i * size:(i + 1) * size] for i in range(slots)]
        taken = [s.cpus for s in running]
        return next((chunk for chunk in slices if chunk not in taken), slices[0])

    def _queue_position(self, server: VllmServer) -> int:
        queued = sorted((s for s in self.servers.values() if s.state == "queued"),
                        key=lambda s: (-s.priority, s.queued_at))
        return queued.index(server) + 1

    def _waiting_reason(self) -> str:
        if any(s.state == "starting" for s in self.servers.values()):
            return "vLLM servers start one at a time, most recently used deployments first"
        cpus = len(host_cpus())
        return (f"this host runs at most {self.max_servers()} vLLM server(s) at once ({cpus} CPUs, "
                f"{CPUS_PER_SERVER} per server); it starts when one stops")

    # --- requests ---------------------------------------------------------------------------------------

    def route(self, name: str) -> Route:
        """Where to send a request for `name`, loading its adapter first (LRU) when it was unloaded."""
        with self._lock:
            key, adapter_dir = self.deployments.get(name, (None, None))
            server = self.servers.get(key)
        if server is None:
            raise VllmUnavailable(f"No vLLM server serves {name!r}.")
        if server.state != "ready":
            raise VllmUnavailable(f"The vLLM server for {name!r} is {server.state}; try again shortly.")
        if adapter_dir is None:
            return Route(server.url, server.api_key, server.served_name)
        self._ensure_adapter(server, name, adapter_dir)
        return Route(server.url, server.api_key, name)

    def _ensure_adapter(self, server: VllmServer, name: str, adapter_dir: Path) -> None:
        with server.lock:
            if name in server.adapters:
                server.adapters.move_to_end(name)
                return
            status, body = server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter_dir)})
            if status != 200 and b"already been loaded" not in body:
                raise VllmUnavailable(f"vLLM could not load the adapter of {name!r}: {body[:500].decode(errors='replace')}")
            server.adapters[name] = adapter_dir
            while len(server.adapters) > self.settings.max_adapters:
                oldest = next(iter(server.adapters))
                server.adapters.pop(oldest)
                server.post("/v1/unload_lora_adapter", {"lora_name": oldest})

    def _unload(self, server: VllmServer, name: str) -> None:
        with server.lock:
            if server.adapters.pop(name, None) is not None and server.state == "ready":
                server.post("/v1/unload_lora_adapter", {"lora_name": name})

    # --- the monitor ------------------------------------------------------------------------------------

    def start(self) -> None:
        stop_leftover_servers(self.settings)
        self._thread = threading.Thread(target=self._monitor, name="tunedeck-vllm-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            servers, self.servers = list(self.servers.values()), {}
            self.deployments.clear()
        for server in servers:
            server.stop()

    def _monitor(self) -> None:
        while not self._stopped.wait(self.poll_seconds):
            try:
                self.check()
            except Exception:  # the monitor must outlive any one bad check
                log.exception("vLLM monitor check failed")

    def reserved_gpu_bytes(self) -> int:
        """What servers still starting will take of the GPU (running ones already show in its free memory)."""
        if self.settings.device != "cuda":
            return 0
        total = int(self.settings.gpu.get("total_bytes") or 0)
        with self._lock:
            starting = [s for s in self.servers.values() if s.state == "starting"]
        return sum(int(total * gpu_memory_fraction(s.model_dir, self.settings.gpu, int(self.settings.kv_cache_gb
                                                                                     * 2**30))) for s in starting)

    def _publish_reservation(self) -> None:
        path = os.environ.get("TUNEDECK_SERVING_RESERVED_FILE")
        if path and self.settings.device == "cuda":
            index = str(self.settings.gpu.get("index", 0))
            Path(path).write_text(json.dumps({index: self.reserved_gpu_bytes()}))

    def check(self) -> None:
        """One round: notice servers that answer, restart the dead, give up on those that cannot start."""
        self._publish_reservation()
        with self._lock:
            servers = list(self.servers.values())
        for server in servers:
            if server.state == "starting":
                self._check_starting(server)
            elif server.state == "ready" and not server.alive():
                log.warning("vLLM for %s died (exit %s); restarting", server.key, server.process.poll())
                server.restarts += 1
                self._restart(server)
        self._start_next()

    def _check_starting(self, server: VllmServer) -> None:
        waited = time.monotonic() - server.started_at
        if server.alive() and server.healthy():
            server.state, server.failures = "ready", 0
            log.info("vLLM for %s answers after %.0fs", server.key, waited)
            for name in self._names_on(server.key):
                self._announce_if_ready(name)
            return
        if server.alive() and waited < self.settings.startup_timeout:
            return
        reason = (f"exited with code {server.process.poll()}" if not server.alive()
                  else f"did not answer within {self.settings.startup_timeout:.0f}s")
        server.failures += 1
        server.error = f"the vLLM server {reason}; its log ends: {server.log_tail(4)}"
        if server.failures < STARTUP_FAILURES_BEFORE_GIVING_UP:
            log.warning("vLLM for %s %s; retrying", server.key, reason)
            server.restarts += 1
            self._restart(server)
            return
        self._give_up(server)

    def _restart(self, server: VllmServer) -> None:
        """Back in the queue, ahead of the servers that never ran (its deployments were in use)."""
        server.stop(grace=5)
        with self._lock:
            if self.servers.get(server.key) is not server:
                return  # removed meanwhile
            self.announced -= set(self._names_on(server.key))
            server.state, server.priority = "queued", float("inf")
        self._start_next()

    def _give_up(self, server: VllmServer) -> None:
        server.stop(grace=5)
        server.state = "failed"
        with self._lock:
            names = self._names_on(server.key)
            self.servers.pop(server.key, None)
            for name in names:
                self.deployments.pop(name, None)
                self.announced.discard(name)
        for name in names:
            self.on_failed(name, server.error)

    def _start(self, server: VllmServer) -> None:
        self.servers[server.key] = server
        server.start()

    def _names_on(self, key: str) -> list[str]:
        with self._lock:
            return [name for name, (k, _) in self.deployments.items() if k == key]

    def _announce_if_ready(self, name: str) -> None:
        with self._lock:
            key, _ = self.deployments.get(name, (None, None))
            server = self.servers.get(key)
            if server is None or server.state != "ready" or name in self.announced:
                return
            self.announced.add(name)
        try:
            self.route(name)  # an adapter is loaded now, so `live` means it answers at once
        except VllmUnavailable as exc:
            with self._lock:
                self.deployments.pop(name, None)
                self.announced.discard(name)
            self.on_failed(name, str(exc))
            return
        self.on_ready(name)
