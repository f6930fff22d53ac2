"""Errors that carry their HTTP status: an expected problem is a 4xx with a reason, never a 500."""

from __future__ import annotations


class AppError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


def error_body(exc: AppError) -> dict[str, str]:
    """The JSON every error answer carries."""
    return {"error": exc.code, "detail": exc.message}


class BadRequest(AppError):
    status_code = 400
    code = "bad_request"


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "payload_too_large"


class Unavailable(AppError):
    """A dependency did not answer in time; the client should retry (Meta does)."""

    status_code = 503
    code = "unavailable"


class ConfigError(AppError):
    """A bot configuration file is invalid; the message names the file and line."""

    status_code = 422
    code = "invalid_config"
