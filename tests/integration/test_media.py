"""Media downloads against real local servers: the SSRF guard refuses before connecting (the
listeners count every accepted connection), redirects are re-vetted, the size cap holds while
streaming, and the token only reaches the origins it is meant for."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from core.config import Environment, Settings
from webhooks.media import (
    MediaPolicy,
    MediaRefused,
    MediaTooLarge,
    MediaUnavailable,
    fetch_attachment,
    fetch_whatsapp_media,
)

TOKEN = "EAAG-test-token"
Route = Callable[["_Handler"], None]


class _Handler(BaseHTTPRequestHandler):
    server: Listener._Server

    def do_GET(self) -> None:
        self.server.owner.requests.append((self.path, dict(self.headers.items())))
        route = self.server.owner.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_error(404)
            return
        route(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Listener:
    """A threaded HTTP server that records each accepted connection and request."""

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        owner: Listener

        def process_request(self, request: Any, client_address: Any) -> None:
            self.owner.connections += 1
            super().process_request(request, client_address)

    class _Server6(_Server):
        address_family = socket.AF_INET6

    def __init__(self, host: str = "127.0.0.1") -> None:
        server_class = Listener._Server6 if ":" in host else Listener._Server
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.routes: dict[str, Route] = {}
        self.server = server_class((host, 0), _Handler)
        self.server.owner = self
        self.port = self.server.server_address[1]
        self.host = host
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str = "/", host: str | None = None) -> str:
        name = host or (f"[{self.host}]" if ":" in self.host else self.host)
        return f"http://{name}:{self.port}{path}"

    def assert_untouched(self) -> None:
        time.sleep(0.1)  # an accepted connection would be counted by now
        assert self.connections == 0
        assert self.requests == []

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(
    body: bytes, *, status: int = 200, ctype: str = "image/jpeg", length: bool = True
) -> Route:
    def route(handler: _Handler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", ctype)
        if length:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return route


def redirect(location: str, status: int = 302) -> Route:
    def route(handler: _Handler) -> None:
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def graph_answer(url: str, body: bytes, **extra: Any) -> Route:
    meta = {
        "url": url,
        "mime_type": "image/jpeg",
        "sha256": hashlib.sha256(body).hexdigest(),
        "file_size": len(body),
        "id": "1234567890",
        "messaging_product": "whatsapp",
    }
    meta.update(extra)
    return reply(json.dumps(meta).encode(), ctype="application/json")


@pytest.fixture
def listeners() -> Iterator[Callable[..., Listener]]:
    made: list[Listener] = []

    def make(host: str = "127.0.0.1") -> Listener:
        listener = Listener(host)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.close()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def open_policy(**overrides: Any) -> MediaPolicy:
    """Every host name allowed and http permitted: only the address checks stand."""
    fields: dict[str, Any] = {"allowed_hosts": ("*",), "https_only": False, "timeout": 3.0}
    fields.update(overrides)
    return MediaPolicy(**fields)


def dev_settings(graph_url: str, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "env": Environment.development,
        "sandbox": True,
        "graph_api_url": graph_url,
        "media_timeout": 3.0,
    }
    fields.update(overrides)
    return Settings(**fields)


# --- the two-step WhatsApp download -----------------------------------------------------------


def test_two_step_download_with_sandbox_loopback(listeners: Callable[..., Listener]) -> None:
    graph = listeners()
    body = b"\xff\xd8\xff\xe0 not really a jpeg" * 50
    graph.routes["/sandbox/graph/v23.0/1234567890"] = graph_answer(
        graph.url("/cdn/media?ext=1&hash=abc"), body
    )
    graph.routes["/cdn/media"] = reply(body, ctype="application/octet-stream")
    base = graph.url("/sandbox/graph")
    policy = MediaPolicy.from_settings(dev_settings(base, media_sandbox_loopback=True))

    media = fetch_whatsapp_media(
        "1234567890", token=TOKEN, graph_url=base, version="v23.0", policy=policy
    )

    assert media.content == body
    assert media.mime_type == "image/jpeg"
    assert media.size == len(body)
    assert media.sha256 == hashlib.sha256(body).hexdigest()
    assert [path for path, _ in graph.requests] == [
        "/sandbox/graph/v23.0/1234567890",
        "/cdn/media?ext=1&hash=abc",
    ]
    for _, headers in graph.requests:
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert headers["Host"] == f"127.0.0.1:{graph.port}"


def test_sandbox_graph_refused_without_the_flag(listeners: Callable[..., Listener]) -> None:
    graph = listeners()
    graph.routes["/v23.0/1"] = graph_answer(graph.url("/cdn"), b"x")
    policy = MediaPolicy.from_settings(dev_settings(graph.url("")))
    assert policy.loopback_origins == frozenset()

    with pytest.raises(MediaRefused, match="loopback"):
        fetch_whatsapp_media(
            "1", token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=policy
        )
    graph.assert_untouched()


@pytest.mark.parametrize(
    "overrides",
    [
        {"env": Environment.production, "sandbox": False},
        {"env": Environment.production, "sandbox": True},
        {"env": Environment.development, "sandbox": False},
    ],
)
def test_loopback_flag_only_counts_in_development_with_sandbox(
    listeners: Callable[..., Listener], overrides: dict[str, Any]
) -> None:
    graph = listeners()
    settings = dev_settings(graph.url(""), media_sandbox_loopback=True, **overrides)
    policy = MediaPolicy.from_settings(settings)
    assert policy.loopback_origins == frozenset()
    with pytest.raises(MediaRefused):
        fetch_whatsapp_media(
            "1", token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=policy
        )
    graph.assert_untouched()


def test_loopback_flag_covers_only_the_graph_origin(listeners: Callable[..., Listener]) -> None:
    graph = listeners()
    other = listeners()
    policy = MediaPolicy.from_settings(dev_settings(graph.url(""), media_sandbox_loopback=True))
    graph.routes["/v23.0/1"] = graph_answer(other.url("/cdn"), b"x")
    graph.routes["/v23.0/2"] = graph_answer(graph.url("/cdn", host="localhost"), b"x")
    graph.routes["/v23.0/3"] = redirect(other.url("/inward"))

    for media_id in ("1", "2", "3"):
        with pytest.raises(MediaRefused):
            fetch_whatsapp_media(
                media_id, token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=policy
            )
    other.assert_untouched()
    assert [path for path, _ in graph.requests] == ["/v23.0/1", "/v23.0/2", "/v23.0/3"]


def test_token_goes_only_to_graph_and_media_origin(listeners: Callable[..., Listener]) -> None:
    graph = listeners()
    cdn2 = listeners()
    body = b"media bytes"
    graph.routes["/v23.0/1"] = graph_answer(graph.url("/cdn"), body)
    graph.routes["/cdn"] = redirect(cdn2.url("/moved", host="localhost"))
    cdn2.routes["/moved"] = reply(body)
    policy = open_policy(
        allowed_hosts=("127.0.0.1", "localhost"),
        loopback_origins=frozenset({("127.0.0.1", graph.port), ("localhost", cdn2.port)}),
    )

    media = fetch_whatsapp_media(
        "1", token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=policy
    )

    assert media.content == body
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for _, h in graph.requests)
    assert len(cdn2.requests) == 1
    assert "Authorization" not in cdn2.requests[0][1]
    assert cdn2.requests[0][1]["Host"] == f"localhost:{cdn2.port}"


def test_token_never_sent_off_allowlist(listeners: Callable[..., Listener]) -> None:
    graph = listeners()
    stranger = listeners()
    graph.routes["/v23.0/1"] = graph_answer(stranger.url("/steal", host="localhost"), b"x")
    policy = open_policy(
        allowed_hosts=("127.0.0.1",),
        loopback_origins=frozenset({("127.0.0.1", graph.port), ("localhost", stranger.port)}),
    )
    with pytest.raises(MediaRefused, match="host not allowed"):
        fetch_whatsapp_media(
            "1", token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=policy
        )
    stranger.assert_untouched()


def test_sha256_mismatch_refused(listeners: Callable[..., Listener]) -> None:
    graph = listeners()
    graph.routes["/v23.0/1"] = graph_answer(graph.url("/cdn"), b"the original")
    graph.routes["/cdn"] = reply(b"something else")
    policy = MediaPolicy.from_settings(dev_settings(graph.url(""), media_sandbox_loopback=True))
    with pytest.raises(MediaRefused, match="sha256 mismatch"):
        fetch_whatsapp_media(
            "1", token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=policy
        )


def test_base64_sha256_accepted(listeners: Callable[..., Listener]) -> None:
    import base64

    graph = listeners()
    body = b"payload"
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    graph.routes["/v23.0/1"] = graph_answer(graph.url("/cdn"), body, sha256=digest)
    graph.routes["/cdn"] = reply(body)
    policy = MediaPolicy.from_settings(dev_settings(graph.url(""), media_sandbox_loopback=True))
    media = fetch_whatsapp_media(
        "1", token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=policy
    )
    assert media.content == body


def test_stated_file_size_over_cap_stops_before_download(
    listeners: Callable[..., Listener],
) -> None:
    graph = listeners()
    graph.routes["/v23.0/1"] = graph_answer(graph.url("/cdn"), b"x", file_size=10_000)
    graph.routes["/cdn"] = reply(b"x")
    policy = MediaPolicy.from_settings(
        dev_settings(graph.url(""), media_sandbox_loopback=True, media_max_bytes=1000)
    )
    with pytest.raises(MediaTooLarge):
        fetch_whatsapp_media(
            "1", token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=policy
        )
    assert [path for path, _ in graph.requests] == ["/v23.0/1"]


@pytest.mark.parametrize("media_id", ["../../me", "1/../2", "1?x=1", "", "a" * 200])
def test_malformed_media_id_refused(listeners: Callable[..., Listener], media_id: str) -> None:
    graph = listeners()
    policy = MediaPolicy.from_settings(dev_settings(graph.url(""), media_sandbox_loopback=True))
    with pytest.raises(MediaRefused, match="media id"):
        fetch_whatsapp_media(
            media_id, token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=policy
        )
    graph.assert_untouched()


@pytest.mark.parametrize(("status", "retryable"), [(404, False), (401, False), (503, True)])
def test_graph_errors_are_unavailable(
    listeners: Callable[..., Listener], status: int, retryable: bool
) -> None:
    graph = listeners()
    graph.routes["/v23.0/1"] = reply(b"{}", status=status, ctype="application/json")
    policy = MediaPolicy.from_settings(dev_settings(graph.url(""), media_sandbox_loopback=True))
    with pytest.raises(MediaUnavailable) as caught:
        fetch_whatsapp_media(
            "1", token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=policy
        )
    assert caught.value.status == status
    assert caught.value.retryable is retryable


# --- addresses refused before connecting ------------------------------------------------------

LOOPBACK_FORMS = [
    "127.0.0.1",
    "localhost",
    "2130706433",
    "0x7f000001",
    "0x7F.0.0.1",
    "0177.0.0.1",
    "127.1",
    "127.000.000.001",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
]


@pytest.mark.parametrize("host", LOOPBACK_FORMS)
def test_loopback_forms_refused_before_connecting(
    listeners: Callable[..., Listener], host: str
) -> None:
    target = listeners()
    target.routes["/secret"] = reply(b"internal")
    with pytest.raises(MediaRefused):
        fetch_attachment(target.url("/secret", host=host), policy=open_policy())
    target.assert_untouched()


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_loopback_refused_before_connecting(listeners: Callable[..., Listener]) -> None:
    target = listeners("::1")
    target.routes["/secret"] = reply(b"internal")
    with pytest.raises(MediaRefused, match="loopback"):
        fetch_attachment(target.url("/secret"), policy=open_policy())
    target.assert_untouched()


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "[::ffff:169.254.169.254]",
        "[::ffff:a9fe:a9fe]",
        "[64:ff9b::a9fe:a9fe]",
        "[2002:7f00:1::1]",
        "[fe80::1]",
        "[fd00::1]",
        "[::]",
        "[ff02::1]",
        "0.0.0.0",  # noqa: S104 - a destination to refuse, nothing binds to it
        "0",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
    ],
)
def test_internal_addresses_refused(host: str) -> None:
    started = time.monotonic()
    with pytest.raises(MediaRefused):
        fetch_attachment(f"http://{host}/latest/meta-data/", policy=open_policy(timeout=5.0))
    assert time.monotonic() - started < 1.0  # refused, not a connect attempt that timed out


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "ftp://lookaside.fbsbx.com/x",
        "dict://127.0.0.1:11211/stats",
        "data:text/plain,hello",
        "//lookaside.fbsbx.com/x",
        "http://user:pw@lookaside.fbsbx.com/x",
        "not a url",
    ],
)
def test_other_schemes_and_shapes_refused(url: str) -> None:
    with pytest.raises(MediaRefused):
        fetch_attachment(url, policy=open_policy())


def test_production_rules_refuse_http_and_other_ports(listeners: Callable[..., Listener]) -> None:
    target = listeners()
    policy = MediaPolicy(allowed_hosts=("127.0.0.1", "lookaside.fbsbx.com"))
    with pytest.raises(MediaRefused, match="https required"):
        fetch_attachment(target.url("/x"), policy=policy)
    with pytest.raises(MediaRefused, match="port not allowed"):
        fetch_attachment("https://lookaside.fbsbx.com:6379/x", policy=policy)
    target.assert_untouched()


def test_default_allowlist_refuses_other_hosts(listeners: Callable[..., Listener]) -> None:
    target = listeners()
    policy = MediaPolicy.from_settings(dev_settings("https://graph.facebook.com"))
    with pytest.raises(MediaRefused, match="host not allowed"):
        fetch_attachment(target.url("/x", host="localhost"), policy=policy)
    target.assert_untouched()


# --- redirects -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{inner}/admin",
        "http://localhost:{inner}/admin",
        "http://2130706433:{inner}/admin",
        "http://[::ffff:127.0.0.1]:{inner}/admin",
        "http://169.254.169.254/latest/meta-data/",
        "gopher://127.0.0.1:{inner}/_x",
        "file:///etc/passwd",
    ],
)
def test_redirects_inward_refused(listeners: Callable[..., Listener], location: str) -> None:
    cdn = listeners()
    inner = listeners()
    cdn.routes["/media"] = redirect(location.format(inner=inner.port))
    policy = open_policy(loopback_origins=frozenset({("127.0.0.1", cdn.port)}))
    with pytest.raises(MediaRefused):
        fetch_attachment(cdn.url("/media"), policy=policy)
    assert cdn.connections == 1
    inner.assert_untouched()


def test_redirect_to_other_allowed_host_is_followed(listeners: Callable[..., Listener]) -> None:
    first = listeners()
    second = listeners()
    first.routes["/a"] = redirect(second.url("/b", host="localhost"), status=307)
    second.routes["/b"] = reply(b"final", ctype="image/png; charset=binary")
    policy = open_policy(
        allowed_hosts=("127.0.0.1", "localhost"),
        loopback_origins=frozenset({("127.0.0.1", first.port), ("localhost", second.port)}),
    )
    media = fetch_attachment(first.url("/a"), policy=policy)
    assert (media.content, media.mime_type, media.size) == (b"final", "image/png", 5)
    assert second.requests[0][1]["Host"] == f"localhost:{second.port}"


def test_redirect_hop_is_vetted_again(listeners: Callable[..., Listener]) -> None:
    # Same allowed host name, but the hop's origin is not exempt: re-vetting refuses it.
    first = listeners()
    second = listeners()
    first.routes["/a"] = redirect(second.url("/b"))
    policy = open_policy(
        allowed_hosts=("127.0.0.1",), loopback_origins=frozenset({("127.0.0.1", first.port)})
    )
    with pytest.raises(MediaRefused, match="loopback"):
        fetch_attachment(first.url("/a"), policy=policy)
    second.assert_untouched()


def test_redirect_limit(listeners: Callable[..., Listener]) -> None:
    loop = listeners()
    loop.routes["/a"] = redirect("/a")
    policy = open_policy(max_redirects=2, loopback_origins=frozenset({("127.0.0.1", loop.port)}))
    with pytest.raises(MediaRefused, match="too many redirects"):
        fetch_attachment(loop.url("/a"), policy=policy)
    assert loop.connections == 3


# --- the size cap ----------------------------------------------------------------------------

CAP = 64 * 1024


def _capped(listener: Listener) -> MediaPolicy:
    return open_policy(max_bytes=CAP, loopback_origins=frozenset({("127.0.0.1", listener.port)}))


@pytest.mark.parametrize("length", [True, False])
def test_exactly_the_cap_is_accepted(listeners: Callable[..., Listener], length: bool) -> None:
    cdn = listeners()
    cdn.routes["/m"] = reply(b"a" * CAP, length=length)
    assert fetch_attachment(cdn.url("/m"), policy=_capped(cdn)).size == CAP


@pytest.mark.parametrize("length", [True, False])
def test_one_byte_over_the_cap_is_refused(listeners: Callable[..., Listener], length: bool) -> None:
    cdn = listeners()
    cdn.routes["/m"] = reply(b"a" * (CAP + 1), length=length)
    with pytest.raises(MediaTooLarge):
        fetch_attachment(cdn.url("/m"), policy=_capped(cdn))


def test_endless_body_is_abandoned_at_the_cap(listeners: Callable[..., Listener]) -> None:
    cdn = listeners()
    sent = {"bytes": 0}
    done = threading.Event()
    total = 64 * 1024 * 1024

    def endless(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "video/mp4")
        handler.end_headers()  # no Content-Length: the body runs until the connection closes
        chunk = b"v" * 65536
        try:
            while sent["bytes"] < total:
                handler.wfile.write(chunk)
                sent["bytes"] += len(chunk)
        except OSError:
            pass
        finally:
            done.set()

    cdn.routes["/m"] = endless
    with pytest.raises(MediaTooLarge):
        fetch_attachment(cdn.url("/m"), policy=_capped(cdn))
    assert done.wait(10)
    assert sent["bytes"] < total


def test_content_length_above_cap_refused_before_reading(
    listeners: Callable[..., Listener],
) -> None:
    cdn = listeners()

    def announces_big(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(CAP * 100))
        handler.end_headers()
        handler.wfile.write(b"small")

    cdn.routes["/m"] = announces_big
    with pytest.raises(MediaTooLarge):
        fetch_attachment(cdn.url("/m"), policy=_capped(cdn))


def test_compressed_response_refused(listeners: Callable[..., Listener]) -> None:
    cdn = listeners()

    def gzipped(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", "4")
        handler.end_headers()
        handler.wfile.write(b"\x1f\x8b\x08\x00")

    cdn.routes["/m"] = gzipped
    with pytest.raises(MediaRefused, match="encoded"):
        fetch_attachment(cdn.url("/m"), policy=_capped(cdn))
    assert cdn.requests[0][1]["Accept-Encoding"] == "identity"


# --- https: connected to the pinned address, verified against the host name -------------------


def _self_signed(tmp_path: Any, name: str) -> tuple[str, str]:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_https_hop_keeps_host_name_for_sni_and_verification(
    listeners: Callable[..., Listener], tmp_path: Any
) -> None:
    import ssl

    cdn = listeners()
    cdn.routes["/m"] = reply(b"over tls")
    cert, key = _self_signed(tmp_path, "localhost")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    seen: list[str | None] = []

    def record_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    server_tls.sni_callback = record_sni
    cdn.server.socket = server_tls.wrap_socket(cdn.server.socket, server_side=True)
    client_tls = ssl.create_default_context(cafile=cert)
    policy = open_policy(
        allowed_hosts=("localhost",),
        loopback_origins=frozenset({("localhost", cdn.port)}),
        tls=client_tls,
    )

    media = fetch_attachment(f"https://localhost:{cdn.port}/m", policy=policy)

    assert media.content == b"over tls"
    assert seen == ["localhost"]
    untrusted = open_policy(
        allowed_hosts=("localhost",), loopback_origins=frozenset({("localhost", cdn.port)})
    )
    with pytest.raises(MediaUnavailable):
        fetch_attachment(f"https://localhost:{cdn.port}/m", policy=untrusted)


# --- failures callers retry or report ---------------------------------------------------------


def _exempt(listener: Listener, **overrides: Any) -> MediaPolicy:
    return open_policy(loopback_origins=frozenset({("127.0.0.1", listener.port)}), **overrides)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (reply(b"<html>", ctype="text/html"), MediaUnavailable),
        (reply(b'{"id": "1"}', ctype="application/json"), MediaUnavailable),
        (reply(b'["url"]', ctype="application/json"), MediaUnavailable),
    ],
)
def test_unusable_graph_answers(
    listeners: Callable[..., Listener], answer: Route, error: type[Exception]
) -> None:
    graph = listeners()
    graph.routes["/v23.0/1"] = answer
    with pytest.raises(error):
        fetch_whatsapp_media(
            "1", token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=_exempt(graph)
        )


@pytest.mark.parametrize("digest", ["not-a-digest", "abcd", "Zm9v"])
def test_malformed_sha256_refused(listeners: Callable[..., Listener], digest: str) -> None:
    graph = listeners()
    graph.routes["/v23.0/1"] = graph_answer(graph.url("/cdn"), b"x", sha256=digest)
    graph.routes["/cdn"] = reply(b"x")
    with pytest.raises(MediaRefused, match="malformed sha256"):
        fetch_whatsapp_media(
            "1", token=TOKEN, graph_url=graph.url(""), version="v23.0", policy=_exempt(graph)
        )


def test_redirect_without_location(listeners: Callable[..., Listener]) -> None:
    cdn = listeners()
    cdn.routes["/m"] = reply(b"", status=302)
    with pytest.raises(MediaUnavailable, match="location") as caught:
        fetch_attachment(cdn.url("/m"), policy=_exempt(cdn))
    assert caught.value.retryable is False


def test_unresolvable_host_is_retryable() -> None:
    with pytest.raises(MediaUnavailable) as caught:
        fetch_attachment("http://media.parley-test.invalid/x", policy=open_policy())
    assert caught.value.retryable is True


def test_closed_port_is_retryable(listeners: Callable[..., Listener]) -> None:
    closed = listeners()
    closed.close()
    with pytest.raises(MediaUnavailable, match="connection failed") as caught:
        fetch_attachment(closed.url("/m"), policy=_exempt(closed))
    assert caught.value.retryable is True


def test_stalled_server_times_out(listeners: Callable[..., Listener]) -> None:
    cdn = listeners()
    release = threading.Event()

    def stall(handler: _Handler) -> None:
        release.wait(5)

    cdn.routes["/m"] = stall
    try:
        with pytest.raises(MediaUnavailable, match="timed out"):
            fetch_attachment(cdn.url("/m"), policy=_exempt(cdn, timeout=0.3))
    finally:
        release.set()


def test_trickling_body_hits_the_deadline(listeners: Callable[..., Listener]) -> None:
    cdn = listeners()

    def trickle(handler: _Handler) -> None:
        handler.send_response(200)
        handler.end_headers()
        try:
            for _ in range(40):
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    cdn.routes["/m"] = trickle
    with pytest.raises(MediaUnavailable, match="deadline"):
        fetch_attachment(cdn.url("/m"), policy=_exempt(cdn, timeout=1.0, deadline=0.5))
