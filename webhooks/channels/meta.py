"""What all three Meta channels share: the verification handshake and the payload signature."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

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
