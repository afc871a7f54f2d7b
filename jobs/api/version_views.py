"""REST API for adapter version actions: mark the line's champion, delete (refused while deployed), evaluate on a
prompt set against the base model. The logic is in jobs/versions.py and jobs/evaluation.py, shared with the pages."""
from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import evaluation as eval_tasks
from ..models import AdapterVersion
from ..versions import VersionInUse, delete_version, set_champion
from . import serializers as s
from .errors import ErrorSerializer, error_response
from .views import MAX_ID, AdapterVersionDetail, _owned_or_404

# ------------------------------------------------------------------------------------------------ API


def _owned_version(request, pk):
    return _owned_or_404(AdapterVersion.objects.owned_by(request.user).select_related("line"), pk,
                         "adapter version")


class AdapterVersionDetailDelete(AdapterVersionDetail):
    """GET as before; DELETE removes the version (409 while it is deployed)."""

    @extend_schema(responses={204: None, 404: OpenApiResponse(ErrorSerializer, "Not found"),
                              409: OpenApiResponse(ErrorSerializer, "The version is deployed")},
                   summary="Delete an adapter version (refused while deployed)")
    def delete(self, request, pk):
        version = _owned_version(request, pk)
        try:
            delete_version(version)
        except VersionInUse as exc:
            return error_response("deployed", str(exc), status.HTTP_409_CONFLICT,
                                  {"deployments": [{"id": d.pk, "name": d.name, "status": d.status}
                                                   for d in exc.deployments]})
        return Response(status=status.HTTP_204_NO_CONTENT)


class AdapterVersionChampion(APIView):
    @extend_schema(request=None, responses={200: s.AdapterVersionSerializer,
                                            404: OpenApiResponse(ErrorSerializer, "Not found")},
                   summary="Mark a version as its adapter line's champion")
    def post(self, request, pk):
        version = _owned_version(request, pk)
        set_champion(version)
        return Response(s.AdapterVersionSerializer(version).data)

    @extend_schema(request=None, responses={200: s.AdapterVersionSerializer},
                   summary="Clear the champion mark if this version holds it")
    def delete(self, request, pk):
        version = _owned_version(request, pk)
        set_champion(version, unset=True)
        return Response(s.AdapterVersionSerializer(version).data)


class EvaluateRequestSerializer(serializers.Serializer):
    ids = serializers.JSONField(help_text="1 to 4 version ids, as a list or a comma-separated string")
    prompts = serializers.JSONField(required=False, help_text="strings or {prompt, reference} objects; "
                                    "default: the first version's validation prompts with their answers")
    max_new_tokens = serializers.IntegerField(required=False, min_value=1, max_value=eval_tasks.MAX_NEW_TOKENS)
    force = serializers.BooleanField(required=False, default=False, help_text="run again even if results exist")


def _parse_ids(raw) -> list[int]:
    if isinstance(raw, str):
        raw = [x for x in raw.split(",") if x.strip()]
    if isinstance(raw, int):
        raw = [raw]
    if not isinstance(raw, list):
        raise eval_tasks.EvaluationInputError("ids must be a list of version ids.")
    ids = []
    for x in raw:
        try:
            value = int(x)
        except (TypeError, ValueError):
            raise eval_tasks.EvaluationInputError("ids must be version ids, e.g. [3, 5].") from None
        if isinstance(x, bool) or not 0 < value <= MAX_ID:
            raise eval_tasks.EvaluationInputError("ids must be positive version ids.")
        if value not in ids:
            ids.append(value)
    if not 1 <= len(ids) <= 4:
        raise eval_tasks.EvaluationInputError("Evaluate 1 to 4 versions at a time.")
    return ids


def _evaluation_payload(versions, set_id) -> dict:
    entries = [eval_tasks.entry_of(v, set_id) for v in versions]
    first = next((e for e in entries if e), {}) or {}
    baseline = next((e.get("baseline") for e in entries if e and e.get("baseline")), None)
    statuses = [(e or {}).get("status") for e in entries]
    overall = ("running" if "running" in statuses else "queued" if "queued" in statuses
               else "failed" if statuses and all(x == "failed" for x in statuses) else "done")
    return {
        "id": set_id,
        "name": first.get("name"),
        "kind": first.get("kind"),
        "status": overall,
        "max_new_tokens": first.get("max_new_tokens"),
        "prompts": first.get("prompts") or [],
        "baseline": baseline,
        "versions": [
            {"id": v.pk, "label": v.label, "status": (e or {}).get("status"), "error": (e or {}).get("error") or "",
             "summary": (e or {}).get("summary"), "results": (e or {}).get("results")}
            for v, e in zip(versions, entries)
        ],
    }


class AdapterVersionEvaluate(APIView):
    def _versions(self, request, ids):
        found = {v.pk: v for v in AdapterVersion.objects.owned_by(request.user)
                 .select_related("line", "dataset").filter(pk__in=ids)}
        missing = [i for i in ids if i not in found]
        return [found[i] for i in ids if i in found], missing

    @extend_schema(request=EvaluateRequestSerializer, responses={202: dict,
                                                                 400: OpenApiResponse(ErrorSerializer, "Bad input"),
                                                                 404: OpenApiResponse(ErrorSerializer, "Not found")},
                   summary="Generate on a prompt set with each version and the base model; scores vs references")
    def post(self, request):
        body = EvaluateRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            ids = _parse_ids(data["ids"])
            versions, missing = self._versions(request, ids)
            if missing:
                return error_response("not_found", f"No adapter version {missing[0]}.", status.HTTP_404_NOT_FOUND)
            new_tokens = eval_tasks.clean_new_tokens(data.get("max_new_tokens"))
            if data.get("prompts") not in (None, []):
                prompts = eval_tasks.clean_prompts(data["prompts"])
                kind, name = ("prompt" if len(prompts) == 1 else "custom"), "API prompts"
            else:
                prompts, kind = eval_tasks.validation_prompts(versions[0]), "validation"
                name = f"validation prompts of {versions[0].dataset.name}"
        except eval_tasks.EvaluationInputError as exc:
            return error_response("invalid", str(exc), status.HTTP_400_BAD_REQUEST)
        set_id = eval_tasks.queue_evaluation(versions, prompts, name=name, kind=kind, max_new_tokens=new_tokens,
                                             force=data.get("force", False))
        fresh = AdapterVersion.objects.filter(pk__in=ids).select_related("line")
        ordered = {v.pk: v for v in fresh}
        payload = _evaluation_payload([ordered[i] for i in ids], set_id)
        return Response({"evaluation": payload}, status=status.HTTP_202_ACCEPTED)

    @extend_schema(parameters=[OpenApiParameter("ids", str, required=True, description="comma-separated version ids"),
                               OpenApiParameter("set", str, required=True, description="the evaluation id")],
                   responses={200: dict, 404: OpenApiResponse(ErrorSerializer, "Not found")},
                   summary="Results of an evaluation so far")
    def get(self, request):
        try:
            ids = _parse_ids(request.query_params.get("ids", ""))
        except eval_tasks.EvaluationInputError as exc:
            return error_response("invalid", str(exc), status.HTTP_400_BAD_REQUEST, {"field": "ids"})
        versions, missing = self._versions(request, ids)
        if missing:
            return error_response("not_found", f"No adapter version {missing[0]}.", status.HTTP_404_NOT_FOUND)
        set_id = request.query_params.get("set") or request.query_params.get("id") or ""
        if not set_id:
            set_id = eval_tasks.evaluation_of(versions[0]).get("latest") or ""
        if not any(eval_tasks.entry_of(v, set_id) for v in versions):
            return error_response("not_found", f"No evaluation {set_id!r} for these versions.",
                                  status.HTTP_404_NOT_FOUND)
        return Response({"evaluation": _evaluation_payload(versions, set_id)})

