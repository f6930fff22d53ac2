"""The synchronous client for a pool of OpenAI-compatible chat servers."""

from __future__ import annotations

import atexit
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
import structlog

from core.config import Settings, get_settings

from ._endpoints import Endpoint, parse_endpoints
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
    Token counts are ``None`` when the server did not report usage.
    """

    text: str
    model: str
    endpoint: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    request_id: str
    elapsed_s: float


class InferenceClient:
    """Sends chat requests to a pool of servers, grouped by role.

    Routing: with a ``conversation_key`` every turn of a conversation goes to the same
    server (rendezvous hashing), so the server's prefix cache holds its history; adding or
    removing a server moves only the conversations that hash to it. A server over its
    in-flight cap or reporting a long ``vllm:num_requests_waiting`` queue is passed over for
    the next in the same order. Without a key the configured order is used.

    Failover: a request that never reached a server (connection refused, DNS failure,
    connect timeout) moves on to the next endpoint of the same role within the call. Once
    a request may have reached a server (read timeout, 5xx, dropped connection) the error
    is raised instead, so an ambiguous request is never sent twice.

    Ejection: connect errors, timeouts, 5xx and malformed answers count as failures; after
    ``breaker_failures`` in a row an endpoint's breaker opens and it gets no traffic for
    ``breaker_cooldown`` seconds; then one request or active check probes it (half-open)
    and closes or reopens the breaker. Active checks run on a daemon thread every
    ``health_interval`` seconds, started by the first ``chat()`` (in the calling process,
    so a forked worker starts its own). Counters, loads and breaker states are per process.

    Thread-safe; owns one connection pool, released by ``close()`` or leaving the ``with``
    block. Proxy settings are not taken from the environment. ``pool`` defaults to the
    ``PARLEY_INFERENCE_*`` settings; ``clock`` (monotonic seconds) times the breakers.
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
    ) -> None:
        self.endpoints: tuple[Endpoint, ...] = tuple(endpoints)
        self._connect_timeout = connect_timeout
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
            trust_env=False,
        )
        config = pool if pool is not None else PoolConfig.from_settings(get_settings())
        self._pool = Pool(self.endpoints, config, clock)
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
    ) -> ChatResult:
        """Send OpenAI-style ``messages``; the server applies its chat template.

        The model name is the endpoint's, else ``model``, else ``"default"``.
        ``request_id`` (a UUID, generated when ``None``) goes out as ``X-Request-Id`` and
        into the logs; llama.cpp's server answers 400 to any other header value, so a
        ``request_id`` that is not a UUID raises ``ValueError`` before anything is sent.
        ``conversation_key`` (the conversation id) pins the conversation to one server.
        ``cache_salt`` (the tenant, e.g. the workspace id) goes out as vLLM's ``cache_salt``
        so tenants never share prefix-cache entries; servers without prefix caching ignore
        it. Otherwise raises a subclass of ``InferenceError``; see the package docstring.
        """
        if request_id is None:
            request_id = uuid.uuid4().hex
        else:
            _check_request_id(request_id)
        if cache_salt is not None and not cache_salt:
            raise ValueError("cache_salt must be a non-empty string")
        key = None if conversation_key is None else str(conversation_key)
        order = self._pool.plan(role, key)
        if not order:
            raise Unavailable(f"no inference endpoint with role {role!r}")
        self._start_monitor()
        error: InferenceError | None = None
        for position, index in enumerate(order):
            endpoint = self.endpoints[index]
            model_name = endpoint.model or model or "default"
            started = time.perf_counter()
            self._pool.begin(index)
            settled = False
            try:
                try:
                    response = self._http.post(
                        endpoint.url + _CHAT_PATH,
                        json=_request_body(messages, params, model_name, cache_salt),
                        headers={"X-Request-Id": request_id},
                    )
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    # The request never left this process, so another server may take it.
                    error = _transport_error(exc, endpoint.url)
                    self._pool.failed(index, server_fault=True)
                    settled = True
                    failover = position < len(order) - 1
                    _log_error(error, endpoint, request_id, model_name, started, failover=failover)
                    continue
                except httpx.HTTPError as exc:
                    error = _transport_error(exc, endpoint.url)
                    self._pool.failed(index, server_fault=True)
                    settled = True
                    _log_error(error, endpoint, request_id, model_name, started, failover=False)
                    raise error from exc
                try:
                    result, ttft = _read_response(
                        response, endpoint, request_id, model_name, started
                    )
                except InferenceError as exc:
                    self._pool.failed(index, server_fault=not isinstance(exc, BadRequest))
                    settled = True
                    _log_error(exc, endpoint, request_id, model_name, started, failover=False)
                    raise
                self._pool.succeeded(
                    index,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                    elapsed_s=result.elapsed_s,
                    ttft_s=ttft,
                )
                settled = True
            finally:
                if not settled:
                    # Interrupted (e.g. KeyboardInterrupt): nothing is known about the server.
                    self._pool.failed(index, server_fault=False)
            log.info(
                "inference.request",
                endpoint=endpoint.url,
                role=role,
                request_id=request_id,
                model=result.model,
                elapsed_s=round(result.elapsed_s, 3),
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                finish_reason=result.finish_reason,
                conversation_owner=position == 0,
            )
            return result
        assert error is not None  # the loop ran at least once and every pass failed over
        raise error

    def route(
        self, conversation_key: str | int | None = None, *, role: str = "chat"
    ) -> list[Endpoint]:
        """The endpoints a request would try now, in order (for status pages and tests)."""
        key = None if conversation_key is None else str(conversation_key)
        return [self.endpoints[i] for i in self._pool.plan(role, key, count_spill=False)]

    def stats(self) -> list[EndpointStats]:
        """A snapshot of every endpoint's counters, load and breaker, in endpoint order."""
        return self._pool.stats()

    def health(self, *, timeout: float = 2.0) -> list[tuple[Endpoint, bool, str]]:
        """Probe every endpoint: ``(endpoint, healthy, detail)`` in endpoint order.

        Asks ``/health`` (vLLM) and, when that route does not exist, ``/v1/models``
        (llama.cpp's server); then, for a healthy server, ``/metrics`` for its load (not
        asked again once it answered 404). The results feed routing and the breakers, as
        described on the class. Never raises; ``detail`` says what was seen.
        """
        short = httpx.Timeout(timeout, connect=min(timeout, self._connect_timeout))
        report: list[tuple[Endpoint, bool, str]] = []
        for index, endpoint in enumerate(self.endpoints):
            healthy, detail = self._probe(endpoint, short)
            metrics: dict[str, list[float]] | None = None
            missing = False
            if healthy and self._pool.wants_metrics(index):
                metrics, missing = self._read_metrics(endpoint, short)
            self._pool.checked(index, healthy=healthy, metrics=metrics, missing=missing)
            report.append((endpoint, healthy, detail))
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
        interval = self._pool.config.health_interval
        if interval <= 0 or self._stopped.is_set():
            return
        with self._monitor_lock:
            # A forked child inherits the handle of a thread that does not run in it.
            if self._monitor is not None and self._monitor.is_alive():
                return
            self._monitor = threading.Thread(
                target=self._monitor_loop, args=(interval,), name="inference-health", daemon=True
            )
            self._monitor.start()
            # A client that lives as long as its process is never closed by its owner: stop
            # the checks and close their connections before the interpreter tears down.
            atexit.register(self.close)

    def _monitor_loop(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            try:
                self.health()
            except Exception as exc:  # the checks must outlive any one failure
                if self._stopped.is_set():
                    return
                log.warning("inference.health_failed", error=type(exc).__name__)


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
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [dict(message) for message in messages],
        "temperature": params.temperature,
        "max_tokens": params.max_tokens,
        "top_p": params.top_p,
        "stream": False,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    return body


def _transport_error(exc: httpx.HTTPError, url: str) -> InferenceError:
    kind = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"request timed out ({kind})", endpoint=url)
    return Unavailable(f"server unreachable ({kind})", endpoint=url)


def _error_code(response: httpx.Response) -> str:
    """The OpenAI-style ``error.code``/``type`` when it is a bare identifier, else ``""``.

    Error messages can quote the request (FastAPI validation errors echo the input), so
    only short identifiers are ever copied out of an error body.
    """
    try:
        data = response.json()
    except ValueError:
        return ""
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


def _read_response(
    response: httpx.Response,
    endpoint: Endpoint,
    request_id: str,
    model: str,
    started: float,
) -> tuple[ChatResult, float | None]:
    """The completion, and the prompt time the server reports (llama.cpp's ``timings``)."""
    _raise_for_status(response, endpoint.url)
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
    timings = data.get("timings")
    prompt_ms = timings.get("prompt_ms") if isinstance(timings, dict) else None
    ttft = prompt_ms / 1000 if isinstance(prompt_ms, int | float) and prompt_ms >= 0 else None
    result = ChatResult(
        text=(content or "").strip(),
        model=served_model if isinstance(served_model, str) and served_model else model,
        endpoint=endpoint.url,
        prompt_tokens=_optional_int(usage.get("prompt_tokens")),
        completion_tokens=_optional_int(usage.get("completion_tokens")),
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        request_id=request_id,
        elapsed_s=time.perf_counter() - started,
    )
    return result, ttft


def _log_error(
    error: InferenceError,
    endpoint: Endpoint,
    request_id: str,
    model: str,
    started: float,
    *,
    failover: bool,
) -> None:
    log.warning(
        "inference.error",
        endpoint=endpoint.url,
        role=endpoint.role,
        request_id=request_id,
        model=model,
        elapsed_s=round(time.perf_counter() - started, 3),
        error=type(error).__name__,
        detail=error.message,
        failover=failover,
    )
