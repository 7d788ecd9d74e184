"""`corral batches submit|list|show|results|cancel`: the Batch API from the command line,
against a gateway (`corral.api`: `--url`, default the running `corral up`'s or the configured
one; `--api-key`, default the admin key the CLI finds, `corral.local`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from common.settings import Settings
from corral import api

FINAL = {"completed", "failed", "cancelled", "expired"}


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    bp = sub.add_parser("batches", help="submit and follow OpenAI-style batch jobs")
    bs = bp.add_subparsers(dest="batches_command", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        ap = bs.add_parser(name, help=help)
        common(ap)
        api.client_flags(ap)
        return ap

    sb = action("submit", "upload a JSONL file and start a batch on it")
    sb.add_argument("file", type=Path, help="JSONL: one {custom_id, method, url, body} a line")
    sb.add_argument(
        "--endpoint",
        default="/v1/chat/completions",
        help="/v1/chat/completions (default), /v1/completions or /v1/embeddings",
    )
    sb.add_argument("--wait", action="store_true", help="show progress until it ends")
    ls = action("list", "recent batches")
    ls.add_argument("--limit", type=int, default=20)
    sh = action("show", "a batch, with a progress bar")
    sh.add_argument("batch_id")
    sh.add_argument("--watch", action="store_true", help="refresh until the batch ends")
    rs = action("results", "print a batch's output (and errors to stderr)")
    rs.add_argument("batch_id")
    cn = action("cancel", "stop a batch: items not started are skipped")
    cn.add_argument("batch_id")


def run(settings: Settings, args: argparse.Namespace) -> int:
    base, headers = api.target(settings, args.url, args.api_key)
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        try:
            return ACTIONS[args.batches_command](http, args)
        except httpx.HTTPStatusError as exc:
            print(f"corral batches: {_error(exc.response)}", file=sys.stderr)
            return 1
        except httpx.HTTPError as exc:
            print(f"corral batches: cannot reach {base}: {exc}", file=sys.stderr)
            return 1


def _error(resp: httpx.Response) -> str:
    try:
        return f"{resp.status_code}: {resp.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{resp.status_code}: {resp.text[:300]}"


def _get(http: httpx.Client, path: str) -> Any:
    resp = http.get(path)
    resp.raise_for_status()
    return resp.json()


def submit(http: httpx.Client, args: argparse.Namespace) -> int:
    with args.file.open("rb") as f:
        up = http.post("/v1/files", files={"file": (args.file.name, f)}, data={"purpose": "batch"})
    up.raise_for_status()
    resp = http.post(
        "/v1/batches",
        json={
            "input_file_id": up.json()["id"],
            "endpoint": args.endpoint,
            "completion_window": "24h",
        },
    )
    resp.raise_for_status()
    batch = resp.json()
    print(batch["id"])
    if batch["status"] == "failed":
        for err in (batch.get("errors") or {}).get("data", []):
            print(f"  line {err.get('line')}: {err['message']}", file=sys.stderr)
        return 1
    if args.wait:
        return _follow(http, batch["id"])
    return 0


def list_batches(http: httpx.Client, args: argparse.Namespace) -> int:
    found = _get(http, f"/v1/batches?limit={args.limit}")["data"]
    if not found:
        print("no batches (submit one with `corral batches submit FILE`)", file=sys.stderr)
    for b in found:
        c = b["request_counts"]
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(b["created_at"]))
        print(
            f"{b['id']}  {b['status']:<11} {c['completed']:>6}/{c['total']:<6} "
            f"failed {c['failed']:<5} {created}"
        )
    return 0


def progress_line(batch: dict[str, Any], width: int = 30) -> str:
    c = batch["request_counts"]
    total = max(1, c["total"])
    done = c["completed"] + c["failed"]
    filled = int(width * done / total)
    return (
        f"{batch['id']} [{'#' * filled}{'.' * (width - filled)}] {done}/{c['total']} "
        f"({c['failed']} failed) {batch['status']}"
    )


def show(http: httpx.Client, args: argparse.Namespace) -> int:
    if args.watch:
        return _follow(http, args.batch_id)
    batch = _get(http, f"/v1/batches/{args.batch_id}")
    print(progress_line(batch))
    print(json.dumps(batch, indent=2))
    return 0


def _follow(http: httpx.Client, batch_id: str) -> int:
    while True:
        batch = _get(http, f"/v1/batches/{batch_id}")
        print("\r" + progress_line(batch), end="", file=sys.stderr, flush=True)
        if batch["status"] in FINAL:
            print(file=sys.stderr)
            return 0 if batch["status"] == "completed" else 1
        time.sleep(1)


def results(http: httpx.Client, args: argparse.Namespace) -> int:
    batch = _get(http, f"/v1/batches/{args.batch_id}")
    if batch["status"] not in FINAL:
        print(
            f"corral batches: {args.batch_id} is {batch['status']}; no results yet", file=sys.stderr
        )
        return 1
    for key, stream in (("output_file_id", sys.stdout), ("error_file_id", sys.stderr)):
        if batch.get(key):
            resp = http.get(f"/v1/files/{batch[key]}/content")
            resp.raise_for_status()
            stream.write(resp.text)
    return 0


def cancel(http: httpx.Client, args: argparse.Namespace) -> int:
    resp = http.post(f"/v1/batches/{args.batch_id}/cancel")
    resp.raise_for_status()
    print(progress_line(resp.json()))
    return 0


ACTIONS: dict[str, Callable[[httpx.Client, argparse.Namespace], int]] = {
    "submit": submit,
    "list": list_batches,
    "show": show,
    "results": results,
    "cancel": cancel,
}
