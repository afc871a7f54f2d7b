from rest_framework import serializers

from ..models import AdapterVersion, BaseModel, Dataset, Deployment, FineTuneJob, JobEvent, MetricPoint, Worker


class TokenRequestSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=256, trim_whitespace=False)


class TokenSerializer(serializers.Serializer):
    token = serializers.CharField()


class BaseModelSerializer(serializers.ModelSerializer):
    shared = serializers.SerializerMethodField()

    class Meta:
        model = BaseModel
        fields = ["id", "name", "architecture", "model_type", "parameters", "sha256", "is_default",
                  "has_chat_template", "shared", "created_at"]

    def get_shared(self, obj) -> bool:
        return obj.owner_id is None


class BaseModelCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    path = serializers.CharField(max_length=1000)


class DatasetSerializer(serializers.ModelSerializer):
    errors = serializers.SerializerMethodField()
    problem_counts = serializers.SerializerMethodField()
    base_model = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = Dataset
        fields = ["id", "name", "status", "progress", "format", "schema", "rows", "train_rows", "validation_rows",
                  "errors", "problem_counts", "error", "token_stats", "content_hash", "size_bytes",
                  "original_filename", "base_model", "validation_fraction", "drop_invalid", "created_at"]

    def get_errors(self, obj) -> list[dict]:
        return [
            {"row": e.get("row"), "kind": e.get("kind"), "message": e.get("message")}
            for e in (obj.report or {}).get("errors", [])
        ]

    def get_problem_counts(self, obj) -> dict:
        return (obj.report or {}).get("problem_counts", {})


class DatasetDetailSerializer(DatasetSerializer):
    class Meta(DatasetSerializer.Meta):
        fields = DatasetSerializer.Meta.fields + ["report", "preview"]


class DatasetUploadSerializer(serializers.Serializer):
    file = serializers.FileField()
    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    base_model = serializers.IntegerField(required=False, allow_null=True)
    validation_file = serializers.FileField(required=False, allow_null=True)
    validation_fraction = serializers.FloatField(required=False, allow_null=True)
    schema = serializers.CharField(required=False, allow_blank=True, max_length=40)
    column_map = serializers.JSONField(required=False)
    drop_invalid = serializers.BooleanField(required=False, default=False)


class PlanRequestSerializer(serializers.Serializer):
    base_model = serializers.IntegerField(required=False, allow_null=True)
    dataset = serializers.IntegerField(required=False, allow_null=True)
    method = serializers.CharField(required=False, default="auto", max_length=20)
    overrides = serializers.JSONField(required=False)
    gpu = serializers.JSONField(required=False)


class JobCreateSerializer(serializers.Serializer):
    base_model = serializers.IntegerField(required=False, allow_null=True)
    dataset = serializers.IntegerField()
    method = serializers.CharField(required=False, default="auto", max_length=20)
    overrides = serializers.JSONField(required=False)
    adapter_name = serializers.CharField(required=False, allow_blank=True, max_length=200)


class JobSerializer(serializers.ModelSerializer):
    adapter_version = serializers.SerializerMethodField()
    metrics = serializers.SerializerMethodField()

    class Meta:
        model = FineTuneJob
        fields = ["id", "status", "progress", "step", "total_steps", "metrics", "error", "adapter_version",
                  "adapter_name", "method", "base_model", "dataset", "plan", "overrides", "cancel_requested",
                  "worker", "attempts", "created_at", "started_at", "finished_at"]

    def get_adapter_version(self, obj) -> int | None:
        version = getattr(obj, "adapter_version", None)
        return version.pk if version else None

    def get_metrics(self, obj) -> dict:
        metrics = dict(obj.metrics or {})
        for key in ("train_loss", "eval_loss", "tokens_per_second"):
            metrics.setdefault(key, None)
        return metrics


class JobEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = JobEvent
        fields = ["kind", "message", "data", "created_at"]


class MetricPointSerializer(serializers.ModelSerializer):
    class Meta:
        model = MetricPoint
        fields = ["step", "train_loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second",
                  "memory_bytes"]


class AdapterVersionSerializer(serializers.ModelSerializer):
    adapter_name = serializers.CharField(source="line.name", read_only=True)
    is_champion = serializers.SerializerMethodField()

    class Meta:
        model = AdapterVersion
        fields = ["id", "adapter_name", "version", "base_model", "dataset", "method", "plan", "metrics",
                  "lineage", "job", "is_champion", "created_at"]

    def get_is_champion(self, obj) -> bool:
        return obj.line.champion_id == obj.pk


class DeploymentSerializer(serializers.ModelSerializer):
    endpoint = serializers.SerializerMethodField()

    class Meta:
        model = Deployment
        fields = ["id", "name", "status", "merge", "version", "error", "endpoint", "details", "created_at"]

    def get_endpoint(self, obj) -> str:
        request = self.context.get("request")
        base = request.build_absolute_uri("/v1") if request else "/v1"
        return base


class WorkerSerializer(serializers.ModelSerializer):
    alive = serializers.SerializerMethodField()

    class Meta:
        model = Worker
        fields = ["hostname", "inventory", "queues", "current_job", "started_at", "last_heartbeat", "alive"]

    def get_alive(self, obj) -> bool:
        return obj.is_alive()
