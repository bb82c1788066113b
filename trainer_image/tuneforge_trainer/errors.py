"""Failures the trainer reports as non-retriable (exit code 42).

Anything else that escapes is treated as retriable (exit code 1): a crash, an OOM, a
storage outage. Only errors that another attempt cannot fix belong here.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_NON_RETRIABLE = 42
EXIT_RETRIABLE = 1


class NonRetriableError(Exception):
    """A failure retrying cannot fix; its message is shown to the user, so no stack traces."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def to_error(self) -> dict[str, Any]:
        """The job's ``error`` object: ``{code, message, param}``."""
        return {"code": self.code, "message": self.message, "param": self.param}


class ConfigError(NonRetriableError):
    """The spec asks for something this trainer cannot do (unsupported method, missing base model)."""
