"""Group commit for every webhook delivery.

One commit per webhook would make Postgres's commit the ceiling of the intake, and Meta sends
about four webhooks per conversation turn (the message, then sent/delivered/read). An
:class:`IntakeBatcher` owns one writer thread: it takes the first waiting delivery and every
delivery queued behind it (waiting up to ``max_wait`` seconds for more, 0 by default: under load
deliveries pile up while the previous batch commits, and an idle system should not add latency),
at most ``max_requests``; applies them in arrival order in one transaction
(:func:`webhooks.service.apply_deliveries`: a few statements for a whole run of messages and
statuses) and commits. The request waits for its batch's commit, so Meta gets its 200 only once
the delivery is durable. The doorbells of the jobs the batch created are then rung by a second
thread (``core.jobs.send_many``: one pipelined broker write), so the next batch does not wait for
the broker. A crash between the commit and the doorbell loses nothing: the relay sends jobs
whose task never ran.

If a batch of several deliveries fails, it is applied again delivery by delivery, each in its
own transaction and without the route cache, so one bad delivery fails alone (its request
answers 5xx and Meta retries it) and the others are acknowledged. A batch of one fails at once
(the cached routes are dropped first, so Meta's retry reads them afresh); so does every request
of a batch when Postgres itself is unreachable.

The writer thread exits after ``idle_exit`` seconds without work and restarts on demand.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import structlog
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.db import session_scope
from webhooks import service
from webhooks.directory import Directory

log = structlog.get_logger()
Job = tuple[str, int]  # (task name, outbox job id): a doorbell to ring after the commit

# Errors that say Postgres cannot be reached: retrying each delivery alone would only wait again.
UNREACHABLE = (OperationalError, InterfaceError)


@dataclass
class _Request:
    delivery: service.Delivery
    done: Future[service.IntakeResult]


@dataclass(frozen=True)
class BatcherStats:
    batches: int  # transactions committed
    requests: int  # deliveries acknowledged through them
    largest: int  # most deliveries in one batch
    retried: int  # batches that failed and were applied delivery by delivery


class IntakeBatcher:
    def __init__(
        self,
        factory: sessionmaker[Session],
        directory: Directory,
        *,
        max_requests: int = 50,
        max_wait: float = 0.0,
        idle_exit: float = 30.0,
    ) -> None:
        self.factory = factory
        self.directory = directory
        self.max_requests = max(1, max_requests)
        self.max_wait = max(0.0, max_wait)
        self.idle_exit = idle_exit
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._doorbells: queue.Queue[list[tuple[str, int]]] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ringer: threading.Thread | None = None
        self._batches = 0
        self._requests = 0
        self._largest = 0
        self._retried = 0

    def submit(self, delivery: service.Delivery) -> Future[service.IntakeResult]:
        """Queue ``delivery`` for the next batch; the future resolves once it is committed (or
        with the error that kept it from being committed). Cancelling the future before its
        batch starts withdraws the delivery."""
        request = _Request(delivery, Future())
        self._queue.put(request)
        self._ensure_thread()
        return request.done

    def apply(self, delivery: service.Delivery, timeout: float = 30.0) -> service.IntakeResult:
        """Blocking :meth:`submit`."""
        return self.submit(delivery).result(timeout=timeout)

    def stats(self) -> BatcherStats:
        with self._lock:
            return BatcherStats(self._batches, self._requests, self._largest, self._retried)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="intake-batcher", daemon=True
                )
                self._thread.start()

    def _ring(self, doorbells: list[tuple[str, int]]) -> None:
        """Hand committed jobs to the doorbell thread, so the next batch need not wait for the
        broker."""
        if not doorbells:
            return
        self._doorbells.put(doorbells)
        with self._lock:
            if self._ringer is None:
                self._ringer = threading.Thread(
                    target=self._run_ringer, name="intake-doorbells", daemon=True
                )
                self._ringer.start()

    def _run_ringer(self) -> None:
        while True:
            try:
                work = self._doorbells.get(timeout=self.idle_exit)
            except queue.Empty:
                with self._lock:
                    if self._doorbells.empty():
                        self._ringer = None
                        return
                continue
            while True:  # everything committed meanwhile goes out in the same broker write
                try:
                    work = work + self._doorbells.get_nowait()
                except queue.Empty:
                    break
            jobs.send_many(work)

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
            # A request whose client went away before its batch started is withdrawn.
            live = [r for r in batch if r.done.set_running_or_notify_cancel()]
            if live:
                self._commit(live)

    def _apply(self, batch: list[_Request]) -> tuple[list[service.IntakeResult], list[Job]]:
        with session_scope(self.factory) as session:
            results = service.apply_deliveries(session, [r.delivery for r in batch], self.directory)
            return results, jobs.take_buffer(session)

    def _commit(self, batch: list[_Request]) -> None:
        try:
            try:
                results, doorbells = self._apply(batch)
            except DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
                # The writer's connection had died (Postgres restarted): it is not pinged
                # before each batch, so the batch is applied again once on a new connection.
                log.warning("webhooks.batch_reconnected", deliveries=len(batch))
                results, doorbells = self._apply(batch)
        except UNREACHABLE as exc:
            log.error("webhooks.batch_failed", deliveries=len(batch), error=type(exc).__name__)
            for request in batch:
                request.done.set_exception(exc)
            return
        except Exception as exc:  # noqa: BLE001  # isolated below: each delivery on its own
            self.directory.forget()  # a cached route or conversation may be what failed
            if len(batch) == 1:
                log.error("webhooks.delivery_failed", error=type(exc).__name__)
                batch[0].done.set_exception(exc)
                return
            log.warning("webhooks.batch_retried", deliveries=len(batch), error=type(exc).__name__)
            with self._lock:
                self._retried += 1
            for request in batch:
                self._commit_alone(request)
            return
        with self._lock:
            self._batches += 1
            self._requests += len(batch)
            self._largest = max(self._largest, len(batch))
        for request, result in zip(batch, results, strict=True):
            request.done.set_result(result)
        self._ring(doorbells)
        _log_batch(batch, results)

    def _commit_alone(self, request: _Request) -> None:
        delivery = request.delivery
        try:
            with session_scope(self.factory) as session:
                result = service.store_events(
                    session, delivery.app, delivery.events, channel=delivery.channel
                )
                doorbells = jobs.take_buffer(session)
        except BaseException as exc:  # the request must hear about it
            log.error(
                "webhooks.delivery_failed", channel=delivery.channel, error=type(exc).__name__
            )
            request.done.set_exception(exc)
            return
        with self._lock:
            self._batches += 1
            self._requests += 1
            self._largest = max(self._largest, 1)
        request.done.set_result(result)
        self._ring(doorbells)
        _log_batch([request], [result])


def _log_batch(batch: list[_Request], results: list[service.IntakeResult]) -> None:
    totals: dict[str, int] = {}
    for result in results:
        for key, value in result.as_json().items():
            totals[key] = totals.get(key, 0) + value
    channels = sorted({r.delivery.channel for r in batch})
    log.info("webhooks.received", deliveries=len(batch), channels=channels, **totals)
