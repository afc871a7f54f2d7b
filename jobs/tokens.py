"""API tokens (issue 31): made with a name and an optional expiry, listed, revoked one by one or in bulk. One set
of rules for the tokens page, the REST API and the login endpoint; every function works on the caller's own
tokens only, so another user's token is the same unknown id as one that does not exist."""
from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .errors import InputError
from .models import ApiToken

MAX_DAYS = 3650  # ten years: an expiry further out is refused (and datetime arithmetic stays in range)
NAME_LENGTH = 100
MAX_IDS = 1000  # ids in one bulk revoke


def clean_name(name, default: str) -> str:
    name = (name or "").strip()
    if len(name) > NAME_LENGTH:
        raise InputError(f"name is longer than {NAME_LENGTH} characters.", field="name")
    return name or default


def clean_days(raw) -> int | None:
    """The page form's "expires in days" box: blank is never."""
    raw = (raw or "").strip() if isinstance(raw, str) else raw
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise InputError(f"Expires in days must be a whole number of days, not {raw!r}.",
                         field="expires_in_days") from None


def expiry(days: int | None = None, at: datetime | None = None, *, default_days: int | None = None,
           now: datetime | None = None) -> datetime | None:
    """When a new token expires: in `days` days, at `at`, or (neither given) after default_days; None: never."""
    now = now or timezone.now()
    if days is not None and at is not None:
        raise InputError("Give expires_in_days or expires_at, not both.", field="expires_at")
    if at is not None:
        if timezone.is_naive(at):
            at = timezone.make_aware(at)
        if at <= now:
            raise InputError("expires_at must be in the future.", field="expires_at")
        if at > now + timedelta(days=MAX_DAYS):
            raise InputError(f"expires_at must be within {MAX_DAYS} days from now.", field="expires_at")
        return at
    days = days if days is not None else (default_days or None)
    if days is None:
        return None
    if isinstance(days, bool) or not 1 <= days <= MAX_DAYS:
        raise InputError(f"expires_in_days must be between 1 and {MAX_DAYS}.", field="expires_in_days")
    return now + timedelta(days=days)


def create(user, name=None, *, days=None, at=None, default_name="token", default_days=None):
    """(token, raw token): the raw token is shown once and never stored."""
    expires_at = expiry(days, at, default_days=default_days)
    return ApiToken.issue(user, name=clean_name(name, default_name), expires_at=expires_at)


def login_default_days() -> int | None:
    """Tokens from POST /api/v1/auth/token expire after LOGIN_TOKEN_DAYS unless the request says when (0: never)."""
    return settings.LOGIN_TOKEN_DAYS or None


def revoke(user, *, ids=None, everything=False, name=None) -> list[int]:
    """Revokes the user's own tokens: these ids, every token with this name, or all of them. Exactly one of the
    three. An id that is not one of the user's tokens is refused (404) and nothing is revoked. Revoking a token
    twice, or an expired one, is not an error. Returns the ids of the tokens that stopped working now."""
    chosen = [ids is not None, bool(everything), name is not None]
    if sum(chosen) != 1:
        raise InputError('Give exactly one of "ids" (a list of token ids), "all": true or "name".')
    owned = ApiToken.objects.owned_by(user)
    with transaction.atomic():
        if ids is not None:
            targets = _owned_ids(owned, ids)
        elif everything:
            targets = owned
        else:
            if not isinstance(name, str) or not name.strip():
                raise InputError("name must be a token name (not blank).", field="name")
            targets = owned.filter(name=name.strip())
        targets = targets.select_for_update().usable()  # an expired token already stopped working
        revoked = sorted(targets.values_list("pk", flat=True))
        ApiToken.objects.filter(pk__in=revoked).update(revoked_at=timezone.now())
    return revoked


def _owned_ids(owned, ids):
    if not isinstance(ids, list) or not 0 < len(ids) <= MAX_IDS:
        raise InputError(f"ids must be a list of 1 to {MAX_IDS} token ids.", field="ids")
    for pk in ids:
        owned.get_or_404(pk)  # ObjectNotFound for another user's id as for an unknown one
    return owned.filter(pk__in=[int(pk) for pk in ids])
