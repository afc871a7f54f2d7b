"""Deployment commands: deploy (and wait until it is live) and chat through the OpenAI-compatible /v1."""
from __future__ import annotations

import argparse
import json
import sys
import time

import requests

from finetune.units import format_duration

from .arguments import command, positive_int
from .client import EXIT_CONNECTION, Client, CliError
from .output import one_line, print_json, status_line


def cmd_deploy(args):
    client = Client.from_config()
    body = {"merge": not args.no_merge}
    if args.name:
        body["name"] = args.name
    answer = client.post(f"/adapter-versions/{args.version}/deploy", json=body)
    deployment = answer.get("deployment", answer) if isinstance(answer, dict) else {}
    if not deployment.get("id"):
        raise CliError("The server's deploy answer has no deployment in it.")
    if not args.json:
        print(f"Deployment {deployment.get('name')} (id {deployment['id']}): {deployment.get('status')}.")
    if args.wait:
        deployment = wait_for_deployment(client, deployment, timeout=args.timeout)
    if args.json:
        print_json(deployment)
    if deployment.get("status") in ("failed", "stopped"):
        raise CliError(f"Deployment {deployment.get('name')} {deployment['status']}: "
                       f"{one_line(deployment.get('error') or 'no error recorded', 300)}")
    if not args.json and deployment.get("status") == "live":
        print(f"Live at {deployment.get('endpoint') or client.url + '/v1'} as model {deployment.get('name')!r}. "
              f"Chat: tunedeck chat {deployment.get('name')}")


def wait_for_deployment(client, deployment, timeout=1800, interval=1.0):
    deadline = time.monotonic() + timeout
    last = None
    started = time.monotonic()
    while deployment.get("status") not in ("live", "failed", "stopped"):
        if deployment.get("status") != last or sys.stderr.isatty():
            last = deployment.get("status")
            status_line(f"Deployment {deployment.get('name')}: {last} ({format_duration(time.monotonic() - started)})")
        if time.monotonic() > deadline:
            raise CliError(f"Deployment {deployment.get('name')} is still {last} after {format_duration(timeout)}.")
        time.sleep(interval)
        deployment = client.get(f"/deployments/{deployment['id']}")
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    return deployment


def sse_events(response):
    """The `data:` payloads of a server-sent-event stream, as they arrive."""
    raw = response.raw
    buffer = b""
    while True:
        chunk = raw.read1(8192) if hasattr(raw, "read1") else raw.read(1)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                yield line[5:].strip().decode("utf-8", "replace")
    if buffer.strip().startswith(b"data:"):
        yield buffer.strip()[5:].strip().decode("utf-8", "replace")


def complete_chat(client, model, messages, args, out=None) -> str:
    out = out or sys.stdout
    body = {"model": model, "messages": messages, "stream": not args.no_stream}
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    response = client.post("/v1/chat/completions", json=body, stream=True, timeout=(10, 600))
    text = ""
    try:
        if "text/event-stream" not in response.headers.get("Content-Type", ""):
            try:
                data = response.json()
                text = data["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise CliError("The chat answer is not an OpenAI-style chat completion.") from None
            out.write(text)
        else:
            for payload in sse_events(response):
                if payload == "[DONE]":
                    break
                try:
                    event = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(event.get("error"), dict):
                    raise CliError(one_line(event["error"].get("message") or event["error"], 300))
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        text += piece
                        out.write(piece)
                        out.flush()
    except requests.exceptions.RequestException as exc:
        raise CliError(f"The answer stream broke off: {exc}", EXIT_CONNECTION) from None
    finally:
        response.close()
    out.write("\n")
    out.flush()
    return text


def cmd_chat(args):
    client = Client.from_config()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:
        messages.append({"role": "user", "content": args.message})
        complete_chat(client, args.deployment, messages, args)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {args.deployment}. /reset clears the conversation, /exit or Ctrl-D quits.",
              file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        if interactive:
            sys.stdout.write(f"{args.deployment}> ")
        reply = complete_chat(client, args.deployment, messages, args)
        messages.append({"role": "assistant", "content": reply})


def add_commands(sub):
    p = command(sub, "deploy", cmd_deploy, "deploy an adapter version for inference", json_flag=True)
    p.add_argument("version", type=positive_int)
    p.add_argument("--no-merge", action="store_true", help="serve the adapter on the base model instead of merging")
    p.add_argument("--name", help="deployment name (the `model` in API calls); default chosen by the server")
    p.add_argument("--wait", action="store_true", help="wait until it is live; exit 1 if it fails")
    p.add_argument("--timeout", type=float, default=1800, help=argparse.SUPPRESS)

    p = command(sub, "chat", cmd_chat, "chat with a deployment (interactive without -m)")
    p.add_argument("deployment", metavar="DEPLOYMENT_NAME")
    p.add_argument("-m", "--message", help="send one message, print the answer and exit")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer instead of streaming it")
