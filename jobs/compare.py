"""Side-by-side view of adapter versions: settings diff, metrics with the best marked, generations per prompt."""
from .metrics import downsampled_points

LOWER_IS_BETTER = {"eval_loss", "train_loss", "perplexity"}
HIGHER_IS_BETTER = {"exact_match", "token_f1", "rouge_l", "tokens_per_second"}
PLAN_FIELDS = ["method", "rank", "alpha", "target_modules", "micro_batch", "grad_accum", "max_seq_len",
               "gradient_checkpointing", "learning_rate", "epochs", "dtype", "device"]


def compare_versions(versions) -> dict:
    settings_rows = []
    for field in PLAN_FIELDS:
        values = [v.plan.get(field) for v in versions]
        settings_rows.append({"field": field, "values": values, "differs": len({repr(x) for x in values}) > 1})
    metric_names = sorted({k for v in versions for k, val in (v.metrics or {}).items() if isinstance(val, (int, float))})
    metric_rows = []
    for name in metric_names:
        values = [(v.metrics or {}).get(name) for v in versions]
        metric_rows.append({"metric": name, "values": values, "best": _best_index(name, values)})
    return {
        "versions": [
            {
                "id": v.pk,
                "label": v.label,
                "adapter_name": v.line.name,
                "version": v.version,
                "method": v.method,
                "plan": v.plan,
                "metrics": v.metrics,
                "generations": v.generations,
                "curve": downsampled_points(v.job, 300) if v.job_id else [],
            }
            for v in versions
        ],
        "settings": settings_rows,
        "metrics": metric_rows,
        "generations": _aligned_generations(versions),
    }


def _best_index(name, values):
    numeric = [(i, x) for i, x in enumerate(values) if isinstance(x, (int, float))]
    if len(numeric) < 2:
        return None
    if name in LOWER_IS_BETTER:
        return min(numeric, key=lambda p: p[1])[0]
    if name in HIGHER_IS_BETTER:
        return max(numeric, key=lambda p: p[1])[0]
    return None


def _aligned_generations(versions):
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
