"""``POST /v1/images/generations``: ``prompt``, ``n``, ``size``, ``response_format: b64_json``; ``seed`` and
``lora_scale`` as polyadapt's extensions."""

from __future__ import annotations

import base64
import re
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .. import auth
from ..backend import ImageOptions, Images
from ..engine import Engine
from ..errors import APIError, too_large
from ..schemas import ImageRequest
from .common import get_engine, now, served_headers, wait

router = APIRouter(tags=["images"])
SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


@router.post("/v1/images/generations")
async def generations(
    body: ImageRequest, tenant: str = Depends(auth.tenant), engine: Engine = Depends(get_engine)
) -> Any:
    if body.response_format == "url":
        raise APIError(400, "response_format 'url' is not supported (this server keeps no files); use b64_json",
                       param="response_format")  # fmt: skip
    most = engine.config.limits.max_images
    if body.n > most:
        raise too_large(f"n is {body.n}; this server generates at most {most} images per request.", "n")
    size = None
    if body.size is not None and body.size != "auto":
        match = SIZE.match(body.size)
        if match is None:
            raise APIError(400, f"size {body.size!r} is not WIDTHxHEIGHT", param="size")
        size = (int(match.group(1)), int(match.group(2)))
    target = engine.resolve(body.model, tenant, "images", body.user)
    options = ImageOptions(n=body.n, size=size, seed=body.seed, lora_scale=body.lora_scale)
    spec = await run_in_threadpool(target.worker.backend.image_spec, body.prompt, target.adapter, options)
    result: Images = await wait(engine.submit(target, spec))
    engine.metrics.images.labels(target.label).inc(len(result.png))
    data = [
        {"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": None, "seed": seed}
        for png, seed in zip(result.png, result.seeds, strict=True)
    ]
    return JSONResponse({"created": now(), "data": data}, headers=served_headers(target))
