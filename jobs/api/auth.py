from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from ..models import ApiToken


def user_for_token(raw: str):
    """The active user behind a raw API token, or None."""
    if not raw:
        return None
    token = ApiToken.objects.select_related("user").filter(
        token_hash=ApiToken.hash(raw), revoked_at__isnull=True
    ).first()
    if token is None or not token.user.is_active:
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
            raise exceptions.AuthenticationFailed("The API token is invalid or revoked.")
        return user, parts[1]

    def authenticate_header(self, request):
        return self.keyword


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "jobs.api.auth.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer"}
