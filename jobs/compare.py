"""Side-by-side view of adapter versions: settings diff, metrics with the best marked, loss curves, generations per
prompt, and the base model without adapter as a baseline. Used by the compare page and
GET /api/v1/adapter-versions/compare. Plain data in, plain data out (a few queries: one per version's curve)."""
import math

from .evaluation import entry_of, evaluation_of, is_active
from .metrics import downsampled_points
from .plan_display import method_fields

LOWER_IS_BETTER = {"eval_loss", "train_loss", "perplexity", "final_step_loss"}
HIGHER_IS_BETTER = {"exact_match", "token_f1", "rouge_l", "tokens_per_second", "reward_accuracy"}
PLAN_FIELDS = ["method", "rank", "alpha", "target_modules", "micro_batch", "grad_accum", "max_seq_len",
               "gradient_checkpointing", "learning_rate", "epochs", "dtype", "device"]
PLAN_SKIP = {"memory", "reasons", "warnings", "calibration", "fit_history", "fits"}
# Plan fields only some methods use, and the method_fields key saying whether a method uses them: a row shows
# when one compared version's method does (IA3 and prompt tuning have no rank or alpha).
METHOD_ONLY_FIELDS = {"rank": "rank", "alpha": "rank", "dropout": "rank", "target_modules": "targets",
                      "num_virtual_tokens": "virtual_tokens"}
METRIC_ORDER = ["eval_loss", "perplexity", "train_loss", "final_step_loss", "reward_accuracy", "tokens_per_second",
                "steps", "tokens_seen", "trainable_parameters", "peak_memory_bytes"]
EVAL_METRICS = ["exact_match", "token_f1", "rouge_l"]
CURVE_POINTS = 300


def compare_versions(versions, set_id=None, *, curves=True) -> dict:
    versions = list(versions)
    evaluation = evaluation_block(versions, set_id)
    metric_rows = _training_metric_rows(versions)
    if evaluation:
        metric_rows += evaluation["summary_rows"]
    return {
        "versions": [
            {
                "id": v.pk,
                "label": v.label,
                "adapter_name": v.line.name,
                "version": v.version,
                "method": v.method,
                "base_model": v.base_model_id,
                "dataset": v.dataset_id,
                "created_at": v.created_at.isoformat() if v.created_at else None,
                "is_champion": v.line.champion_id == v.pk,
                "plan": v.plan,
                "metrics": {k: val for k, val in (v.metrics or {}).items() if k != "evaluation"},
                "lineage": {k: val for k, val in (v.lineage or {}).items() if k != "curves"},
                "generations": v.generations,
                "curve": version_curve(v) if curves else [],
            }
            for v in versions
        ],
        "baseline": _baseline_summary(versions, evaluation),
        "settings": settings_rows(versions),
        "metrics": metric_rows,
        "generations": _aligned_generations(versions),
        "evaluation": evaluation,
    }


def version_curve(version) -> list[dict]:
    """The version's training curve: the copy in its lineage, else (versions recorded before lineage kept one)
    the job's metric rows while the job exists."""
    stored = (version.lineage or {}).get("curves")
    if isinstance(stored, dict) and stored.get("step"):
        names = [k for k in stored if k != "step"]
        return [{"step": step, **{k: (stored[k][i] if i < len(stored[k]) else None) for k in names}}
                for i, step in enumerate(stored["step"])]
    return downsampled_points(version.job_id, CURVE_POINTS) if version.job_id else []


# ------------------------------------------------------------------------------------------------ settings


def _short(value, n=12):
    return (value or "")[:n]


def settings_rows(versions) -> list[dict]:
    rows = []

    def add(field, values, group="plan"):
        rows.append({"field": field, "values": values, "differs": len({repr(x) for x in values}) > 1,
                     "group": group})

    add("base_model", [f"{v.lineage.get('base_model', {}).get('name') or v.base_model_id} "
                       f"@{_short(v.lineage.get('base_model', {}).get('sha256'))}" for v in versions], "lineage")
    add("dataset", [f"{v.lineage.get('dataset', {}).get('name') or v.dataset_id} "
                    f"@{_short(v.lineage.get('dataset', {}).get('content_hash'))}" for v in versions], "lineage")
    unused = _fields_no_method_uses(versions)
    for field in PLAN_FIELDS:
        if field not in unused:
            add(field, [v.plan.get(field) for v in versions])
    extra = sorted({k for v in versions for k, val in (v.plan or {}).items()
                    if k not in PLAN_FIELDS and k not in PLAN_SKIP and k not in unused and not isinstance(val, dict)})
    for field in extra:
        add(field, [v.plan.get(field) for v in versions])
    return rows


def _fields_no_method_uses(versions) -> set[str]:
    uses = [method_fields(v.method or "") for v in versions]
    return {field for field, key in METHOD_ONLY_FIELDS.items() if not any(u[key] for u in uses)}


# ------------------------------------------------------------------------------------------------ metrics


def _metric_sort_key(name):
    return (METRIC_ORDER.index(name), "") if name in METRIC_ORDER else (len(METRIC_ORDER), name)


# Progress readings of the last step that say nothing about the result.
NOT_COMPARED = {"eta_seconds", "epoch"}


def _training_metric_rows(versions) -> list[dict]:
    names = {k for v in versions for k, val in (v.metrics or {}).items()
             if isinstance(val, (int, float)) and not isinstance(val, bool) and k not in NOT_COMPARED}
    baseline = _baseline_training_metrics(versions)
    rows = []
    for name in sorted(names, key=_metric_sort_key):
        values = [(v.metrics or {}).get(name) for v in versions]
        rows.append({"metric": name, "values": values, "best": _best_index(name, values),
                     "baseline": baseline.get(name), "source": "training"})
    return rows


def _baseline_training_metrics(versions) -> dict:
    """The base model's validation loss before training, when the training run measured it (same dataset as
    the first version)."""
    first = versions[0] if versions else None
    if first is None:
        return {}
    initial = (first.metrics or {}).get("initial_eval_loss")
    if not isinstance(initial, (int, float)):
        return {}
    return {"eval_loss": initial, "perplexity": math.exp(min(initial, 50))}


def _best_index(name, values):
    numeric = [(i, x) for i, x in enumerate(values) if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if len(numeric) < 2 or len({x for _, x in numeric}) < 2:
        return None
    if name in LOWER_IS_BETTER:
        return min(numeric, key=lambda p: p[1])[0]
    if name in HIGHER_IS_BETTER:
        return max(numeric, key=lambda p: p[1])[0]
    return None


# ------------------------------------------------------------------------------------------------ evaluation


def common_set_id(versions, wanted=None):
    """The evaluation set to show: the one asked for, else the first version's latest set if every version
    has it, else the newest set every version has (ad-hoc single prompts are never chosen)."""
    if not versions:
        return None
    if wanted:
        return wanted if all(entry_of(v, wanted) for v in versions) else None
    evaluations = [evaluation_of(v) for v in versions]
    shared = set.intersection(*[{k for k, e in ev["sets"].items() if e.get("kind") != "prompt"}
                                for ev in evaluations])
    if not shared:
        return None
    latest = evaluations[0].get("latest")
    if latest in shared:
        return latest
    return max(shared, key=lambda k: evaluations[0]["sets"][k].get("queued_at") or "")


def _cell(entry, index):
    results = (entry or {}).get("results") or []
    return results[index] if index < len(results) else None


def _status(entries) -> str:
    statuses = [(e or {}).get("status") for e in entries]
    if any(s in ("queued", "running") for s in statuses):
        return "running" if "running" in statuses else "queued"
    if statuses and all(s == "failed" for s in statuses):
        return "failed"
    return "done"


def evaluation_block(versions, set_id=None) -> dict | None:
    set_id = common_set_id(versions, set_id)
    if not set_id:
        return None
    entries = [entry_of(v, set_id) for v in versions]
    prompts = entries[0].get("prompts") or []
    baseline = next((e.get("baseline") for e in entries if e.get("baseline")), None)
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append({
            "prompt": prompt.get("prompt"),
            "messages": prompt.get("messages"),
            "reference": prompt.get("reference"),
            "baseline": _cell(baseline, i),
            "outputs": [_cell(e, i) for e in entries],
        })
    summary_rows = []
    for name in EVAL_METRICS:
        values = [((e.get("summary") or {}).get(name)) for e in entries]
        base_value = ((baseline or {}).get("summary") or {}).get(name)
        if all(v is None for v in values) and base_value is None:
            continue
        summary_rows.append({"metric": name, "values": values, "best": _best_index(name, values),
                             "baseline": base_value, "source": "evaluation"})
    status = _status(entries)
    return {
        "set_id": set_id,
        "name": entries[0].get("name"),
        "kind": entries[0].get("kind"),
        "status": status,
        "active": any(is_active(e) for e in entries),
        "statuses": [e.get("status") for e in entries],
        "errors": [e.get("error") or "" for e in entries],
        "max_new_tokens": entries[0].get("max_new_tokens"),
        "baseline": {
            "base_model": (baseline or {}).get("base_model"),
            "summary": (baseline or {}).get("summary"),
            "error": (baseline or {}).get("error"),
            "ready": bool(baseline),
        },
        "rows": rows,
        "summary_rows": summary_rows,
    }


def _baseline_summary(versions, evaluation) -> dict:
    first = versions[0] if versions else None
    base = None
    if first is not None:
        base = {"id": first.base_model_id, "name": (first.lineage.get("base_model") or {}).get("name")}
    return {
        "label": f"base model: {base['name']}" if base and base.get("name") else "base model",
        "base_model": base,
        "same_base": len({v.base_model_id for v in versions}) <= 1,
        "training_metrics": _baseline_training_metrics(versions),
        "evaluation": (evaluation or {}).get("baseline"),
    }


def prompt_run(versions, set_id) -> dict | None:
    """One ad-hoc prompt run against every compared version and the base model."""
    entries = [entry_of(v, set_id) for v in versions]
    if not entries or any(e is None for e in entries):
        return None
    baseline = next((e.get("baseline") for e in entries if e.get("baseline")), None)
    prompt = (entries[0].get("prompts") or [{}])[0]
    return {
        "set_id": set_id,
        "prompt": prompt.get("prompt"),
        "reference": prompt.get("reference"),
        "status": _status(entries),
        "active": any(is_active(e) for e in entries),
        "baseline": _cell(baseline, 0),
        "baseline_error": (baseline or {}).get("error"),
        "outputs": [_cell(e, 0) for e in entries],
        "errors": [e.get("error") or "" for e in entries],
        "statuses": [e.get("status") for e in entries],
    }


def _aligned_generations(versions):
    """The generations each training run made on its validation prompts, aligned by prompt."""
    prompts = []
    by_prompt = {}
    for index, version in enumerate(versions):
        for gen in version.generations or []:
            key = gen.get("prompt") if isinstance(gen.get("prompt"), str) else repr(gen.get("prompt"))
            if key not in by_prompt:
                by_prompt[key] = {"prompt": gen.get("prompt"), "reference": gen.get("reference"),
                                  "outputs": [None] * len(versions)}
                prompts.append(key)
            by_prompt[key]["outputs"][index] = gen.get("output")
    return [by_prompt[k] for k in prompts]
