"""The error envelope ``{"error": {"code", "message", "param", "type"}}`` and its handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tuneforge.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class BodyTooLarge(Exception):
    """Raised while a request body streams in past its limit (see ``limits``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body exceeds the limit of {limit} bytes.")
        self.limit = limit


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers


def envelope(status: int, code: str, message: str, param: str | None = None) -> dict:
    return {
        "error": {"code": code, "message": message, "param": param, "type": _TYPES.get(status, "api_error")}
    }


def not_found(kind: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"{kind}_not_found", f"No {kind} found with id {ident!r}.", param=param)


def _validation_param(exc: RequestValidationError) -> tuple[str, str]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown field {param!r}"
    return (param or ""), (f"{param}: {msg}" if param else msg)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            envelope(exc.status, exc.code, exc.message, exc.param), exc.status, headers=exc.headers
        )

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse(envelope(413, "request_too_large", str(exc)), 413)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = _validation_param(exc)
        return JSONResponse(envelope(400, "invalid_request", message, param or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(envelope(exc.status_code, code, str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Log the type and path, not the request: bodies and headers may carry secrets.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(envelope(500, "internal_error", "Internal server error."), 500)
