"""A small client of a gateway's API, for the `corral models`, `corral status` and `corral
batches` commands. The gateway: `--url`, else `CORRAL_URL`, else the configured host and port
(those of the running `corral up` when nothing else names a cluster: `corral.local`). The
key: `--api-key`, else the settings' admin key as the CLI resolved it (`CORRAL_ADMIN_KEY`,
its alias `CORRAL_API_KEY`, or the local `corral up`'s key)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import httpx

from common.settings import Settings

KEY_HELP = (
    "the key to send (default: $CORRAL_ADMIN_KEY, or its alias $CORRAL_API_KEY; else the "
    "admin key of the `corral up` running here)"
)


class ApiError(RuntimeError):
    pass


def client_flags(p: argparse.ArgumentParser) -> None:
    """`--url` and `--api-key`, the same on every command that talks to a gateway."""
    p.add_argument(
        "--url", help="gateway URL (default: $CORRAL_URL, else the running `corral up`'s)"
    )
    p.add_argument("--api-key", help=KEY_HELP)


def target(settings: Settings, url: str | None, key: str | None) -> tuple[str, dict[str, str]]:
    """The gateway's base URL, and the headers that carry the key."""
    base = (url or os.environ.get("CORRAL_URL") or settings.local_url()).rstrip("/")
    admin = settings.admin_key
    secret = key or (admin.get_secret_value() if admin is not None else None)
    return base, {"Authorization": f"Bearer {secret}"} if secret else {}


class Api:
    def __init__(self, settings: Settings, url: str | None = None, key: str | None = None):
        self.base, headers = target(settings, url, key)
        self._http = httpx.Client(base_url=self.base, headers=headers, timeout=10.0)

    def close(self) -> None:
        self._http.close()

    def get(self, path: str) -> dict[str, Any]:
        return self._call("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._call("POST", path, body)

    def delete(self, path: str) -> dict[str, Any]:
        return self._call("DELETE", path)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the gateway at {self.base}: {exc}") from exc
        try:
            data: dict[str, Any] = resp.json()
        except ValueError:
            data = {}
        if resp.status_code >= 400:
            message = (data.get("error") or {}).get("message") or resp.text[:300]
            if resp.status_code in (401, 403):
                message += " (pass the admin key: --api-key, or set CORRAL_ADMIN_KEY)"
            raise ApiError(f"{method} {path}: HTTP {resp.status_code}: {message}")
        return data
