from django.urls import path, re_path

from . import hub_views, search_views, views

urlpatterns = [
    path("auth/token", views.issue_token, name="api-token"),
    path("base-models", views.BaseModelList.as_view(), name="api-base-models"),
    path("base-models/<int:pk>", views.BaseModelDetail.as_view(), name="api-base-model"),
    path("base-models/pull", hub_views.BaseModelPull.as_view(), name="api-base-model-pull"),  # issue 34
    path("base-models/<int:pk>/cancel", hub_views.BaseModelPullCancel.as_view(), name="api-base-model-cancel"),
    path("hub-token", hub_views.HubTokenView.as_view(), name="api-hub-token"),
    path("datasets", views.DatasetList.as_view(), name="api-datasets"),
    path("datasets/<int:pk>", views.DatasetDetail.as_view(), name="api-dataset"),
    path("datasets/<int:pk>/drop-invalid", views.DatasetDropInvalid.as_view(), name="api-dataset-drop-invalid"),
    path("datasets/<int:pk>/retry", views.DatasetRetry.as_view(), name="api-dataset-retry"),
    path("datasets/<int:pk>/reprocess", views.DatasetReprocess.as_view(), name="api-dataset-reprocess"),
    path("datasets/<int:pk>/mapping-preview", views.DatasetMappingPreview.as_view(),
         name="api-dataset-mapping-preview"),
    path("plans", views.PlanView.as_view(), name="api-plans"),
    path("jobs", views.JobList.as_view(), name="api-jobs"),
    path("jobs/<int:pk>", views.JobDetail.as_view(), name="api-job"),
    path("jobs/<int:pk>/cancel", views.JobCancel.as_view(), name="api-job-cancel"),
    path("jobs/<int:pk>/retry", views.JobRetry.as_view(), name="api-job-retry"),
    path("jobs/<int:pk>/clone", views.JobClone.as_view(), name="api-job-clone"),
    path("jobs/<int:pk>/metrics", views.JobMetrics.as_view(), name="api-job-metrics"),
    path("jobs/<int:pk>/trials", search_views.JobTrials.as_view(), name="api-job-trials"),  # issue 20
    path("adapter-versions", views.AdapterVersionList.as_view(), name="api-versions"),
    path("adapter-versions/compare", views.AdapterVersionCompare.as_view(), name="api-versions-compare"),
    path("adapter-versions/<int:pk>", views.AdapterVersionDetail.as_view(), name="api-version"),
    path("adapter-versions/<int:pk>/download", views.AdapterVersionDownload.as_view(), name="api-version-download"),
    path("deployments/<int:pk>", views.DeploymentDetail.as_view(), name="api-deployment"),
    path("workers", views.WorkerList.as_view(), name="api-workers"),
    path("tokens", views.TokenList.as_view(), name="api-tokens"),
    path("tokens/<int:pk>", views.TokenDetail.as_view(), name="api-token-detail"),
    path("tokens/revoke", views.TokenRevoke.as_view(), name="api-tokens-revoke"),  # issue 31: bulk revoke
]

# Deployments (jobs/api/deploy_views.py); GET deployments/<pk> is views.DeploymentDetail above.
from . import deploy_views  # noqa: E402

urlpatterns += [
    path("adapter-versions/<int:pk>/deploy", deploy_views.VersionDeploy.as_view(), name="api-version-deploy"),
    path("deployments", deploy_views.DeploymentList.as_view(), name="api-deployments"),
    path("deployments/<int:pk>/stop", deploy_views.DeploymentStop.as_view(), name="api-deployment-stop"),
    path("deployments/<int:pk>/rollback", deploy_views.DeploymentRollback.as_view(), name="api-deployment-rollback"),
    path("deployments/<int:pk>/export", deploy_views.DeploymentExport.as_view(), name="api-deployment-export"),
    path("deployments/<int:pk>/gguf/<str:kind>", deploy_views.DeploymentGGUF.as_view(), name="api-deployment-gguf"),
]

# Adapter version actions (issue 7). Put first: DELETE on adapter-versions/<pk> must reach the view that allows it
# (it answers GET exactly as AdapterVersionDetail does).
from . import version_views  # noqa: E402

urlpatterns = [
    path("adapter-versions/evaluate", version_views.AdapterVersionEvaluate.as_view(), name="api-versions-evaluate"),
    path("adapter-versions/<int:pk>/champion", version_views.AdapterVersionChampion.as_view(),
         name="api-version-champion"),
    path("adapter-versions/<int:pk>", version_views.AdapterVersionDetailDelete.as_view(), name="api-version"),
] + urlpatterns


def _same_without_slash(request, rest):
    """/api/v1/datasets/ answers as /api/v1/datasets (issue 37): a trailing slash is a common client habit, and
    a 404 for it reads as "no such endpoint". Any method, no redirect (a redirected POST would lose its body)."""
    from django.http import Http404
    from django.urls import Resolver404, resolve

    try:
        match = resolve(request.path_info.rstrip("/"))
    except Resolver404:
        raise Http404(f"No such API path: {request.path_info}") from None
    return match.func(request, *match.args, **match.kwargs)


urlpatterns += [re_path(r"^(?P<rest>.+)/$", _same_without_slash)]
