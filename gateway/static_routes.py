"""The demo chat page at `/` and its files under `/static/` (no credential needed)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).parent / "static"


async def get_index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def add_static_routes(app: web.Application) -> None:
    """aiohttp's static resource refuses paths outside the folder (no traversal)."""
    app.router.add_get("/", get_index)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
