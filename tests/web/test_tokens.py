"""API tokens (issue 31): a name and an optional expiry on every way of making one (login endpoint, tokens endpoint,
tokens page), the login endpoint's operator default expiry, an expired token refused with a 401 that says so, the
listing, and revoking one by one and in bulk, only ever the caller's own tokens. The API is driven over HTTP
against a live server; the page through Django's test client."""
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from django.core.cache import cache
from django.utils import timezone

from jobs.models import ApiToken

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def clear_throttle_cache():
    cache.clear()
    yield
    cache.clear()


class Api:
    """A requests session on the live server's /api/v1, with a bearer token once logged in."""

    def __init__(self, base, token=None):
        self.base, self.session = f"{base}/api/v1", requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def __getattr__(self, method):  # api.get("/jobs"), api.post("/tokens", json=...)
        return lambda path, **kw: self.session.request(method.upper(), self.base + path, timeout=30, **kw)


def login(live_server, username="alice", password="alice-pw", **fields):
    return requests.post(f"{live_server.url}/api/v1/auth/token", timeout=30,
                         json={"username": username, "password": password, **fields})


def as_user(live_server, username, password, **fields):
    response = login(live_server, username, password, **fields)
    assert response.status_code == 200, response.text
    return Api(live_server.url, response.json()["token"]), response.json()


def parse(value):
    return datetime.fromisoformat(value)


def days_from_now(value) -> float:
    return (parse(value) - datetime.now(UTC)).total_seconds() / 86400


def expire(token_id):
    """The token's expiry time passes (the clock is not mocked: its expiry is moved into the past)."""
    ApiToken.objects.filter(pk=token_id).update(expires_at=timezone.now() - timedelta(seconds=1))


def test_login_token_has_a_name_and_the_operator_default_expiry(live_server, user, settings):
    body = login(live_server, name="nightly-backup").json()
    assert body["token"].startswith("td_") and body["name"] == "nightly-backup" and body["active"] is True
    assert days_from_now(body["expires_at"]) == pytest.approx(settings.LOGIN_TOKEN_DAYS, abs=0.01)
    assert settings.LOGIN_TOKEN_DAYS == 30  # the documented default
    unnamed = login(live_server).json()
    assert unnamed["name"] == "api" and unnamed["expires_at"]
    two_days = login(live_server, name="short", expires_in_days=2).json()
    assert days_from_now(two_days["expires_at"]) == pytest.approx(2, abs=0.01)
    when = (datetime.now(UTC) + timedelta(hours=5)).replace(microsecond=0)
    at = login(live_server, name="until", expires_at=when.isoformat()).json()
    assert parse(at["expires_at"]) == when
    settings.LOGIN_TOKEN_DAYS = 0  # the operator turned the default off: permanent unless asked
    assert login(live_server, name="forever").json()["expires_at"] is None
    stored = {t.name: t for t in ApiToken.objects.filter(user=user)}
    assert set(stored) == {"nightly-backup", "api", "short", "until", "forever"}


@pytest.mark.parametrize("fields, field", [
    ({"expires_in_days": 0}, "expires_in_days"),
    ({"expires_in_days": 4000}, "expires_in_days"),
    ({"expires_in_days": "soon"}, "expires_in_days"),
    ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"expires_at": "tomorrow"}, "expires_at"),
    ({"expires_in_days": 3, "expires_at": "2099-01-01T00:00:00Z"}, "expires_at"),
    ({"name": "x" * 101}, "name"),
])
def test_a_bad_expiry_or_name_is_a_400_naming_the_field(live_server, user, fields, field):
    for response in (login(live_server, **fields),
                     Api(live_server.url, ApiToken.issue(user)[1]).post("/tokens", json=fields)):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid" and field in error["message"] + str(error["details"])
    assert not ApiToken.objects.filter(user=user).exclude(name="token").exists()


def test_an_expired_token_is_refused_with_a_401_that_says_it_expired(live_server, user):
    api, body = as_user(live_server, "alice", "alice-pw", name="ci-runner", expires_in_days=1)
    assert api.get("/jobs").status_code == 200
    listed = {t["id"]: t for t in api.get("/tokens").json()["results"]}
    assert listed[body["id"]]["last_used_at"] and listed[body["id"]]["state"] == "active"
    expire(body["id"])
    refused = api.get("/jobs")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    error = refused.json()["error"]
    assert error["code"] == "token_expired" and "expired" in error["message"] and "ci-runner" in error["message"]
    openai = requests.get(f"{live_server.url}/v1/models", timeout=30, headers=api.session.headers)
    assert openai.status_code == 401 and "expired" in openai.json()["error"]["message"]
    # a revoked token says revoked, not expired; an unknown one neither
    other, other_body = as_user(live_server, "alice", "alice-pw")
    ApiToken.objects.filter(pk=other_body["id"]).update(revoked_at=timezone.now())
    assert "revoked" in other.get("/jobs").json()["error"]["message"]
    assert Api(live_server.url, "td_unknown").get("/jobs").json()["error"]["code"] == "authentication_failed"
    fresh, _ = as_user(live_server, "alice", "alice-pw")
    states = {t["id"]: (t["state"], t["active"]) for t in fresh.get("/tokens").json()["results"]}
    assert states[body["id"]] == ("expired", False) and states[other_body["id"]] == ("revoked", False)


def test_tokens_endpoint_makes_named_tokens_with_an_optional_expiry(live_server, user):
    api = Api(live_server.url, ApiToken.issue(user, name="admin")[1])
    week = api.post("/tokens", json={"name": "deploy-bot", "expires_in_days": 7})
    assert week.status_code == 201 and week.json()["name"] == "deploy-bot"
    assert days_from_now(week.json()["expires_at"]) == pytest.approx(7, abs=0.01)
    forever = api.post("/tokens", json={"name": "grafana"}).json()
    assert forever["expires_at"] is None and forever["state"] == "active"
    listing = api.get("/tokens").json()["results"]
    assert {t["name"] for t in listing} == {"admin", "deploy-bot", "grafana"}
    assert all({"name", "created_at", "last_used_at", "expires_at", "revoked_at", "state"} <= set(t) for t in listing)
    assert not any("token" in t for t in listing)  # the secret is shown once, when made
    assert Api(live_server.url, week.json()["token"]).get("/jobs").status_code == 200


def test_bulk_revoke_by_ids_by_name_and_all(live_server, user):
    api = Api(live_server.url, ApiToken.issue(user, name="admin")[1])
    made = {name: api.post("/tokens", json={"name": name}).json() for name in ("a", "b", "c")}
    scripts = [login(live_server).json() for _ in range(3)]  # three logins, three tokens named "api"

    by_ids = api.post("/tokens/revoke", json={"ids": [made["a"]["id"], made["b"]["id"]]})
    assert by_ids.status_code == 200 and by_ids.json() == {"revoked": sorted([made["a"]["id"], made["b"]["id"]]),
                                                           "count": 2}
    assert Api(live_server.url, made["a"]["token"]).get("/jobs").status_code == 401
    assert Api(live_server.url, made["c"]["token"]).get("/jobs").status_code == 200
    again = api.post("/tokens/revoke", json={"ids": [made["a"]["id"]]}).json()
    assert again == {"revoked": [], "count": 0}  # revoking twice is not an error

    by_name = api.post("/tokens/revoke", json={"name": "api"}).json()
    assert by_name["count"] == 3 and set(by_name["revoked"]) == {s["id"] for s in scripts}
    assert all(Api(live_server.url, s["token"]).get("/jobs").status_code == 401 for s in scripts)

    for bad in ({}, {"ids": []}, {"ids": "1"}, {"all": "yes"}, {"all": False}, {"name": " "},
                {"ids": [made["c"]["id"]], "all": True}):
        response = api.post("/tokens/revoke", json=bad)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid", (bad, response.text)
    assert Api(live_server.url, made["c"]["token"]).get("/jobs").status_code == 200

    everything = api.post("/tokens/revoke", json={"all": True}).json()
    assert everything["count"] == 2  # c and the caller's own token
    assert api.get("/jobs").status_code == 401
    assert not ApiToken.objects.filter(user=user).usable().exists()


def test_user_b_can_never_list_or_revoke_user_a_tokens(live_server, client, user, other_user):
    alice, _ = as_user(live_server, "alice", "alice-pw", name="shared-name")
    alice_token = ApiToken.objects.get(user=user)
    bob, _ = as_user(live_server, "bob", "bob-pw", name="shared-name")
    bob_token = ApiToken.objects.get(user=other_user)

    assert [t["id"] for t in bob.get("/tokens").json()["results"]] == [bob_token.pk]
    assert bob.get(f"/tokens/{alice_token.pk}").status_code == 404
    assert bob.delete(f"/tokens/{alice_token.pk}").status_code == 404
    refused = bob.post("/tokens/revoke", json={"ids": [bob_token.pk, alice_token.pk]})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert bob.get("/jobs").status_code == 200, "a refused bulk revoke revokes nothing, not even bob's own"
    assert bob.post("/tokens/revoke", json={"name": "shared-name"}).json()["revoked"] == [bob_token.pk]
    assert alice.get("/jobs").status_code == 200
    bob, _ = as_user(live_server, "bob", "bob-pw")
    assert bob.post("/tokens/revoke", json={"all": True}).json()["count"] == 1
    assert alice.get("/jobs").status_code == 200

    client.force_login(other_user)
    assert client.post("/tokens/", {"revoke": str(alice_token.pk)}).status_code == 404
    client.post("/tokens/", {"revoke_all": "1"})
    page = client.get("/tokens/").content.decode()
    assert f'id="token-{alice_token.pk}"' not in page and alice_token.prefix not in page
    alice_token.refresh_from_db()
    assert alice_token.revoked_at is None and alice.get("/jobs").status_code == 200


def test_tokens_page_makes_lists_and_revokes_tokens(client, user, other_user):
    client.force_login(user)
    made = client.post("/tokens/", {"name": "laptop", "expires_in_days": "14"})
    assert made.status_code == 200 and 'id="new-token"' in made.content.decode()
    laptop = ApiToken.objects.get(user=user, name="laptop")
    assert (laptop.expires_at - timezone.now()).total_seconds() / 86400 == pytest.approx(14, abs=0.01)
    client.post("/tokens/", {"name": "desktop", "expires_in_days": ""})
    desktop = ApiToken.objects.get(user=user, name="desktop")
    assert desktop.expires_at is None
    old, _ = ApiToken.issue(user, name="old-script")
    expire(old.pk)

    page = client.get("/tokens/").content.decode()
    row = page.split(f'id="token-{laptop.pk}"')[1].split("</tr>")[0]
    assert laptop.expires_at.strftime("%Y-%m-%d") in row and "Revoke…" in row
    assert "never" in page.split(f'id="token-{desktop.pk}"')[1].split("</tr>")[0]
    assert f'id="token-{old.pk}" data-state="expired"' in page
    assert ">expired</span>" in page.split(f'id="token-{old.pk}"')[1].split("</tr>")[0]
    assert 'id="revoke-all"' in page and "Revoke all 2 active tokens?" in page  # the confirmation

    for bad in ("0", "abc", "1.5", "99999"):
        refused = client.post("/tokens/", {"name": "bad", "expires_in_days": bad})
        assert refused.status_code == 400 and 'id="token-error"' in refused.content.decode(), bad
    too_long = client.post("/tokens/", {"name": "n" * 101})
    assert too_long.status_code == 400 and "name" in too_long.content.decode()
    assert not ApiToken.objects.filter(name__in=["bad", "n" * 100]).exists()

    one = client.post("/tokens/", {"revoke": str(laptop.pk)}, follow=True).content.decode()
    assert "Revoked laptop" in one
    laptop.refresh_from_db()
    assert laptop.revoked_at is not None and desktop.revoked_at is None

    theirs, _ = ApiToken.issue(other_user, name="bobs")
    everything = client.post("/tokens/", {"revoke_all": "1"}, follow=True).content.decode()
    assert "Revoked 1 token" in everything and 'id="revoke-all"' not in everything
    assert not ApiToken.objects.filter(user=user).usable().exists()
    assert ApiToken.objects.get(pk=theirs.pk).revoked_at is None


def test_cli_login_names_its_token_and_says_when_it_expires(live_server, user, tmp_path):
    script = Path(sys.executable).with_name("tunedeck")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tunedeck.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEDECK_")}
    env.update(HOME=str(tmp_path), TUNEDECK_CONFIG=str(tmp_path / "config.json"))
    done = subprocess.run([*command, "login", "--url", live_server.url, "-u", "alice", "--password", "alice-pw"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    token = ApiToken.objects.get(user=user)
    assert token.name == f"tunedeck-cli@{socket.gethostname()}"[:100]
    assert f"it expires on {token.expires_at:%Y-%m-%d}" in done.stdout
