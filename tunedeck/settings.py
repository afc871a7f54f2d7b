"""Settings come from the environment; with none set, embedded defaults (SQLite, an SQLite-backed Celery
broker) let `scripts/run.sh` work on a bare machine.

Safe by default (README, "Production and security"): DEBUG is off and the SECRET_KEY is random unless a developer
asks otherwise (TUNEDECK_ENV=development or TUNEDECK_DEBUG=1). HTTPS is the reverse proxy's job; TUNEDECK_HTTPS=1
says the site is served over it and switches on Secure cookies, the HTTPS redirect and HSTS."""
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from tunedeck.secretfile import read_or_create_secret


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value in ("1", "true", "yes", "on")


BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("TUNEDECK_DATA_DIR", BASE_DIR / "var")).resolve()
ENVIRONMENT = os.environ.get("TUNEDECK_ENV", "production").strip().lower() or "production"
if ENVIRONMENT not in ("production", "development"):
    raise ImproperlyConfigured(f"TUNEDECK_ENV is {ENVIRONMENT!r}: say production (the default) or development.")
DEVELOPMENT = ENVIRONMENT == "development"
DEBUG = _flag("TUNEDECK_DEBUG", default=DEVELOPMENT)

# Given, or made once at random and kept in the data directory (mode 0600), where every process of this
# installation (web server, workers, inference server) reads the same one.
SECRET_KEY = os.environ.get("SECRET_KEY", "").strip()
SECRET_KEY_FILE = DATA_DIR / "secret-key"
if not SECRET_KEY:
    SECRET_KEY = read_or_create_secret(SECRET_KEY_FILE)
elif len(SECRET_KEY) < 32 and not DEVELOPMENT:
    raise ImproperlyConfigured("SECRET_KEY must be a random string of at least 32 characters (or leave it unset: "
                               f"Tunedeck then makes one and keeps it in {SECRET_KEY_FILE}).")

ALLOWED_HOSTS = [h for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h]
if DEVELOPMENT:
    ALLOWED_HOSTS += ["testserver"]
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o]

# Off by default: the one-command run is plain http://127.0.0.1:8000, where a Secure cookie or an HTTPS redirect
# breaks login. Behind the operator's TLS proxy (which must set X-Forwarded-Proto), TUNEDECK_HTTPS=1.
HTTPS = _flag("TUNEDECK_HTTPS")
if HTTPS:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = _flag("SECURE_SSL_REDIRECT", default=True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # liveness checks from inside the network speak plain http
    SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "3600"))
    # Opt-in: they bind every subdomain (and, preloaded, every browser) to HTTPS for a long time.
    SECURE_HSTS_INCLUDE_SUBDOMAINS = _flag("SECURE_HSTS_INCLUDE_SUBDOMAINS")
    SECURE_HSTS_PRELOAD = _flag("SECURE_HSTS_PRELOAD")
SECURE_CONTENT_TYPE_NOSNIFF = True
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_HTTPONLY = True  # pages send the token from the template (hx-headers), never from the cookie
CSRF_COOKIE_SAMESITE = "Lax"
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# Rate limits (jobs/ratelimit.py): POSTs to the login forms per address and per username, inference per token.
TUNEDECK_LOGIN_RATE = os.environ.get("TUNEDECK_LOGIN_RATE", "10/min")
TUNEDECK_INFERENCE_RATE = os.environ.get("TUNEDECK_INFERENCE_RATE", "120/min")
# The counters live in the cache: per process unless TUNEDECK_CACHE_URL names a shared Redis.
if os.environ.get("TUNEDECK_CACHE_URL"):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                          "LOCATION": os.environ["TUNEDECK_CACHE_URL"]}}

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served as static files (no CDN)
    "jobs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "jobs.ratelimit.RateLimitMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "tunedeck.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
WSGI_APPLICATION = "tunedeck.wsgi.application"
ASGI_APPLICATION = "tunedeck.asgi.application"

DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'db.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # The web server and the worker write at once; wait for the lock instead of failing.
    DATABASES["default"]["OPTIONS"] = {"timeout": 30, "transaction_mode": "IMMEDIATE"}
    DATABASES["default"]["CONN_MAX_AGE"] = 0
if os.environ.get("TUNEDECK_TEST_DB_NAME"):
    # Lets several test runs share one PostgreSQL server without sharing a test database.
    DATABASES["default"]["TEST"] = {"NAME": os.environ["TUNEDECK_TEST_DB_NAME"]}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 4}},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Browser libraries come from npm (package.json; scripts/setup.sh runs npm install), never committed: chart.js is
# served from node_modules as static/vendor/chartjs/chart.umd.js.
if (BASE_DIR / "node_modules" / "chart.js" / "dist").is_dir():
    STATICFILES_DIRS.append(("vendor/chartjs", BASE_DIR / "node_modules" / "chart.js" / "dist"))
STATIC_ROOT = DATA_DIR / "staticfiles"

# Where the platform keeps what users give it and what training makes.
UPLOAD_DIR = DATA_DIR / "uploads"
DATASET_DIR = DATA_DIR / "datasets"
MODEL_DIR = DATA_DIR / "models"
ADAPTER_DIR = DATA_DIR / "adapters"
CHECKPOINT_DIR = DATA_DIR / "checkpoints"
DEPLOYMENT_DIR = DATA_DIR / "deployments"
# Folders an administrator may register base models from (page, API, manage.py register_model), separated by
# os.pathsep. Empty: no server folder can be registered. Never the data directory (jobs/base_models.py).
MODEL_ROOTS = [r for r in os.environ.get("TUNEDECK_MODEL_ROOTS", "").split(os.pathsep) if r.strip()]
# The inference server (`manage.py serve_inference`) that the OpenAI-compatible /v1 endpoints proxy to.
TUNEDECK_INFERENCE_URL = os.environ.get("TUNEDECK_INFERENCE_URL", "http://127.0.0.1:8100")
# vLLM, in its own environment (scripts/setup-vllm.sh): the inference server starts one vLLM server per merged
# model or shared base on 127.0.0.1. Without this interpreter every deployment is served by the built-in server.
TUNEDECK_VLLM_PYTHON = os.environ.get("TUNEDECK_VLLM_PYTHON", str(BASE_DIR / ".venv-vllm" / "bin" / "python"))
TUNEDECK_VLLM_KV_CACHE_GB = float(os.environ.get("TUNEDECK_VLLM_KV_CACHE_GB", "1"))  # per server
TUNEDECK_VLLM_MAX_MODEL_LEN = int(os.environ.get("TUNEDECK_VLLM_MAX_MODEL_LEN", "2048"))
TUNEDECK_VLLM_MAX_LORAS = int(os.environ.get("TUNEDECK_VLLM_MAX_LORAS", "16"))  # adapters in one batch
TUNEDECK_VLLM_MAX_LORA_RANK = int(os.environ.get("TUNEDECK_VLLM_MAX_LORA_RANK", "64"))
TUNEDECK_VLLM_STARTUP_SECONDS = float(os.environ.get("TUNEDECK_VLLM_STARTUP_SECONDS", "600"))
TUNEDECK_VLLM_DTYPE = os.environ.get("TUNEDECK_VLLM_DTYPE", "auto")
# auto | all | vllm: which CPUs vLLM's model threads use on CPU hosts (serving/vllm_process.cpu_thread_binding)
TUNEDECK_VLLM_CPU_THREADS = os.environ.get("TUNEDECK_VLLM_CPU_THREADS", "auto")
# The inference server's engines, in order: each deployment is served by the first that can serve it and is
# available (serving/engine.py). A third engine is a serving.engine.Engine subclass and one entry here.
TUNEDECK_SERVING_ENGINES = [
    {"ENGINE": "serving.vllm.VllmEngine", "OPTIONS": {
        "python": TUNEDECK_VLLM_PYTHON, "kv_cache_gb": TUNEDECK_VLLM_KV_CACHE_GB,
        "max_model_len": TUNEDECK_VLLM_MAX_MODEL_LEN, "max_loras": TUNEDECK_VLLM_MAX_LORAS,
        "max_lora_rank": TUNEDECK_VLLM_MAX_LORA_RANK, "startup_seconds": TUNEDECK_VLLM_STARTUP_SECONDS,
        "dtype": TUNEDECK_VLLM_DTYPE, "cpu_threads": TUNEDECK_VLLM_CPU_THREADS,
        # vLLM servers running at once; 0: one per 4 CPUs on a CPU host (at least one), no limit on a GPU.
        "max_servers": int(os.environ.get("TUNEDECK_VLLM_MAX_SERVERS", "0"))}},
    {"ENGINE": "serving.builtin.BuiltinEngine"},
]
# Where the inference server tells the workers' GPU probe how much memory starting vLLM servers will take.
os.environ.setdefault("TUNEDECK_SERVING_RESERVED_FILE", str(DATA_DIR / "serving-reserved.json"))

# Uploads stream to disk in chunks and are refused as soon as they pass the limit.
MAX_UPLOAD_BYTES = int(os.environ.get("TUNEDECK_MAX_UPLOAD_BYTES", str(512 * 1024 * 1024)))
FILE_UPLOAD_MAX_MEMORY_SIZE = 0
FILE_UPLOAD_TEMP_DIR = str(UPLOAD_DIR / "incoming")
FILE_UPLOAD_HANDLERS = ["jobs.uploads.LimitedTemporaryFileUploadHandler"]
DATA_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024  # non-file fields

# Celery: Redis when CELERY_BROKER_URL says so, else an embedded SQLite broker (kombu's SQLAlchemy transport).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or f"sqla+sqlite:///{DATA_DIR / 'broker.sqlite3'}"
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
# The one place that says which queue a task goes to (docs/internals.md, "Tasks and queues"); jobs/queue.py sends
# by task name. Training, merges and full evaluations need the GPU worker; dataset checks go to the default queue;
# short generations a user waits for (the compare page's prompt box, a few typed evaluation prompts) go to
# "interactive", consumed by its own worker process so they never wait behind a training run.
INTERACTIVE_QUEUE = "interactive"
CELERY_TASK_ROUTES = {
    "jobs.tasks.train_job": {"queue": "gpu"},
    "jobs.tasks.deploy_version": {"queue": "gpu"},
    "jobs.tasks.evaluate_versions_task": {"queue": "gpu"},
    "jobs.tasks.search_trials_task": {"queue": "gpu"},  # issue 20: search trials train too
    "jobs.tasks.join_job_task": {"queue": "gpu"},  # issue 36: a worker joining a job that spans several workers
    "jobs.tasks.evaluate_interactive": {"queue": INTERACTIVE_QUEUE},
    # issue 34: Hub downloads on their own queue, so a large pull never delays dataset checks or training
    "jobs.tasks.pull_base_model_task": {"queue": "downloads"},
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A broker restart must not kill a training run: the job row's lease, not the broker connection, owns the job.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# Training can outlast Redis' default one-hour visibility timeout; the job row's lease stops double runs anyway.
CELERY_BROKER_TRANSPORT_OPTIONS = (
    {"visibility_timeout": int(os.environ.get("TUNEDECK_VISIBILITY_TIMEOUT", "43200"))}
    if CELERY_BROKER_URL.startswith("redis")
    else {}
)
CELERY_TASK_ALWAYS_EAGER = os.environ.get("CELERY_TASK_ALWAYS_EAGER") == "1"

# A worker that has not beaten its heart for this long is gone; its job is requeued.
WORKER_HEARTBEAT_SECONDS = float(os.environ.get("TUNEDECK_HEARTBEAT_SECONDS", "10"))
JOB_LEASE_SECONDS = float(os.environ.get("TUNEDECK_LEASE_SECONDS", "60"))
# issue 36, jobs across several workers (docs/distributed.md): the address the other workers reach this worker's
# c10d rendezvous at (default: its host name), its port (0: a free one per job), how long node 0 waits for the
# others to join.
RENDEZVOUS_HOST = os.environ.get("TUNEDECK_RENDEZVOUS_HOST", "")
RENDEZVOUS_PORT = int(os.environ.get("TUNEDECK_RENDEZVOUS_PORT", "0"))
NODE_JOIN_SECONDS = float(os.environ.get("TUNEDECK_NODE_JOIN_SECONDS", "600"))
# A job queued this long (or this long since its message was last sent) gets its message sent again: a broker
# restarted without persistence loses queued messages. Duplicates are no-ops (the lease), so this is only cost.
JOB_RESEND_SECONDS = float(os.environ.get("TUNEDECK_RESEND_SECONDS", "900"))

# Datasets: files over DATASET_LARGE_BYTES are processed on their own queue (scripts/run.sh starts a worker for
# it), so a large upload never delays small ones. One file may have at most DATASET_MAX_ROWS rows and take at most
# DATASET_MAX_SECONDS to check; token statistics stop counting after DATASET_TOKEN_STATS_SECONDS (and say so).
# A processing worker renews its lease every quarter of DATASET_LEASE_SECONDS; a
# dataset whose lease goes stale is processed again, at most DATASET_MAX_ATTEMPTS times, then marked invalid.
DATASET_QUEUE = "default"
DATASET_LARGE_QUEUE = "datasets-large"
DATASET_LARGE_BYTES = int(os.environ.get("TUNEDECK_DATASET_LARGE_BYTES", str(4 * 1024 * 1024)))
DATASET_MAX_ROWS = int(os.environ.get("TUNEDECK_DATASET_MAX_ROWS", "5000000"))
DATASET_MAX_SECONDS = float(os.environ.get("TUNEDECK_DATASET_MAX_SECONDS", "1800"))
# One row (a line of JSONL or text) over this is that row's problem; a gzip may expand to at most
# DATASET_MAX_DECOMPRESSED_BYTES (0: 100x the upload, at least 64 MiB), counted as it streams.
DATASET_MAX_ROW_BYTES = int(os.environ.get("TUNEDECK_DATASET_MAX_ROW_BYTES", str(1024 * 1024)))
DATASET_MAX_DECOMPRESSED_BYTES = int(os.environ.get("TUNEDECK_DATASET_MAX_DECOMPRESSED_BYTES", "0")) or None
DATASET_TOKEN_STATS_SECONDS = float(os.environ.get("TUNEDECK_DATASET_TOKEN_STATS_SECONDS", "600"))
DATASET_LEASE_SECONDS = float(os.environ.get("TUNEDECK_DATASET_LEASE_SECONDS", "120"))
DATASET_MAX_ATTEMPTS = 2

# issue 34: base models pulled from the Hugging Face Hub (HF_ENDPOINT: a mirror, or the tests' local server). A pull
# is refused unless HUB_DISK_RESERVE_BYTES stay free after it; a worker renews a pull's lease every quarter of
# HUB_PULL_LEASE_SECONDS, and a pull whose lease goes stale resumes on a live worker, at most HUB_PULL_MAX_ATTEMPTS.
HUB_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
HUB_DISK_RESERVE_BYTES = int(os.environ.get("TUNEDECK_HUB_DISK_RESERVE_BYTES", str(2 * 1024**3)))
HUB_PULL_LEASE_SECONDS = float(os.environ.get("TUNEDECK_HUB_LEASE_SECONDS", "120"))
HUB_PULL_MAX_ATTEMPTS = 5

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "jobs.api.auth.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "jobs.api.pagination.Pagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "jobs.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "jobs.api.schema.AutoSchema",  # adds the error responses
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tunedeck API",
    "DESCRIPTION": "Parameter-efficient fine-tuning of open LLMs.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from drf-spectacular-sidecar's static files: the docs work on an air-gapped install.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # No deep-link anchors inside the operation buttons (nested interactive controls for screen readers).
    "SWAGGER_UI_SETTINGS": {"deepLinking": False, "persistAuthorization": True},
    "ENUM_NAME_OVERRIDES": {
        "JobStatusEnum": "jobs.models.JobStatus",
        "DatasetStatusEnum": "jobs.models.Dataset.Status",
        "DeploymentStatusEnum": "jobs.models.Deployment.Status",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("TUNEDECK_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

for _folder in (DATA_DIR, UPLOAD_DIR / "incoming", DATASET_DIR, MODEL_DIR, ADAPTER_DIR, CHECKPOINT_DIR, DEPLOYMENT_DIR):
    _folder.mkdir(parents=True, exist_ok=True)

# ---- issue 31: limits an operator sets (jobs/limits.py) and API token lifetimes (jobs/tokens.py) ----
# A search may run at most MAX_SEARCH_TRIALS trials and MAX_SEARCH_MINUTES minutes (a request for more is refused,
# the auto-planned budget is capped), on at most MAX_SEARCH_HELPERS workers besides the job's own; a user may have
# at most MAX_QUEUED_JOBS_PER_USER jobs queued (running ones do not count). Tokens made by POST /api/v1/auth/token
# without an expiry expire after LOGIN_TOKEN_DAYS days (0: never), so scripts that log in on every run do not
# pile up permanent tokens.
def _limit(name: str, default: str, kind=int, minimum=1):
    from django.core.exceptions import ImproperlyConfigured

    raw = os.environ.get(name, default)
    try:
        value = kind(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, not {raw!r}.") from None
    if not minimum <= value < float("inf"):
        raise ImproperlyConfigured(f"{name} must be a finite number of at least {minimum}, not {raw!r}.")
    return value


MAX_SEARCH_TRIALS = _limit("TUNEDECK_MAX_SEARCH_TRIALS", "20")
MAX_SEARCH_MINUTES = _limit("TUNEDECK_MAX_SEARCH_MINUTES", "120", float, minimum=0.5)
MAX_SEARCH_HELPERS = _limit("TUNEDECK_MAX_SEARCH_HELPERS", "2", minimum=0)
MAX_QUEUED_JOBS_PER_USER = _limit("TUNEDECK_MAX_QUEUED_JOBS_PER_USER", "10")
LOGIN_TOKEN_DAYS = _limit("TUNEDECK_LOGIN_TOKEN_DAYS", "30", minimum=0)
