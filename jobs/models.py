"""What the platform stores. The database is the source of truth for every status; Celery only carries work."""
import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.http import Http404
from django.utils import timezone

from finetune.methods import method_names

User = settings.AUTH_USER_MODEL

# Ids are PostgreSQL bigints; a larger number names no object (and must not reach the database as one).
MAX_ID = 2**63 - 1


class ObjectNotFound(Http404):
    """No such object for this user. The message names it ("No dataset 5."): pages answer 404, the REST API
    shows the message in its not_found error, /v1 turns it into OpenAI's model_not_found."""


class OwnedQuerySet(models.QuerySet):
    """Every lookup of a user's objects, for pages, the REST API and /v1 alike, is
    `Model.objects.owned_by(user)[.select_related(...)].get_or_404(pk)`: another user's id, a malformed id and one
    beyond the bigint range are all the same unknown id."""

    owner_field = "owner"

    def owned_by(self, user):
        return self.filter(**{self.owner_field: user})

    def get_or_404(self, pk=None, **fields):
        """The object of this queryset with this id (or these field values); else ObjectNotFound."""
        label = getattr(self.model, "lookup_label", None) or self.model._meta.verbose_name
        if pk is not None:
            try:
                number = int(pk)
            except (TypeError, ValueError):
                number = 0
            if isinstance(pk, bool) or not 0 < number <= MAX_ID:
                raise ObjectNotFound(f"No {label} {pk}.")
            fields["pk"] = number
        found = self.filter(**fields).first()
        if found is None:
            wanted = fields.pop("pk", None)
            named = ", ".join(f"{key} {value!r}" for key, value in fields.items())
            raise ObjectNotFound(f"No {label} {wanted}." if wanted is not None else f"No {label} with {named}.")
        return found


class BaseModel(models.Model):
    """A Hugging Face model folder on the server. owner=None means shared with every user (the default model)."""

    owner = models.ForeignKey(User, null=True, blank=True, on_delete=models.CASCADE, related_name="base_models")
    name = models.CharField(max_length=200)
    path = models.CharField(max_length=1000)
    architecture = models.CharField(max_length=200, blank=True)
    model_type = models.CharField(max_length=100, blank=True)
    parameters = models.BigIntegerField(default=0)
    config = models.JSONField(default=dict)
    sha256 = models.CharField(max_length=64, blank=True)
    is_default = models.BooleanField(default=False)
    has_chat_template = models.BooleanField(default=False)
    trust_remote_code = models.BooleanField(default=False, help_text="Only an admin may turn this on.")
    created_at = models.DateTimeField(default=timezone.now)
    # issue 34: a model pulled from the Hugging Face Hub (jobs/hub_pulls.py, jobs/services/hub_download.py) goes
    # pending -> downloading -> validating -> ready, or failed / cancelled; a registered folder is ready at once.
    status = models.CharField(max_length=20, default="ready", choices=[(s, s) for s in (
        "pending", "downloading", "validating", "ready", "failed", "cancelled")])
    hub_repo = models.CharField(max_length=200, blank=True)
    hub_revision = models.CharField(max_length=200, blank=True)
    hub_commit = models.CharField(max_length=64, blank=True)
    hub_endpoint = models.CharField(max_length=500, blank=True)
    pulled_by = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    token_source = models.CharField(max_length=10, blank=True, help_text="whose Hub token the pull uses: user, site")
    license = models.CharField(max_length=200, blank=True)
    dtype = models.CharField(max_length=20, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    files = models.JSONField(default=list, blank=True)
    bytes_total = models.BigIntegerField(default=0)
    bytes_done = models.BigIntegerField(default=0)
    error = models.TextField(blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.IntegerField(default=0)

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-is_default", "name"]

    def __str__(self):
        return self.name

    @classmethod
    def visible_to(cls, user):
        return cls.objects.filter(models.Q(owner__isnull=True) | models.Q(owner=user))

    @classmethod
    def ready_for(cls, user):
        """The models a user may train on now (a pull still downloading is listed, not offered)."""
        return cls.visible_to(user).filter(status="ready")


class HubToken(models.Model):
    """A Hugging Face access token, encrypted at rest (jobs/hub_tokens.py); owner None is the site's token, set by
    an administrator. The token itself is never shown again, logged, or sent in a response."""

    owner = models.OneToOneField(User, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    encrypted = models.TextField()
    set_at = models.DateTimeField(default=timezone.now)

    def __str__(self):
        return f"Hub token of {self.owner or 'the site'} (set {self.set_at:%Y-%m-%d})"


class Dataset(models.Model):
    class Status(models.TextChoices):
        VALIDATING = "validating"
        READY = "ready"
        INVALID = "invalid"

    owner = models.ForeignKey(User, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200)
    original_filename = models.CharField(max_length=300, blank=True)
    content_hash = models.CharField(max_length=64, db_index=True)
    options_hash = models.CharField(max_length=64, default="", help_text="Hash of validation file and settings.")
    file_path = models.CharField(max_length=1000)
    size_bytes = models.BigIntegerField(default=0)
    validation_file_path = models.CharField(max_length=1000, blank=True)
    validation_fraction = models.FloatField(default=0.1)
    split_seed = models.IntegerField(default=42)
    base_model = models.ForeignKey(BaseModel, null=True, blank=True, on_delete=models.SET_NULL)
    schema_override = models.CharField(max_length=40, blank=True)
    column_map = models.JSONField(default=dict, blank=True)
    drop_invalid = models.BooleanField(default=False)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.VALIDATING)
    progress = models.FloatField(default=0.0)
    format = models.CharField(max_length=20, blank=True)
    schema = models.CharField(max_length=40, blank=True)
    rows = models.IntegerField(default=0)
    train_rows = models.IntegerField(default=0)
    validation_rows = models.IntegerField(default=0)
    report = models.JSONField(default=dict, blank=True)
    token_stats = models.JSONField(default=dict, blank=True)
    preview = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    train_path = models.CharField(max_length=1000, blank=True)
    validation_path = models.CharField(max_length=1000, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # The processing worker's lease: set when it starts, renewed while it works; a stale one means it died.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.IntegerField(default=0)

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "content_hash", "options_hash"], name="dataset_version_unique")
        ]

    def __str__(self):
        return self.name


class JobStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


METHODS = method_names()


class FineTuneJob(models.Model):
    ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
    lookup_label = "job"

    owner = models.ForeignKey(User, on_delete=models.CASCADE, related_name="jobs")
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT)
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT)
    method = models.CharField(max_length=20, default="auto")
    overrides = models.JSONField(default=dict, blank=True)
    plan = models.JSONField(default=dict)
    adapter_name = models.CharField(max_length=200)
    status = models.CharField(max_length=20, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True)
    progress = models.FloatField(default=0.0)
    step = models.IntegerField(default=0)
    total_steps = models.IntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    # The lease: which worker process holds the job and until when. Another worker may take it only after expiry.
    worker = models.CharField(max_length=200, blank=True)
    lease_token = models.CharField(max_length=64, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.IntegerField(default=0)
    log_tail = models.TextField(blank=True)
    # The phases of the current attempt, before and after the steps (jobs/phases.py): written by the worker.
    phases = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"Job {self.pk} ({self.adapter_name})"

    @property
    def is_active(self):
        return self.status in self.ACTIVE

    @property
    def checkpoint_dir(self):
        return settings.CHECKPOINT_DIR / f"job-{self.pk}"


class JobNode(models.Model):
    """One worker's part of a job trained across several workers (issue 36): node 0 is the worker that claimed
    the job and opened the c10d rendezvous; the others join it (jobs/node_join.py). The rows are the placement the
    job page and the API show, and how a joining worker reports its own failure."""

    WAITING, JOINED, FINISHED, FAILED = "waiting", "joined", "finished", "failed"

    job = models.ForeignKey(FineTuneJob, on_delete=models.CASCADE, related_name="nodes")
    node_rank = models.PositiveIntegerField()
    worker = models.CharField(max_length=255, blank=True)  # the Celery worker's name, once it has joined
    ranks = models.JSONField(default=list)  # the global ranks this node trains
    rendezvous = models.CharField(max_length=255)  # host:port of node 0's c10d rendezvous
    status = models.CharField(max_length=16, default=WAITING)
    error = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)  # a joined node touches it while it trains

    class Meta:
        ordering = ["node_rank"]
        constraints = [models.UniqueConstraint(fields=["job", "node_rank"], name="one_row_per_job_node")]


class MetricPoint(models.Model):
    # The measured series, named as the trainer's on_progress reports them: the recorder, the REST API and the
    # downsampled charts all read this one list.
    SERIES = ("train_loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "memory_bytes")

    job = models.ForeignKey(FineTuneJob, on_delete=models.CASCADE, related_name="metric_points")
    step = models.IntegerField()
    train_loss = models.FloatField(null=True)
    eval_loss = models.FloatField(null=True)
    learning_rate = models.FloatField(null=True)
    grad_norm = models.FloatField(null=True)
    tokens_per_second = models.FloatField(null=True)
    memory_bytes = models.BigIntegerField(null=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["step", "id"]
        indexes = [models.Index(fields=["job", "step"])]


class JobEvent(models.Model):
    job = models.ForeignKey(FineTuneJob, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=40)
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]


class AdapterLine(models.Model):
    """A named adapter ("support-intents") whose trainings are its versions v1, v2, ..."""

    owner = models.ForeignKey(User, on_delete=models.CASCADE, related_name="adapter_lines")
    name = models.CharField(max_length=200)
    champion = models.ForeignKey("AdapterVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="adapter_line_unique")]

    def __str__(self):
        return self.name


class AdapterVersion(models.Model):
    """Immutable once made: lineage, plan and metrics are written with it and never edited."""

    owner = models.ForeignKey(User, on_delete=models.CASCADE, related_name="adapter_versions")
    line = models.ForeignKey(AdapterLine, on_delete=models.CASCADE, related_name="versions")
    version = models.IntegerField()
    job = models.OneToOneField(FineTuneJob, null=True, on_delete=models.SET_NULL, related_name="adapter_version")
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT)
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT)
    method = models.CharField(max_length=20)
    path = models.CharField(max_length=1000)
    plan = models.JSONField(default=dict)
    metrics = models.JSONField(default=dict)
    generations = models.JSONField(default=list)
    lineage = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now)

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["line", "version"], name="adapter_version_unique")]

    def __str__(self):
        return f"{self.line.name} v{self.version}"

    @property
    def label(self):
        return f"{self.line.name} v{self.version}"

    # What a version is. Evaluations added later live under metrics["evaluation"]; every other metric is fixed.
    IMMUTABLE_FIELDS = ("owner_id", "line_id", "version", "base_model_id", "dataset_id", "method", "path", "plan",
                        "generations", "lineage", "created_at")

    def save(self, *args, **kwargs):
        if self.pk is not None and not kwargs.get("force_insert"):
            self._refuse_lineage_changes()
        super().save(*args, **kwargs)

    def _refuse_lineage_changes(self):
        from django.core.exceptions import ValidationError

        stored = type(self).objects.filter(pk=self.pk).values(*self.IMMUTABLE_FIELDS, "metrics").first()
        if stored is None:
            return

        def training_metrics(metrics):
            return {k: v for k, v in (metrics or {}).items() if k != "evaluation"}

        changed = [f for f in self.IMMUTABLE_FIELDS if stored[f] != getattr(self, f)]
        if training_metrics(stored["metrics"]) != training_metrics(self.metrics):
            changed.append("metrics")
        if changed:
            raise ValidationError(f"{self.label} is immutable; refused to change {', '.join(changed)}. "
                                  "Train a new version instead.")


class Deployment(models.Model):
    class Status(models.TextChoices):
        MERGING = "merging"
        LOADING = "loading"
        LIVE = "live"
        FAILED = "failed"
        STOPPED = "stopped"

    owner = models.ForeignKey(User, on_delete=models.CASCADE, related_name="deployments")
    # None once the version it served was deleted (jobs.versions.delete_version, only while the deployment is
    # stopped or failed): the record, its name and history stay, and details["deleted_version"] says what it was.
    version = models.ForeignKey(AdapterVersion, null=True, blank=True, on_delete=models.PROTECT,
                                related_name="deployments")
    name = models.CharField(max_length=200, unique=True)
    merge = models.BooleanField(default=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.MERGING)
    path = models.CharField(max_length=1000, blank=True)
    error = models.TextField(blank=True)
    details = models.JSONField(default=dict, blank=True)
    # Bumped by every deploy, rollback and stop: work started for an older revision (a merge task, a load in the
    # inference server) must not overwrite the newer state.
    revision = models.IntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return self.name

    @property
    def version_deleted(self) -> dict | None:
        """{"id", "label", "line_id", "deleted_at"} of the deleted version it served, else None."""
        return (self.details or {}).get("deleted_version") if self.version_id is None else None

    @property
    def version_label(self) -> str:
        """The version it serves or served ("support v2"), also once that version is deleted."""
        if self.version_id is not None:
            return self.version.label
        return (self.version_deleted or {}).get("label") or (self.details or {}).get("version_label") or ""


class TokenQuerySet(OwnedQuerySet):
    owner_field = "user"

    def usable(self, now=None):
        """Neither revoked nor expired."""
        now = now or timezone.now()
        return self.filter(revoked_at__isnull=True).filter(models.Q(expires_at__isnull=True) |
                                                            models.Q(expires_at__gt=now))


class ApiToken(models.Model):
    """Only a hash is stored; the token itself is shown once, when made. expires_at None: never expires."""

    lookup_label = "API token"

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, default="token")
    prefix = models.CharField(max_length=12)
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)  # issue 31
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = TokenQuerySet.as_manager()

    PREFIX = "td_"

    @staticmethod
    def hash(raw: str) -> str:
        return hashlib.sha256(raw.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name="token", expires_at=None):
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, prefix=raw[:10], token_hash=cls.hash(raw),
                                   expires_at=expires_at)
        return token, raw

    def is_expired(self, now=None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    @property
    def state(self) -> str:
        """active, expired or revoked (revoked wins: it was a person's decision)."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.is_expired() else "active"


class Worker(models.Model):
    """A Celery worker process as it last reported itself."""

    hostname = models.CharField(max_length=255, unique=True)
    inventory = models.JSONField(default=dict)
    queues = models.CharField(max_length=200, blank=True)
    current_job = models.ForeignKey(FineTuneJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    started_at = models.DateTimeField(default=timezone.now)
    last_heartbeat = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["hostname"]

    def is_alive(self, now=None):
        now = now or timezone.now()
        return (now - self.last_heartbeat).total_seconds() < 3 * settings.WORKER_HEARTBEAT_SECONDS


# ---- issue 20 (search stage): one row per Optuna trial of a job's search, written by jobs/search.py ----
class SearchTrial(models.Model):
    class State(models.TextChoices):
        RUNNING = "running"
        COMPLETE = "complete"
        PRUNED = "pruned"
        FAILED = "failed"

    job = models.ForeignKey(FineTuneJob, on_delete=models.CASCADE, related_name="search_trials")
    number = models.IntegerField()  # the Optuna trial number, 0-based
    params = models.JSONField(default=dict)
    state = models.CharField(max_length=20, choices=State.choices, default=State.RUNNING)
    score = models.FloatField(null=True)
    metric = models.CharField(max_length=40, blank=True)  # exact_match, token_f1 or eval_loss
    curve = models.JSONField(default=list, blank=True)  # [[step, eval_loss], ...]
    duration = models.FloatField(default=0.0)  # seconds
    reason = models.TextField(blank=True)  # why pruned or failed
    worker = models.CharField(max_length=200, blank=True)
    winner = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["number"]
        constraints = [models.UniqueConstraint(fields=["job", "number"], name="one_row_per_search_trial")]
