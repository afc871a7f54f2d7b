"""The built-in engine's model registry: which models are loaded, and which adapter is active on each.

A `ModelServer` holds loaded models and answers chat and completion requests for named deployments:

- a merged deployment (or any plain model folder) is one loaded model;
- adapter deployments share ONE loaded copy of their base model: peft keeps several adapters on it and each
  request switches to its own with `set_adapter`. Adapters load on first use and the least recently used are
  evicted beyond `max_adapters` per base. Adapters of different peft types (LoRA/DoRA vs IA3 vs prefix vs
  prompt tuning) cannot share a PeftModel, so each type gets its own copy of the base, and QLoRA adapters run
  on a 4-bit copy, the base they were trained on.
- bottleneck adapter layers (method "adapter", peft_type BOTTLENECK_ADAPTER, see finetune.methods) are not a
  peft type: they hook into the base's decoder layers and cannot be switched off, so each such adapter gets its
  own copy of the base with its layers attached (not counted against `max_adapters`, never evicted).

Adapter switching and generation mutate per-base state, so each loaded base has a lock held for the whole
request; requests for different bases run in parallel. What a request does once its model is active is
serving.sampling's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import TunedeckError
from finetune.merge import AdapterFolderError, describe_adapter
from finetune.methods import BOTTLENECK_TYPE
from finetune.modelstore import load_model_and_tokenizer, stop_token_ids

from .sampling import (
    ChatPrompt,
    DeltaDecoder,
    Result,
    SamplingParams,
    TextPrompt,
    generate_answer,
    stream_from_thread,
)

# peft types that attach to the model as prompt-learning wrappers rather than injected layers.
PROMPT_LEARNING_TYPES = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"}


class UnknownModel(TunedeckError):
    pass



@dataclass
class _Deployment:
    name: str
    kind: str  # "adapter" or "merged"
    group_key: tuple
    adapter_dir: Path | None = None


@dataclass
class _LoadedBase:
    """One loaded model, optionally wrapped by a PeftModel holding several adapters of one peft type."""

    path: Path
    peft_type: str | None
    quantize_4bit: bool
    bottleneck_dir: Path | None = None  # adapter layers fixed onto this copy (BOTTLENECK_ADAPTER)
    lock: threading.Lock = field(default_factory=threading.Lock)
    model: object = None
    peft_model: object = None
    tokenizer: object = None
    stop_ids: list = field(default_factory=list)
    context_length: int | None = None
    loaded_adapters: OrderedDict = field(
        default_factory=OrderedDict
    )  # slot name -> deployment name, LRU first
    next_slot: int = 0




class ModelServer:
    def __init__(self, *, max_adapters: int = 8, device: str = "auto", dtype="auto"):
        if max_adapters < 1:
            raise ValueError("max_adapters must be at least 1")
        self.max_adapters = max_adapters
        self.device = device
        self.dtype = dtype
        self._deployments: dict[str, _Deployment] = {}
        self._bases: dict[tuple, _LoadedBase] = {}
        self._registry_lock = threading.Lock()

    # --- registry -----------------------------------------------------------------------------------------

    def add_adapter(
        self, name: str, adapter_dir, base_path=None, *, quantize_4bit: bool | None = None
    ) -> None:
        """Registers an adapter deployment; its base defaults to the path recorded in adapter_config.json.

        `quantize_4bit` None follows the adapter: one trained on a 4-bit base (QLoRA) is served on one, which
        reproduces the trained model exactly (its merged form runs on the full-precision base instead).
        """
        adapter_dir = Path(adapter_dir)
        description = describe_adapter(adapter_dir)
        base = Path(base_path) if base_path else _recorded_base_path(adapter_dir)
        quantized = description["quantized_base"] if quantize_4bit is None else quantize_4bit
        peft_type = description["peft_type"] or "LORA"
        # Bottleneck adapter layers cannot be switched per request: one base copy per adapter folder.
        fixed = str(adapter_dir.resolve()) if peft_type == BOTTLENECK_TYPE else None
        key = (str(base.resolve()), peft_type, bool(quantized), fixed)
        self._register(_Deployment(name=name, kind="adapter", group_key=key, adapter_dir=adapter_dir))

    def add_merged(self, name: str, model_dir) -> None:
        """Registers a standalone model folder (a merged adapter, or a base model served as it is)."""
        key = (str(Path(model_dir).resolve()), None, False, None)
        self._register(_Deployment(name=name, kind="merged", group_key=key))

    def _register(self, deployment: _Deployment) -> None:
        with self._registry_lock:
            if deployment.name in self._deployments:
                raise TunedeckError(
                    f"A model named {deployment.name!r} is already being served; remove it first."
                )
            self._deployments[deployment.name] = deployment
            if deployment.group_key not in self._bases:
                path, peft_type, quantized, fixed = deployment.group_key
                self._bases[deployment.group_key] = _LoadedBase(
                    Path(path), peft_type, quantized, Path(fixed) if fixed else None
                )

    def list_models(self) -> list[dict]:
        with self._registry_lock:
            return [self._describe(d) for d in self._deployments.values()]

    def _describe(self, deployment: _Deployment) -> dict:
        group = self._bases[deployment.group_key]
        if deployment.kind == "adapter" and group.bottleneck_dir is None:
            loaded = deployment.name in group.loaded_adapters.values()
        else:
            loaded = group.model is not None
        return {
            "name": deployment.name,
            "kind": deployment.kind,
            "base": str(group.path),
            "adapter_dir": str(deployment.adapter_dir) if deployment.adapter_dir else None,
            "quantized_4bit": group.quantize_4bit,
            "loaded": loaded,
        }

    def remove(self, name: str) -> None:
        """Stops serving `name`, unloading its adapter, and its base too when nothing else uses it."""
        deployment, group = self._lookup(name)
        with group.lock:
            with self._registry_lock:
                if self._deployments.get(name) is not deployment:
                    raise UnknownModel(f"No model named {name!r} is being served.")
                del self._deployments[name]
                still_used = any(d.group_key == deployment.group_key for d in self._deployments.values())
                if not still_used:
                    del self._bases[deployment.group_key]
            if still_used and deployment.kind == "adapter" and group.bottleneck_dir is None:
                self._unload_adapter(group, name)

    def load(self, name: str) -> None:
        """Loads a deployment now rather than on its first request, so a deployment can report itself live."""
        deployment, group = self._lookup(name)
        with group.lock:
            self._check_still_served(deployment)
            self._activate(group, deployment)

    def _lookup(self, name: str) -> tuple[_Deployment, _LoadedBase]:
        with self._registry_lock:
            deployment = self._deployments.get(name)
            if deployment is None:
                raise UnknownModel(f"No model named {name!r} is being served.")
            return deployment, self._bases[deployment.group_key]

    def _check_still_served(self, deployment: _Deployment) -> None:
        # A request that waited for the model lock may find its deployment removed meanwhile.
        with self._registry_lock:
            if self._deployments.get(deployment.name) is not deployment:
                raise UnknownModel(f"No model named {deployment.name!r} is being served.")

    # --- loading and adapter switching (called with group.lock held) ---------------------------------------

    def _ensure_base(self, group: _LoadedBase) -> None:
        if group.model is not None:
            return
        model, tokenizer = load_model_and_tokenizer(
            group.path, device=self.device, dtype=self.dtype, quantize_4bit=group.quantize_4bit
        )
        if group.bottleneck_dir is not None:
            from finetune.errors import TrainingError
            from finetune.methods import load_bottleneck

            try:
                load_bottleneck(model, group.bottleneck_dir)
            except (TrainingError, KeyError, RuntimeError) as exc:
                raise AdapterFolderError(
                    f"The adapter layers in {group.bottleneck_dir} do not fit the base model {group.path}: {exc}"
                ) from None
            model.eval()
        group.model, group.tokenizer = model, tokenizer
        group.stop_ids = stop_token_ids(tokenizer, model.generation_config)
        group.context_length = getattr(model.config, "max_position_embeddings", None)

    def _activate(self, group: _LoadedBase, deployment: _Deployment):
        """Returns the model to run for `deployment`, with its adapter loaded and active."""
        self._ensure_base(group)
        if deployment.kind == "merged" or group.bottleneck_dir is not None:
            return group.model
        slot = self._slot_for(group, deployment.name)
        if slot is None:
            slot = self._load_adapter(group, deployment)
        group.loaded_adapters.move_to_end(slot)
        group.peft_model.set_adapter(slot)
        return group.peft_model

    def _slot_for(self, group: _LoadedBase, name: str) -> str | None:
        return next((slot for slot, owner in group.loaded_adapters.items() if owner == name), None)

    def _load_adapter(self, group: _LoadedBase, deployment: _Deployment) -> str:
        from peft import PeftModel

        # peft adapter names become module attribute names; deployment names may hold any characters.
        slot = f"slot{group.next_slot}"
        group.next_slot += 1
        try:
            if group.peft_model is None:
                group.peft_model = PeftModel.from_pretrained(
                    group.model, str(deployment.adapter_dir), adapter_name=slot
                )
                group.peft_model.eval()
            else:
                group.peft_model.load_adapter(str(deployment.adapter_dir), adapter_name=slot)
        except RuntimeError as exc:
            if "size mismatch" not in str(exc):
                raise
            raise AdapterFolderError(
                f"The adapter of {deployment.name!r} does not fit its base model {group.path}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        group.loaded_adapters[slot] = deployment.name
        self._evict_beyond_limit(group, keep=slot)
        return slot

    def _evict_beyond_limit(self, group: _LoadedBase, keep: str) -> None:
        while len(group.loaded_adapters) > self.max_adapters:
            oldest = next(slot for slot in group.loaded_adapters if slot != keep)
            group.peft_model.delete_adapter(oldest)
            del group.loaded_adapters[oldest]

    def _unload_adapter(self, group: _LoadedBase, name: str) -> None:
        slot = self._slot_for(group, name)
        if slot is None:
            return
        del group.loaded_adapters[slot]
        if group.loaded_adapters:
            group.peft_model.delete_adapter(slot)
            return
        # peft cannot run with zero adapters, so the wrapper goes; injected LoRA/IA3 layers are taken out of
        # the base first, prompt-learning wrappers never touched it.
        if group.peft_type not in PROMPT_LEARNING_TYPES:
            group.model = group.peft_model.unload()
        group.peft_model = None

    # --- requests ------------------------------------------------------------------------------------------

    def chat(self, name, messages, *, tools=None, **sampling) -> dict:
        """`sampling`: the request's honoured fields (SAMPLING_FIELDS: max_tokens=, temperature=, top_k=, ...);
        `tools` are only shown to the model, through its chat template (tool_choice "none": none is called)."""
        return self._run(name, ChatPrompt(messages, tools), SamplingParams(**sampling)).as_dict()

    def complete(self, name, prompt, **sampling) -> dict:
        return self._run(name, TextPrompt(prompt), SamplingParams(**sampling)).as_dict()

    def stream_chat(self, name, messages, *, tools=None, **sampling):
        """Yields text deltas, then a final dict like chat()'s."""
        return self._stream(name, ChatPrompt(messages, tools), SamplingParams(**sampling))

    def stream_complete(self, name, prompt, **sampling):
        return self._stream(name, TextPrompt(prompt), SamplingParams(**sampling))

    def _run(self, name, prompt, params, emit=None, cancelled=None) -> Result:
        deployment, group = self._lookup(name)
        with group.lock:
            self._check_still_served(deployment)
            model = self._activate(group, deployment)
            input_ids = prompt.token_ids(group.tokenizer).to(model.device)
            on_token = DeltaDecoder(group.tokenizer, group.stop_ids, params.stop, emit) if emit else None
            return generate_answer(model, group, input_ids, params, on_token, cancelled)

    def _stream(self, name, prompt, params):
        self._lookup(name)  # fail fast, before the caller starts a response
        return stream_from_thread(lambda emit, cancelled: self._run(name, prompt, params, emit, cancelled))


def _recorded_base_path(adapter_dir: Path) -> Path:
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    recorded = config.get("base_model_name_or_path")
    if not recorded or not Path(recorded).is_dir():
        raise AdapterFolderError(
            f"The adapter in {adapter_dir} records its base model as {recorded!r}, which is not a local "
            "folder; pass the base model path explicitly."
        )
    return Path(recorded)
