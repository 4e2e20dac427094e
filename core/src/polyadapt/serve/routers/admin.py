"""Admin endpoints (the admin key): list, add (from the registry only), remove, load and unload adapters at
runtime. An adapter is added by registry reference, never by a path: no request names a file on the server."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from .. import auth
from ..engine import Engine
from ..schemas import Request
from .common import get_engine

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(auth.admin)])


class AddAdapter(Request):
    name: str
    base: str
    source: str = Field(alias="from")
    tenants: list[str] = Field(default_factory=list)


@router.get("/adapters")
def list_adapters(engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    return {"object": "list", "data": engine.adapters_state()}


@router.post("/adapters")
async def add_adapter(body: AddAdapter, engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    source = await run_in_threadpool(engine.add_adapter, body.name, body.base, body.source, body.tenants)
    return {"name": source.name, "base": source.base, "version": source.current.label, "followed": source.followed}


@router.delete("/adapters/{name}")
async def remove_adapter(name: str, engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    source = await run_in_threadpool(engine.remove_adapter, name)
    return {"name": source.name, "removed": True}


@router.post("/adapters/{name}/load")
async def load_adapter(name: str, engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    source = await run_in_threadpool(engine.load, name)
    return {"name": name, "version": source.current.label, "loaded": True}


@router.post("/adapters/{name}/unload")
async def unload_adapter(name: str, engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    was = await run_in_threadpool(engine.unload, name)
    return {"name": name, "unloaded": was}
