"""Token counts from the served model's own tokenizer, asked of the model servers, cached.

Two server APIs are spoken; which one an endpoint has is found once per endpoint and process:

* vLLM: ``GET /v1/models`` lists each model with ``max_model_len``. ``POST /tokenize`` takes
  ``{"model", "prompt", "add_special_tokens"}`` (a text) or ``{"model", "messages",
  "add_generation_prompt"}`` (a chat, through the model's chat template) and answers
  ``{"count", "tokens", "max_model_len"}``.
* llama-cpp-python's server (the local CPU server): ``POST /extras/tokenize`` and
  ``/extras/tokenize/count`` take ``{"input": text}`` and answer ``{"tokens": [...]}`` /
  ``{"count": n}``. It has no chat-template endpoint, and ``/v1/models`` has no context size.
  It is recognised by ``/extras/tokenize`` in its ``/openapi.json``.

Any other server (a router that does not pass these routes on, a stand-in) has no tokenizer:
:meth:`Tokenizer.available` says so and callers cannot count.

Counting a chat prompt
----------------------
A prompt is counted as the sum of its message contents (each counted by the server and cached
per model and text) plus the chat template's framing (:class:`Framing`): the tokens the template
puts around each message by role, and once per prompt (the system message's header, BOS, the
generation prompt). The framing is measured once per model from the server itself: with ``w`` a
one-token word and ``P(messages)`` the server's size of a whole chat prompt, ::

    base      = P([system w]) - c(w)
    user      = P([system w, user w]) - P([system w]) - c(w)
    assistant = P([system w, user w, assistant w, user w]) - P([system w, user w]) - user - 2 c(w)

``P`` is vLLM's ``/tokenize`` with ``messages``; on llama.cpp it is ``usage.prompt_tokens`` of a
one-token chat completion (the server applies the template embedded in the GGUF). A content
tokenized alone can differ from the same content inside the template by a token where they
meet; callers keep a margin for that. Errors are those of the package (``Unavailable``,
``Timeout``, ``BadResponse``); nothing raised quotes a text.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import httpx

from ._endpoints import DNS_PREFIX, Endpoint, Resolver, dns_name, expand, system_resolver
from ._errors import BadResponse, InferenceError, Timeout, Unavailable

Api = Literal["vllm", "llama_cpp"]
# One token in every tokenizer seen so far; the framing arithmetic checks it stays one.
_PROBE_WORD = "ok"


@dataclass(frozen=True, slots=True)
class Framing:
    """What the chat template adds around message contents, in tokens. ``base`` once per
    prompt (the system message's framing, BOS, the generation prompt); ``user`` and
    ``assistant`` per message of that role."""

    base: int
    user: int
    assistant: int

    def of(self, role: str) -> int:
        """The framing of one message after the system message."""
        return self.assistant if role == "assistant" else self.user


@dataclass(frozen=True, slots=True)
class CacheInfo:
    hits: int
    misses: int
    size: int


@dataclass(frozen=True, slots=True)
class _Server:
    endpoint: Endpoint
    api: Api
    # The context window per served model name, as the server reports it (vLLM).
    contexts: tuple[tuple[str, int], ...] = ()


class Tokenizer:
    """Counts tokens with the tokenizer of the model the chat endpoints serve.

    Endpoints of the requested role are asked in order; one that cannot be reached is skipped
    for the next (the discovery is retried on the next call). Counts are cached per (model
    name, text) in an LRU of ``cache_size`` entries (keyed by a digest, so no text is kept);
    framings and context sizes per model for the life of the object. Thread-safe; owns one
    connection pool, released by ``close()``.
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        cache_size: int = 50_000,
        transport: httpx.BaseTransport | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.endpoints = tuple(endpoints)
        self._resolver = resolver
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
            trust_env=False,
        )
        self._lock = threading.Lock()
        self._apis: dict[str, _Server | None] = {}
        self._cache: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._cache_size = cache_size
        self._hits = 0
        self._misses = 0
        self._framings: dict[str, Framing] = {}

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

    # --- public -----------------------------------------------------------------------------

    def available(self, *, role: str = "chat") -> bool:
        """Whether a reachable endpoint of ``role`` has a tokenize API. Raises ``Unavailable``
        (or ``Timeout``) when no endpoint of the role could be asked at all."""
        return self._server(role) is not None

    def context_length(self, *, role: str = "chat", model: str | None = None) -> int | None:
        """The context window the server reports for the model (vLLM), else ``None``."""
        server = self._require(role)
        name = _model_name(server.endpoint, model)
        known = dict(server.contexts)
        if name in known:
            return known[name]
        return min(known.values()) if len(known) == 1 else None

    def count(self, text: str, *, role: str = "chat", model: str | None = None) -> int:
        """The number of tokens of ``text`` (no special tokens added), cached."""
        return self.count_many([text], role=role, model=model)[0]

    def count_many(
        self, texts: Sequence[str], *, role: str = "chat", model: str | None = None
    ) -> list[int]:
        """:meth:`count` for each text, in order; only the texts not cached are sent."""
        server = self._require(role)
        name = _model_name(server.endpoint, model)
        keys = [(name, hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest()) for t in texts]
        counts: list[int | None] = []
        with self._lock:
            for key in keys:
                found = self._cache.get(key)
                if found is not None:
                    self._cache.move_to_end(key)
                    self._hits += 1
                else:
                    self._misses += 1
                counts.append(found)
        for i, (text, found) in enumerate(zip(texts, counts, strict=True)):
            if found is None:
                counts[i] = self._count_text(server, name, text)
                self._remember(keys[i], counts[i] or 0)
        return [c or 0 for c in counts]

    def tokens(self, text: str, *, role: str = "chat", model: str | None = None) -> list[int]:
        """The token ids of ``text`` as the server tokenizes it (special tokens in the text
        are parsed as such, none is added). Not cached."""
        server = self._require(role)
        name = _model_name(server.endpoint, model)
        if server.api == "vllm":
            data = self._post(
                server.endpoint,
                "/tokenize",
                {"model": name, "prompt": text, "add_special_tokens": False},
            )
        else:
            data = self._post(server.endpoint, "/extras/tokenize", {"input": text})
        ids = data.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise BadResponse("tokenize answer has no token list", endpoint=server.endpoint.url)
        return ids

    def framing(self, *, role: str = "chat", model: str | None = None) -> Framing:
        """The chat template's framing for the model, measured once (see the module
        docstring)."""
        server = self._require(role)
        name = _model_name(server.endpoint, model)
        with self._lock:
            known = self._framings.get(name)
        if known is not None:
            return known
        word = self.count(_PROBE_WORD, role=role, model=model)
        system = {"role": "system", "content": _PROBE_WORD}
        user = {"role": "user", "content": _PROBE_WORD}
        reply = {"role": "assistant", "content": _PROBE_WORD}
        p1 = self._chat_size(server, name, [system])
        p2 = self._chat_size(server, name, [system, user])
        p3 = self._chat_size(server, name, [system, user, reply, user])
        user_frame = p2 - p1 - word
        framing = Framing(
            base=p1 - word, user=user_frame, assistant=p3 - p2 - user_frame - 2 * word
        )
        if min(framing.base, framing.user, framing.assistant) < 0:
            raise BadResponse("chat template framing is inconsistent", endpoint=server.endpoint.url)
        with self._lock:
            self._framings[name] = framing
        return framing

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache))

    # --- internals ----------------------------------------------------------------------------

    def _remember(self, key: tuple[str, bytes], value: int) -> None:
        if self._cache_size == 0:
            return
        with self._lock:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _require(self, role: str) -> _Server:
        server = self._server(role)
        if server is None:
            raise Unavailable(f"no endpoint with role {role!r} has a tokenize API")
        return server

    def _server(self, role: str) -> _Server | None:
        entries = [e for e in self.endpoints if e.role == role]
        if not entries:
            raise Unavailable(f"no inference endpoint with role {role!r}")
        candidates = [server for entry in entries for server in self._expand(entry)]
        error: InferenceError | None = None
        reachable = False
        for endpoint in candidates:
            with self._lock:
                known = endpoint.url in self._apis
                server = self._apis.get(endpoint.url)
            if known:
                reachable = True
                if server is not None:
                    return server
                continue
            try:
                server = self._discover(endpoint)
            except InferenceError as exc:
                error = exc
                continue
            reachable = True
            with self._lock:
                self._apis[endpoint.url] = server
            if server is not None:
                return server
        if not reachable and error is not None:
            raise error
        return None

    def _expand(self, entry: Endpoint) -> list[Endpoint]:
        """A ``dns+http://`` entry's servers (they serve one model: any of them will do)."""
        if not entry.url.startswith(DNS_PREFIX):
            return [entry]
        try:
            return expand(entry, self._resolver(*dns_name(entry)))
        except OSError:
            return []

    def _discover(self, endpoint: Endpoint) -> _Server | None:
        models = self._get(endpoint, "/v1/models")
        data = models.get("data") if models is not None else None
        entries: list[Any] = data if isinstance(data, list) else []
        if any(
            isinstance(e, dict) and ("max_model_len" in e or e.get("owned_by") == "vllm")
            for e in entries
        ):
            return _Server(endpoint, "vllm", _served_lengths(entries))
        spec = self._get(endpoint, "/openapi.json")
        paths = spec.get("paths") if spec is not None else None
        if isinstance(paths, dict):
            if "/extras/tokenize/count" in paths and "/extras/tokenize" in paths:
                return _Server(endpoint, "llama_cpp")
            if "/tokenize" in paths and "/v1/chat/completions" in paths:
                return _Server(endpoint, "vllm")
        return None

    def _count_text(self, server: _Server, name: str, text: str) -> int:
        if server.api == "vllm":
            data = self._post(
                server.endpoint,
                "/tokenize",
                {"model": name, "prompt": text, "add_special_tokens": False},
            )
        else:
            data = self._post(server.endpoint, "/extras/tokenize/count", {"input": text})
        return _count_of(data, server.endpoint)

    def _chat_size(self, server: _Server, name: str, messages: list[dict[str, str]]) -> int:
        """The size of a whole chat prompt with the generation prompt, as the server builds it."""
        if server.api == "vllm":
            data = self._post(
                server.endpoint,
                "/tokenize",
                {"model": name, "messages": messages, "add_generation_prompt": True},
            )
            return _count_of(data, server.endpoint)
        data = self._post(
            server.endpoint,
            "/v1/chat/completions",
            {"model": name, "messages": messages, "max_tokens": 1, "temperature": 0},
        )
        usage = data.get("usage")
        size = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadResponse("chat answer has no prompt token count", endpoint=server.endpoint.url)
        return size

    def _get(self, endpoint: Endpoint, path: str) -> dict[str, Any] | None:
        """The JSON object at ``path``; ``None`` for an error status or another body."""
        try:
            response = self._http.get(endpoint.url + path)
        except httpx.TimeoutException as exc:
            raise Timeout(
                f"tokenizer discovery timed out ({type(exc).__name__})", endpoint=endpoint.url
            ) from exc
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"server unreachable ({type(exc).__name__})", endpoint=endpoint.url
            ) from exc
        if response.status_code >= 500:
            raise Unavailable(f"HTTP {response.status_code}", endpoint=endpoint.url)
        if response.status_code != 200:
            return None
        try:
            data = response.json()
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _post(self, endpoint: Endpoint, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            response = self._http.post(endpoint.url + path, json=dict(body))
        except httpx.TimeoutException as exc:
            raise Timeout(
                f"tokenize timed out ({type(exc).__name__})", endpoint=endpoint.url
            ) from exc
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"server unreachable ({type(exc).__name__})", endpoint=endpoint.url
            ) from exc
        status = response.status_code
        if status == 429 or status >= 500:
            raise Unavailable(f"tokenize failed: HTTP {status}", endpoint=endpoint.url)
        if status != 200:
            raise BadResponse(f"tokenize rejected: HTTP {status}", endpoint=endpoint.url)
        try:
            data = response.json()
        except ValueError:
            raise BadResponse("tokenize answer is not JSON", endpoint=endpoint.url) from None
        if not isinstance(data, dict):
            raise BadResponse("tokenize answer is not an object", endpoint=endpoint.url)
        return data


def _model_name(endpoint: Endpoint, model: str | None) -> str:
    """The model name the chat client sends to this endpoint (the endpoint's wins)."""
    return endpoint.model or model or "default"


def _served_lengths(entries: list[Any]) -> tuple[tuple[str, int], ...]:
    return tuple(
        (e["id"], e["max_model_len"])
        for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("id"), str)
        and isinstance(e.get("max_model_len"), int)
        and not isinstance(e.get("max_model_len"), bool)
    )


def _count_of(data: Mapping[str, Any], endpoint: Endpoint) -> int:
    count = data.get("count")
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    tokens = data.get("tokens")
    if isinstance(tokens, list):
        return len(tokens)
    raise BadResponse("tokenize answer has no count", endpoint=endpoint.url)
