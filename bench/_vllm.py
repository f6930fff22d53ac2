"""Streaming chat requests timed to the first token, and vllm-router as a child process.

``stream_chat`` sends one OpenAI-style chat completion with ``stream: true`` and reads the
server-sent events: the time to the first content chunk, the text, the finish reason, the
usage and every completion id seen (a reply carrying two ids was generated twice).

``StreamingTransport`` does the same underneath ``inference.InferenceClient``: a streamed
request passes through and is only observed; a request the client does not stream is sent as a
stream and answered with an ordinary completion built from the chunks. Either way Parley's own
routing, failover and breakers run unchanged while the benchmark sees the same first-token
time as for every other mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench._common import Child, free_port, wait_http
from tests.support.vllm import VENV

CHAT_PATH = "/v1/chat/completions"


class StreamBroken(httpx.RemoteProtocolError):
    """The stream ended without a finish reason (the server or a router in between died)."""


@dataclass
class StreamResult:
    text: str = ""
    ttft_s: float | None = None
    elapsed_s: float = 0.0
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str = ""
    ids: set[str] = field(default_factory=set)

    @property
    def duplicated(self) -> bool:
        return len(self.ids) > 1


class StreamReader:
    """Folds a chat-completion event stream, fed chunk by chunk, into a ``StreamResult``."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.result = StreamResult()
        self._parts: list[str] = []
        self._buffer = b""
        self._done = False

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        while b"\n" in self._buffer and not self._done:
            line, self._buffer = self._buffer.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self._done = True
                return
            event = json.loads(payload)
            if isinstance(event, dict):
                self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        result = self.result
        if isinstance(event.get("id"), str):
            result.ids.add(event["id"])
        if isinstance(event.get("model"), str):
            result.model = event["model"]
        usage = event.get("usage")
        if isinstance(usage, dict):
            result.prompt_tokens = usage.get("prompt_tokens")
            result.completion_tokens = usage.get("completion_tokens")
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                if result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - self.started
                self._parts.append(content)
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]

    def finish(self) -> StreamResult:
        """The result; raises ``StreamBroken`` when the stream had no finish reason."""
        self.result.elapsed_s = time.perf_counter() - self.started
        self.result.text = "".join(self._parts)
        if self.result.finish_reason is None:
            raise StreamBroken("the stream ended without a finish reason")
        return self.result


def read_stream(chunks: Iterable[bytes], started: float) -> StreamResult:
    reader = StreamReader(started)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.finish()


def streaming_body(body: Mapping[str, Any]) -> dict[str, Any]:
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


def stream_chat(
    http: httpx.Client, url: str, body: Mapping[str, Any], headers: Mapping[str, str]
) -> StreamResult:
    """One streamed chat completion at ``url`` (a base URL). Raises ``httpx.HTTPError``
    (``HTTPStatusError`` for a non-200 answer, ``StreamBroken`` for a cut stream)."""
    started = time.perf_counter()
    with http.stream(
        "POST", url + CHAT_PATH, json=streaming_body(body), headers=dict(headers)
    ) as response:
        if response.status_code != 200:
            response.read()
            response.raise_for_status()
            raise httpx.HTTPStatusError(
                f"HTTP {response.status_code}", request=response.request, response=response
            )
        return read_stream(response.iter_bytes(), started)


class _Observed(httpx.SyncByteStream):
    """Passes a streamed reply through unchanged while a ``StreamReader`` times it."""

    def __init__(
        self, inner: httpx.Response, reader: StreamReader, done: Callable[[StreamResult], None]
    ) -> None:
        self._inner = inner
        self._reader = reader
        self._done = done
        self._recorded = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner.iter_raw():
            self._reader.feed(chunk)
            yield chunk
        self._finish()

    def _finish(self) -> None:
        if not self._recorded:
            self._recorded = True
            with contextlib.suppress(StreamBroken):
                self._done(self._reader.finish())

    def close(self) -> None:
        # a client may stop reading at the finish reason, before ``[DONE]``
        self._finish()
        self._inner.close()


class StreamingTransport(httpx.BaseTransport):
    """Times every chat request of an ``InferenceClient`` to its first token, by request id.

    A request the client streams itself passes through untouched and is only observed; one
    it does not stream is sent as a stream and answered with the completion built from it.
    """

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self._lock = threading.Lock()
        self._results: dict[str, StreamResult] = {}

    def pop(self, request_id: str) -> StreamResult | None:
        with self._lock:
            return self._results.pop(request_id, None)

    def _record(self, request_id: str) -> Callable[[StreamResult], None]:
        def record(result: StreamResult) -> None:
            with self._lock:
                self._results[request_id] = result

        return record

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or not request.url.path.endswith(CHAT_PATH):
            return self._inner.handle_request(request)
        body = json.loads(request.read())
        record = self._record(request.headers.get("X-Request-Id", ""))
        started = time.perf_counter()
        if body.get("stream"):
            response = self._inner.handle_request(request)
            if response.status_code != 200:
                return response
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_Observed(response, StreamReader(started), record),
                extensions=response.extensions,
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        streamed = httpx.Request(
            "POST",
            request.url,
            headers=headers,
            json=streaming_body(body),
            extensions=request.extensions,
        )
        response = self._inner.handle_request(streamed)
        try:
            if response.status_code != 200:
                return httpx.Response(
                    response.status_code, headers=response.headers, content=response.read()
                )
            result = read_stream(response.iter_bytes(), started)
        finally:
            response.close()
        record(result)
        completion = {
            "id": min(result.ids) if result.ids else "",
            "object": "chat.completion",
            "model": result.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
            },
        }
        return httpx.Response(200, json=completion)

    def close(self) -> None:
        self._inner.close()


class Router:
    """``vllm-router`` from ``.parley/venv-vllm`` in front of the given servers."""

    def __init__(self, policy: str, worker_urls: list[str], log_dir: Path) -> None:
        self.policy = policy
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            str(VENV / "bin" / "vllm-router"),
            "--worker-urls",
            *worker_urls,
            "--policy",
            policy,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(free_port()),
            "--log-level",
            "warning",
        ]
        self.child = Child(f"router-{policy}", argv, dict(os.environ), log_dir)
        try:
            wait_http(self.url + "/v1/models", timeout=60, child=self.child)
        except BaseException:
            self.child.stop()
            raise

    def stop(self) -> None:
        self.child.stop()
