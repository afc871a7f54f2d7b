"""Hugging Face access tokens for gated models: one per user, and a site token an administrator sets for everyone.

Stored encrypted at rest (Fernet); the key is a secret file in the data directory (tunedeck/secretfile.py), made once
and shared by the web server and the workers, so a copied database alone reveals no token. A token is written once
and never shown again: pages and the API say only whether one is set and when. Nothing here logs a token, and no
error message quotes one."""
from __future__ import annotations

import base64
import hashlib
import re

from django.conf import settings
from django.utils import timezone

from tunedeck.secretfile import read_or_create_secret

from .errors import InputError, NotAllowed
from .models import HubToken

KEY_FILE_NAME = "hub-token-key"
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_\-.]{8,400}$")
SITE_ONLY = "The site's Hub token is for administrators; set your own token instead."


def _fernet():
    from cryptography.fernet import Fernet

    secret = read_or_create_secret(settings.DATA_DIR / KEY_FILE_NAME)
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest()))


def set_token(actor, token: str, *, site: bool = False) -> HubToken:
    """Stores actor's token (site=True: the site's, administrators only); an empty token removes it."""
    if site and not getattr(actor, "is_staff", False):
        raise NotAllowed(SITE_ONLY)
    owner = None if site else actor
    token = (token or "").strip()
    if not token:
        _rows(owner).delete()
        return None
    if not TOKEN_PATTERN.match(token):
        raise InputError("That does not look like a Hugging Face access token (letters, digits, '_', '-' only; "
                         "copy it from huggingface.co/settings/tokens).", field="token")
    encrypted = _fernet().encrypt(token.encode()).decode()
    existing = _rows(owner)
    if existing.update(encrypted=encrypted, set_at=timezone.now()):
        return existing.first()
    return HubToken.objects.create(owner=owner, encrypted=encrypted)


def _rows(owner):
    return HubToken.objects.filter(owner=owner) if owner is not None else HubToken.objects.filter(owner__isnull=True)


def token_status(user) -> dict:
    """What a page may show: whether a token is set and when, for the user and for the site."""
    mine = HubToken.objects.filter(owner=user).first() if user is not None else None
    site = HubToken.objects.filter(owner__isnull=True).first()
    return {"user_set": mine is not None, "user_set_at": mine.set_at if mine else None,
            "site_set": site is not None, "site_set_at": site.set_at if site else None}


def token_for(user, source: str | None = None) -> tuple[str | None, str]:
    """(token, "user" | "site" | "") for a pull by user: their own token first, else the site's. source pins the
    choice a pull recorded when it was started (a worker resuming it uses the same one)."""
    candidates = {"user": lambda: HubToken.objects.filter(owner=user).first() if user is not None else None,
                  "site": lambda: HubToken.objects.filter(owner__isnull=True).first()}
    order = [source] if source in candidates else ["user", "site"]
    for name in order:
        row = candidates[name]()
        if row is not None:
            return _decrypt(row), name
    return None, ""


def _decrypt(row: HubToken) -> str:
    from cryptography.fernet import InvalidToken

    try:
        return _fernet().decrypt(row.encrypted.encode()).decode()
    except InvalidToken:
        raise InputError("The stored Hub token can no longer be read (the key file in the data directory changed); "
                         "set the token again.", field="token") from None
