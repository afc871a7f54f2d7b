"""Commands for the account and the models: login, logout, base-models, register-model, pull-model."""
from __future__ import annotations

import getpass
import os
import socket
import sys

from .arguments import command
from .client import EXIT_USAGE, Client, CliError, load_config, normalise_url, save_config
from .output import print_json, table


def cmd_login(args):
    try:
        config = load_config()
    except CliError:
        config = {}  # a broken config file is what logging in again repairs
    url = normalise_url(args.url or os.environ.get("TUNEDECK_URL") or config.get("url") or "")
    username = args.username or os.environ.get("TUNEDECK_USERNAME") or config.get("username")
    if not username:
        if not sys.stdin.isatty():
            raise CliError("Give --username.", EXIT_USAGE)
        username = input("Username: ").strip()
    password = args.password or os.environ.get("TUNEDECK_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            raise CliError("Give --password or set TUNEDECK_PASSWORD (no terminal to prompt on).", EXIT_USAGE)
        password = getpass.getpass(f"Password for {username} at {url}: ")
    body = Client(url).post("/auth/token", json={"username": username, "password": password,
                                                 "name": f"tunedeck-cli@{socket.gethostname()}"[:100]})
    if not isinstance(body, dict) or not body.get("token"):
        raise CliError(f"{url} did not return a token; is it a Tunedeck server?")
    path = save_config({**config, "url": url, "token": body["token"], "username": username})
    until = f"; it expires on {body['expires_at'][:10]}" if body.get("expires_at") else ""
    print(f"Logged in to {url} as {username}; token saved in {path}{until}.")


def cmd_logout(args):
    config = load_config()
    token, url = config.get("token"), config.get("url")
    if token and url:
        client = Client(normalise_url(url), token)
        try:
            tokens, _ = client.list("/tokens")
            for item in tokens:
                if item.get("active") and item.get("prefix") and token.startswith(item["prefix"]):
                    client.delete(f"/tokens/{item['id']}")
                    break
        except CliError as exc:
            print(f"tunedeck: warning: could not revoke the token on the server: {exc}", file=sys.stderr)
    config.pop("token", None)
    save_config(config)
    print("Logged out.")


def cmd_base_models(args):
    client = Client.from_config()
    items, _ = client.list("/base-models")
    if args.json:
        return print_json(items)
    table([[m["id"], m["name"] + (" (default)" if m.get("is_default") else ""), m.get("architecture"),
            f"{m.get('parameters', 0) / 1e6:.1f}M", "shared" if m.get("shared") else "yours"] for m in items],
          ["ID", "NAME", "ARCHITECTURE", "PARAMS", "OWNER"], empty="No base models registered.")


def cmd_register_model(args):
    client = Client.from_config()
    model = client.post("/base-models", json={"name": args.name, "path": args.path, "shared": not args.private})
    if args.json:
        return print_json(model)
    print(f"Registered base model {model['id']}: {model['name']} ({model.get('architecture')}, "
          f"{model.get('parameters', 0) / 1e6:.1f}M parameters, {'shared' if model.get('shared') else 'yours only'}).")


def cmd_pull_model(args):
    """issue 34: look at a Hub repository (size, licence, architecture), pull it, and follow the download."""
    import time

    from finetune.units import format_bytes

    from .output import ProgressBar

    client = Client.from_config()
    body = {"repo_id": args.repo_id, "revision": args.revision or ""}
    look = client.post("/base-models/pull", json={**body, "confirm": False})
    print(f"{look['repo_id']} @ {look['commit'][:8]}: {look.get('architecture') or look['kind']}, "
          f"{format_bytes(look['total_bytes'])} to download, licence {look.get('license') or 'not stated'}.")
    if args.look:
        return print_json(look) if args.json else None
    model = client.post("/base-models/pull", json={**body, "confirm": True})
    bar = ProgressBar(model.get("bytes_total") or 0, f"pulling {model['name']}")
    while not args.no_wait and model["status"] in ("pending", "downloading", "validating"):
        time.sleep(1.0)
        model = client.get(f"/base-models/{model['id']}")
        bar.update(model.get("bytes_done") or 0, model["status"])
    if not args.no_wait:
        bar.finish(model["status"])
    if args.json:
        return print_json(model)
    print(f"Base model {model['id']}: {model['name']} is {model['status']}. {model.get('error') or ''}".rstrip())
    return 0 if model["status"] in ("ready", "pending", "downloading", "validating") else 1


def add_commands(sub):
    p = command(sub, "login", cmd_login, "get an API token for a user and store it")
    p.add_argument("--url", help="the server, e.g. http://127.0.0.1:8000 (default: $TUNEDECK_URL or the stored one)")
    p.add_argument("--username", "-u")
    p.add_argument("--password", help="default: $TUNEDECK_PASSWORD, else asked for")
    command(sub, "logout", cmd_logout, "revoke the stored token and forget it")
    command(sub, "base-models", cmd_base_models, "list the base models you can fine-tune", json_flag=True)
    p = command(sub, "register-model", cmd_register_model, "register a model folder on the server as a base "
                 "model (administrators; the folder must be inside the server's TUNEDECK_MODEL_ROOTS)", json_flag=True)
    p.add_argument("name")
    p.add_argument("path", help="absolute path of the Hugging Face model folder on the server")
    p.add_argument("--private", action="store_true", help="only you may use it (default: every user)")
    p = command(sub, "pull-model", cmd_pull_model, "pull a base model from the Hugging Face Hub onto the server "
                "(a worker downloads it; the same model pulled before is reused)", json_flag=True)
    p.add_argument("repo_id", help="a Hub model id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.add_argument("--look", action="store_true", help="only show the size, licence and architecture")
    p.add_argument("--no-wait", action="store_true", help="start the pull and return at once")
