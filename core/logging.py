"""Structured JSON logs that never carry message bodies, phone numbers or tokens.

Events are named ``area.event`` and carry ids. Two guards stand behind that habit: keys that name
sensitive fields are dropped, and every string value is scrubbed of e-mail addresses and long digit
runs (phone numbers, card numbers) before it is written.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SENSITIVE_KEYS = frozenset(
    {
        "body",
        "text",
        "content",
        "messages",
        "prompt",
        "reply",
        "token",
        "access_token",
        "app_secret",
        "secret",
        "password",
        "authorization",
        "phone",
        "wa_id",
        "from",
        "to",
        "payload",
    }
)
_SCRUB = re.compile(
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"  # e-mail
    r"|\+?\d[\d ().-]{5,}\d"  # phone / card-like digit runs (7+ digits with separators)
)


def scrub(value: str) -> str:
    return _SCRUB.sub("[redacted]", value)


def _scrub_event(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key.lower() in SENSITIVE_KEYS:
            event_dict[key] = "[redacted]"
        else:
            value = event_dict[key]
            if isinstance(value, str):
                event_dict[key] = scrub(value)
    return event_dict


_configured = False


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was when logging
    was configured: a line logged later from a background thread (the intake's totals) must
    not go to a stream that was replaced and closed meanwhile (a test runner's capture)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Configure structlog and route the standard library's loggers through the same scrubber."""
    global _configured
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.format_exc_info,
        _scrub_event,
        # After the scrubber: an ISO date is a digit run it would blank out.
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _configured = True
