"""The status page: `GET /ui` (and `/`, which redirects there) and its assets, served from
the package (`gateway/ui/static/`: no build step, nothing from elsewhere). Open to anyone,
like the API docs: the page holds no data. It asks for a key when the gateway wants one,
keeps it in the tab's `sessionStorage`, and sends it as a bearer header, never in a URL.
Its data come from the status stream (`GET /v1/models/status/stream?cluster=true`), read
with `fetch` (an `EventSource` cannot send a header)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from common.errors import NotFound
from gateway.tenancy.principals import UI_ASSETS

router = APIRouter(tags=["ui"], include_in_schema=False)

STATIC = Path(__file__).resolve().parents[1] / "ui" / "static"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css", "icon.svg": "image/svg+xml"}
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Only what the package serves; the page's own fetches go to this gateway alone.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
async def page() -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


@router.get(UI_ASSETS + "{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"No asset {name!r}.")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
