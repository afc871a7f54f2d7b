"""REST API for adapter version actions: mark the line's champion, delete (refused while deployed), evaluate on a
prompt set against the base model. The logic is in jobs/versions.py and jobs/evaluation.py, shared with the pages."""
from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import evaluation
from ..models import AdapterVersion
from ..versions import VersionInUse, delete_version, owned_versions, parse_version_ids, set_champion
from . import serializers as s
from .errors import ErrorSerializer, error_response
from .views import AdapterVersionDetail

# ------------------------------------------------------------------------------------------------ API


def _owned_version(request, pk):
    return AdapterVersion.objects.owned_by(request.user).select_related("line").get_or_404(pk)


class AdapterVersionDetailDelete(AdapterVersionDetail):
    """GET as before; DELETE removes the version (409 while it is deployed). Its stopped and failed deployments
    keep their records: `version` becomes null and `details.deleted_version` says which version it was."""

    @extend_schema(responses={204: None, 404: OpenApiResponse(ErrorSerializer, "Not found"),
                              409: OpenApiResponse(ErrorSerializer, "The version is deployed")},
                   summary="Delete an adapter version (refused while deployed; stopped deployments keep their "
                           "records, with version null and details.deleted_version)")
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
    max_new_tokens = serializers.IntegerField(required=False, min_value=1, max_value=evaluation.MAX_NEW_TOKENS)
    force = serializers.BooleanField(required=False, default=False, help_text="run again even if results exist")


def _evaluation_payload(versions, set_id) -> dict:
    entries = [evaluation.entry_of(v, set_id) for v in versions]
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
    @extend_schema(request=EvaluateRequestSerializer, responses={202: dict,
                                                                 400: OpenApiResponse(ErrorSerializer, "Bad input"),
                                                                 404: OpenApiResponse(ErrorSerializer, "Not found")},
                   summary="Generate on a prompt set with each version and the base model; scores vs references")
    def post(self, request):
        body = EvaluateRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        ids = parse_version_ids(data["ids"], action="evaluate")
        versions = owned_versions(request.user, ids, "line", "dataset")
        new_tokens = evaluation.clean_new_tokens(data.get("max_new_tokens"))
        prompts, name, kind = evaluation.choose_prompts(versions[0], data.get("prompts"), typed_name="API prompts",
                                                        one_typed_kind="prompt")
        set_id = evaluation.queue_evaluation(versions, prompts, name=name, kind=kind, max_new_tokens=new_tokens,
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
        ids = parse_version_ids(request.query_params.get("ids", ""), action="evaluate")
        versions = owned_versions(request.user, ids, "line", "dataset")
        set_id = request.query_params.get("set") or request.query_params.get("id") or ""
        if not set_id:
            set_id = evaluation.evaluation_of(versions[0]).get("latest") or ""
        if not any(evaluation.entry_of(v, set_id) for v in versions):
            return error_response("not_found", f"No evaluation {set_id!r} for these versions.",
                                  status.HTTP_404_NOT_FOUND)
        return Response({"evaluation": _evaluation_payload(versions, set_id)})
