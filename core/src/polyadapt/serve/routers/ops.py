"""``GET /health`` and ``GET /metrics`` (Prometheus text format)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from ..engine import Engine
from .common import get_engine

router = APIRouter(tags=["operations"])


@router.get("/health")
def health(engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    return engine.health()


@router.get("/metrics")
def metrics(engine: Engine = Depends(get_engine)) -> Response:
    body, content_type = engine.metrics.render()
    return Response(content=body, media_type=content_type)
