"""Media downloads from Meta: WhatsApp's two-step fetch and Messenger/Instagram attachment URLs.

Every hop (the Graph API lookup, the CDN download, each redirect) passes the same guard before a
socket is opened:

1. scheme ``https`` (``http`` too outside production, for the sandbox); in production port 443;
2. a host name on the allow-list (``PARLEY_MEDIA_ALLOWED_HOSTS`` plus the configured Graph API
   host); numeric host forms other than a canonical dotted quad (``2130706433``, ``0x7f000001``,
   ``0177.0.0.1``, ``127.1``) and URLs with user info are refused outright;
3. the host is resolved here, once, and every address must be global unicast: loopback,
   private, link-local, multicast, unspecified, reserved, shared (100.64/10) addresses and IPv6
   forms embedding one of them (IPv4-mapped, 6to4, Teredo, NAT64) are refused. The one
   exception is the development sandbox: with ``PARLEY_MEDIA_SANDBOX_LOOPBACK`` the exact origin
   (host and port) of the Graph API URL may be loopback, and nothing else;
4. the connection goes to the vetted address (pinned in the network backend), while the Host
   header, SNI and certificate check keep the host name.

Redirects are never followed by the HTTP stack: at most ``PARLEY_MEDIA_MAX_REDIRECTS`` are
followed here, each re-vetted from step 1. The Bearer token goes only to the origin it was
meant for (the Graph API origin, then the origin of the media URL the Graph API returned); a
redirect to another origin is followed without it. Bodies are streamed and abandoned at
``max_bytes + 1`` whatever ``Content-Length`` says; a whole fetch has a deadline.

Errors (callers map them to a notice or a retry)::

    MediaError
    ├── MediaRefused       the guard or an integrity check said no (never retry)
    ├── MediaTooLarge      over the size cap (never retry; tell the user)
    └── MediaUnavailable   network failure, deadline, or an error status; ``retryable`` says
                           whether trying again later can help (timeouts, 429, 5xx)

No function here touches the database; ``from_settings`` is the only place settings are read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx
import structlog

from core.config import Settings, get_settings

log = structlog.get_logger()

MIB = 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_METADATA_LIMIT = 64 * 1024
_MEDIA_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class MediaError(Exception):
    """Base of every media download failure."""


class MediaRefused(MediaError):
    """The guard refused a URL or address, or the content failed its integrity check."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MediaTooLarge(MediaError):
    """The media is (or announced itself as) larger than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"media larger than {limit} bytes")
        self.limit = limit


class MediaUnavailable(MediaError):
    """The media could not be fetched; ``retryable`` when a later attempt may succeed."""

    def __init__(self, reason: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.status = status


@dataclass(frozen=True)
class Media:
    content: bytes
    mime_type: str
    size: int
    sha256: str  # hex digest of ``content``


def _host_pattern(pattern: str) -> re.Pattern[str]:
    """``*`` alone matches every host; a leading ``*.`` one or more labels; any other ``*`` part
    of one label (``scontent*.xx.fbcdn.net``)."""
    pattern = pattern.strip().lower().rstrip(".")
    if pattern == "*":
        return re.compile(r".+")
    prefix = ""
    if pattern.startswith("*."):
        prefix, pattern = r"(?:[a-z0-9_-]+\.)+", pattern[2:]
    body = r"[a-z0-9_-]*".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(prefix + body)


@dataclass(frozen=True)
class MediaPolicy:
    """The rules every hop is held to. Build it with :meth:`from_settings` outside tests."""

    max_bytes: int = 16 * MIB
    allowed_hosts: tuple[str, ...] = ()
    https_only: bool = True
    # (host, port) origins that may resolve to loopback: the development sandbox only.
    loopback_origins: frozenset[tuple[str, int]] = frozenset()
    max_redirects: int = 3
    timeout: float = 15.0
    deadline: float = 60.0
    # Trust store for https hops; None: httpx's default (certifi).
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    _patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        patterns = tuple(_host_pattern(p) for p in self.allowed_hosts if p.strip())
        object.__setattr__(self, "_patterns", patterns)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> MediaPolicy:
        settings = settings or get_settings()
        graph = httpx.URL(settings.graph_api_url)
        hosts = [h for h in settings.media_allowed_hosts.split(",") if h.strip()]
        if graph.host:
            hosts.append(_host_of(graph))
        loopback: frozenset[tuple[str, int]] = frozenset()
        if settings.media_sandbox_loopback and settings.sandbox and not settings.is_production:
            loopback = frozenset({(_host_of(graph), _port_of(graph))})
        return cls(
            max_bytes=settings.media_max_bytes,
            allowed_hosts=tuple(hosts),
            https_only=settings.is_production,
            loopback_origins=loopback,
            max_redirects=settings.media_max_redirects,
            timeout=settings.media_timeout,
            deadline=settings.media_deadline,
        )

    def allows_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(p.fullmatch(host) for p in self._patterns)


def _host_of(url: httpx.URL) -> str:
    return url.raw_host.decode("ascii").lower().rstrip(".")


def _port_of(url: httpx.URL) -> int:
    if url.port is not None:
        return url.port
    return 443 if url.scheme == "https" else 80


def _embedded(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def address_refusal(ip: IPAddress) -> str | None:
    """Why a connection to ``ip`` is not allowed (None when it is a global unicast address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in _embedded(ip):
            reason = address_refusal(inner)
            if reason is not None:
                return reason
    checks = (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("shared", isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED),
        ("not global", not ip.is_global),
    )
    for reason, hit in checks:
        if hit:
            return reason
    return None


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    host: str
    port: int
    addresses: tuple[str, ...]

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.url.scheme, self.host, self.port)


def _refuse(reason: str, **fields: Any) -> MediaRefused:
    log.warning("webhooks.media_refused", reason=reason, **fields)
    return MediaRefused(reason)


def _parse(raw: str | httpx.URL) -> httpx.URL:
    try:
        return raw if isinstance(raw, httpx.URL) else httpx.URL(raw)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise _refuse("invalid url") from exc


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise MediaUnavailable("host does not resolve", retryable=True) from exc
    addresses: list[IPAddress] = []
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]
        ip = ipaddress.ip_address(text)
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise MediaUnavailable("host does not resolve", retryable=True)
    return addresses


def vet(url: str | httpx.URL, policy: MediaPolicy) -> _Target:
    """Check ``url`` against ``policy`` and resolve it; the address to connect to, or
    :class:`MediaRefused`. No connection is made."""
    parsed = _parse(url)
    if parsed.scheme not in ("http", "https"):
        raise _refuse("scheme not allowed", scheme=parsed.scheme)
    if policy.https_only and parsed.scheme != "https":
        raise _refuse("https required")
    if parsed.userinfo:
        raise _refuse("user info in url")
    if not parsed.raw_host:
        raise _refuse("no host")
    host = _host_of(parsed)
    port = _port_of(parsed)
    if policy.https_only and port != 443:
        raise _refuse("port not allowed", host=host)
    literal: IPAddress | None = None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        if all(_NUMERIC_LABEL.fullmatch(label) for label in host.split(".")):
            raise _refuse("numeric host form", host=host) from None
    if not policy.allows_host(host):
        raise _refuse("host not allowed", host=host)
    addresses = [literal] if literal is not None else _resolve(host, port)
    for ip in addresses:
        reason = address_refusal(ip)
        if reason == "loopback" and (host, port) in policy.loopback_origins:
            continue
        if reason is not None:
            raise _refuse(f"{reason} address", host=host)
    return _Target(url=parsed, host=host, port=port, addresses=tuple(map(str, addresses)))


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects only to the vetted addresses of the one host it was made for, in order."""

    def __init__(self, host: str, addresses: tuple[str, ...]) -> None:
        self._host = host
        self._addresses = addresses
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        if host.lower().rstrip(".") != self._host:
            raise httpcore.ConnectError("connection to an unvetted host")
        failure: httpcore.ConnectError | None = None
        for address in self._addresses:
            try:
                return self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure or httpcore.ConnectError("no address")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not used for media")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


@dataclass(frozen=True)
class _Body:
    content: bytes
    content_type: str


_ssl_context: ssl.SSLContext | None = None


def _tls() -> ssl.SSLContext:
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = httpx.create_ssl_context()
    return _ssl_context


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _status_error(status: int) -> MediaUnavailable:
    retryable = status == 429 or status >= 500
    return MediaUnavailable(f"HTTP {status}", retryable=retryable, status=status)


def _get(
    url: str | httpx.URL,
    policy: MediaPolicy,
    *,
    max_bytes: int,
    deadline: float,
    token: str | None = None,
) -> _Body:
    """GET ``url`` under ``policy``, following redirects by hand. The token is sent only to the
    origin of ``url`` itself."""
    current = _parse(url)
    token_origin: tuple[str, str, int] | None = None
    for _hop in range(policy.max_redirects + 1):
        target = vet(current, policy)
        if token_origin is None:
            token_origin = target.origin
        headers = [(b"Accept-Encoding", b"identity"), (b"User-Agent", b"parley-media")]
        if token is not None and target.origin == token_origin:
            headers.append((b"Authorization", b"Bearer " + token.encode()))
        answer = _exchange(target, headers, policy, max_bytes=max_bytes, deadline=deadline)
        if isinstance(answer, _Body):
            return answer
        current = _parse(current.join(answer))
        log.info("webhooks.media_redirect", host=_host_of(current) if current.raw_host else None)
    raise _refuse("too many redirects")


def _exchange(
    target: _Target,
    headers: list[tuple[bytes, bytes]],
    policy: MediaPolicy,
    *,
    max_bytes: int,
    deadline: float,
) -> _Body | str:
    """One request to the pinned address: the body, or the Location of a redirect."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise MediaUnavailable("deadline exceeded", retryable=True)
    wait = min(policy.timeout, remaining)
    request_url = httpcore.URL(
        scheme=target.url.raw_scheme,
        host=target.url.raw_host,
        port=target.url.port,
        target=target.url.raw_path,
    )
    timeouts = {"connect": wait, "read": wait, "write": wait, "pool": wait}
    pool = httpcore.ConnectionPool(
        ssl_context=(policy.tls or _tls()) if target.url.scheme == "https" else None,
        network_backend=_PinnedBackend(target.host, target.addresses),
        max_connections=1,
        retries=0,
    )
    try:
        with (
            pool,
            pool.stream(
                "GET", request_url, headers=headers, extensions={"timeout": timeouts}
            ) as response,
        ):
            return _read(response, max_bytes=max_bytes, deadline=deadline)
    except httpcore.TimeoutException as exc:
        raise MediaUnavailable("timed out", retryable=True) from exc
    except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
        raise MediaUnavailable("connection failed", retryable=True) from exc


def _read(response: httpcore.Response, *, max_bytes: int, deadline: float) -> _Body | str:
    if response.status in _REDIRECTS:
        location = _header(response.headers, b"location")
        if not location:
            raise MediaUnavailable("redirect without location", retryable=False)
        return location
    if response.status != 200:
        raise _status_error(response.status)
    encoding = (_header(response.headers, b"content-encoding") or "identity").lower()
    if encoding != "identity":
        raise _refuse("encoded response")
    declared = _header(response.headers, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise MediaTooLarge(max_bytes)
    chunks: list[bytes] = []
    total = 0
    stream = response.stream
    assert isinstance(stream, Iterable)
    for chunk in stream:
        total += len(chunk)
        if total > max_bytes:
            raise MediaTooLarge(max_bytes)
        if time.monotonic() > deadline:
            raise MediaUnavailable("deadline exceeded", retryable=True)
        chunks.append(chunk)
    content_type = _header(response.headers, b"content-type") or ""
    return _Body(b"".join(chunks), content_type.split(";", 1)[0].strip().lower())


def _media(content: bytes, mime_type: str) -> Media:
    digest = hashlib.sha256(content).hexdigest()
    return Media(content, mime_type or "application/octet-stream", len(content), digest)


def _expected_digest(value: str) -> bytes:
    """WhatsApp's ``sha256`` as raw bytes: hex is documented, base64 is accepted too."""
    if _HEX_SHA256.fullmatch(value):
        return bytes.fromhex(value)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise _refuse("malformed sha256")
    return raw


def _metadata(body: bytes) -> Mapping[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MediaUnavailable("media lookup answered no JSON", retryable=False) from exc
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        raise MediaUnavailable("media lookup answered no url", retryable=False)
    return data


def fetch_whatsapp_media(
    media_id: str,
    *,
    token: str,
    graph_url: str,
    version: str,
    policy: MediaPolicy | None = None,
) -> Media:
    """Download WhatsApp media: ``GET {graph_url}/{version}/{media_id}`` with the Bearer token,
    then ``GET`` the returned URL with the same token. The ``sha256`` and ``file_size`` the
    Graph API states are checked. Raises :class:`MediaError`; no side effects but the requests.
    """
    policy = policy or MediaPolicy.from_settings()
    if not _MEDIA_ID.fullmatch(media_id):
        raise _refuse("malformed media id")
    deadline = time.monotonic() + policy.deadline
    lookup = f"{graph_url.rstrip('/')}/{version.strip('/')}/{media_id}"
    answer = _get(lookup, policy, max_bytes=_METADATA_LIMIT, deadline=deadline, token=token)
    meta = _metadata(answer.content)
    size = meta.get("file_size")
    if isinstance(size, int) and size > policy.max_bytes:
        raise MediaTooLarge(policy.max_bytes)
    stated = meta.get("sha256")
    expected = _expected_digest(stated) if isinstance(stated, str) and stated else None
    body = _get(meta["url"], policy, max_bytes=policy.max_bytes, deadline=deadline, token=token)
    media = _media(body.content, str(meta.get("mime_type") or body.content_type))
    if expected is not None and not hmac.compare_digest(
        expected, hashlib.sha256(body.content).digest()
    ):
        raise _refuse("sha256 mismatch")
    return media


def fetch_attachment(url: str, *, policy: MediaPolicy | None = None) -> Media:
    """Download a Messenger/Instagram attachment URL (no token) under the same guard.
    Raises :class:`MediaError`."""
    policy = policy or MediaPolicy.from_settings()
    deadline = time.monotonic() + policy.deadline
    body = _get(url, policy, max_bytes=policy.max_bytes, deadline=deadline)
    return _media(body.content, body.content_type)
