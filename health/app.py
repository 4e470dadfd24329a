"""The health page's Starlette app: `/` (HTML), `/api/v1/state` (JSON), `/metrics`.

The app only reads snapshots from `source` (the collector's latest one); it never
touches the swarm, so a slow or hostile peer cannot stall a page load.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .metrics import CONTENT_TYPE, metrics_registry, render_metrics
from .render import render_page
from .state import SwarmSnapshot

# No script runs on the page; nothing from a peer may either.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _unavailable() -> Response:
    return JSONResponse({"error": "no snapshot yet"}, status_code=503, headers=SECURITY_HEADERS)


def health_app(source: Callable[[], SwarmSnapshot | None]) -> Starlette:
    registry = metrics_registry(source)

    async def page(request: Request) -> Response:
        snapshot = source()
        if snapshot is None:
            return _unavailable()
        return HTMLResponse(render_page(snapshot), headers=SECURITY_HEADERS)

    async def state(request: Request) -> Response:
        snapshot = source()
        if snapshot is None:
            return _unavailable()
        return JSONResponse(snapshot.to_json(), headers=SECURITY_HEADERS)

    async def metrics(request: Request) -> Response:
        return Response(render_metrics(registry), media_type=CONTENT_TYPE)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/v1/state", state),
            Route("/metrics", metrics),
        ]
    )
