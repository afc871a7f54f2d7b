from datetime import UTC

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from ..models import ApiToken


def token_for(raw: str) -> ApiToken | None:
    """The token row behind a raw API token whatever its state (active, expired or revoked), or None."""
    if not raw:
        return None
    return ApiToken.objects.select_related("user").filter(token_hash=ApiToken.hash(raw)).first()


def user_for_token(raw: str):
    """The active user behind a raw API token that is neither revoked nor expired, or None."""
    token = token_for(raw)
    if token is None or token.state != "active" or not token.user.is_active:
        return None
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return token.user


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        parts = header.split()
        if len(parts) != 2 or parts[0].lower() not in ("bearer", "token"):
            raise exceptions.AuthenticationFailed("Send the token as 'Authorization: Bearer <token>'.")
        user = user_for_token(parts[1])
        if user is None:
            raise self.refusal(token_for(parts[1]))
        return user, parts[1]

    @staticmethod
    def refusal(token) -> exceptions.AuthenticationFailed:
        """An expired token says so (its holder knows the token, so its name and date tell them nothing new)."""
        if token is not None and token.state == "expired" and token.user.is_active:
            when = token.expires_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
            return exceptions.AuthenticationFailed(
                f"The API token {token.name!r} expired at {when}. Make a new one: log in again "
                "(POST /api/v1/auth/token, `tunedeck login`) or on the API tokens page.", code="token_expired")
        return exceptions.AuthenticationFailed("The API token is invalid or revoked.")

    def authenticate_header(self, request):
        return self.keyword


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "jobs.api.auth.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer"}
