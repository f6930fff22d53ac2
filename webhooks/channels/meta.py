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


@dataclass(frozen=True)
class ErrorRule:
    """One row of the Graph error table (meta-channels reference a.6)."""

    kind: str
    meaning: str
    channels: str = "all"
    # The whole account is affected (policy block, locked account): the failure is logged as an
    # account alert for an admin, on top of its class.
    alert: bool = False


# The Graph error table, by ``error.code``. Codes 200-299 (permission missing) are a range and
# handled in :func:`rule_for`. Subcodes only refine, never override, a row: 190/463 (expired)
# and 10/2018278 (outside the allowed window) and 10/2018300 (thread owned by another app)
# land in the class of their code.
ERROR_TABLE: dict[int, ErrorRule] = {
    0: ErrorRule(CREDENTIALS, "AuthException: token expired or invalid"),
    102: ErrorRule(CREDENTIALS, "API session: token invalid"),
    190: ErrorRule(CREDENTIALS, "access token expired or invalid (subcode 463: expired)"),
    1: ErrorRule(RETRY, "unknown error"),
    2: ErrorRule(RETRY, "temporary service error"),
    3: ErrorRule(NEVER, "capability missing"),
    4: ErrorRule(RETRY, "application request limit reached"),
    10: ErrorRule(NEVER, "permission denied / outside the allowed window / thread owned elsewhere"),
    17: ErrorRule(RETRY, "user request limit reached"),
    32: ErrorRule(RETRY, "page request limit reached"),
    368: ErrorRule(NEVER, "temporarily blocked for policy violations", alert=True),
    551: ErrorRule(NEVER, "this person isn't available right now", "messenger,instagram"),
    613: ErrorRule(RETRY, "calls exceeded the rate limit", "messenger,instagram"),
    80007: ErrorRule(RETRY, "WhatsApp Business Account rate limit", "whatsapp"),
    130429: ErrorRule(RETRY, "Cloud API throughput exceeded", "whatsapp"),
    131000: ErrorRule(RETRY, "something went wrong", "whatsapp"),
    131026: ErrorRule(NEVER, "message undeliverable", "whatsapp"),
    131031: ErrorRule(NEVER, "business account locked", "whatsapp", alert=True),
    131047: ErrorRule(NEVER, "re-engagement: more than 24 h since the user's message", "whatsapp"),
    131048: ErrorRule(NEVER, "spam rate limit hit", "whatsapp"),
    131049: ErrorRule(NEVER, "Meta chose not to deliver (ecosystem limit)", "whatsapp"),
    131050: ErrorRule(NEVER, "user stopped marketing messages", "whatsapp"),
    131051: ErrorRule(NEVER, "unsupported message type", "whatsapp"),
    131056: ErrorRule(RETRY, "pair rate limit: too many messages to this user", "whatsapp"),
    131057: ErrorRule(RETRY, "account in maintenance (throughput upgrade)", "whatsapp"),
    131060: ErrorRule(NEVER, "message unavailable", "whatsapp"),
}
_PERMISSION = ErrorRule(NEVER, "permission missing (200-299)")

# Kept for callers that test membership.
RETRY_CODES = frozenset(c for c, r in ERROR_TABLE.items() if r.kind == RETRY)
CREDENTIAL_CODES = frozenset(c for c, r in ERROR_TABLE.items() if r.kind == CREDENTIALS)


def rule_for(code: int | None) -> ErrorRule | None:
    if code is None:
        return None
    if 200 <= code <= 299:
        return _PERMISSION
    return ERROR_TABLE.get(code)


@dataclass(frozen=True)
class SendError:
    kind: str  # RETRY | NEVER | CREDENTIALS
    status: int
    code: int | None
    retry_after: float | None = None
    subcode: int | None = None
    alert: bool = False  # the account as a whole is blocked or locked

    def describe(self) -> str:
        """A short text for ``last_error``: status, code and class, never Meta's message."""
        code = f" code {self.code}" if self.code is not None else ""
        return f"graph {self.status}{code} {self.kind}"


def _int_field(response: Any, name: str) -> int | None:
    if isinstance(response, dict) and isinstance(response.get("error"), dict):
        raw = response["error"].get(name)
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    return None


def error_code(response: Any) -> int | None:
    return _int_field(response, "code")


def classify_error(status: int, response: Any, retry_after: str | None = None) -> SendError:
    """Class of a non-2xx Graph API answer (``response`` is its decoded JSON or None).

    A code in :data:`ERROR_TABLE` decides; code 0 counts as credentials only when its type is an
    auth exception (``OAuthException``/``AuthException``). Without a known code the HTTP status
    decides: 401 credentials, 429 and 5xx retry, anything else never."""
    code = error_code(response)
    subcode = _int_field(response, "error_subcode")
    error_type = ""
    if isinstance(response, dict) and isinstance(response.get("error"), dict):
        error_type = str(response["error"].get("type") or "")
    wait = parse_retry_after(retry_after)
    rule = rule_for(code)
    alert = False
    if code == 0 and "Auth" not in error_type:
        rule = None
    if rule is not None:
        kind = rule.kind
        alert = rule.alert
    elif status == 401:
        kind = CREDENTIALS
    elif status == 429 or status >= 500:
        kind = RETRY
    else:
        kind = NEVER
    return SendError(kind, status, code, wait, subcode, alert)


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
