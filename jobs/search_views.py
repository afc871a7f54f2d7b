"""The job page's search section (issue 20): the trials table (htmx-polled) and the chart's JSON."""
from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from .models import FineTuneJob
from .search import trials_payload


@login_required
@require_GET
def job_trials(request, pk):
    job = FineTuneJob.objects.owned_by(request.user).get_or_404(pk)
    return render(request, "jobs/_search_trials.html", {"job": job, "search": trials_payload(job)})


@login_required
@require_GET
def job_trials_json(request, pk):
    response = JsonResponse(trials_payload(FineTuneJob.objects.owned_by(request.user).get_or_404(pk)))
    response["Cache-Control"] = "no-store"
    return response
