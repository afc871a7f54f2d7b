"""REST API v1. Every query starts from the requesting user's own objects, so another user's ids are 404."""
import logging
from pathlib import Path

from django.contrib.auth import authenticate
from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.decorators import (
    api_view,
    authentication_classes,
    parser_classes,
    permission_classes,
    throttle_classes,
)
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.throttling import AnonRateThrottle
from rest_framework.views import APIView

from .. import services, tokens
from ..archives import zip_folder
from ..compare import compare_versions
from ..models import AdapterVersion, ApiToken, BaseModel, Dataset, Deployment, FineTuneJob, JobStatus, Worker
from ..services.datasets import mapping_preview, reprocess_with_mapping
from ..versions import owned_versions, parse_version_ids
from . import serializers as s
from .errors import ErrorSerializer, error_response

log = logging.getLogger(__name__)

class SafeLookup:
    """Detail views look up through the one owned-object lookup (OwnedQuerySet.get_or_404): another user's id
    and an id too large for the database are a 404 like any other unknown id."""

    def get_object(self):
        obj = self.get_queryset().get_or_404(self.kwargs["pk"])
        self.check_object_permissions(self.request, obj)
        return obj


class LoginThrottle(AnonRateThrottle):
    rate = "20/min"
    scope = "login"


@extend_schema(
    request=s.TokenRequestSerializer,
    responses={200: s.ApiTokenCreatedSerializer, 401: OpenApiResponse(ErrorSerializer, "Wrong username or password")},
    summary="Exchange a username and password for an API token (it expires after the server's default unless "
            "expires_in_days or expires_at says when)",
)
@api_view(["POST"])
@parser_classes([JSONParser])
@authentication_classes([])
@permission_classes([AllowAny])
@throttle_classes([LoginThrottle])
def issue_token(request):
    body = s.TokenRequestSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    data = body.validated_data
    user = authenticate(request, username=data["username"], password=data["password"])
    if user is None:
        return error_response("invalid_credentials", "Wrong username or password.", status.HTTP_401_UNAUTHORIZED)
    # issue 31: without an expiry asked for, it expires after LOGIN_TOKEN_DAYS (scripts that log in on every run)
    token, raw = tokens.create(user, data.get("name"), days=data.get("expires_in_days"), at=data.get("expires_at"),
                               default_name="api", default_days=tokens.login_default_days())
    token.token = raw
    return Response(s.ApiTokenCreatedSerializer(token).data)


def _visible_base_model(user, pk):
    if pk in (None, ""):
        model = services.default_base_model()
        if model is None:
            raise services.InputError("No base model is registered; give base_model.", field="base_model")
        return model
    return BaseModel.visible_to(user).get_or_404(pk)


# ---------------------------------------------------------------- tokens


class TokenList(generics.ListCreateAPIView):
    """The user's API tokens. Listing shows each token's prefix only; the token itself is shown once, when made."""

    parser_classes = [JSONParser]

    serializer_class = s.ApiTokenSerializer

    def get_queryset(self):
        return ApiToken.objects.owned_by(self.request.user).order_by("-created_at", "-id")

    @extend_schema(request=s.ApiTokenCreateSerializer, responses={201: s.ApiTokenCreatedSerializer},
                   summary="Create an API token (the response is the only time it is shown)")
    def post(self, request):
        body = s.ApiTokenCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        token, raw = tokens.create(request.user, data.get("name"), days=data.get("expires_in_days"),
                                   at=data.get("expires_at"))
        token.token = raw
        return Response(s.ApiTokenCreatedSerializer(token).data, status=status.HTTP_201_CREATED)


class TokenDetail(SafeLookup, generics.RetrieveDestroyAPIView):
    serializer_class = s.ApiTokenSerializer

    def get_queryset(self):
        return ApiToken.objects.owned_by(self.request.user)

    @extend_schema(responses={204: None}, summary="Revoke an API token (it stops working at once)")
    def delete(self, request, pk):
        tokens.revoke(request.user, ids=[self.get_queryset().get_or_404(pk).pk])
        return Response(status=status.HTTP_204_NO_CONTENT)


class TokenRevoke(APIView):
    """Bulk revoke (issue 31): {"ids": [...]}, {"all": true} or {"name": "..."}; only the caller's own tokens."""

    parser_classes = [JSONParser]

    @extend_schema(request=s.TokenRevokeSerializer, responses={200: s.TokenRevokedSerializer},
                   summary="Revoke several of your API tokens at once: by ids, by name, or all")
    def post(self, request):
        body = s.TokenRevokeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        revoked = tokens.revoke(request.user, ids=data.get("ids"), everything=data.get("all", False),
                                name=data.get("name"))
        return Response({"revoked": revoked, "count": len(revoked)})


class BaseModelList(generics.ListCreateAPIView):
    parser_classes = [JSONParser]
    serializer_class = s.BaseModelSerializer

    def get_queryset(self):
        return BaseModel.visible_to(self.request.user)

    @extend_schema(request=s.BaseModelCreateSerializer, responses={201: s.BaseModelSerializer},
                   summary="Register a model folder on the server (administrators only)")
    def post(self, request):
        if not services.may_register_folders(request.user):  # before the body is read: nothing about it leaks
            raise services.NotAllowed(services.ADMINS_ONLY)
        body = s.BaseModelCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        owner = None if data["shared"] else request.user
        model = services.register_base_model(request.user, data["name"], data["path"], owner=owner)
        return Response(s.BaseModelSerializer(model).data, status=status.HTTP_201_CREATED)


class BaseModelDetail(SafeLookup, generics.RetrieveAPIView):
    serializer_class = s.BaseModelSerializer

    def get_queryset(self):
        return BaseModel.visible_to(self.request.user)


# ---------------------------------------------------------------- datasets


class DatasetList(generics.ListCreateAPIView):
    serializer_class = s.DatasetSerializer
    parser_classes = [MultiPartParser, FormParser]
    error_statuses = ("413",)

    def get_queryset(self):
        return Dataset.objects.owned_by(self.request.user)

    @extend_schema(
        request={"multipart/form-data": s.DatasetUploadSerializer},
        responses={
            201: s.DatasetCreatedSerializer,
            200: OpenApiResponse(s.DatasetCreatedSerializer, "The same file with the same settings was uploaded "
                                 "before: that dataset version, with reused=true"),
        },
        summary="Upload a dataset file (validated in the background; poll the dataset until it is not validating)",
    )
    def post(self, request):
        files = request.FILES  # parses the body: the upload handler refuses an oversized one while streaming
        refused = getattr(request._request, "upload_refused", None)
        if refused:
            return error_response("too_large", refused, status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        if "file" not in files:
            return error_response("invalid", "Send the dataset as the multipart field 'file'.", 400,
                                  {"field": "file"})
        body = s.DatasetUploadSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        base_model = _visible_base_model(request.user, data.get("base_model")) if data.get("base_model") else None
        dataset, created = services.create_dataset(
            request.user,
            data["file"],
            name=data.get("name", ""),
            base_model=base_model,
            validation_file=data.get("validation_file"),
            validation_fraction=data.get("validation_fraction"),
            schema=data.get("schema", ""),
            column_map=data.get("column_map"),
            drop_invalid=data.get("drop_invalid", False),
        )
        payload = s.DatasetCreatedSerializer(dataset).data
        payload["reused"] = not created
        return Response(payload, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class DatasetDetail(SafeLookup, generics.RetrieveDestroyAPIView):
    serializer_class = s.DatasetDetailSerializer
    error_statuses = ("409",)

    def get_queryset(self):
        return Dataset.objects.owned_by(self.request.user)

    @extend_schema(responses={204: None},
                   summary="Delete a dataset version and its files, whatever its status (refused while jobs use it)")
    def delete(self, request, pk):
        services.delete_dataset(self.get_queryset().get_or_404(pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


class DatasetRetry(APIView):
    error_statuses = ("409",)

    @extend_schema(request=None, responses={202: s.DatasetSerializer},
                   summary="Process a dataset again from its stored file (after a failure or a stuck worker)")
    def post(self, request, pk):
        dataset = services.retry_dataset(Dataset.objects.owned_by(request.user).get_or_404(pk))
        return Response(s.DatasetSerializer(dataset).data, status=status.HTTP_202_ACCEPTED)


class DatasetDropInvalid(APIView):
    @extend_schema(request=None, responses={202: s.DatasetSerializer},
                   summary="Re-check an invalid dataset with its bad rows dropped (a new dataset version)")
    def post(self, request, pk):
        dataset = Dataset.objects.owned_by(request.user).get_or_404(pk)
        new = services.reprocess_dataset_dropping_invalid(request.user, dataset)
        return Response(s.DatasetSerializer(new).data, status=status.HTTP_202_ACCEPTED)


class DatasetReprocess(APIView):
    parser_classes = [JSONParser]
    error_statuses = ("409",)

    @extend_schema(request=s.DatasetMappingSerializer, responses={202: s.DatasetSerializer},
                   summary="Process the stored file again with a layout (schema) and column_map, without a "
                           "re-upload: the same dataset, or a new version of it when jobs used this one")
    def post(self, request, pk):
        dataset = Dataset.objects.owned_by(request.user).get_or_404(pk)
        body = _mapping_body(request)
        new = reprocess_with_mapping(request.user, dataset, body.get("schema"), body.get("column_map"))
        return Response(s.DatasetSerializer(new).data, status=status.HTTP_202_ACCEPTED)


class DatasetMappingPreview(APIView):
    parser_classes = [JSONParser]
    error_statuses = ("409",)

    @extend_schema(request=s.DatasetMappingSerializer, responses={200: s.MappingPreviewSerializer},
                   summary="The first rows of a dataset normalised under a layout and column_map (changes nothing)")
    def post(self, request, pk):
        dataset = Dataset.objects.owned_by(request.user).get_or_404(pk)
        body = _mapping_body(request)
        return Response(mapping_preview(dataset, body.get("schema"), body.get("column_map")))


def _mapping_body(request) -> dict:
    body = s.DatasetMappingSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    return body.validated_data


# ---------------------------------------------------------------- plans and jobs


class PlanView(APIView):
    parser_classes = [JSONParser]
    @extend_schema(request=s.PlanRequestSerializer, responses={200: s.PlanSerializer},
                   summary="The training plan for a dataset (pre-flight; creates nothing)")
    def post(self, request):
        body = s.PlanRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        base_model = _visible_base_model(request.user, data.get("base_model"))
        dataset = None
        if data.get("dataset") is not None:
            dataset = Dataset.objects.owned_by(request.user).get_or_404(data["dataset"])
        plan = services.make_plan(base_model, dataset, data.get("method", "auto"), data.get("overrides"), data.get("gpu"))
        return Response(plan)


class JobList(generics.ListCreateAPIView):
    parser_classes = [JSONParser]
    error_statuses = ("409",)  # issue 31: the user's queued jobs are at the server's limit
    serializer_class = s.JobSerializer

    def get_queryset(self):
        queryset = FineTuneJob.objects.owned_by(self.request.user).select_related("adapter_version")
        wanted = self.request.query_params.get("status")
        if wanted and wanted not in JobStatus.values:
            raise services.InputError(f"Unknown status {wanted!r}; choose one of {', '.join(JobStatus.values)}.",
                                      field="status")
        return queryset.filter(status=wanted) if wanted else queryset

    @extend_schema(parameters=[OpenApiParameter("status", str, enum=JobStatus.values,
                                                description="only jobs with this status")])
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    @extend_schema(request=s.JobCreateSerializer, responses={201: s.JobSerializer},
                   summary="Queue a fine-tuning job (auto plan, or with method and overrides)")
    def post(self, request):
        body = s.JobCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        base_model = _visible_base_model(request.user, data.get("base_model"))
        dataset = Dataset.objects.owned_by(request.user).get_or_404(data["dataset"])
        job = services.create_job(
            request.user, base_model, dataset, data.get("method", "auto"), data.get("overrides"),
            data.get("adapter_name", ""),
        )
        return Response(s.JobSerializer(job).data, status=status.HTTP_201_CREATED)


class JobDetail(SafeLookup, generics.RetrieveAPIView):
    serializer_class = s.JobSerializer

    def get_queryset(self):
        return FineTuneJob.objects.owned_by(self.request.user).select_related("adapter_version")


def _jobs(user):
    return FineTuneJob.objects.owned_by(user).select_related("adapter_version")


class JobClone(APIView):
    parser_classes = [JSONParser]
    error_statuses = ("409",)  # issue 31: queued jobs at the limit
    @extend_schema(request=s.JobCloneSerializer, responses={201: s.JobSerializer},
                   summary="A new job with this job's settings, changed by the fields given")
    def post(self, request, pk):
        source = _jobs(request.user).get_or_404(pk)
        body = s.JobCloneSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        overrides = dict(source.overrides or {})
        extra = data.get("overrides")
        if extra not in (None, ""):
            if not isinstance(extra, dict):
                raise services.InputError("overrides must be an object of plan fields.", field="overrides")
            overrides.update(extra)
        base_model = _visible_base_model(request.user, data["base_model"]) if data.get("base_model") else None
        if base_model is None:
            base_model = BaseModel.visible_to(request.user).get_or_404(source.base_model_id)
        dataset = Dataset.objects.owned_by(request.user).get_or_404(data.get("dataset", source.dataset_id))
        adapter_name = data.get("adapter_name") or source.adapter_name
        job = services.create_job(request.user, base_model, dataset, data.get("method", source.method), overrides,
                                  adapter_name)
        return Response(s.JobSerializer(job).data, status=status.HTTP_201_CREATED)


class JobCancel(APIView):
    @extend_schema(request=None, responses={202: s.JobSerializer},
                   summary="Cancel a job (queued: at once; running: at the worker's next check)")
    def post(self, request, pk):
        job = services.request_cancel(_jobs(request.user).get_or_404(pk))
        return Response(s.JobSerializer(_jobs(request.user).get_or_404(job.pk)).data, status=status.HTTP_202_ACCEPTED)


class JobRetry(APIView):
    error_statuses = ("409",)  # issue 31: queued jobs at the limit
    @extend_schema(request=None, responses={202: s.JobSerializer},
                   summary="Requeue a failed or cancelled job; it resumes from its last checkpoint")
    def post(self, request, pk):
        job = services.retry_job(_jobs(request.user).get_or_404(pk))
        return Response(s.JobSerializer(_jobs(request.user).get_or_404(job.pk)).data, status=status.HTTP_202_ACCEPTED)


class JobMetrics(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("max_points", int, description="downsample to at most this many points "
                                     "(10 to 5000, default 500)")],
        responses={200: s.JobMetricsSerializer},
    )
    def get(self, request, pk):
        from ..metrics import downsampled_points

        job = _jobs(request.user).get_or_404(pk)
        try:
            max_points = max(10, min(5000, int(request.query_params.get("max_points", 500))))
        except ValueError:
            raise services.InputError("max_points must be a whole number.", field="max_points") from None
        events = s.JobEventSerializer(job.events.all()[:500], many=True).data
        return Response({"job": job.pk, "points": downsampled_points(job, max_points), "events": events})


# ---------------------------------------------------------------- adapter versions


class AdapterVersionList(generics.ListAPIView):
    serializer_class = s.AdapterVersionSerializer

    def get_queryset(self):
        return AdapterVersion.objects.owned_by(self.request.user).select_related("line")


class AdapterVersionDetail(SafeLookup, generics.RetrieveAPIView):
    serializer_class = s.AdapterVersionSerializer

    def get_queryset(self):
        return AdapterVersion.objects.owned_by(self.request.user).select_related("line")


class AdapterVersionDownload(APIView):
    error_statuses = ("410",)

    @extend_schema(responses={(200, "application/zip"): OpenApiTypes.BINARY},
                   summary="The peft adapter folder as a zip")
    def get(self, request, pk):
        version = AdapterVersion.objects.owned_by(request.user).select_related("line").get_or_404(pk)
        folder = Path(version.path)
        if not folder.is_dir():
            return error_response("gone", "The adapter files are missing on the server.", status.HTTP_410_GONE)
        filename = f"{version.line.name}-v{version.version}.zip".replace("/", "_").replace('"', "")
        return FileResponse(zip_folder(folder), as_attachment=True, filename=filename,
                            content_type="application/zip")


class AdapterVersionCompare(APIView):
    @extend_schema(parameters=[OpenApiParameter("ids", str, required=True, pattern=r"^[1-9][0-9]{0,17}(,[1-9][0-9]{0,17}){0,3}$",
                                                description="1 to 4 comma-separated version ids, e.g. 3,5")],
                   responses={200: s.CompareSerializer},
                   summary="Versions side by side: settings, metrics (best marked) and generations per prompt")
    def get(self, request):
        ids = parse_version_ids(request.query_params.get("ids", ""), action="compare")
        return Response(compare_versions(owned_versions(request.user, ids, "line", "job")))


class DeploymentDetail(SafeLookup, generics.RetrieveAPIView):
    serializer_class = s.DeploymentSerializer

    def get_queryset(self):
        return Deployment.objects.owned_by(self.request.user)


class WorkerList(generics.ListAPIView):
    serializer_class = s.WorkerSerializer
    queryset = Worker.objects.all()
