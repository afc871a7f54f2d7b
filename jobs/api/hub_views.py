"""REST API for base models from the Hugging Face Hub (issue 34): look before pulling, pull, cancel, and the Hub
token (set or removed, never read back). jobs/hub_pulls.py and jobs/hub_tokens.py hold the rules."""
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import hub_pulls, hub_tokens
from ..models import BaseModel
from . import serializers as s


class PullRequestSerializer(serializers.Serializer):
    repo_id = s.StrictCharField(max_length=300, help_text="a Hub model id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    revision = s.StrictCharField(max_length=200, required=False, allow_blank=True, default="",
                                 help_text="branch, tag or commit (default main)")
    confirm = s.StrictBooleanField(default=False, help_text="false: only show what would be fetched; true: pull")
    trust_remote_code = s.StrictBooleanField(default=False, help_text="administrators only")


class PullPreviewSerializer(serializers.Serializer):
    repo_id = serializers.CharField()
    revision = serializers.CharField()
    commit = serializers.CharField()
    kind = serializers.CharField(help_text="safetensors, or gguf (converted after the download)")
    files = serializers.ListField(child=serializers.DictField())
    total_bytes = serializers.IntegerField()
    needed_bytes = serializers.IntegerField(help_text="0 when the same commit is already stored")
    free_bytes = serializers.IntegerField()
    disk_ok = serializers.BooleanField()
    license = serializers.CharField()
    gated = serializers.BooleanField()
    architecture = serializers.CharField()
    parameters = serializers.IntegerField()
    context_length = serializers.IntegerField(allow_null=True)
    existing = serializers.IntegerField(allow_null=True, help_text="id of the stored model, if already pulled")


class HubTokenSerializer(serializers.Serializer):
    token = s.StrictCharField(max_length=400, allow_blank=True, help_text="empty removes it")
    site = s.StrictBooleanField(default=False, help_text="the site's token (administrators only)")


class HubTokenStatusSerializer(serializers.Serializer):
    user_set = serializers.BooleanField()
    user_set_at = serializers.DateTimeField(allow_null=True)
    site_set = serializers.BooleanField()
    site_set_at = serializers.DateTimeField(allow_null=True)


def preview_data(info: dict) -> dict:
    data = {name: info[name] for name in PullPreviewSerializer().fields if name in info}
    data["existing"] = info["existing"].pk if info["existing"] is not None else None
    data["context_length"] = (info["config"] or {}).get("max_position_embeddings")
    return data


class BaseModelPull(APIView):
    parser_classes = (JSONParser,)

    @extend_schema(request=PullRequestSerializer,
                   responses={200: PullPreviewSerializer, 202: s.BaseModelSerializer},
                   summary="Pull a base model from the Hugging Face Hub (confirm=false: only show size, licence, "
                           "architecture and whether it fits on disk)")
    def post(self, request):
        body = PullRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        args = (request.user, data["repo_id"], data["revision"], data["trust_remote_code"])
        if not data["confirm"]:
            return Response(preview_data(hub_pulls.preview_pull(*args)))
        model, started = hub_pulls.start_pull(*args)
        return Response(s.BaseModelSerializer(model).data,
                        status=status.HTTP_202_ACCEPTED if started else status.HTTP_200_OK)


class BaseModelPullCancel(APIView):
    @extend_schema(request=None, responses={200: s.BaseModelSerializer}, summary="Cancel a pull under way")
    def post(self, request, pk):
        model = BaseModel.visible_to(request.user).get_or_404(pk)
        return Response(s.BaseModelSerializer(hub_pulls.cancel_pull(request.user, model)).data)


class HubTokenView(APIView):
    parser_classes = (JSONParser,)

    @extend_schema(responses={200: HubTokenStatusSerializer}, summary="Whether a Hub token is set (never the token)")
    def get(self, request):
        return Response(hub_tokens.token_status(request.user))

    @extend_schema(request=HubTokenSerializer, responses={200: HubTokenStatusSerializer},
                   summary="Set (or with an empty token remove) your Hugging Face token, or the site's")
    def post(self, request):
        body = HubTokenSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        hub_tokens.set_token(request.user, body.validated_data["token"], site=body.validated_data["site"])
        return Response(hub_tokens.token_status(request.user))
