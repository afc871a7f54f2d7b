"""REST API for deployments: deploy a version, list, stop, roll back, export the merged model.

Every lookup starts from the requesting user's own objects, so another user's ids are 404.
"""
from pathlib import Path

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import deploy
from ..archives import zip_response
from ..models import AdapterVersion, Deployment
from ..services import InputError
from .errors import error_response
from .serializers import DeploymentSerializer

STATUS_FOR_CODE = {"not_found": 404, "gone": 410, "no_previous_version": 409, "name_taken": 409,
                   "version_deleted": 409}


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


def input_error(exc: InputError):
    details = {"field": exc.field} if exc.field else None
    return error_response(exc.code, str(exc), STATUS_FOR_CODE.get(exc.code, 400), details)


class VersionDeploy(APIView):
    @extend_schema(request=DeployRequestSerializer, responses={202: DeployResponse})
    def post(self, request, pk):
        version = AdapterVersion.objects.owned_by(request.user).select_related("line", "base_model").get_or_404(pk)
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
        queryset = Deployment.objects.owned_by(self.request.user).select_related("version__line")
        wanted = self.request.query_params.get("status")
        return queryset.filter(status=wanted) if wanted else queryset


class DeploymentStop(APIView):
    @extend_schema(request=None, responses={200: DeploymentSerializer})
    def post(self, request, pk):
        deployment = deploy.stop(Deployment.objects.owned_by(request.user).get_or_404(pk))
        return Response(DeploymentSerializer(deployment, context={"request": request}).data)


class DeploymentRollback(APIView):
    @extend_schema(request=None, responses={202: DeploymentSerializer})
    def post(self, request, pk):
        deployment = Deployment.objects.owned_by(request.user).get_or_404(pk)
        try:
            deployment = deploy.rollback(deployment)
        except InputError as exc:
            return input_error(exc)
        data = DeploymentSerializer(deployment, context={"request": request}).data
        return Response(data, status=status.HTTP_202_ACCEPTED)


class DeploymentExport(APIView):
    @extend_schema(responses={(200, "application/zip"): bytes})
    def get(self, request, pk):
        deployment = Deployment.objects.owned_by(request.user).get_or_404(pk)
        problem = deploy.export_problem(deployment)
        if problem:
            return error_response(*problem)
        return zip_response(Path(deployment.path), f"{deployment.name}-merged.zip")


class DeploymentGGUF(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): bytes})
    def get(self, request, pk, kind):
        """The merged model as GGUF (kind f16 or q8_0) for llama.cpp/Ollama, or its Ollama Modelfile."""
        from ..gguf_exports import gguf_problem, gguf_response

        deployment = Deployment.objects.owned_by(request.user).get_or_404(pk)
        problem = gguf_problem(deployment, kind)
        if problem:
            return error_response(*problem)
        return gguf_response(deployment, kind)
