from django.urls import path

from . import dataset_views, token_views, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("healthz", views.healthz, name="healthz"),
    path("datasets/", dataset_views.dataset_list, name="datasets"),
    path("datasets/<int:pk>/", dataset_views.dataset_detail, name="dataset-detail"),
    path("datasets/<int:pk>/drop-invalid", dataset_views.dataset_drop_invalid, name="dataset-drop-invalid"),
    path("datasets/<int:pk>/retry", dataset_views.dataset_retry, name="dataset-retry"),
    path("datasets/<int:pk>/mapping", dataset_views.dataset_mapping, name="dataset-mapping"),
    path("datasets/<int:pk>/delete", dataset_views.dataset_delete, name="dataset-delete"),
    path("jobs/", views.job_list, name="jobs"),
    path("jobs/new/", views.job_new, name="job-new"),
    path("jobs/plan-preview", views.plan_preview, name="plan-preview"),
    path("jobs/<int:pk>/", views.job_detail, name="job-detail"),
    path("jobs/<int:pk>/cancel", views.job_cancel, name="job-cancel"),
    path("jobs/<int:pk>/retry", views.job_retry, name="job-retry"),
    path("versions/", views.version_list, name="versions"),
    path("versions/<int:pk>/", views.version_detail, name="version-detail"),
    path("versions/<int:pk>/download", views.version_download, name="version-download"),
    path("workers/", views.worker_list, name="workers"),
    path("tokens/", token_views.token_list, name="tokens"),  # issue 31
]

# Monitoring, versions and comparison (issues 6 and 7).
urlpatterns += [
    path("jobs/<int:pk>/metrics.json", views.job_metrics_json, name="job-metrics-json"),
    path("versions/compare/", views.compare_page, name="versions-compare"),
    path("versions/compare/evaluate", views.compare_evaluate, name="versions-compare-evaluate"),
    path("versions/compare/prompt", views.compare_prompt, name="versions-compare-prompt"),
    path("versions/<int:pk>/champion", views.version_champion, name="version-champion"),
    path("versions/<int:pk>/delete", views.version_delete, name="version-delete"),
    path("versions/<int:pk>/evaluate", views.version_evaluate, name="version-evaluate"),
]

# Deployments (jobs/deploy_views.py).
from . import deploy_views  # noqa: E402

urlpatterns += [
    path("versions/<int:pk>/deploy", deploy_views.version_deploy, name="version-deploy"),
    path("deployments/", deploy_views.deployment_list, name="deployments"),
    path("deployments/<int:pk>/", deploy_views.deployment_detail, name="deployment-detail"),
    path("deployments/<int:pk>/stop", deploy_views.deployment_stop, name="deployment-stop"),
    path("deployments/<int:pk>/rollback", deploy_views.deployment_rollback, name="deployment-rollback"),
    path("deployments/<int:pk>/export", deploy_views.deployment_export, name="deployment-export"),
    path("deployments/<int:pk>/gguf/<str:kind>", deploy_views.deployment_gguf, name="deployment-gguf"),
    path("deployments/<int:pk>/chat/", deploy_views.playground, name="deployment-chat"),
    path("deployments/<int:pk>/chat/stream", deploy_views.playground_stream, name="deployment-chat-stream"),
]

# Search trials (issue 20, jobs/search_views.py).
from . import search_views  # noqa: E402

urlpatterns += [
    path("jobs/<int:pk>/trials", search_views.job_trials, name="job-trials"),
    path("jobs/<int:pk>/trials.json", search_views.job_trials_json, name="job-trials-json"),
]

# Base models (jobs/model_views.py).
from . import model_views  # noqa: E402

urlpatterns += [
    path("models/", model_views.model_list, name="models"),
    path("models/<int:pk>/progress", model_views.model_progress, name="model-progress"),  # issue 34
    path("models/<int:pk>/cancel", model_views.model_cancel, name="model-cancel"),
]
