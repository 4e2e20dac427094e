"""``GET /v1/models``: only the caller's models, each with its base as ``parent`` and the version it serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from .. import auth
from ..engine import Engine
from ..errors import model_not_found
from .common import get_engine

router = APIRouter(tags=["models"])


@router.get("/v1/models")
def list_models(tenant: str = Depends(auth.tenant), engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    return {"object": "list", "data": engine.models_for(tenant)}


@router.get("/v1/models/{model:path}")
def get_model(model: str, tenant: str = Depends(auth.tenant), engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    for item in engine.models_for(tenant):
        if item["id"] == model:
            return item
    raise model_not_found(model)
