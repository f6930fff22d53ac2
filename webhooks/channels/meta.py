"""What all three Meta channels share: the verification handshake, the payload signature and
the classification of send errors."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

_SIGNATURE = re.compile(r"sha256=([0-9a-fA-F]{64})")


class SignatureError(Exception):
    """The request is not signed by any configured Meta app.

    ``missing`` is True when there is no usable ``X-Hub-Signature-256`` header at all (401),
    False when a well-formed signature matches no app secret (403).
    """

    def __init__(self, reason: str, *, missing: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing


def sign(body: bytes, secret: str) -> str:
    """The ``X-Hub-Signature-256`` header value Meta sends for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secrets: Sequence[str]) -> int:
    """Return the index of the app secret that signed ``body`` (raw bytes, as received).

    Only ``X-Hub-Signature-256`` is accepted; every secret is compared in constant time.
    Raises :class:`SignatureError`.
    """
    if not header:
        raise SignatureError("missing X-Hub-Signature-256", missing=True)
    match = _SIGNATURE.fullmatch(header.strip())
    if match is None:
        raise SignatureError("malformed X-Hub-Signature-256", missing=True)
    given = match.group(1).lower().encode()
    found = -1
    for index, secret in enumerate(secrets):
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().encode()
        # No early exit: the time taken does not depend on which secret matched.
        if hmac.compare_digest(expected, given) and found < 0:
            found = index
    if found < 0:
        raise SignatureError("signature does not match any app secret", missing=False)
    return found


@dataclass(frozen=True)
class Handshake:
    mode: str | None
    token: str | None
    challenge: str | None


class HandshakeError(Exception):
    def __init__(self, reason: str, *, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def answer_handshake(query: Handshake, verify_tokens: Sequence[str]) -> str:
    """The challenge to echo as text/plain, or :class:`HandshakeError` (400 or 403)."""
    if query.mode != "subscribe":
        raise HandshakeError("hub.mode must be 'subscribe'", status=403)
    token = (query.token or "").encode()
    ok = False
    for candidate in verify_tokens:
        ok |= hmac.compare_digest(candidate.encode(), token)
    if not ok or not query.token:
        raise HandshakeError("hub.verify_token does not match", status=403)
    if not query.challenge:
        raise HandshakeError("hub.challenge is missing", status=400)
    return query.challenge


# --- send errors ----------------------------------------------------------------------------
#
# Meta's error body: {"error": {"message", "type", "code", "error_subcode", "error_data",
# "fbtrace_id"}}. Retry decisions follow ``code`` (meta-channels reference a.6), never the
# message text.

RETRY = "retry"  # definitely not taken: try again after a back-off
NEVER = "never"  # refused for this message: retrying cannot help
CREDENTIALS = "credentials"  # the account's token is refused: pause the account

# Throttling, temporary and unknown server errors.
RETRY_CODES = frozenset({1, 2, 4, 17, 32, 613, 80007, 130429, 131000, 131056, 131057})
# Token expired, invalidated or unparseable.
CREDENTIAL_CODES = frozenset({102, 190})


@dataclass(frozen=True)
class SendError:
    kind: str  # RETRY | NEVER | CREDENTIALS
    status: int
    code: int | None
    retry_after: float | None = None

    def describe(self) -> str:
        """A short text for ``last_error``: status, code and class, never Meta's message."""
        code = f" code {self.code}" if self.code is not None else ""
        return f"graph {self.status}{code} {self.kind}"


def error_code(response: Any) -> int | None:
    if isinstance(response, dict) and isinstance(response.get("error"), dict):
        raw = response["error"].get("code")
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    return None


def classify_error(status: int, response: Any, retry_after: str | None = None) -> SendError:
    """Class of a non-2xx Graph API answer (``response`` is its decoded JSON or None)."""
    code = error_code(response)
    error_type = ""
    if isinstance(response, dict) and isinstance(response.get("error"), dict):
        error_type = str(response["error"].get("type") or "")
    wait = parse_retry_after(retry_after)
    if status == 401 or code in CREDENTIAL_CODES or (code == 0 and "Auth" in error_type):
        kind = CREDENTIALS
    elif status == 429 or status >= 500 or code in RETRY_CODES:
        kind = RETRY
    else:
        kind = NEVER
    return SendError(kind, status, code, wait)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), 3600.0)


# Transport failures. Before the request could have reached Meta (no connection) a send is
# definitely not taken and may be retried; once it may have been written (read timeout,
# connection reset or closed before the answer) it is ambiguous and must not be resent blindly.
NOT_SENT = "not_sent"
AMBIGUOUS = "ambiguous"


def classify_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(
        exc,
        httpx.ConnectError
        | httpx.ConnectTimeout
        | httpx.PoolTimeout
        | httpx.UnsupportedProtocol
        | httpx.ProxyError,
    ):
        return NOT_SENT
    return AMBIGUOUS
