"""Deployment pages: deploy from a version, the live list with stop and rollback, a deployment's page with its
export commands, the chat playground and its streaming endpoint (session-authenticated, proxied to the
inference server). Every lookup goes through the user's own objects, so another user's ids give 404."""
import json
from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from . import deploy, waiting
from .archives import zip_response
from .models import AdapterVersion, Deployment
from .openai_views import OpenAIError, clean_messages, error_response, proxy
from .services import InputError


def _deployment(user, pk):
    return Deployment.objects.owned_by(user).select_related("version__line", "version__base_model").get_or_404(pk)


def _back(request, default):
    target = request.POST.get("next") or ""
    return redirect(target if target.startswith("/") and not target.startswith("//") else default)


@login_required
@require_POST
def version_deploy(request, pk):
    version = AdapterVersion.objects.owned_by(request.user).select_related("line", "base_model").get_or_404(pk)
    try:
        deployment = deploy.deploy_version(
            request.user, version, merge=request.POST.get("merge") == "on", name=request.POST.get("name", "")
        )
    except InputError as exc:
        messages.error(request, str(exc))
        return redirect("version-detail", pk=version.pk)
    messages.info(request, f"Deploying {version.label} as {deployment.name}.")
    return redirect("deployment-detail", pk=deployment.pk)


@login_required
def deployment_list(request):
    deployments = list(Deployment.objects.owned_by(request.user).select_related("version__line", "version__base_model"))
    for d in deployments:
        d.queue_spot = _queue_spot(d, request.user)
    # The rows poll only while something is on its way, so an open Stop confirmation is never swapped away.
    in_progress = any(d.status in (Deployment.Status.MERGING, Deployment.Status.LOADING) for d in deployments)
    template = "jobs/_deployment_rows.html" if request.htmx else "jobs/deployments.html"
    return render(request, template, {"deployments": deployments, "any_in_progress": in_progress})


@login_required
def deployment_detail(request, pk):
    deployment = _deployment(request.user, pk)
    context = {
        "deployment": deployment,
        "previous": deploy.previous_version(deployment),
        "endpoint": request.build_absolute_uri("/v1"),
        "stalled": deploy.loading_stalled(deployment),
        "queue_spot": _queue_spot(deployment, request.user),
    }
    if request.htmx:
        response = render(request, "jobs/_deployment_status.html", context)
        if deployment.status not in (Deployment.Status.MERGING, Deployment.Status.LOADING):
            # The status poll saw the work end: reload the whole page, whose export section depends on it.
            response["HX-Refresh"] = "true"
        return response
    context.update(
        commands=deploy.export_commands(deployment),
        export_problem=deploy.export_problem(deployment),
        details_json=json.dumps(deployment.details, indent=2, sort_keys=True),
    )
    return render(request, "jobs/deployment_detail.html", context)


def _queue_spot(deployment, user):
    """While its merge waits for a gpu worker: its place in that queue (the page says "queued", not "merging")."""
    if deployment.status != Deployment.Status.MERGING or waiting.merge_started(deployment):
        return None
    return waiting.place(waiting.GPU, f"deployment:{deployment.pk}:{deployment.revision}", user)


@login_required
@require_POST
def deployment_stop(request, pk):
    deployment = deploy.stop(_deployment(request.user, pk))
    messages.success(request, f"Stopped {deployment.name}: it no longer answers on the API. Deploy again to serve it.")
    return _back(request, "deployments")


@login_required
@require_POST
def deployment_rollback(request, pk):
    deployment = _deployment(request.user, pk)
    try:
        deployment = deploy.rollback(deployment)
        messages.info(request, f"Rolling {deployment.name} back to {deployment.version.label}.")
    except InputError as exc:
        messages.error(request, str(exc))
    return _back(request, "deployments")


@login_required
def deployment_export(request, pk):
    deployment = _deployment(request.user, pk)
    problem = deploy.export_problem(deployment)
    if problem:
        raise Http404(problem[1])
    return zip_response(Path(deployment.path), f"{deployment.name}-merged.zip")


@login_required
def deployment_gguf(request, pk, kind):
    from .gguf_exports import gguf_problem, gguf_response

    deployment = _deployment(request.user, pk)
    problem = gguf_problem(deployment, kind)
    if problem:
        raise Http404(problem[1])
    return gguf_response(deployment, kind)


@login_required
def playground(request, pk):
    deployment = _deployment(request.user, pk)
    live = (
        Deployment.objects.owned_by(request.user)
        .filter(status=Deployment.Status.LIVE)
        .exclude(pk=deployment.pk)
        .order_by("name")
    )
    return render(request, "jobs/playground.html", {"deployment": deployment, "live": live})


@login_required
@require_POST
def playground_stream(request, pk):
    """The playground's chat endpoint: the session user's live deployment, streamed as OpenAI chunks."""
    deployment = _deployment(request.user, pk)
    if deployment.status != Deployment.Status.LIVE:
        return error_response(409, f"{deployment.name} is {deployment.status}, not live.", "not_live")
    try:
        body = json.loads(request.body or b"{}")
        if not isinstance(body, dict):
            raise ValueError
    except ValueError:
        return error_response(400, "Send a JSON object.", "invalid_json")
    try:
        # include_usage: the last chunk counts the generated tokens, for the page's tokens/s.
        payload = {"model": deployment.name, "messages": clean_messages(body.get("messages")), "stream": True,
                   "stream_options": {"include_usage": True}}
    except OpenAIError as exc:
        return exc.response()
    for key, low, high in (("max_tokens", 1, 2048), ("temperature", 0, 2)):
        value = body.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high:
            payload[key] = int(value) if key == "max_tokens" else float(value)
    return proxy("/v1/chat/completions", deployment.name, payload)

