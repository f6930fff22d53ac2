"""The inference error tree; see the ``inference`` package docstring for what callers do."""

from __future__ import annotations


class InferenceError(Exception):
    """Base of every error raised by the inference client.

    ``endpoint`` is the base URL of the server involved, or ``None`` when no server was
    tried. Messages name statuses and error kinds only, never prompt or reply content.
    """

    def __init__(self, message: str, *, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint

    def __str__(self) -> str:
        if self.endpoint is None:
            return self.message
        return f"{self.message} [{self.endpoint}]"


class Unavailable(InferenceError):
    """No server could take the request: refused, DNS, 5xx, 429, or no endpoint."""


class Timeout(InferenceError):
    """The server did not answer in time; the request may or may not have run."""


class BadRequest(InferenceError):
    """The server rejected the request (4xx); sending it again gives the same answer."""


class ContextTooLong(BadRequest):
    """The prompt plus ``max_tokens`` does not fit the model's context window."""


class BadResponse(InferenceError):
    """The server answered 2xx with a body that is not a chat completion."""
