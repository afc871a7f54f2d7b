"""REST API for deployments: deploy a version, list, stop, roll back, export the merged model.

Every lookup starts from the requesting user's own objects, so another user's ids are 404.
"""
import zipfile
from pathlib import Path

from django.http import Http404, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import deploy
from ..models import AdapterVersion, Deployment
from ..services import InputError
from .errors import error_response
from .serializers import DeploymentSerializer

BIGINT = 2**63 - 1
STATUS_FOR_CODE = {"not_found": 404, "gone": 410, "no_previous_version": 409, "name_taken": 409}


class DeployRequestSerializer(serializers.Serializer):
    merge = serializers.BooleanField(
        required=False, default=True,
        help_text="Merge the adapter into its base (LoRA, DoRA, IA3, QLoRA). Methods that cannot be merged "
        "(prefix, prompt, adapter layers) are deployed unmerged either way, and the deployment says so.",
    )
    name = serializers.CharField(
        required=False, allow_blank=True, max_length=100,
        help_text="The model name clients send; by default the adapter's name (repointing an existing "
        "deployment of the same adapter to this version).",
    )


DeployResponse = inline_serializer("DeployResponse", {"deployment": DeploymentSerializer()})


def owned(model, user, pk, **select):
    if pk > BIGINT:
        raise Http404
    queryset = model.objects.owned_by(user)
    if select.get("related"):
        queryset = queryset.select_related(*select["related"])
    return get_object_or_404(queryset, pk=pk)


def input_error(exc: InputError):
    details = {"field": exc.field} if exc.field else None
    return error_response(exc.code, str(exc), STATUS_FOR_CODE.get(exc.code, 400), details)


class VersionDeploy(APIView):
    @extend_schema(request=DeployRequestSerializer, responses={202: DeployResponse})
    def post(self, request, pk):
        version = owned(AdapterVersion, request.user, pk, related=["line", "base_model"])
        body = DeployRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            deployment = deploy.deploy_version(
                request.user, version, merge=body.validated_data["merge"], name=body.validated_data.get("name", "")
            )
        except InputError as exc:
            return input_error(exc)
        data = DeploymentSerializer(deployment, context={"request": request}).data
        return Response({"deployment": data}, status=status.HTTP_202_ACCEPTED)


class DeploymentList(generics.ListAPIView):
    serializer_class = DeploymentSerializer

    def get_queryset(self):
        queryset = Deployment.objects.owned_by(self.request.user)
        wanted = self.request.query_params.get("status")
        return queryset.filter(status=wanted) if wanted else queryset


class DeploymentStop(APIView):
    @extend_schema(request=None, responses={200: DeploymentSerializer})
    def post(self, request, pk):
        deployment = deploy.stop(owned(Deployment, request.user, pk))
        return Response(DeploymentSerializer(deployment, context={"request": request}).data)


class DeploymentRollback(APIView):
    @extend_schema(request=None, responses={202: DeploymentSerializer})
    def post(self, request, pk):
        deployment = owned(Deployment, request.user, pk)
        try:
            deployment = deploy.rollback(deployment)
        except InputError as exc:
            return input_error(exc)
        data = DeploymentSerializer(deployment, context={"request": request}).data
        return Response(data, status=status.HTTP_202_ACCEPTED)


class DeploymentExport(APIView):
    @extend_schema(responses={(200, "application/zip"): bytes})
    def get(self, request, pk):
        deployment = owned(Deployment, request.user, pk)
        problem = export_problem(deployment)
        if problem:
            return error_response(*problem)
        return zip_response(Path(deployment.path), f"{deployment.name}-merged.zip")


class DeploymentGGUF(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): bytes})
    def get(self, request, pk, kind):
        """The merged model as GGUF (kind f16 or q8_0) for llama.cpp/Ollama, or its Ollama Modelfile."""
        from ..gguf_exports import gguf_problem, gguf_response

        deployment = owned(Deployment, request.user, pk)
        problem = gguf_problem(deployment, kind)
        if problem:
            return error_response(*problem)
        return gguf_response(deployment, kind)


def export_problem(deployment: Deployment):
    """(code, message, http status) when the deployment has no merged model to download, else None."""
    if not deployment.path:
        if deployment.status in (Deployment.Status.MERGING, Deployment.Status.LOADING) and deployment.merge:
            return "not_ready", "The merge has not finished yet; try again when the deployment is live.", 409
        return (
            "not_merged",
            "This deployment serves the adapter unmerged, so there is no merged model to export; download the "
            f"adapter instead (/api/v1/adapter-versions/{deployment.version_id}/download).",
            409,
        )
    if not Path(deployment.path).is_dir():
        return "gone", "The merged model files are missing on the server.", 410
    return None


class _Sink:
    """A write-only file for zipfile that hands out what was written since the last call."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.offset = 0

    def write(self, data):
        self.parts.append(bytes(data))
        self.offset += len(data)
        return len(data)

    def tell(self):
        return self.offset

    def seek(self, *args):  # zipfile then writes data descriptors instead of seeking back
        raise OSError("not seekable")

    def flush(self):
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def stream_zip(folder: Path, chunk_bytes: int = 1 << 20):
    """Yields a zip of `folder` piece by piece, never holding a whole (multi-GB) weight file in memory."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            info = zipfile.ZipInfo.from_file(path, str(path.relative_to(folder)))
            with path.open("rb") as source, archive.open(info, "w", force_zip64=True) as target:
                while block := source.read(chunk_bytes):
                    target.write(block)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


def zip_response(folder: Path, filename: str) -> StreamingHttpResponse:
    filename = filename.replace("/", "_").replace('"', "")
    response = StreamingHttpResponse(stream_zip(folder), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
