"""vLLM as a serving engine: which deployments it can serve, and a supervisor for its server processes.

vLLM lives in an environment of its own (scripts/setup-vllm.sh makes .venv-vllm; its pins clash with the
training stack), so it runs as child processes of the inference server, never imported here:

- one OpenAI-compatible vLLM server per merged model, and one per base model that unmerged LoRA adapters share
  (started with --enable-lora; adapters are loaded at run time through POST /v1/load_lora_adapter, the least
  recently used unloaded beyond `max_adapters`);
- each listens on a free port of 127.0.0.1 and wants an API key only the supervisor knows, so nothing of vLLM's
  own API is reachable except through Tunedeck's /v1; the key reaches vLLM through its environment
  (VLLM_API_KEY), never its command line, which any local user can read in /proc/<pid>/cmdline;
- a monitor thread waits for each server's /health, reports when it answers (the deployment goes live), restarts
  a server that dies, and gives up on one that cannot start (the deployment then falls back to the built-in
  server).

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

log = logging.getLogger("tunedeck.vllm")

BUILTIN, VLLM = "builtin", "vllm"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
# Decoder architectures vLLM serves with LoRA (a conservative subset of vllm/model_executor/models).
VLLM_ARCHITECTURES = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "OPTForCausalLM",
    "FalconForCausalLM", "StableLmForCausalLM", "Starcoder2ForCausalLM", "OlmoForCausalLM",
}
# Head sizes vLLM's CPU attention kernels are built for.
CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256}
STARTUP_FAILURES_BEFORE_GIVING_UP = 2


class VllmUnavailable(TunedeckError):
    """vLLM cannot serve this deployment (not installed, not started, or it died for good)."""


# ---------------------------------------------------------------------------------------------------------
# Which engine serves a deployment
# ---------------------------------------------------------------------------------------------------------


def vllm_python_problem(python) -> str | None:
    """Why the vLLM interpreter cannot be used, or None when it is there."""
    if not python:
        return "TUNEDECK_VLLM_PYTHON is empty"
    if not Path(python).is_file() or not os.access(python, os.X_OK):
        return f"no vLLM environment at {python} (run scripts/setup-vllm.sh)"
    return None


def choose_engine(kind: str, model_dir, adapter_dir=None, *, vllm_python=None, device: str = "cpu") -> dict:
    """{"engine": "vllm"|"builtin", "reason": why, "warning": what the user should know or ""}.

    `kind` is "merged" (model_dir is the merged folder) or "adapter" (model_dir is the base, adapter_dir the
    unmerged adapter). Methods vLLM has no kernel for stay on the built-in server, with the reason.
    """
    method_reason = _builtin_only_reason(kind, adapter_dir)
    if method_reason:
        return {"engine": BUILTIN, "reason": method_reason, "warning": ""}
    model_reason = _model_unsupported_reason(Path(model_dir), device)
    if model_reason:
        return {"engine": BUILTIN, "reason": model_reason, "warning": ""}
    problem = vllm_python_problem(vllm_python)
    if problem:
        return {"engine": BUILTIN, "reason": "vLLM is not available",
                "warning": f"vLLM could serve this deployment but {problem}; the built-in server serves it, "
                           "one request at a time per base model."}
    why = "a merged model gets a vLLM server of its own" if kind == "merged" else (
        "a LoRA adapter is loaded at run time onto its base model's vLLM server (shared with other adapters)")
    return {"engine": VLLM, "reason": why, "warning": ""}


def _builtin_only_reason(kind: str, adapter_dir) -> str:
    if kind == "merged":
        return ""
    from finetune.merge import _read_json, describe_adapter

    description = describe_adapter(Path(adapter_dir))
    peft_type = description["peft_type"]
    config = _read_json(Path(adapter_dir) / "adapter_config.json") or {}
    if peft_type in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"):
        return f"vLLM cannot serve {description['method']} tuning (learned virtual tokens); the built-in server does"
    if peft_type != "LORA":
        label = "bottleneck adapter layers" if description["method"] == "adapter" else f"{peft_type} adapters"
        return f"vLLM cannot serve {label} unmerged; the built-in server does (merge IA3 to use vLLM)"
    if config.get("use_dora"):
        return "vLLM cannot serve DoRA adapters unmerged; the built-in server does (deploy merged to use vLLM)"
    if description["quantized_base"]:
        return ("a QLoRA adapter runs unmerged on the 4-bit base it was trained on, which the built-in server "
                "reproduces exactly (deploy merged to use vLLM)")
    if config.get("modules_to_save"):
        return "vLLM LoRA cannot serve an adapter with fully trained modules (modules_to_save)"
    if int(config.get("r") or 0) > LORA_RANKS[-1]:
        return f"vLLM serves LoRA ranks up to {LORA_RANKS[-1]}"
    return ""


def _model_unsupported_reason(model_dir: Path, device: str) -> str:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{model_dir} has no readable config.json"
    architectures = set(config.get("architectures") or [])
    if not architectures & VLLM_ARCHITECTURES:
        return f"Tunedeck does not serve the {', '.join(sorted(architectures)) or 'unknown'} architecture on vLLM"
    head = config.get("head_dim") or (config.get("hidden_size", 0) // max(1, config.get("num_attention_heads", 1)))
    if device == "cpu" and head not in CPU_HEAD_SIZES:
        return f"vLLM's CPU attention has no kernel for head size {head}"
    return ""


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
    state: str = "starting"  # starting -> ready; dead/failed
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
            env.update(cpu_thread_binding(self.settings.cpu_threads))
        return env

    def start(self) -> None:
        self.port = _free_port()
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            shown = " ".join(self.command())
            out.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {shown}\n".encode())
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            env=self.environment(), start_new_session=True)
        self.state, self.started_at, self.adapters = "starting", time.monotonic(), OrderedDict()
        log.info("started vLLM for %s on port %s (pid %s)", self.key, self.port, self.process.pid)

    def stop(self, grace: float = 15.0) -> None:
        process, self.process = self.process, None
        self.state = "stopped"
        if process is None or process.poll() is not None:
            return
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal_group(process: subprocess.Popen, sig) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


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

    def add_merged(self, name: str, model_dir) -> None:
        key = f"merged:{name}"
        with self._lock:
            self.deployments[name] = (key, None)
            if key not in self.servers:
                self._start(VllmServer(key, Path(model_dir), name, False, self.settings))

    def add_adapter(self, name: str, base_dir, adapter_dir) -> None:
        rank = adapter_rank(adapter_dir)
        if rank > self.settings.max_lora_rank:
            raise VllmUnavailable(f"its LoRA rank {rank} is above this server's --max-lora-rank "
                                  f"{self.settings.max_lora_rank} (TUNEDECK_VLLM_MAX_LORA_RANK)")
        key = f"base:{Path(base_dir).resolve()}"
        with self._lock:
            self.deployments[name] = (key, Path(adapter_dir))
            if key not in self.servers:
                self._start(VllmServer(key, Path(base_dir), "base", True, self.settings))
        self._announce_if_ready(name)

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
            return {"state": server.state, "waited_s": round(time.monotonic() - server.started_at, 1),
                    "restarts": server.restarts, "port": server.port, "log_tail": server.log_tail(3)}

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
            except Exception:  # noqa: BLE001 - the monitor must outlive any one bad check
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
        server.stop(grace=5)
        with self._lock:
            if self.servers.get(server.key) is not server:
                return  # removed meanwhile
            self.announced -= set(self._names_on(server.key))
            self._start(server)

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
