"""Endpoint descriptions, the parser for ``PARLEY_INFERENCE_ENDPOINTS``, and DNS discovery."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import yaml

Role = Literal["chat", "guard", "vision"]
ROLES: tuple[Role, ...] = ("chat", "guard", "vision")
_OPTIONS = ("model", "role", "max_in_flight", "stream")
DNS_PREFIX = "dns+"

Resolver = Callable[[str, int], Sequence[str]]
"""Maps ``(host, port)`` to IP address strings; raises ``OSError`` when the name fails."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One OpenAI-compatible server.

    ``url`` is the base URL without ``/v1`` and without a trailing slash; the client calls
    ``{url}/v1/chat/completions``. A ``dns+http://NAME[:PORT][/prefix]`` url is a discovery
    entry rather than a server: every address ``NAME`` resolves to becomes a server
    ``http://ADDRESS:PORT[/prefix]`` with this entry's model, role and cap. ``model`` is the
    name sent in requests (``None`` lets the caller choose). ``role`` says which kind of
    request the server takes. ``max_in_flight`` caps the requests one process keeps open to
    it before spilling to the next server (``None``: the pool's default; 0: no cap).
    ``stream`` says whether replies are streamed (the default). Turn it off for a server
    that reports no token usage or context errors while streaming (llama-cpp-python's);
    such requests are still closed when the caller gives up, but the time to the first
    token is not measured and llama-cpp-python finishes the generation anyway.
    """

    url: str
    model: str | None = None
    role: Role = "chat"
    max_in_flight: int | None = None
    stream: bool = True

    @property
    def discovered_by_dns(self) -> bool:
        """Whether this is a ``dns+http://`` entry standing for the addresses of a name."""
        return self.url.startswith(DNS_PREFIX)


def normalize_base_url(raw: str) -> str:
    """Return ``raw`` as an ``http(s)://host[:port][/prefix]`` base without ``/v1``.

    Raises ``ValueError`` for other schemes, a missing host, or a query or fragment.
    """
    url = raw.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {raw!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"base URL may not have a query or fragment: {raw!r}")
    try:
        _ = parts.port  # raises ValueError on a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"bad port in URL: {raw!r}") from exc
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _normalize(raw: str) -> str:
    """``normalize_base_url`` that also takes ``dns+http://`` discovery entries."""
    url = raw.strip()
    if not url.startswith(DNS_PREFIX):
        return normalize_base_url(url)
    if not url.startswith(DNS_PREFIX + "http://"):
        raise ValueError(
            f"DNS discovery takes dns+http:// only (addresses cannot match a TLS name): {raw!r}"
        )
    return DNS_PREFIX + normalize_base_url(url[len(DNS_PREFIX) :])


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to: its IPv4 ones, or its IPv6 ones when it has none.

    One family only, so a dual-stack server (an A and an AAAA record per pod) counts once.
    Raises ``OSError`` (``socket.gaierror``) when the name does not resolve.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET]
    v6 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET6]
    return v4 or v6


def expand(entry: Endpoint, addresses: Sequence[str]) -> list[Endpoint]:
    """The servers of a ``dns+http://`` entry at ``addresses``, sorted and without duplicates.

    Strings that are not IP addresses are skipped, so a resolver answer cannot inject a URL.
    """
    parts = urlsplit(entry.url[len(DNS_PREFIX) :])
    port = parts.port or 80
    ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for address in addresses:
        try:
            ips.add(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            continue
    servers = []
    for ip in sorted(ips, key=lambda ip: (ip.version, int(ip))):
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        servers.append(replace(entry, url=f"http://{host}:{port}{parts.path}"))
    return servers


def dns_name(entry: Endpoint) -> tuple[str, int]:
    """The ``(host, port)`` a ``dns+http://`` entry resolves."""
    parts = urlsplit(entry.url[len(DNS_PREFIX) :])
    return parts.hostname or "", parts.port or 80


def _role(value: object, item: str) -> Role:
    for role in ROLES:
        if value == role:
            return role
    raise ValueError(f"unknown role {value!r} in {item!r}; expected one of {', '.join(ROLES)}")


def _cap(value: object, item: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"max_in_flight must be a whole number >= 0 in {item!r}")


def _flag(value: object, item: str) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f"stream must be true or false in {item!r}")


def _parse_item(item: str) -> Endpoint:
    url, _, fragment = item.partition("#")
    fields: dict[str, str] = {}
    if fragment:
        for pair in fragment.split("&"):
            key, sep, value = pair.partition("=")
            if not sep or key not in _OPTIONS or key in fields or not value:
                raise ValueError(
                    f"bad option {pair!r} in {item!r}; "
                    "use #model=NAME&role=ROLE&max_in_flight=N&stream=true|false"
                )
            fields[key] = unquote(value)
    try:
        base = _normalize(url)
    except ValueError as exc:
        raise ValueError(f"bad endpoint {item!r}: {exc}") from None
    return Endpoint(
        url=base,
        model=fields.get("model"),
        role=_role(fields.get("role", "chat"), item),
        max_in_flight=_cap(fields.get("max_in_flight"), item),
        stream=_flag(fields.get("stream"), item),
    )


def _load_pool(path: Path) -> list[Endpoint]:
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read endpoint pool {str(path)!r}: {exc}") from None
    entries = data.get("endpoints") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{str(path)!r} must be a mapping with an 'endpoints' list")
    endpoints: list[Endpoint] = []
    for index, entry in enumerate(entries):
        item = f"{path}: endpoints[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise ValueError(f"{item} must be a mapping with a 'url' string")
        unknown = set(entry) - {"url", *_OPTIONS}
        if unknown:
            raise ValueError(f"{item} has unknown keys: {', '.join(sorted(map(str, unknown)))}")
        model = entry.get("model")
        if model is not None and not (isinstance(model, str) and model):
            raise ValueError(f"{item}: 'model' must be a non-empty string")
        try:
            base = _normalize(entry["url"])
        except ValueError as exc:
            raise ValueError(f"{item}: {exc}") from None
        endpoints.append(
            Endpoint(
                url=base,
                model=model,
                role=_role(entry.get("role", "chat"), item),
                max_in_flight=_cap(entry.get("max_in_flight"), item),
                stream=_flag(entry.get("stream"), item),
            )
        )
    return endpoints


def parse_endpoints(spec: str) -> list[Endpoint]:
    """Parse an endpoint list.

    ``spec`` is either comma-separated
    ``URL[#model=NAME][&role=chat|guard|vision][&max_in_flight=N][&stream=true|false]``
    items (options in any order, role defaulting to ``chat``, blank items ignored) or
    ``@path/to/pool.yaml`` naming a YAML file
    ``endpoints: [{url, model, role, max_in_flight, stream}]``. A URL written
    ``dns+http://NAME[:PORT][/prefix]`` is kept as one discovery entry (see ``Endpoint``);
    the client resolves it. The order is kept: it is the failover order of requests
    without a conversation key. Raises
    ``ValueError`` naming the bad item, or when the spec holds no endpoint at all.
    """
    text = spec.strip()
    if text.startswith("@"):
        endpoints = _load_pool(Path(text[1:].strip()))
    else:
        endpoints = [_parse_item(item.strip()) for item in text.split(",") if item.strip()]
    if not endpoints:
        raise ValueError(f"no endpoints in {spec!r}")
    return endpoints
