from rest_framework import serializers

from ..models import (
    METHODS,
    AdapterVersion,
    ApiToken,
    BaseModel,
    Dataset,
    Deployment,
    FineTuneJob,
    JobEvent,
    MetricPoint,
    Worker,
)
from ..tokens import MAX_DAYS as MAX_TOKEN_DAYS

METHOD_HELP = f"auto (the planner chooses), or one of the registered methods: {', '.join(METHODS)}"


class StrictCharField(serializers.CharField):
    """For JSON bodies: a number or a boolean where text is expected is an error, not silently str()-ed."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """For JSON bodies: only true or false (not 0, 1 or "yes")."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class TokenExpiryFields(serializers.Serializer):
    """When a new token stops working (issue 31): one of the two, or neither."""

    expires_in_days = serializers.IntegerField(required=False, min_value=1, max_value=MAX_TOKEN_DAYS,
                                               help_text="the token expires this many days from now")
    expires_at = serializers.DateTimeField(required=False, help_text="the token expires at this time (ISO 8601)")


class TokenRequestSerializer(TokenExpiryFields):
    username = StrictCharField(max_length=150)
    password = StrictCharField(max_length=256, trim_whitespace=False)
    name = StrictCharField(required=False, allow_blank=True, max_length=100,
                                 help_text="a label for the token in the token list (default: api)")


class ApiTokenSerializer(serializers.ModelSerializer):
    """A token as listed: only its first characters, never the token or its hash."""

    active = serializers.SerializerMethodField(help_text="neither revoked nor expired")
    state = serializers.SerializerMethodField(help_text="active, expired or revoked")

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at", "active",
                  "state"]

    def get_active(self, obj) -> bool:
        return obj.state == "active"

    def get_state(self, obj) -> str:
        return obj.state


class ApiTokenCreateSerializer(TokenExpiryFields):
    name = StrictCharField(required=False, allow_blank=True, max_length=100,
                           help_text="a label for the token in the token list (default: token)")


class ApiTokenCreatedSerializer(ApiTokenSerializer):
    token = serializers.CharField(read_only=True, help_text="shown once; only its hash is stored")

    class Meta(ApiTokenSerializer.Meta):
        fields = ApiTokenSerializer.Meta.fields + ["token"]


class TokenRevokeSerializer(serializers.Serializer):
    """Exactly one of ids, all or name; only ever the caller's own tokens."""

    ids = serializers.ListField(child=serializers.IntegerField(min_value=1), required=False,
                                help_text="these tokens (404, and nothing revoked, if one is not yours)")
    all = StrictBooleanField(required=False, help_text="true: every token of yours, this one included")
    name = StrictCharField(required=False, max_length=100, help_text="every token of yours with this name")


class TokenRevokedSerializer(serializers.Serializer):
    revoked = serializers.ListField(child=serializers.IntegerField(), help_text="ids revoked by this request")
    count = serializers.IntegerField()


class BaseModelSerializer(serializers.ModelSerializer):
    shared = serializers.SerializerMethodField()
    context_length = serializers.SerializerMethodField()

    class Meta:
        model = BaseModel
        fields = ["id", "name", "architecture", "model_type", "parameters", "sha256", "is_default",
                  "has_chat_template", "shared", "created_at",
                  # issue 34: pulled from the Hub (status pending/downloading/validating/ready/failed/cancelled)
                  "status", "hub_repo", "hub_revision", "hub_commit", "license", "dtype", "size_bytes",
                  "bytes_done", "bytes_total", "error", "context_length"]

    def get_shared(self, obj) -> bool:
        return obj.owner_id is None

    def get_context_length(self, obj) -> int | None:
        config = obj.config or {}
        return config.get("max_position_embeddings") or config.get("n_positions") or None


class BaseModelCreateSerializer(serializers.Serializer):
    """Administrators only; the folder must lie inside TUNEDECK_MODEL_ROOTS and outside the data directory."""

    name = StrictCharField(max_length=200)
    path = StrictCharField(max_length=1000, help_text="absolute path of a Hugging Face model folder on the server")
    shared = StrictBooleanField(default=True, help_text="every user may use it (false: only you)")

    def validate(self, attrs):
        if "trust_remote_code" in self.initial_data:
            raise serializers.ValidationError({"trust_remote_code": "A model's own code is allowed only from the "
                                               "server's command line: manage.py register_model --trust-remote-code."})
        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({unknown[0]: "Unknown field; the fields are name, path and shared."})
        return attrs


class DatasetSerializer(serializers.ModelSerializer):
    errors = serializers.SerializerMethodField()
    problem_counts = serializers.SerializerMethodField()
    base_model = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)

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


class DatasetCreatedSerializer(DatasetSerializer):
    reused = serializers.BooleanField(read_only=True, help_text="true when the same file and settings were "
                                      "uploaded before; that version is returned (status 200)")

    class Meta(DatasetSerializer.Meta):
        fields = DatasetSerializer.Meta.fields + ["reused"]


class DatasetUploadSerializer(serializers.Serializer):
    file = serializers.FileField()
    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    base_model = serializers.IntegerField(required=False, allow_null=True)
    validation_file = serializers.FileField(required=False, allow_null=True)
    validation_fraction = serializers.FloatField(required=False, allow_null=True)
    schema = serializers.CharField(required=False, allow_blank=True, max_length=40)
    column_map = serializers.JSONField(required=False)
    drop_invalid = serializers.BooleanField(required=False, default=False)


class DatasetMappingSerializer(serializers.Serializer):
    schema = serializers.JSONField(required=False, help_text="the layout the rows are in, e.g. prompt_completion")
    column_map = serializers.JSONField(required=False, help_text='our field -> your column, e.g. {"prompt": '
                                       '"question", "completion": "reply"}; columns as report.columns lists them')

    def validate(self, attrs):
        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({unknown[0]: "Unknown field; the fields are schema and column_map."})
        return attrs


class MappingPreviewSerializer(serializers.Serializer):
    schema = serializers.CharField()
    column_map = serializers.DictField(child=serializers.CharField())
    columns = serializers.ListField(child=serializers.CharField(), help_text="the file's columns, as detected")
    rows = serializers.ListField(child=serializers.DictField(), help_text='the first rows: {"row", "example"} '
                                 '(the normalised example) or {"row", "problem"}')


BYTES = {"min_value": 0, "max_value": 2**53}


class GpuSerializer(serializers.Serializer):
    index = serializers.IntegerField(required=False, min_value=0, max_value=1024)
    name = StrictCharField(required=False, allow_blank=True, max_length=200)
    total_bytes = serializers.IntegerField(required=False, **BYTES)
    free_bytes = serializers.IntegerField(**BYTES)
    compute_capability = StrictCharField(required=False, allow_blank=True, max_length=20)
    bf16 = StrictBooleanField(required=False, default=False)


class CpuSerializer(serializers.Serializer):
    cores = serializers.IntegerField(required=False, min_value=0, max_value=100_000)
    ram_total_bytes = serializers.IntegerField(required=False, **BYTES)
    ram_available_bytes = serializers.IntegerField(required=False, **BYTES)


class InventorySerializer(serializers.Serializer):
    """What autotune.probe() reports; plan for this hardware instead of the live workers'."""

    gpus = GpuSerializer(many=True, required=False)
    cpu = CpuSerializer(required=False)


class PlanRequestSerializer(serializers.Serializer):
    base_model = serializers.IntegerField(required=False, allow_null=True)
    dataset = serializers.IntegerField(required=False, allow_null=True)
    method = StrictCharField(required=False, default="auto", max_length=20, help_text=METHOD_HELP)
    overrides = serializers.JSONField(required=False, allow_null=True,
                                      help_text="plan fields to fix, e.g. {\"rank\": 16}")
    gpu = InventorySerializer(required=False, allow_null=True)


class JobCreateSerializer(serializers.Serializer):
    base_model = serializers.IntegerField(required=False, allow_null=True)
    dataset = serializers.IntegerField()
    method = StrictCharField(required=False, default="auto", max_length=20, help_text=METHOD_HELP)
    overrides = serializers.JSONField(required=False, allow_null=True)
    adapter_name = StrictCharField(required=False, allow_blank=True, max_length=200)


class JobCloneSerializer(serializers.Serializer):
    """Every field optional: the new job takes the source job's settings, changed by what is given here.
    overrides are merged into the source's (a null value removes that override)."""

    base_model = serializers.IntegerField(required=False, allow_null=True)
    dataset = serializers.IntegerField(required=False)
    method = StrictCharField(required=False, max_length=20, help_text=METHOD_HELP)
    overrides = serializers.JSONField(required=False, allow_null=True)
    adapter_name = StrictCharField(required=False, allow_blank=True, max_length=200)


class PlanMemorySerializer(serializers.Serializer):
    total_bytes = serializers.IntegerField()
    breakdown = serializers.DictField(child=serializers.FloatField(), help_text="bytes per part")
    capacity_bytes = serializers.IntegerField(allow_null=True)


class PlanSerializer(serializers.Serializer):
    """The plan; extra keys (dropout, max_steps, warmup_ratio, ...) appear when set. See docs/internals.md."""

    method = serializers.CharField()
    rank = serializers.IntegerField(allow_null=True)
    alpha = serializers.FloatField(allow_null=True)
    target_modules = serializers.JSONField(help_text='a list of module names, or "all-linear"')
    micro_batch = serializers.IntegerField()
    grad_accum = serializers.IntegerField()
    max_seq_len = serializers.IntegerField()
    gradient_checkpointing = serializers.BooleanField()
    learning_rate = serializers.FloatField()
    epochs = serializers.FloatField()
    memory = PlanMemorySerializer()
    reasons = serializers.ListField(child=serializers.CharField())
    warnings = serializers.ListField(child=serializers.CharField(), required=False)
    fits = serializers.BooleanField(required=False)
    device = serializers.CharField(required=False)
    dtype = serializers.CharField(required=False)
    # issue 36 (docs/distributed.md): the ranks the plan trains on; grad_accum is per rank
    gpus = serializers.IntegerField(required=False, help_text="the world size: GPUs, or processes on a CPU")
    parallel = serializers.ChoiceField(["ddp", "fsdp"], required=False,
                                       help_text="with gpus > 1: data parallel, or the frozen base sharded (FSDP2)")
    global_batch = serializers.IntegerField(required=False, help_text="micro_batch x grad_accum x gpus")


def _queue_place(queue, key, request) -> dict | None:
    """{"queue", "position", "ahead", "waiting_for"} while the work waits in its Celery queue (jobs.waiting)."""
    from ..waiting import place

    spot = place(queue, key, getattr(request, "user", None))
    return {k: spot[k] for k in ("queue", "position", "ahead", "waiting_for")} if spot else None


class JobSerializer(serializers.ModelSerializer):
    adapter_version = serializers.SerializerMethodField()
    metrics = serializers.SerializerMethodField()
    queue = serializers.SerializerMethodField()
    phase = serializers.SerializerMethodField()
    phases = serializers.SerializerMethodField()
    remaining_seconds = serializers.SerializerMethodField()
    nodes = serializers.SerializerMethodField()

    class Meta:
        model = FineTuneJob
        fields = ["id", "status", "progress", "step", "total_steps", "metrics", "error", "adapter_version",
                  "adapter_name", "method", "base_model", "dataset", "plan", "overrides", "cancel_requested",
                  "worker", "attempts", "created_at", "started_at", "finished_at", "queue", "phase", "phases",
                  "remaining_seconds", "nodes"]

    def get_nodes(self, obj) -> list[dict]:
        """issue 36: a job across several workers: which worker runs which node and ranks (empty on one worker)."""
        return [{"node": n.node_rank, "worker": n.worker, "ranks": n.ranks, "status": n.status,
                 "rendezvous": n.rendezvous, "error": n.error} for n in obj.nodes.all()]

    def get_phase(self, obj) -> str | None:
        """The running phase (jobs/phases.py LABELS): queued, loading, checking_fit, ..., saving; null when done."""
        from ..phases import current

        return current(obj)

    def get_phases(self, obj) -> list[dict]:
        """This attempt's phases, oldest first: name, label, seconds, state (done|current), started_at, ended_at."""
        from ..phases import view

        return view(obj)

    def get_remaining_seconds(self, obj) -> float | None:
        """Time left of a running job from its measured step rate and phase costs; null while not measured."""
        from ..phases import measured_costs, remaining_seconds

        if obj.status != "running":
            return None
        cache = self.context.setdefault("phase_costs", {})
        if obj.base_model_id not in cache:
            cache[obj.base_model_id] = measured_costs([obj.base_model_id]).get(obj.base_model_id, {})
        left = remaining_seconds(obj, costs=cache[obj.base_model_id])
        return round(left, 1) if left is not None else None

    def get_queue(self, obj) -> dict | None:
        if obj.status != "queued":
            return None
        return _queue_place("gpu", f"job:{obj.pk}", self.context.get("request"))

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
        fields = ["step", *MetricPoint.SERIES]


class JobMetricPointSerializer(serializers.Serializer):
    step = serializers.IntegerField()
    train_loss = serializers.FloatField(allow_null=True)
    eval_loss = serializers.FloatField(allow_null=True)
    learning_rate = serializers.FloatField(allow_null=True)
    grad_norm = serializers.FloatField(allow_null=True)
    tokens_per_second = serializers.FloatField(allow_null=True)
    memory_bytes = serializers.FloatField(allow_null=True)


class JobMetricsSerializer(serializers.Serializer):
    job = serializers.IntegerField()
    points = JobMetricPointSerializer(many=True)
    events = JobEventSerializer(many=True)


class AdapterVersionSerializer(serializers.ModelSerializer):
    adapter_name = serializers.CharField(source="line.name", read_only=True)
    is_champion = serializers.SerializerMethodField()

    class Meta:
        model = AdapterVersion
        fields = ["id", "adapter_name", "version", "base_model", "dataset", "method", "plan", "metrics",
                  "lineage", "job", "is_champion", "created_at"]

    def get_is_champion(self, obj) -> bool:
        return obj.line.champion_id == obj.pk


class CompareVersionSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    label = serializers.CharField()
    adapter_name = serializers.CharField()
    version = serializers.IntegerField()
    method = serializers.CharField()
    plan = serializers.JSONField()
    metrics = serializers.JSONField()
    generations = serializers.JSONField()
    curve = JobMetricPointSerializer(many=True)


class CompareSettingSerializer(serializers.Serializer):
    field = serializers.CharField()
    values = serializers.ListField(child=serializers.JSONField(allow_null=True))
    differs = serializers.BooleanField()


class CompareMetricSerializer(serializers.Serializer):
    metric = serializers.CharField()
    values = serializers.ListField(child=serializers.FloatField(allow_null=True))
    best = serializers.IntegerField(allow_null=True, help_text="index of the best version, where one is better")


class CompareGenerationSerializer(serializers.Serializer):
    prompt = serializers.JSONField(allow_null=True)
    reference = serializers.JSONField(allow_null=True)
    outputs = serializers.ListField(child=serializers.CharField(allow_null=True))


class CompareSerializer(serializers.Serializer):
    versions = CompareVersionSerializer(many=True)
    settings = CompareSettingSerializer(many=True)
    metrics = CompareMetricSerializer(many=True)
    generations = CompareGenerationSerializer(many=True)


class DeploymentSerializer(serializers.ModelSerializer):
    endpoint = serializers.SerializerMethodField()
    engine = serializers.SerializerMethodField()
    queue = serializers.SerializerMethodField()
    version_label = serializers.CharField(read_only=True, help_text="the version it serves or served")
    version_deleted = serializers.JSONField(read_only=True, help_text="{id, label, line_id, deleted_at} once the "
                                            "version it served was deleted (version is then null), else null")

    class Meta:
        model = Deployment
        fields = ["id", "name", "status", "merge", "version", "version_label", "version_deleted", "error",
                  "endpoint", "engine", "details", "created_at", "queue"]

    def get_engine(self, obj) -> dict | None:
        """Which engine serves it (vllm or builtin), why, any fallback warning, and loading progress."""
        details = obj.details or {}
        if not details.get("engine"):
            return None
        return {"name": details["engine"], "reason": details.get("engine_reason", ""),
                "warning": details.get("engine_warning", ""), "progress": details.get("engine_progress")}

    def get_queue(self, obj) -> dict | None:
        """Set while status is merging but the merge still waits for a gpu worker (the page says "queued")."""
        from ..waiting import merge_started

        if obj.status != Deployment.Status.MERGING or merge_started(obj):
            return None
        return _queue_place("gpu", f"deployment:{obj.pk}:{obj.revision}", self.context.get("request"))

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
