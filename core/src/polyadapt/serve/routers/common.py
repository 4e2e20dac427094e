"""What the routers share: the engine dependency, waiting on a job, the adapter header, ids."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import Request

from ..backend import Job
from ..engine import Engine, Target

ADAPTER_HEADER = "x-polyadapt-adapter"
ROUTE_HEADER = "x-polyadapt-route"


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def served_headers(target: Target) -> dict[str, str]:
    """``x-polyadapt-adapter``: the adapter version that served the response; ``x-polyadapt-route``: the route's
    choice when the model was a route."""
    headers = {ADAPTER_HEADER: target.label}
    if target.decision is not None:
        headers[ROUTE_HEADER] = f"{target.decision.route}={target.served}"
    return headers


async def wait(job: Job) -> Any:
    """The job's result; if the client goes away first, the job is cancelled."""
    try:
        return await asyncio.wrap_future(job.future)
    except asyncio.CancelledError:
        job.cancelled.set()
        raise


async def wait_all(jobs: list[Job]) -> list[Any]:
    try:
        return list(await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)))
    except BaseException:
        for job in jobs:
            job.cancelled.set()
        raise


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
