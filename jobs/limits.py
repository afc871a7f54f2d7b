"""Limits an operator sets (issue 31), so one user's request cannot hold every training worker: trials and minutes
per search, helper workers per search, queued jobs per user. The numbers are settings read from the environment
(tunedeck/settings.py, TUNEDECK_MAX_*); a request over a limit is refused with the field and the limit named."""
from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model

from autotune import search

from .errors import InputError
from .models import FineTuneJob, JobStatus

# override field -> (setting, unit): the search budget a job may ask for
SEARCH_LIMITS = {"search_trials": ("MAX_SEARCH_TRIALS", "trials"), "search_minutes": ("MAX_SEARCH_MINUTES", "minutes")}


def search_limit(field: str):
    return getattr(settings, SEARCH_LIMITS[field][0])


def refuse_over_limit(options: dict) -> None:
    """A search_trials or search_minutes over this server's limit is an error naming the field and the limit."""
    for field, (_, unit) in SEARCH_LIMITS.items():
        value, limit = options.get(field), search_limit(field)
        if value is not None and value > limit:
            raise InputError(f"{field} {value:g} is over this server's limit of {limit:g} {unit} per search; "
                             f"ask for at most {limit:g}.", field=field)


def within_limits(overrides: dict) -> dict:
    """The overrides with search_trials and search_minutes lowered to the limits as they are now (a job queued
    before an operator lowered them is planned again on a worker: it gets the new limit, not an error)."""
    clamped = dict(overrides or {})
    for field in SEARCH_LIMITS:
        if isinstance(clamped.get(field), (int, float)) and not isinstance(clamped[field], bool):
            clamped[field] = min(clamped[field], search_limit(field))
    return clamped


def cap_budget(budget: dict) -> dict:
    """Every search budget, the auto-planned one included, within the limits: at most MAX_SEARCH_TRIALS trials
    and MAX_SEARCH_MINUTES of wall time (a budget set in trials alone had no time bound, one in minutes alone
    no trial bound). Says so in the summary when the plan would have asked for more. A search that is off is
    left as it is, with the limits in force."""
    budget["limits"] = {"max_trials": int(search_limit("search_trials")),
                        "max_minutes": search_limit("search_minutes"), "max_helpers": int(settings.MAX_SEARCH_HELPERS)}
    if not budget.get("enabled"):
        return budget
    max_trials, max_seconds = int(search_limit("search_trials")), float(search_limit("search_minutes")) * 60
    wanted_seconds, wanted_trials = budget.get("seconds"), budget.get("expected_trials") or 0
    budget["seconds"] = min(wanted_seconds, max_seconds) if wanted_seconds else max_seconds
    budget["max_trials"] = min(budget["max_trials"], max_trials) if budget.get("max_trials") else max_trials
    budget["expected_trials"] = min(wanted_trials, max_trials)
    trial_seconds = budget.get("trial_seconds_estimate")
    if trial_seconds:
        budget["expected_trials"] = min(budget["expected_trials"], int(budget["seconds"] // trial_seconds))
    full_space = getattr(search, "FULL_SPACE_TRIALS", None)  # fewer trials than this search the learning rate only
    if full_space and budget.get("searched") == "all" and budget["expected_trials"] < full_space:
        budget["searched"] = "learning_rate"
    if (wanted_seconds or 0) > max_seconds or wanted_trials > max_trials:
        budget["summary"] += (f" Capped by this server's limits: at most {max_trials} trials and "
                              f"{search_limit('search_minutes'):g} minutes per search.")
    return budget


def helper_workers(available: int, wanted: int) -> int:
    """How many other training workers a job's search may take: at most MAX_SEARCH_HELPERS."""
    return max(0, min(available, wanted, int(settings.MAX_SEARCH_HELPERS)))


def check_queue_room(user) -> None:
    """Refuses one more queued job past MAX_QUEUED_JOBS_PER_USER. Call inside the transaction that queues it:
    the user's row is locked, so two requests at once cannot both take the last place. Running jobs do not
    count; they hold a worker already and leave the queue."""
    limit = int(settings.MAX_QUEUED_JOBS_PER_USER)
    get_user_model().objects.select_for_update().filter(pk=user.pk).first()
    queued = FineTuneJob.objects.filter(owner=user, status=JobStatus.QUEUED).count()
    if queued >= limit:
        raise InputError(f"You have {queued} job{'s' if queued != 1 else ''} queued, this server's limit per user "
                         f"is {limit}: wait until one starts, or cancel one, then queue this one.",
                         code="conflict")
