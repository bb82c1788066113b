"""The error envelope ``{"error": {"code", "message", "param", "type"}}`` and its handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("tuneforge.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None
    type: str


class ErrorEnvelope(BaseModel):
    """Every 4xx and 5xx body, as documented in the OpenAPI spec."""

    error: ErrorDetail


# Documented on every operation (create_app passes it to FastAPI): the statuses any route may
# answer with, so clients and the schema fuzzer (tests/fuzz/) know the envelope is the body.
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorEnvelope, "description": description}
    for status, description in {
        400: "Invalid request (bad input, in the error envelope).",
        401: "Missing or invalid API key.",
        403: "The key lacks the role (admin) this needs.",
        404: "No such object in the caller's project.",
        408: "The request body arrived too slowly.",
        409: "Conflict with the object's state.",
        413: "Request body too large.",
        415: "Unsupported Content-Encoding of the request body.",
        422: "Idempotency-Key reused with another body.",
        429: "Rate limit or project quota exceeded; see Retry-After.",
    }.items()
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


def _allowed_methods(request: Request) -> str:
    """Every method some route accepts on this path, for a 405's ``Allow`` (RFC 9110)."""
    methods: set[str] = set()
    for ctx in iter_route_contexts(request.app.routes):
        if ctx.methods and ctx.matches(request.scope)[0] != Match.NONE:
            methods |= set(ctx.methods)
    return ", ".join(sorted(methods))


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
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:  # Starlette names the first matching route's methods only
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return JSONResponse(
            envelope(exc.status_code, code, str(exc.detail)), exc.status_code, headers=headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Log the type and path, not the request: bodies and headers may carry secrets.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(envelope(500, "internal_error", "Internal server error."), 500)
