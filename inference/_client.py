"""The synchronous client for a pool of OpenAI-compatible chat servers."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
import structlog

from core.config import Settings

from ._endpoints import Endpoint, parse_endpoints
from ._errors import BadRequest, BadResponse, ContextTooLong, InferenceError, Timeout, Unavailable

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
    """Sends chat requests to the endpoints of a role, in the given order.

    Failover: a request that never reached a server (connection refused, DNS failure,
    connect timeout) moves on to the next endpoint of the same role within the call. Once
    a request may have reached a server (read timeout, 5xx, dropped connection) the error
    is raised instead, so an ambiguous request is never sent twice. Thread-safe; owns one
    connection pool, released by ``close()`` or leaving the ``with`` block. Proxy settings
    are not taken from the environment.
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        timeout: float = 60.0,
        connect_timeout: float = 3.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.endpoints: tuple[Endpoint, ...] = tuple(endpoints)
        self._connect_timeout = connect_timeout
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
            trust_env=False,
        )

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
        )

    def close(self) -> None:
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
    ) -> ChatResult:
        """Send OpenAI-style ``messages``; the server applies its chat template.

        The model name is the endpoint's, else ``model``, else ``"default"``.
        ``request_id`` (a UUID, generated when ``None``) goes out as ``X-Request-Id`` and
        into the logs; llama.cpp's server answers 400 to any other header value, so a
        ``request_id`` that is not a UUID raises ``ValueError`` before anything is sent.
        Otherwise raises a subclass of ``InferenceError``; see the package docstring.
        """
        candidates = [endpoint for endpoint in self.endpoints if endpoint.role == role]
        error: InferenceError = Unavailable(f"no inference endpoint with role {role!r}")
        if request_id is None:
            request_id = uuid.uuid4().hex
        else:
            _check_request_id(request_id)
        for endpoint in candidates:
            model_name = endpoint.model or model or "default"
            started = time.perf_counter()
            try:
                response = self._http.post(
                    endpoint.url + _CHAT_PATH,
                    json=_request_body(messages, params, model_name),
                    headers={"X-Request-Id": request_id},
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # The request never left this process, so another server may take it.
                error = _transport_error(exc, endpoint.url)
                failover = endpoint is not candidates[-1]
                _log_error(error, endpoint, request_id, model_name, started, failover=failover)
                continue
            except httpx.HTTPError as exc:
                error = _transport_error(exc, endpoint.url)
                _log_error(error, endpoint, request_id, model_name, started, failover=False)
                raise error from exc
            try:
                result = _read_response(response, endpoint, request_id, model_name, started)
            except InferenceError as exc:
                _log_error(exc, endpoint, request_id, model_name, started, failover=False)
                raise
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
            )
            return result
        raise error

    def health(self, *, timeout: float = 2.0) -> list[tuple[Endpoint, bool, str]]:
        """Probe every endpoint: ``(endpoint, healthy, detail)`` in endpoint order.

        Asks ``/health`` (vLLM) and, when that route does not exist, ``/v1/models``
        (llama.cpp's server). Never raises; ``detail`` says what was seen.
        """
        short = httpx.Timeout(timeout, connect=min(timeout, self._connect_timeout))
        report: list[tuple[Endpoint, bool, str]] = []
        for endpoint in self.endpoints:
            healthy, detail = False, ""
            for path in ("/health", "/v1/models"):
                try:
                    response = self._http.get(endpoint.url + path, timeout=short)
                except httpx.TimeoutException:
                    detail = f"{path}: timeout"
                    break
                except (httpx.HTTPError, httpx.InvalidURL) as exc:
                    detail = f"{path}: {type(exc).__name__}"
                    break
                detail = f"{path}: HTTP {response.status_code}"
                if response.status_code not in (404, 405):
                    healthy = response.status_code == 200
                    break
            report.append((endpoint, healthy, detail))
        return report


def _check_request_id(request_id: str) -> None:
    try:
        uuid.UUID(request_id)
    except ValueError:
        raise ValueError("request_id must be a UUID string") from None


def _request_body(
    messages: Sequence[Mapping[str, Any]], params: GenerationParams, model: str
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
) -> ChatResult:
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
    return ChatResult(
        text=(content or "").strip(),
        model=served_model if isinstance(served_model, str) and served_model else model,
        endpoint=endpoint.url,
        prompt_tokens=_optional_int(usage.get("prompt_tokens")),
        completion_tokens=_optional_int(usage.get("completion_tokens")),
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        request_id=request_id,
        elapsed_s=time.perf_counter() - started,
    )


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
