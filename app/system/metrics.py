"""`GET /metrics`: this process's Prometheus metrics (`app/core/metrics.py`).

The route carries no credential check of its own: `create_app` includes it behind the admin
dependency, so the system layer needs no access domain. What must be fresh at a scrape (the
queue gauges) is refreshed first by the callables the API root leaves in
`app.state.metric_refreshers`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.core.metrics import exposition

router = APIRouter(tags=["system"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus's text exposition of this process's metrics (admin keys only)."""
    for refresh in getattr(request.app.state, "metric_refreshers", ()):
        await refresh()
    body, content_type = exposition()
    return Response(body, media_type=content_type)
