"""REST API v1. Every query starts from the requesting user's own objects, so another user's ids are 404."""
import io
import zipfile
from pathlib import Path

from django.contrib.auth import authenticate
from django.http import FileResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, status
from rest_framework.decorators import api_view, authentication_classes, permission_classes, throttle_classes
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.throttling import AnonRateThrottle
from rest_framework.views import APIView

from .. import services
from ..models import AdapterVersion, ApiToken, BaseModel, Dataset, Deployment, FineTuneJob, Worker
from . import serializers as s
from .errors import error_response


class LoginThrottle(AnonRateThrottle):
    rate = "20/min"
    scope = "login"


@extend_schema(request=s.TokenRequestSerializer, responses={200: s.TokenSerializer})
@api_view(["POST"])
@authentication_classes([])
@permission_classes([AllowAny])
@throttle_classes([LoginThrottle])
def issue_token(request):
    body = s.TokenRequestSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    user = authenticate(request, username=body.validated_data["username"], password=body.validated_data["password"])
    if user is None:
        return error_response("invalid_credentials", "Wrong username or password.", status.HTTP_401_UNAUTHORIZED)
    _, raw = ApiToken.issue(user, name="api")
    return Response({"token": raw})


def _visible_base_model(user, pk):
    if pk in (None, ""):
        model = services.default_base_model()
        if model is None:
            raise services.InputError("No base model is registered; give base_model.", field="base_model")
        return model
    return get_object_or_404(BaseModel.visible_to(user), pk=pk)


class BaseModelList(generics.ListCreateAPIView):
    serializer_class = s.BaseModelSerializer

    def get_queryset(self):
        return BaseModel.visible_to(self.request.user)

    @extend_schema(request=s.BaseModelCreateSerializer, responses={201: s.BaseModelSerializer})
    def post(self, request):
        body = s.BaseModelCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        model = services.register_base_model(request.user, body.validated_data["name"], body.validated_data["path"])
        return Response(s.BaseModelSerializer(model).data, status=status.HTTP_201_CREATED)


class BaseModelDetail(generics.RetrieveAPIView):
    serializer_class = s.BaseModelSerializer

    def get_queryset(self):
        return BaseModel.visible_to(self.request.user)


class DatasetList(generics.ListCreateAPIView):
    serializer_class = s.DatasetSerializer
    parser_classes = [MultiPartParser, FormParser]

    def get_queryset(self):
        return Dataset.objects.owned_by(self.request.user)

    @extend_schema(request={"multipart/form-data": s.DatasetUploadSerializer}, responses={201: s.DatasetSerializer})
    def post(self, request):
        refused = getattr(request._request, "upload_refused", None)
        if refused:
            return error_response("too_large", refused, status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        if "file" not in request.FILES:
            return error_response("invalid", "Send the dataset as the multipart field 'file'.", 400)
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
        payload = s.DatasetSerializer(dataset).data
        payload["reused"] = not created
        return Response(payload, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class DatasetDetail(generics.RetrieveAPIView):
    serializer_class = s.DatasetDetailSerializer

    def get_queryset(self):
        return Dataset.objects.owned_by(self.request.user)


class DatasetDropInvalid(APIView):
    @extend_schema(request=None, responses={202: s.DatasetSerializer})
    def post(self, request, pk):
        dataset = get_object_or_404(Dataset.objects.owned_by(request.user), pk=pk)
        new = services.reprocess_dataset_dropping_invalid(request.user, dataset)
        return Response(s.DatasetSerializer(new).data, status=status.HTTP_202_ACCEPTED)


class PlanView(APIView):
    @extend_schema(request=s.PlanRequestSerializer, responses={200: dict})
    def post(self, request):
        body = s.PlanRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        base_model = _visible_base_model(request.user, data.get("base_model"))
        dataset = None
        if data.get("dataset") is not None:
            dataset = get_object_or_404(Dataset.objects.owned_by(request.user), pk=data["dataset"])
        plan = services.make_plan(base_model, dataset, data.get("method", "auto"), data.get("overrides"), data.get("gpu"))
        return Response(plan)


class JobList(generics.ListCreateAPIView):
    serializer_class = s.JobSerializer

    def get_queryset(self):
        queryset = FineTuneJob.objects.owned_by(self.request.user).select_related("adapter_version")
        wanted = self.request.query_params.get("status")
        return queryset.filter(status=wanted) if wanted else queryset

    @extend_schema(request=s.JobCreateSerializer, responses={201: s.JobSerializer})
    def post(self, request):
        body = s.JobCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        base_model = _visible_base_model(request.user, data.get("base_model"))
        dataset = get_object_or_404(Dataset.objects.owned_by(request.user), pk=data["dataset"])
        job = services.create_job(
            request.user, base_model, dataset, data.get("method", "auto"), data.get("overrides"),
            data.get("adapter_name", ""),
        )
        return Response(s.JobSerializer(job).data, status=status.HTTP_201_CREATED)


class JobDetail(generics.RetrieveAPIView):
    serializer_class = s.JobSerializer

    def get_queryset(self):
        return FineTuneJob.objects.owned_by(self.request.user).select_related("adapter_version")


class JobCancel(APIView):
    @extend_schema(request=None, responses={202: s.JobSerializer})
    def post(self, request, pk):
        job = get_object_or_404(FineTuneJob.objects.owned_by(request.user), pk=pk)
        job = services.request_cancel(job)
        return Response(s.JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class JobRetry(APIView):
    @extend_schema(request=None, responses={202: s.JobSerializer})
    def post(self, request, pk):
        job = get_object_or_404(FineTuneJob.objects.owned_by(request.user), pk=pk)
        job = services.retry_job(job)
        return Response(s.JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class JobMetrics(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("max_points", int, description="downsample to at most this many points")],
        responses={200: dict},
    )
    def get(self, request, pk):
        from ..metrics import downsampled_points

        job = get_object_or_404(FineTuneJob.objects.owned_by(request.user), pk=pk)
        try:
            max_points = max(10, min(5000, int(request.query_params.get("max_points", 500))))
        except ValueError:
            raise services.InputError("max_points must be a whole number.", field="max_points") from None
        events = s.JobEventSerializer(job.events.all()[:500], many=True).data
        return Response({"job": job.pk, "points": downsampled_points(job, max_points), "events": events})


class AdapterVersionList(generics.ListAPIView):
    serializer_class = s.AdapterVersionSerializer

    def get_queryset(self):
        return AdapterVersion.objects.owned_by(self.request.user).select_related("line")


class AdapterVersionDetail(generics.RetrieveAPIView):
    serializer_class = s.AdapterVersionSerializer

    def get_queryset(self):
        return AdapterVersion.objects.owned_by(self.request.user).select_related("line")


def zip_folder(folder: Path) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, path.relative_to(folder))
    buffer.seek(0)
    return buffer


class AdapterVersionDownload(APIView):
    @extend_schema(responses={(200, "application/zip"): bytes})
    def get(self, request, pk):
        version = get_object_or_404(AdapterVersion.objects.owned_by(request.user).select_related("line"), pk=pk)
        folder = Path(version.path)
        if not folder.is_dir():
            return error_response("gone", "The adapter files are missing on the server.", status.HTTP_410_GONE)
        filename = f"{version.line.name}-v{version.version}.zip".replace("/", "_").replace('"', "")
        return FileResponse(zip_folder(folder), as_attachment=True, filename=filename,
                            content_type="application/zip")


class AdapterVersionCompare(APIView):
    @extend_schema(parameters=[OpenApiParameter("ids", str, description="comma-separated version ids")],
                   responses={200: dict})
    def get(self, request):
        raw = request.query_params.get("ids", "")
        try:
            ids = [int(x) for x in raw.split(",") if x.strip()]
        except ValueError:
            raise services.InputError("ids must be comma-separated version ids, e.g. ids=1,2.", field="ids") from None
        if not 1 <= len(ids) <= 4:
            raise services.InputError("Compare 1 to 4 versions at a time.", field="ids")
        versions = {v.pk: v for v in AdapterVersion.objects.owned_by(request.user).select_related("line").filter(pk__in=ids)}
        missing = [i for i in ids if i not in versions]
        if missing:
            return error_response("not_found", f"No adapter version {missing[0]}.", status.HTTP_404_NOT_FOUND)
        ordered = [versions[i] for i in ids]
        from ..compare import compare_versions

        return Response(compare_versions(ordered))


class DeploymentDetail(generics.RetrieveAPIView):
    serializer_class = s.DeploymentSerializer

    def get_queryset(self):
        return Deployment.objects.owned_by(self.request.user)


class WorkerList(generics.ListAPIView):
    serializer_class = s.WorkerSerializer
    queryset = Worker.objects.all()
