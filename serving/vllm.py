"""vLLM as a serving engine: which deployments it serves, and relaying their requests to its servers.

Its server processes (one per merged model or shared base, ports, keys, health, restarts) are
serving.vllm_process's; the request fields it takes are serving.vllm_fields'. Methods vLLM has no kernel for
(prefix and prompt tuning, IA3 and DoRA unmerged, QLoRA on its 4-bit base, bottleneck adapter layers) and models
it cannot run (architecture, a CPU head size with no kernel) are passed on to the next engine, with the reason.

Pure Python: no Django, no torch. Speaks HTTP with the standard library only.
"""
from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

from .engine import MERGED, Engine, Reply, RequestError, ServedModel, Unavailable
from .vllm_fields import VLLM_FIELDS, for_vllm, vllm_refusal
from .vllm_process import LORA_RANKS, EngineSettings, VllmSupervisor, VllmUnavailable

VLLM_MISSING = "vLLM is not available"
VLLM_OFF = "vLLM is switched off for this inference server"
VLLM_FAILED = "its vLLM server failed"
VLLM_STARTING = "its vLLM server is starting"


class VllmEngine(Engine):
    """vLLM servers in their own environment (TUNEDECK_VLLM_PYTHON), started and watched by a VllmSupervisor.

    Options (settings.TUNEDECK_SERVING_ENGINES): `python`, `kv_cache_gb`,
    `max_model_len`, `max_loras`, `max_lora_rank`, `startup_seconds`, `dtype`, `cpu_threads`, `max_servers`; `gpus` (autotune's
    probe of the GPUs, probed here when not given and the device is auto or cuda).
    """

    name = "vllm"
    label = "vLLM"
    fields = VLLM_FIELDS

    def __init__(self, context=None, *, python: str = "", kv_cache_gb: float = 1.0, max_model_len: int = 2048,
                 max_loras: int = 16, max_lora_rank: int = 64, startup_seconds: float = 600.0, dtype: str = "auto",
                 cpu_threads: str = "auto", max_servers: int = 0, gpus=None, poll_seconds: float = 1.0,
                 **options):
        super().__init__(context, **options)
        if gpus is None:
            gpus = _probe_gpus() if self.enabled and self.context.device in ("auto", "cuda") else []
        self.settings = EngineSettings(
            python=python, log_dir=Path(self.context.log_dir), device="cuda" if gpus else "cpu",
            gpu=gpus[0] if gpus else {}, kv_cache_gb=kv_cache_gb, max_model_len=max_model_len,
            max_loras=max(self.context.max_adapters, max_loras), max_adapters=self.context.max_adapters,
            max_lora_rank=max_lora_rank, startup_timeout=startup_seconds, dtype=dtype, cpu_threads=cpu_threads,
            max_servers=max_servers)
        # Through the context at each call: the inference server may set its callbacks after construction.
        self.supervisor = VllmSupervisor(self.settings, on_ready=lambda name: self.context.on_ready(name),
                                         on_failed=lambda name, reason: self.context.on_failed(name, reason),
                                         poll_seconds=poll_seconds)

    # --- whether it serves a deployment -----------------------------------------------------------------

    def unavailable(self) -> Unavailable | None:
        if not self.enabled:
            return Unavailable(VLLM_OFF)  # the base class's words, kept here for refusal_hint
        problem = vllm_python_problem(self.settings.python)
        if problem:
            return Unavailable(VLLM_MISSING, f"vLLM could serve this deployment but {problem}; {{fallback}} "
                                             "serves it, one request at a time per base model.")
        return None

    def cannot_serve(self, model: ServedModel) -> str:
        if model.kind != MERGED:
            method_reason = _method_unsupported_reason(model.adapter_dir)
            if method_reason:
                return method_reason
        return _model_unsupported_reason(model.weights_dir, self.settings.device)

    def serves_because(self, model: ServedModel) -> str:
        if model.kind == MERGED:
            return "a merged model gets a vLLM server of its own"
        return "a LoRA adapter is loaded at run time onto its base model's vLLM server (shared with other adapters)"

    # --- lifecycle: servers start in the background; on_ready says when one answers ---------------------

    def start(self) -> None:
        self.supervisor.start()

    def stop(self) -> None:
        self.supervisor.stop()

    def add(self, model: ServedModel) -> None:
        if model.kind == MERGED:
            self.supervisor.add_merged(model.name, model.model_dir, model.priority)
        else:
            self.supervisor.add_adapter(model.name, model.base_path, model.adapter_dir, model.priority)

    def add_merged(self, name, model_dir) -> None:
        self.supervisor.add_merged(name, model_dir)

    def add_adapter(self, name, adapter_dir, base_path) -> None:
        self.supervisor.add_adapter(name, base_path, adapter_dir)

    def remove(self, name: str) -> None:
        self.supervisor.remove(name)

    def __contains__(self, name: str) -> bool:
        return name in self.supervisor

    def is_ready(self, name: str) -> bool:
        return self.supervisor.is_ready(name)

    def progress(self, name: str) -> dict | None:
        return self.supervisor.progress(name)

    def models(self) -> list[dict]:
        return [{"name": name, "loaded": self.supervisor.is_ready(name)} for name in list(self.supervisor.deployments)]

    # --- requests: relayed to the deployment's vLLM server byte for byte --------------------------------

    def refused_field(self, body: dict) -> tuple[str, str] | None:
        return vllm_refusal(body)

    def refusal_hint(self, key: str, why_not_here: str) -> str:
        """What to say when the built-in server refused `key` on a deployment vLLM does not serve."""
        field = VLLM_FIELDS.get(key)
        if field is None or not field.passed:
            why = f": {field.refused}" if field else ""
            return f"vLLM does not take it either{why}. Send the request without it."
        if why_not_here == VLLM_MISSING:
            return ("vLLM serves it and could serve this deployment, but vLLM's environment is not installed on "
                    "this server: run scripts/setup-vllm.sh (or point TUNEDECK_VLLM_PYTHON at it), then restart "
                    "the inference server. Or send the request without it.")
        if why_not_here == VLLM_OFF:
            return "vLLM serves it, but this inference server runs with --no-vllm. Send the request without it."
        if why_not_here == VLLM_STARTING:
            return ("vLLM serves it and takes this deployment over once its server is ready (the deployment's "
                    "engine progress says how far). Send it again then, or send the request without it.")
        if why_not_here == VLLM_FAILED:
            return ("vLLM serves it, but this deployment's vLLM server failed (its engine warning says why). Send "
                    "the request without it.")
        return "vLLM serves it, but cannot serve this deployment. Send the request without it."

    def generate(self, endpoint, name, body) -> Reply:
        return self._relay(endpoint, name, body)

    def stream(self, endpoint, name, body) -> Reply:
        return self._relay(endpoint, name, body)

    def _relay(self, endpoint, name, body) -> Reply:
        """Sends `body` to the deployment's vLLM server; its answer comes back unchanged (status, content type,
        a stream chunk by chunk). Its removed guided_* fields go as the structured_outputs it reads now."""
        try:
            route = self.supervisor.route(name)
        except VllmUnavailable as exc:
            raise RequestError(503, str(exc), "model_loading", err_type="service_unavailable") from exc
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        payload = json.dumps({**for_vllm(body), "model": route.model}).encode()
        host, port = route.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        try:
            connection.request("POST", path, body=payload, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {route.api_key}"})
            upstream = connection.getresponse()
            content_type = upstream.getheader("Content-Type", "application/json")
            if not content_type.startswith("text/event-stream"):
                data = upstream.read()
                connection.close()
                return Reply(upstream.status, content_type, data)
        except OSError as exc:  # the server died; the monitor restarts it
            connection.close()
            raise RequestError(503, f"The vLLM server of {name!r} is restarting: {exc}", "model_loading",
                               err_type="service_unavailable") from exc
        except BaseException:
            connection.close()
            raise
        return Reply(upstream.status, content_type, chunks=_upstream_chunks(connection, upstream))


def _upstream_chunks(connection, upstream):
    """The stream as vLLM sends it. Closing this generator (the client went away) closes vLLM's request too, so
    it stops generating."""
    try:
        while data := upstream.read1(65536):
            yield data
    except (OSError, http.client.HTTPException) as exc:  # vLLM died mid-answer: say so in the stream
        error = {"error": {"message": f"The vLLM server stopped mid-answer: {exc}", "type": "service_unavailable",
                           "param": None, "code": "model_loading"}}
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        connection.close()


def _probe_gpus() -> list[dict]:
    from autotune.probe import probe_gpus

    return probe_gpus()


# ---------------------------------------------------------------------------------------------------------
# Which deployments vLLM can serve
# ---------------------------------------------------------------------------------------------------------

# Decoder architectures vLLM serves with LoRA (a conservative subset of vllm/model_executor/models).
VLLM_ARCHITECTURES = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "OPTForCausalLM",
    "FalconForCausalLM", "StableLmForCausalLM", "Starcoder2ForCausalLM", "OlmoForCausalLM",
}
# Head sizes vLLM's CPU attention kernels are built for.
CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256}


def vllm_python_problem(python) -> str | None:
    """Why the vLLM interpreter cannot be used, or None when it is there."""
    if not python:
        return "TUNEDECK_VLLM_PYTHON is empty"
    if not Path(python).is_file() or not os.access(python, os.X_OK):
        return f"no vLLM environment at {python} (run scripts/setup-vllm.sh)"
    return None


def _method_unsupported_reason(adapter_dir) -> str:
    from finetune.merge import _read_json, describe_adapter
    from finetune.methods import BOTTLENECK_TYPE

    description = describe_adapter(Path(adapter_dir))
    peft_type = description["peft_type"]
    config = _read_json(Path(adapter_dir) / "adapter_config.json") or {}
    if peft_type in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"):
        return f"vLLM cannot serve {description['method']} tuning (learned virtual tokens); the built-in server does"
    if peft_type != "LORA":
        label = "bottleneck adapter layers" if peft_type == BOTTLENECK_TYPE else f"{peft_type} adapters"
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


