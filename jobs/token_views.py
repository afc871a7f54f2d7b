"""The API tokens page (issue 31): make a token with a name and an optional expiry, see each token's state, revoke
one or all of them. The same rules as the REST API (jobs/tokens.py); only ever the signed-in user's tokens."""
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render

from . import tokens
from .errors import InputError
from .models import ApiToken


@login_required
def token_list(request):
    new_token, error, form = None, None, {"name": "cli", "expires_in_days": ""}
    if request.method == "POST":
        if request.POST.get("revoke"):
            return _revoke_one(request)
        if request.POST.get("revoke_all"):
            return _revoke_all(request)
        if request.POST.get("revoke_selected"):
            return _revoke_selected(request)
        form = {"name": request.POST.get("name", ""), "expires_in_days": request.POST.get("expires_in_days", "")}
        try:
            _, new_token = tokens.create(request.user, form["name"], days=tokens.clean_days(form["expires_in_days"]))
        except InputError as exc:
            error = str(exc)
    mine = list(ApiToken.objects.owned_by(request.user).order_by("-created_at", "-id"))
    context = {"tokens": mine, "new_token": new_token, "error": error, "form": form,
               "active_count": sum(1 for t in mine if t.state == "active"), "max_days": tokens.MAX_DAYS}
    return render(request, "jobs/tokens.html", context, status=400 if error else 200)


def _revoke_one(request):
    token = ApiToken.objects.owned_by(request.user).get_or_404(request.POST["revoke"])
    tokens.revoke(request.user, ids=[token.pk])
    messages.success(request, f"Revoked {token.name} ({token.prefix}…): requests with it now get 401.")
    return redirect("tokens")


def _revoke_selected(request):
    """The tokens ticked in the table, by name in the message; an id that is not the user's is a 404."""
    ids = request.POST.getlist("ids")
    if not ids:
        messages.error(request, "Tick the tokens to revoke in the first column, then press Revoke again.")
        return redirect("tokens")
    chosen = [ApiToken.objects.owned_by(request.user).get_or_404(pk) for pk in ids]
    tokens.revoke(request.user, ids=[t.pk for t in chosen])
    names = ", ".join(t.name for t in chosen)
    messages.success(request, f"Revoked {names}: requests with {'them' if len(chosen) > 1 else 'it'} now get 401.")
    return redirect("tokens")


def _revoke_all(request):
    revoked = tokens.revoke(request.user, everything=True)
    count = len(revoked)
    messages.success(request, f"Revoked {count} token{'s' if count != 1 else ''}: requests with "
                              f"{'them' if count != 1 else 'it'} now get 401." if count else "No token to revoke.")
    return redirect("tokens")
