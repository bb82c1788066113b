"""One error hierarchy for everything the SDK raises.

    TuneforgeError
    ├── APIError                      the server or the network failed the request
    │   ├── APIConnectionError        no response (refused, reset, DNS)
    │   │   └── APITimeoutError
    │   └── APIStatusError            a response with status >= 400; .status_code, .code
    │       ├── BadRequestError           400
    │       ├── AuthenticationError       401
    │       ├── PermissionDeniedError     403
    │       ├── NotFoundError             404
    │       ├── ConflictError             409
    │       ├── PayloadTooLargeError      413
    │       ├── UnprocessableEntityError  422
    │       ├── RateLimitError            429
    │       └── InternalServerError       >= 500
    ├── JobTimeoutError               jobs.wait() ran out of time
    └── AdapterIntegrityError         a downloaded file does not match its manifest

The server answers errors as ``{"error": {"code", "message", "param", "type"}}``.
"""

from __future__ import annotations

from typing import Any

import httpx


class TuneforgeError(Exception):
    pass


class APIError(TuneforgeError):
    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.body = body


class APIConnectionError(APIError):
    def __init__(self, message: str = "Connection error.") -> None:
        super().__init__(message, code="connection_error")


class APITimeoutError(APIConnectionError):
    def __init__(self) -> None:
        super().__init__("Request timed out.")
        self.code = "timeout"


class APIStatusError(APIError):
    status_code: int

    def __init__(self, message: str, *, response: httpx.Response, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.response = response
        self.status_code = response.status_code
        self.request_id: str | None = response.headers.get("x-request-id")

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        request = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.status_code}{code}: {self.message}{request}"


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class PayloadTooLargeError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


class JobTimeoutError(TuneforgeError):
    pass


class AdapterIntegrityError(TuneforgeError):
    pass


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def error_from_response(response: httpx.Response) -> APIStatusError:
    """Build the matching exception from an error response and its envelope."""
    try:
        body = response.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or response.reason_phrase)
        kw = {"code": err.get("code"), "param": err.get("param"), "type": err.get("type")}
    else:
        message = response.text[:500] or response.reason_phrase
        kw = {}
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIStatusError
    return cls(message, response=response, body=body, **kw)
