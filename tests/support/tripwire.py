"""Raise an exception in the main thread the way Celery's soft time limit does: a signal
whose handler raises ``SoftTimeLimitExceeded`` wherever the thread is, even blocked in a read."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from types import FrameType

import httpx
from celery.exceptions import SoftTimeLimitExceeded


def _raise(signum: int, frame: FrameType | None) -> None:
    raise SoftTimeLimitExceeded()


class SoftTimeLimit:
    """While entered, ``fire()`` (from any thread) raises ``SoftTimeLimitExceeded`` in the
    main thread, through a real ``SIGUSR1`` as Celery's prefork pool sends it."""

    def __enter__(self) -> SoftTimeLimit:
        self._main = threading.main_thread().ident
        self._previous = signal.signal(signal.SIGUSR1, _raise)
        return self

    def fire(self) -> None:
        assert self._main is not None
        signal.pthread_kill(self._main, signal.SIGUSR1)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGUSR1, self._previous)


class _FiringStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, after: int, limit: SoftTimeLimit) -> None:
        self._inner, self._after, self._limit = inner, after, limit

    def __iter__(self) -> Iterator[bytes]:
        for n, data in enumerate(self._inner, start=1):
            yield data
            if n == self._after:
                self._limit.fire()

    def close(self) -> None:
        self._inner.close()


class FiringTransport(httpx.BaseTransport):
    """A real ``httpx.HTTPTransport`` that fires ``limit`` once ``after`` body chunks of a
    streamed response went by; the response is otherwise the real one, socket included."""

    def __init__(self, limit: SoftTimeLimit, after: int = 3) -> None:
        self._inner = httpx.HTTPTransport()
        self._limit, self._after = limit, after

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return response
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_FiringStream(response.stream, self._after, self._limit),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._inner.close()
