"""Group commit for status-only webhooks.

Meta sends about three status webhooks (sent, delivered, read) per outbound message; one commit
each would cost more than the messages themselves. A :class:`StatusBatcher` owns one writer
thread: it takes the first waiting request, collects more for up to ``max_wait`` seconds or
``max_requests`` requests, applies all their statuses in one transaction
(:func:`webhooks.repository.apply_statuses`: one statement) and commits. Each request thread
blocks in :meth:`StatusBatcher.apply` until its batch is committed, so the 200 still goes to
Meta only after the statuses are durable; if the batch fails, every request in it gets the
exception (and Meta retries).

The writer thread exits after ``idle_exit`` seconds without work and restarts on demand.
Inbound user messages never come through here: they commit per request.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import structlog
from sqlalchemy.orm import Session, sessionmaker

from core.db import session_scope
from core.models import utcnow
from webhooks import repository

log = structlog.get_logger()


@dataclass
class _Request:
    statuses: Sequence[repository.SignedStatus]
    done: Future[int]


@dataclass(frozen=True)
class BatcherStats:
    batches: int  # transactions committed
    requests: int  # requests acknowledged through them
    largest: int  # most requests in one batch


class StatusBatcher:
    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        max_requests: int = 50,
        max_wait: float = 0.005,
        idle_exit: float = 30.0,
    ) -> None:
        self.factory = factory
        self.max_requests = max(1, max_requests)
        self.max_wait = max(0.0, max_wait)
        self.idle_exit = idle_exit
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._batches = 0
        self._requests = 0
        self._largest = 0

    def apply(self, statuses: Sequence[repository.SignedStatus], timeout: float = 30.0) -> int:
        """Apply ``statuses`` in the next batch; returns when that batch is committed (the
        number of chunk rows the batch changed), or raises what the batch raised."""
        request = _Request(statuses, Future())
        self._queue.put(request)
        self._ensure_thread()
        return request.done.result(timeout=timeout)

    def stats(self) -> BatcherStats:
        with self._lock:
            return BatcherStats(self._batches, self._requests, self._largest)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="status-batcher", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.idle_exit)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_requests:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
            self._commit(batch)

    def _commit(self, batch: list[_Request]) -> None:
        statuses = [s for request in batch for s in request.statuses]
        try:
            with session_scope(self.factory) as session:
                changed = repository.apply_statuses(session, statuses, now=utcnow())
        except BaseException as exc:  # every waiting request must hear about it
            log.error("webhooks.status_batch_failed", requests=len(batch), error=type(exc).__name__)
            for request in batch:
                request.done.set_exception(exc)
            return
        with self._lock:
            self._batches += 1
            self._requests += len(batch)
            self._largest = max(self._largest, len(batch))
        for request in batch:
            request.done.set_result(changed)
