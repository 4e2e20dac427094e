"""Errors in OpenAI's shape, from one exception handler: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a request can meet becomes an :class:`APIError` (or is turned into one by :func:`as_api_error`): a bad
key (401), a model the tenant may not use, answered exactly like one that does not exist (404), malformed JSON, wrong
types, empty or corrupt audio, a prompt beyond the context (400), a request past the limits (413), and anything
unexpected (500, logged with its traceback). The server goes on serving after each.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("polyadapt.serve")

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
         404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 503: "server_error"}  # fmt: skip


class APIError(Exception):
    """An error answered in OpenAI's shape with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid_key() -> APIError:
    return APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.", code="invalid_api_key")


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model '{model}' does not exist or you do not have access to it.", param="model",
        code="model_not_found",
    )  # fmt: skip


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param, code="request_too_large")


def as_api_error(exc: BaseException) -> APIError:
    """Any exception as the :class:`APIError` to answer."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from ..errors import PolyadaptError
    from .backend import RequestProblem

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestProblem):
        return APIError(exc.status, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, HTTPException):
        message = {404: "Unknown endpoint.", 405: "Method not allowed."}.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message)
    if isinstance(exc, PolyadaptError):
        return APIError(400, str(exc))
    log.error("unexpected error", exc_info=exc)
    return APIError(500, f"The server had an error while processing the request ({type(exc).__name__}).",
                    kind="server_error")  # fmt: skip


def _validation_error(exc: Any) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON{f' ({detail})' if detail else ''}.",
                        code="invalid_json")  # fmt: skip
    lines = []
    param = None
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "header", "form")]
        key = ".".join(loc) or "body"
        param = param or key
        lines.append(f"{key}: {error.get('msg', 'invalid')}")
    return APIError(400, "Invalid request: " + "; ".join(lines), param=param, code="invalid_request")


async def handle(request: Any, exc: Exception) -> Any:
    """The one exception handler: every error as OpenAI's error JSON."""
    from fastapi.responses import JSONResponse

    error = as_api_error(exc)
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)
