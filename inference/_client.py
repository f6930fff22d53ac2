"""The synchronous client for a pool of OpenAI-compatible chat servers."""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
import structlog

from core.config import Settings, get_settings

from ._endpoints import Endpoint, Resolver, dns_name, expand, parse_endpoints, system_resolver
from ._errors import BadRequest, BadResponse, ContextTooLong, InferenceError, Timeout, Unavailable
from ._pool import EndpointStats, Pool, PoolConfig, parse_metrics

log = structlog.get_logger()

_CHAT_PATH = "/v1/chat/completions"
# Phrases vLLM, llama.cpp and OpenAI use when the prompt does not fit the context window.
_CONTEXT_PATTERNS = (
    "context length",
    "context_length",
    "maximum context",
    "maximum model length",
)
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Checks are rare and run on their own thread: a fresh connection each time keeps no idle
# socket in the pool between them.
_PROBE_HEADERS = {"Connection": "close"}


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Sampling settings sent with each request; ``stop`` and ``seed`` only when set."""

    temperature: float = 0.7
    max_tokens: int = 256
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not isinstance(self.stop, tuple):
            raise TypeError("stop must be a tuple of strings")


DEFAULT_PARAMS = GenerationParams()


@dataclass(frozen=True, slots=True)
class ChatResult:
    """One completed chat request.

    ``text`` is stripped and may be empty. ``endpoint`` is the base URL that answered.
    Token counts are ``None`` when the server did not report usage (llama-cpp-python's
    server reports none while streaming; vLLM does). ``elapsed_s`` is the time of the
    attempt that answered, from sending to the end of the stream.
    """

    text: str
    model: str
    endpoint: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    request_id: str
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class _Reply:
    result: ChatResult
    ttft_s: float | None
    generation_s: float


class _Deadline:
    """Ends the read of one response at the call's deadline, even while a read blocks.

    A timer shuts the socket down, which wakes the blocked read with an error; the caller
    sees ``fired`` and raises ``Timeout``. The shutdown happens only while the response is
    being read, never after ``disarm()``, so a connection back in the pool is never hit.
    Transports without a socket (tests' ``MockTransport``) get the check between chunks only.
    """

    def __init__(self, response: httpx.Response, deadline: float) -> None:
        self.fired = False
        self._lock = threading.Lock()
        self._armed = True
        self._timer: threading.Timer | None = None
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket) and math.isfinite(deadline):
            self._sock = sock
            self._timer = threading.Timer(max(deadline - time.monotonic(), 0), self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self._armed:
                return
            self.fired = True
            with contextlib.suppress(OSError):  # already closed by the other side
                self._sock.shutdown(socket.SHUT_RDWR)

    def disarm(self) -> None:
        with self._lock:
            self._armed = False
        if self._timer is not None:
            self._timer.cancel()


class InferenceClient:
    """Sends chat requests to a pool of servers, grouped by role.

    Routing: with a ``conversation_key`` every turn of a conversation goes to the same
    server (rendezvous hashing), so the server's prefix cache holds its history; adding or
    removing a server moves only the conversations that hash to it. A server over its
    in-flight cap or reporting a long ``vllm:num_requests_waiting`` queue is passed over for
    the next in the same order. Without a key the configured order is used.

    Discovery: a ``dns+http://NAME:PORT`` endpoint stands for every address ``NAME``
    resolves to (``resolver``, default the system's; IPv4 addresses, else IPv6), each a
    server with that entry's model, role and cap. Names are resolved when the client is
    built and every ``PoolConfig.dns_interval`` seconds on the background thread, or now
    with ``refresh()``; servers join and leave the rendezvous set as addresses do. A failed
    resolution keeps the addresses of the last good one.

    Streaming: requests go out with ``stream: true`` (usage asked for with
    ``stream_options.include_usage``) and are read chunk by chunk, so the time to the first
    token is measured and a request the caller gives up is really closed: when an exception
    reaches the calling thread mid-request (Celery's ``SoftTimeLimitExceeded``,
    ``KeyboardInterrupt``) or the call's ``timeout`` passes, the connection is closed, not
    returned to the pool, and vLLM and llama.cpp abort the generation when they see it go.
    A server that ignores ``stream`` and answers one JSON body is read as such; an endpoint
    with ``stream=False`` is asked for one JSON body (still closed when abandoned).

    Failover: a request that never reached a server (connection refused, DNS failure,
    connect timeout) moves on to the next endpoint of the same role within the call. Once
    a request may have reached a server (read timeout, 5xx, dropped connection) the error
    is raised instead, so an ambiguous request is never sent twice.

    Ejection: connect errors, timeouts, 5xx and malformed answers count as failures; after
    ``breaker_failures`` in a row an endpoint's breaker opens and it gets no traffic for
    ``breaker_cooldown`` seconds; then one request or active check probes it (half-open)
    and closes or reopens the breaker. Active checks run on a daemon thread every
    ``health_interval`` seconds, started by the first ``chat()`` (in the calling process,
    so a forked worker starts its own). Counters, timings, loads and breaker states are per
    process; ``stats()`` reads them and ``inference.InferenceCollector`` exports them.

    Logs: every line about a request carries its ``request_id`` and ``endpoint`` (``None``
    before one is chosen), never prompt or reply text.

    Thread-safe; owns one connection pool, released by ``close()`` or leaving the ``with``
    block. Proxy settings are not taken from the environment. ``timeout`` bounds one
    ``chat()`` call in total (connecting, queueing and generating, failovers included);
    ``pool`` defaults to the ``PARLEY_INFERENCE_*`` settings; ``clock`` (monotonic seconds)
    times the breakers.
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        timeout: float = 60.0,
        connect_timeout: float = 3.0,
        transport: httpx.BaseTransport | None = None,
        pool: PoolConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        resolver: Resolver = system_resolver,
    ) -> None:
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeout and connect_timeout must be > 0")
        self._configured: tuple[Endpoint, ...] = tuple(endpoints)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
            trust_env=False,
        )
        config = pool if pool is not None else PoolConfig.from_settings(get_settings())
        self._resolver = resolver
        self._resolved: dict[Endpoint, tuple[Endpoint, ...]] = {}
        self._dns_errors: dict[Endpoint, str] = {}
        self._refresh_lock = threading.Lock()
        self._pool = Pool((), config, clock)
        self.refresh()
        self._monitor_lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        self._stopped = threading.Event()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        default_endpoints: Sequence[Endpoint] = (),
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> Self:
        """Build a client from ``inference_endpoints``, else from ``default_endpoints``.

        Raises ``ValueError`` when ``inference_endpoints`` is set but malformed.
        """
        spec = settings.inference_endpoints
        endpoints = parse_endpoints(spec) if spec else list(default_endpoints)
        return cls(
            endpoints,
            timeout=settings.inference_timeout,
            connect_timeout=settings.inference_connect_timeout,
            transport=transport,
            pool=PoolConfig.from_settings(settings),
        )

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The servers in the pool now: the configured ones, DNS entries expanded in place."""
        return tuple(self._pool.members())

    def refresh(self) -> tuple[Endpoint, ...]:
        """Resolve the ``dns+http://`` endpoints now and apply the answer; returns
        ``endpoints``. Never raises for a name that fails: it keeps its last addresses."""
        with self._refresh_lock:
            for entry in self._configured:
                if not entry.discovered_by_dns:
                    continue
                host, port = dns_name(entry)
                try:
                    servers = tuple(expand(entry, self._resolver(host, port)))
                except (OSError, UnicodeError) as exc:  # idna refuses some malformed names
                    servers = self._resolved.get(entry, ())
                    self._dns_errors[entry] = type(exc).__name__
                    log.warning("inference.dns_failed", entry=entry.url, error=type(exc).__name__)
                else:
                    self._dns_errors.pop(entry, None)
                    if not servers:
                        self._dns_errors[entry] = "no addresses"
                self._resolved[entry] = servers
            members: list[Endpoint] = []
            for entry in self._configured:
                members.extend(
                    self._resolved.get(entry, ()) if entry.discovered_by_dns else [entry]
                )
            joined, left = self._pool.set_members(members)
        for endpoint in joined if self._has_dns else ():
            log.info("inference.endpoint_joined", endpoint=endpoint.url, role=endpoint.role)
        for endpoint in left:
            log.info("inference.endpoint_left", endpoint=endpoint.url, role=endpoint.role)
        return self.endpoints

    @property
    def _has_dns(self) -> bool:
        return any(entry.discovered_by_dns for entry in self._configured)

    def close(self) -> None:
        """Stop the health checks and release the connections; the client is done after."""
        self._stopped.set()
        with self._monitor_lock:
            monitor = self._monitor
        atexit.unregister(self.close)
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout=self._connect_timeout + 5)
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        params: GenerationParams = DEFAULT_PARAMS,
        role: str = "chat",
        model: str | None = None,
        request_id: str | None = None,
        conversation_key: str | int | None = None,
        cache_salt: str | None = None,
        timeout: float | None = None,
    ) -> ChatResult:
        """Send OpenAI-style ``messages``; the server applies its chat template.

        The model name is the endpoint's, else ``model``, else ``"default"``.
        ``request_id`` (a UUID, generated when ``None``) goes out as ``X-Request-Id`` and
        into the logs; llama.cpp's server answers 400 to any other header value, so a
        ``request_id`` that is not a UUID raises ``ValueError`` before anything is sent.
        ``conversation_key`` (the conversation id) pins the conversation to one server, and
        goes out as ``X-Session-ID`` for a router in front of a pool to do the same.
        ``cache_salt`` (the tenant, e.g. the workspace id) goes out as vLLM's ``cache_salt``
        so tenants never share prefix-cache entries; servers without prefix caching ignore
        it. ``timeout`` (seconds, default the client's) bounds the whole call; when it
        passes, the request is closed and ``Timeout`` raised. An exception raised in the
        calling thread while the request runs closes the request and propagates unchanged.
        Otherwise raises a subclass of ``InferenceError``; see the package docstring.
        """
        if request_id is None:
            request_id = uuid.uuid4().hex
        else:
            _check_request_id(request_id)
        if cache_salt is not None and not cache_salt:
            raise ValueError("cache_salt must be a non-empty string")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be > 0")
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        key = None if conversation_key is None else str(conversation_key)
        order = self._pool.plan(role, key)
        if not order and self._has_dns:
            self.refresh()  # a name that did not resolve yet may resolve now
            order = self._pool.plan(role, key)
        if not order:
            raise Unavailable(f"no inference endpoint with role {role!r}")
        self._start_monitor()
        bound = log.bind(request_id=request_id, role=role)
        error: InferenceError | None = None
        for position, endpoint in enumerate(order):
            model_name = endpoint.model or model or "default"
            attempt = bound.bind(endpoint=endpoint.url, model=model_name)
            started = time.monotonic()
            ticket = self._pool.begin(endpoint)
            settled = False
            try:
                try:
                    reply = self._attempt(
                        endpoint,
                        _request_body(
                            messages, params, model_name, cache_salt, stream=endpoint.stream
                        ),
                        request_id=request_id,
                        session=key,
                        model=model_name,
                        started=started,
                        deadline=deadline,
                    )
                except _NotSent as exc:
                    # The request never left this process, so another server may take it.
                    error = exc.error
                    self._pool.failed(ticket, kind="connect", server_fault=True)
                    settled = True
                    failover = position < len(order) - 1 and time.monotonic() < deadline
                    _log_error(attempt, error, started, failover=failover)
                    if failover:
                        continue
                    raise error from exc.__cause__
                except InferenceError as exc:
                    self._pool.failed(
                        ticket, kind=_kind(exc), server_fault=not isinstance(exc, BadRequest)
                    )
                    settled = True
                    _log_error(attempt, exc, started, failover=False)
                    raise
                self._pool.succeeded(
                    ticket,
                    prompt_tokens=reply.result.prompt_tokens,
                    completion_tokens=reply.result.completion_tokens,
                    ttft_s=reply.ttft_s,
                    generation_s=reply.generation_s,
                )
                settled = True
            finally:
                if not settled:
                    # The caller gave up (an exception from its own thread): the response
                    # was closed on the way out, so the server sees the client go.
                    self._pool.failed(ticket, kind="abandoned", server_fault=False)
                    attempt.warning(
                        "inference.abandoned",
                        elapsed_s=round(time.monotonic() - started, 3),
                    )
            result = reply.result
            attempt.info(
                "inference.request",
                served_model=result.model,
                elapsed_s=round(result.elapsed_s, 3),
                ttft_s=None if reply.ttft_s is None else round(reply.ttft_s, 3),
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                finish_reason=result.finish_reason,
                conversation_owner=position == 0,
            )
            return result
        assert error is not None  # the loop ran at least once and every pass failed over
        raise error

    def _attempt(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        *,
        request_id: str,
        session: str | None,
        model: str,
        started: float,
        deadline: float,
    ) -> _Reply:
        """One request to one server, read to its end or closed on the way out."""
        remaining = max(deadline - started, 0.001)
        timeout = httpx.Timeout(remaining, connect=min(self._connect_timeout, remaining))
        headers = {
            "X-Request-Id": request_id,
            "Accept": "text/event-stream" if endpoint.stream else "application/json",
        }
        if session is not None:
            # A router in front of the pool (vllm-router's consistent_hash) keeps a session on
            # one server by this header: the same affinity the pool gives, one hop later.
            headers["X-Session-ID"] = session
        request = self._http.build_request(
            "POST", endpoint.url + _CHAT_PATH, json=body, headers=headers, timeout=timeout
        )
        try:
            response = self._http.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _NotSent(_transport_error(exc, endpoint.url)) from exc
        except httpx.HTTPError as exc:
            raise _transport_error(exc, endpoint.url) from exc
        guard = _Deadline(response, deadline)
        try:
            if not 200 <= response.status_code < 300:
                response.read()
                _raise_for_status(response, endpoint.url)
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                return _read_stream(response, endpoint, request_id, model, started, deadline)
            response.read()
            return _read_json(response, endpoint, request_id, model, started)
        except (httpx.HTTPError, InferenceError) as exc:
            # A socket shut at the deadline surfaces as a broken or truncated stream.
            if guard.fired:
                raise _deadline_error(endpoint, deadline, started) from None
            if isinstance(exc, InferenceError):
                raise
            if time.monotonic() >= deadline:
                raise _deadline_error(endpoint, deadline, started) from None
            raise _transport_error(exc, endpoint.url) from exc
        finally:
            guard.disarm()
            # Unread body left: httpx closes the connection instead of pooling it.
            response.close()

    def route(
        self, conversation_key: str | int | None = None, *, role: str = "chat"
    ) -> list[Endpoint]:
        """The endpoints a request would try now, in order (for status pages and tests)."""
        key = None if conversation_key is None else str(conversation_key)
        return self._pool.plan(role, key, count_spill=False)

    def stats(self) -> list[EndpointStats]:
        """A snapshot of every endpoint's counters, timings, load and breaker, in endpoint
        order."""
        return self._pool.stats()

    def health(self, *, timeout: float = 2.0) -> list[tuple[Endpoint, bool, str]]:
        """Probe every endpoint: ``(endpoint, healthy, detail)`` in endpoint order.

        Asks ``/health`` (vLLM) and, when that route does not exist, ``/v1/models``
        (llama.cpp's server); then, for a healthy server, ``/metrics`` for its load (not
        asked again once it answered 404). The results feed routing and the breakers, as
        described on the class. A ``dns+http://`` entry with no address is reported as
        itself, unhealthy, with the resolution error. Never raises; ``detail`` says what
        was seen.
        """
        short = httpx.Timeout(timeout, connect=min(timeout, self._connect_timeout))
        report: list[tuple[Endpoint, bool, str]] = []
        for endpoint in self._pool.members():
            healthy, detail = self._probe(endpoint, short)
            metrics: dict[str, list[float]] | None = None
            missing = False
            if healthy and self._pool.wants_metrics(endpoint):
                metrics, missing = self._read_metrics(endpoint, short)
            self._pool.checked(endpoint, healthy=healthy, metrics=metrics, missing=missing)
            report.append((endpoint, healthy, detail))
        with self._refresh_lock:
            empty = [e for e in self._configured if e.discovered_by_dns and not self._resolved[e]]
            report.extend(
                (e, False, f"dns: {self._dns_errors.get(e, 'no addresses')}") for e in empty
            )
        return report

    def _probe(self, endpoint: Endpoint, timeout: httpx.Timeout) -> tuple[bool, str]:
        detail = ""
        for path in ("/health", "/v1/models"):
            try:
                response = self._http.get(
                    endpoint.url + path, timeout=timeout, headers=_PROBE_HEADERS
                )
            except httpx.TimeoutException:
                return False, f"{path}: timeout"
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                return False, f"{path}: {type(exc).__name__}"
            detail = f"{path}: HTTP {response.status_code}"
            if response.status_code not in (404, 405):
                return response.status_code == 200, detail
        return False, detail

    def _read_metrics(
        self, endpoint: Endpoint, timeout: httpx.Timeout
    ) -> tuple[dict[str, list[float]] | None, bool]:
        """The server's Prometheus samples, and whether it has no ``/metrics`` at all."""
        try:
            response = self._http.get(
                endpoint.url + "/metrics", timeout=timeout, headers=_PROBE_HEADERS
            )
        except (httpx.HTTPError, httpx.InvalidURL):
            return None, False
        if response.status_code in (404, 405):
            return None, True
        if response.status_code != 200:
            return None, False
        return parse_metrics(response.text), False

    def _start_monitor(self) -> None:
        config = self._pool.config
        if self._stopped.is_set() or (config.health_interval <= 0 and not self._has_dns):
            return
        with self._monitor_lock:
            # A forked child inherits the handle of a thread that does not run in it.
            if self._monitor is not None and self._monitor.is_alive():
                return
            self._monitor = threading.Thread(
                target=self._monitor_loop, name="inference-health", daemon=True
            )
            self._monitor.start()
            # A client that lives as long as its process is never closed by its owner: stop
            # the checks and close their connections before the interpreter tears down.
            atexit.register(self.close)

    def _monitor_loop(self) -> None:
        config = self._pool.config
        now = time.monotonic()
        health_every = config.health_interval if config.health_interval > 0 else math.inf
        dns_every = config.dns_interval if self._has_dns else math.inf
        next_health, next_dns = now + health_every, now + dns_every
        while not self._stopped.wait(max(min(next_health, next_dns) - time.monotonic(), 0)):
            now = time.monotonic()
            try:
                if now >= next_dns:
                    next_dns = now + dns_every
                    self.refresh()
                if now >= next_health:
                    next_health = now + health_every
                    self.health()
            except Exception as exc:  # the checks must outlive any one failure
                if self._stopped.is_set():
                    return
                log.warning("inference.health_failed", error=type(exc).__name__)


class _NotSent(Exception):
    """The request never reached the server: another one may take it."""

    def __init__(self, error: InferenceError) -> None:
        super().__init__(error.message)
        self.error = error


def _check_request_id(request_id: str) -> None:
    try:
        uuid.UUID(request_id)
    except ValueError:
        raise ValueError("request_id must be a UUID string") from None


def _request_body(
    messages: Sequence[Mapping[str, Any]],
    params: GenerationParams,
    model: str,
    cache_salt: str | None = None,
    *,
    stream: bool = True,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [dict(message) for message in messages],
        "temperature": params.temperature,
        "max_tokens": params.max_tokens,
        "top_p": params.top_p,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    return body


def _kind(error: InferenceError) -> str:
    """The ``error_kinds`` key of an error (see ``EndpointStats``)."""
    if isinstance(error, ContextTooLong):
        return "context_too_long"
    if isinstance(error, BadRequest):
        return "bad_request"
    if isinstance(error, Timeout):
        return "timeout"
    if isinstance(error, BadResponse):
        return "bad_response"
    return "unavailable"


def _transport_error(exc: httpx.HTTPError, url: str) -> InferenceError:
    kind = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"request timed out ({kind})", endpoint=url)
    return Unavailable(f"server unreachable ({kind})", endpoint=url)


def _deadline_error(endpoint: Endpoint, deadline: float, started: float) -> Timeout:
    return Timeout(
        f"call timed out after {max(deadline - started, 0):.1f}s on this server; request closed",
        endpoint=endpoint.url,
    )


def _error_code(response: httpx.Response) -> str:
    """The OpenAI-style ``error.code``/``type`` when it is a bare identifier, else ``""``.

    Error messages can quote the request (FastAPI validation errors echo the input), so
    only short identifiers are ever copied out of an error body.
    """
    try:
        data = response.json()
    except ValueError:
        return ""
    return _identifier(data)


def _identifier(data: object) -> str:
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return ""
    for key in ("code", "type"):
        value = error.get(key)
        if isinstance(value, str) and _ERROR_CODE.fullmatch(value):
            return value
    return ""


def _raise_for_status(response: httpx.Response, url: str) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    code = _error_code(response)
    message = f"HTTP {status}" + (f" ({code})" if code else "")
    if status == 400:
        body = response.text.lower()
        if any(p in body for p in _CONTEXT_PATTERNS) or ("exceed" in body and "context" in body):
            raise ContextTooLong(f"prompt exceeds the model context: {message}", endpoint=url)
    if status == 408:
        raise Timeout(f"server gave up waiting: {message}", endpoint=url)
    if status == 429 or status >= 500:
        raise Unavailable(f"server cannot take the request now: {message}", endpoint=url)
    if 400 <= status < 500:
        raise BadRequest(f"request rejected: {message}", endpoint=url)
    raise BadResponse(f"unexpected status: {message}", endpoint=url)


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sse_data(response: httpx.Response) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream (comments and pings skipped)."""
    for line in response.iter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


def _stream_error(chunk: dict[str, Any], url: str) -> InferenceError:
    """The error a server sent inside a stream that had already started with 200."""
    error = chunk.get("error")
    details = error if isinstance(error, dict) else chunk
    status = details.get("code")
    code = _identifier({"error": details})
    message = "server failed mid-stream" + (f" ({code})" if code else "")
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return BadRequest(message, endpoint=url)
    return Unavailable(message, endpoint=url)


def _read_stream(
    response: httpx.Response,
    endpoint: Endpoint,
    request_id: str,
    model: str,
    started: float,
    deadline: float,
) -> _Reply:
    """Assemble a chat completion from its ``chat.completion.chunk`` events."""
    url = endpoint.url
    parts: list[str] = []
    served_model: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] = {}
    first_at: float | None = None
    for data in _sse_data(response):
        if time.monotonic() >= deadline:
            raise _deadline_error(endpoint, deadline, started)
        if data == "[DONE]":
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            raise BadResponse("stream chunk is not JSON", endpoint=url) from None
        if not isinstance(chunk, dict):
            raise BadResponse("stream chunk is not an object", endpoint=url)
        if "error" in chunk or chunk.get("object") == "error":
            raise _stream_error(chunk, url)
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            served_model = chunk["model"]
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            continue
        choice = choices[0]
        if not isinstance(choice, dict) or not isinstance(choice.get("delta"), dict):
            raise BadResponse("stream choice has no delta", endpoint=url)
        if first_at is None:
            first_at = time.monotonic()
        content = choice["delta"].get("content")
        if content is not None and not isinstance(content, str):
            raise BadResponse("delta content is not text", endpoint=url)
        if content:
            parts.append(content)
        if isinstance(choice.get("finish_reason"), str):
            finish_reason = choice["finish_reason"]
    ended = time.monotonic()
    if first_at is None:
        raise BadResponse("stream has no choices", endpoint=url)
    if finish_reason is None:
        # Cut short: a dropped proxy, or llama-cpp-python's server ending one stream with
        # [DONE] when another request arrives (its --interrupt_requests, on by default).
        raise BadResponse("stream ended before the reply was complete", endpoint=url)
    result = ChatResult(
        text="".join(parts).strip(),
        model=served_model or model,
        endpoint=url,
        prompt_tokens=_optional_int(usage.get("prompt_tokens")),
        completion_tokens=_optional_int(usage.get("completion_tokens")),
        finish_reason=finish_reason,
        request_id=request_id,
        elapsed_s=ended - started,
    )
    return _Reply(result, ttft_s=first_at - started, generation_s=ended - first_at)


def _read_json(
    response: httpx.Response,
    endpoint: Endpoint,
    request_id: str,
    model: str,
    started: float,
) -> _Reply:
    """A whole ``chat.completion`` body, from a server that does not stream."""
    try:
        data = response.json()
    except ValueError:
        raise BadResponse("response is not JSON", endpoint=endpoint.url) from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse("response has no choices", endpoint=endpoint.url)
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise BadResponse("choice has no message", endpoint=endpoint.url)
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise BadResponse("message content is not text", endpoint=endpoint.url)
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    finish_reason = choice.get("finish_reason")
    served_model = data.get("model")
    elapsed = time.monotonic() - started
    result = ChatResult(
        text=(content or "").strip(),
        model=served_model if isinstance(served_model, str) and served_model else model,
        endpoint=endpoint.url,
        prompt_tokens=_optional_int(usage.get("prompt_tokens")),
        completion_tokens=_optional_int(usage.get("completion_tokens")),
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        request_id=request_id,
        elapsed_s=elapsed,
    )
    return _Reply(result, ttft_s=None, generation_s=elapsed)


def _log_error(
    attempt: Any,
    error: InferenceError,
    started: float,
    *,
    failover: bool,
) -> None:
    attempt.warning(
        "inference.error",
        elapsed_s=round(time.monotonic() - started, 3),
        error=type(error).__name__,
        detail=error.message,
        failover=failover,
    )
