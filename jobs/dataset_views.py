"""The dataset pages: upload (a new version, or the same file reused), a version's report and token histogram,
retry, re-check with the bad rows dropped, map the columns of a file whose layout was not recognised, delete.
Each looks datasets up through the user's own queryset."""
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from finetune.data import LAYOUTS, best_layout, column_guesses, mappable_layouts

from . import services
from .models import BaseModel, Dataset
from .services import SCHEMAS, InputError
from .services.datasets import mapping_preview, reprocess_with_mapping


@login_required
def dataset_list(request):
    error = None
    if request.method == "POST":
        error = getattr(request, "upload_refused", None)
        if not error:
            try:
                base_model = None
                if request.POST.get("base_model"):
                    base_model = BaseModel.visible_to(request.user).get_or_404(request.POST["base_model"])
                dataset, created = services.create_dataset(
                    request.user,
                    request.FILES.get("file"),
                    name=request.POST.get("name", ""),
                    base_model=base_model,
                    validation_file=request.FILES.get("validation_file"),
                    validation_fraction=request.POST.get("validation_fraction"),
                    schema=request.POST.get("schema", ""),
                    column_map=request.POST.get("column_map", ""),
                )
                if not created and request.POST.get("name", "").strip():
                    messages.info(request, "This file was uploaded before with the same settings; reusing it "
                                           "under the new name.")
                    return redirect("dataset-detail", pk=dataset.pk)
                if not created:
                    messages.info(request, "This file was uploaded before with the same settings; reusing it.")
                return redirect("dataset-detail", pk=dataset.pk)
            except InputError as exc:
                error = str(exc)
    context = {
        "datasets": Dataset.objects.owned_by(request.user).select_related("base_model"),
        "base_models": BaseModel.visible_to(request.user),
        "schemas": SCHEMAS,
        "error": error,
    }
    return render(request, "jobs/datasets.html", context, status=400 if error else 200)


@login_required
def dataset_detail(request, pk):
    dataset = Dataset.objects.owned_by(request.user).select_related("base_model").get_or_404(pk)
    template = "jobs/_dataset_status.html" if request.htmx else "jobs/dataset_detail.html"
    return render(request, template, _detail_context(dataset))


def _detail_context(dataset, mapping=None) -> dict:
    if mapping is None and _needs_mapping(dataset):
        mapping = _mapping_form(dataset, {})
    return {"dataset": dataset, "histogram": _histogram_bars(dataset.token_stats), "mapping": mapping,
            "used_by": _jobs_using(dataset)}


def _jobs_using(dataset) -> list[dict]:
    """The jobs that keep the dataset for their lineage: the page says so instead of offering a delete that would
    be refused after the confirmation."""
    from .models import FineTuneJob

    return [{"pk": pk, "name": name} for pk, name in
            FineTuneJob.objects.filter(dataset=dataset).order_by("-created_at").values_list("pk", "adapter_name")[:50]]


def _needs_mapping(dataset) -> bool:
    """Invalid because no layout fits the columns, or because rows miss a field (often under another name)."""
    report = dataset.report or {}
    if dataset.status != Dataset.Status.INVALID:
        return False
    if not report.get("columns"):  # processed before the columns were recorded: the form asks to process again
        return "match no known schema" in (dataset.error or "")
    return not report.get("schema") or bool((report.get("problem_counts") or {}).get("missing_field"))


@login_required
@require_http_methods(["GET", "POST"])
def dataset_mapping(request, pk):
    """GET (htmx, as a select changes): the mapping form for the chosen layout and its live preview. POST: process
    the stored file again with the mapping (no re-upload)."""
    dataset = Dataset.objects.owned_by(request.user).select_related("base_model").get_or_404(pk)
    if request.method == "GET":
        return render(request, "jobs/_dataset_mapping.html",
                      {"dataset": dataset, "mapping": _mapping_form(dataset, request.GET)})
    schema, column_map = _chosen_mapping(request.POST)
    try:
        new = reprocess_with_mapping(request.user, dataset, schema, column_map)
    except InputError as exc:
        mapping = {**_mapping_form(dataset, request.POST), "error": str(exc)}
        return render(request, "jobs/dataset_detail.html", _detail_context(dataset, mapping), status=400)
    if new.pk != dataset.pk:
        messages.info(request, f"Dataset {dataset.pk} keeps its settings (jobs used it, or another version already "
                               f"has this mapping); this is version {new.pk} of the same file with your mapping.")
    return redirect("dataset-detail", pk=new.pk)


def _chosen_mapping(params) -> tuple[str, dict]:
    """The form's layout select and its map-<field> selects; a field left on "none" is not mapped."""
    column_map = {key.removeprefix("map-"): value for key, value in params.items()
                  if key.startswith("map-") and value}
    return params.get("schema", ""), column_map


def _mapping_form(dataset, params) -> dict:
    """What the mapping form shows: the layouts, the chosen one's fields (required first) each with the column
    chosen or guessed, the detected columns, and the preview of the first rows under that mapping."""
    report = dataset.report or {}
    columns = report.get("columns") or []
    if not columns:
        return {"missing_columns": True}
    layouts = mappable_layouts()
    names = [layout.name for layout in layouts]
    wanted = [params.get("schema"), dataset.schema_override, report.get("schema"),
              best_layout(columns, report.get("schema_candidates") or []), "prompt_completion", names[0]]
    schema = next(name for name in wanted if name in names)
    guesses = column_guesses(schema, {} if params else dataset.column_map or {}, columns)
    layout = LAYOUTS[schema]
    fields = [{"name": name, "required": name in layout.required,
               "choice": params.get(f"map-{name}", guesses[name]) if params else guesses[name]}
              for name in layout.fields]
    column_map = {f["name"]: f["choice"] for f in fields if f["choice"]}
    form = {"columns": columns, "layouts": layouts, "schema": schema, "fields": fields, "preview": [], "error": ""}
    try:
        form["preview"] = [_preview_row(r) for r in mapping_preview(dataset, schema, column_map)["rows"]]
    except InputError as exc:
        form["error"] = str(exc)
    return form


def _preview_row(row: dict) -> dict:
    """A normalised example as labelled lines (role or part: text), or the row's problem."""
    example = row.get("example")
    if example is None:
        return {"row": row["row"], "problem": row["problem"]}
    lines = [(m["role"], m.get("content") or "") for m in example.get("prompt") or example.get("messages") or []]
    lines += [(name, example[name]) for name in ("text", "chosen", "rejected") if name in example]
    if "label" in example:
        lines.append(("label", "desirable" if example["label"] else "undesirable"))
    return {"row": row["row"], "lines": lines}


@login_required
@require_POST
def dataset_drop_invalid(request, pk):
    dataset = Dataset.objects.owned_by(request.user).get_or_404(pk)
    try:
        new = services.reprocess_dataset_dropping_invalid(request.user, dataset)
    except InputError as exc:
        messages.error(request, str(exc))
        return redirect("dataset-detail", pk=dataset.pk)
    return redirect("dataset-detail", pk=new.pk)


@login_required
@require_POST
def dataset_retry(request, pk):
    dataset = Dataset.objects.owned_by(request.user).get_or_404(pk)
    try:
        services.retry_dataset(dataset)
    except InputError as exc:
        messages.error(request, str(exc))
    return redirect("dataset-detail", pk=dataset.pk)


@login_required
@require_POST
def dataset_delete(request, pk):
    dataset = Dataset.objects.owned_by(request.user).get_or_404(pk)
    try:
        services.delete_dataset(dataset)
    except InputError as exc:
        messages.error(request, str(exc))
        return redirect("dataset-detail", pk=dataset.pk)
    messages.info(request, f"Dataset {dataset.name!r} deleted.")
    return redirect("datasets")


def _histogram_bars(stats):
    """Bins of the token-length histogram with their heights and ranges, and the axis labels around them."""
    hist = (stats or {}).get("histogram") or {}
    counts, edges = hist.get("counts") or [], hist.get("edges") or []
    if not counts:
        return None
    top = max(counts) or 1

    def edge(i):
        return round(edges[i]) if i < len(edges) and isinstance(edges[i], (int, float)) else ""

    bins = [{"count": c, "height": round(100 * c / top, 1), "low": edge(i), "high": edge(i + 1)}
            for i, c in enumerate(counts)]
    middle = len(bins) // 2
    return {"bins": bins, "top": top, "x_labels": [bins[0]["low"], bins[middle]["low"], bins[-1]["high"]]}
