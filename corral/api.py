"""A small client of a gateway's management API, for the `corral models` and `corral status`
commands: the gateway URL and the admin key come from flags, else `CORRAL_URL` /
`CORRAL_ADMIN_KEY` (the settings), else the configured host and port."""

from __future__ import annotations

import os
from typing import Any

import httpx

from common.settings import Settings


class ApiError(RuntimeError):
    pass


class Api:
    def __init__(self, settings: Settings, url: str | None = None, key: str | None = None):
        self.base = url or os.environ.get("CORRAL_URL") or settings.local_url()
        self.base = self.base.rstrip("/")
        admin = getattr(settings, "admin_key", None)
        secret = key or (admin.get_secret_value() if admin is not None else None)
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
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
            raise ApiError(f"{method} {path}: HTTP {resp.status_code}: {message}")
        return data
