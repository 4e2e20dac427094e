"""The FastAPI application: routers per concern over the :class:`polyadapt.serve.engine.Engine`, one exception
handler for every error, and a middleware that counts requests, times them and refuses oversized bodies (413)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from ..errors import PolyadaptError
from .auth import Keyring
from .backend import RequestProblem
from .engine import Engine
from .errors import APIError, as_api_error, handle, too_large

KNOWN = {
    "/v1/completions", "/v1/chat/completions", "/v1/audio/transcriptions", "/v1/images/generations", "/v1/models",
    "/health", "/metrics",
}  # fmt: skip


def create_app(engine: Engine) -> FastAPI:
    from .routers import admin, audio, images, models, ops, text

    app = FastAPI(title="polyadapt serve", version="1", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.keyring = Keyring(engine.keys.tenants, engine.keys.admin)
    # one handler for every error a request can meet; anything else is turned into a 500 by the middleware
    for kind in (APIError, RequestProblem, PolyadaptError, RequestValidationError, HTTPException):
        app.add_exception_handler(kind, handle)
    for router in (models.router, text.router, audio.router, images.router, admin.router, ops.router):
        app.include_router(router)
    app.add_middleware(ServeMiddleware, engine=engine)
    return app


def endpoint_label(path: str) -> str:
    if path in KNOWN:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models"
    if path.startswith("/admin/"):
        return "/admin"
    return "other"


class ServeMiddleware:
    """Pure ASGI (streaming responses pass through untouched): request metrics and the body size limit."""

    def __init__(self, app: Any, engine: Engine) -> None:
        self.app = app
        self.metrics = engine.metrics
        self.max_bytes = int(engine.config.limits.max_request_mb * 2**20)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_label(scope.get("path", ""))
        start = time.perf_counter()
        status: dict[str, Any] = {"code": 500}
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        limit = self.max_bytes

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
            await send(message)

        if length is not None and length.isdigit() and int(length) > limit:
            await self._refuse(scope, receive, counted_send, limit)
        else:
            seen = {"bytes": 0}

            async def limited_receive() -> dict:
                message = await receive()
                if message["type"] == "http.request":
                    seen["bytes"] += len(message.get("body", b""))
                    if seen["bytes"] > limit:
                        raise too_large(f"The request body is larger than {limit // 2**20} MiB.")
                return message

            try:
                await self.app(scope, limited_receive, counted_send)
            except Exception as exc:  # unexpected: answered as OpenAI's 500 error, and the server goes on
                if status.get("started"):
                    raise
                from fastapi.responses import JSONResponse

                error = as_api_error(exc)
                if error.status == 413:
                    await drain(receive, limit + max(limit, DRAIN_BYTES))
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, counted_send)
        code = str(status["code"])
        self.metrics.requests.labels(endpoint, code).inc()
        if status["code"] >= 400:
            self.metrics.errors.labels(endpoint, code).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any, limit: int) -> None:
        """413 after reading (and dropping) the body, up to a bound: a client still sending when the answer comes
        and the socket closes gets a connection reset instead of the 413."""
        from fastapi.responses import JSONResponse

        await drain(receive, limit + max(limit, DRAIN_BYTES))
        error = too_large(f"The request body is larger than {limit // 2**20} MiB.")
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


DRAIN_BYTES = 16 * 2**20


async def drain(receive: Any, most: int) -> None:
    """Read and drop what is left of a request body, at most ``most`` bytes."""
    seen = 0
    while seen <= most:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
