"""Group commit for every webhook delivery.

One commit per webhook would make Postgres's commit the ceiling of the intake, and Meta sends
about four webhooks per conversation turn (the message, then sent/delivered/read). An
:class:`IntakeBatcher` owns one writer thread: it takes the first waiting delivery and every
delivery queued behind it (waiting up to ``max_wait`` seconds for more, 0 by default: under load
deliveries pile up while the previous batch commits, and an idle system should not add latency),
at most ``max_requests``; applies them in arrival order in one transaction
(:func:`webhooks.service.apply_deliveries`: a few statements for a whole run of messages and
statuses) and commits. The request waits for its batch's commit, so Meta gets its 200 only once
the delivery is durable.

With ``overlap`` (the API's own engine), a third thread commits: while one batch's commit waits
for Postgres's WAL flush, the writer applies the next batch in a second transaction (at most one
more waits, applied, behind the commit). Rows two batches share keep their order: the later
batch's statements on them wait for the earlier batch's row locks, so for one conversation
(whose row every inbound message updates) batches commit in arrival order.

The doorbells of the jobs a batch created are then rung by another
thread (``core.jobs.send_many``: one pipelined broker write), so the next batch does not wait for
the broker. A crash between the commit and the doorbell loses nothing: the relay sends jobs
whose task never ran.

If a batch of several deliveries fails, it is applied again delivery by delivery, each in its
own transaction and without the route cache, so one bad delivery fails alone (its request
answers 5xx and Meta retries it) and the others are acknowledged. A batch of one fails at once
(the cached routes are dropped first, so Meta's retry reads them afresh); so does every request
of a batch when Postgres itself is unreachable. A failed commit is handled the same way.

Totals of what was received are logged as ``webhooks.received`` at most once a second.

The writer thread exits after ``idle_exit`` seconds without work and restarts on demand.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core import jobs
from core.db import session_scope
from webhooks import service
from webhooks.directory import Directory

log = structlog.get_logger()
Job = tuple[str, int]  # (task name, outbox job id): a doorbell to ring after the commit
T = TypeVar("T")

# Errors that say Postgres cannot be reached: retrying each delivery alone would only wait again.
UNREACHABLE = (OperationalError, InterfaceError)


@dataclass
class _Request:
    delivery: service.Delivery
    done: Future[service.IntakeResult]


@dataclass
class _Staged:
    """A batch applied in a transaction that is still open."""

    batch: list[_Request]
    session: Session
    results: list[service.IntakeResult]
    doorbells: list[Job]


class _Lane(Generic[T]):
    """A queue served by one daemon thread, started on demand and gone after ``idle_exit``
    seconds without work. ``put`` enqueues before it looks for the thread, and the thread
    leaves only when, under the same lock, the queue is empty: no item is ever stranded."""

    def __init__(
        self, name: str, handle: Callable[[T], None], idle_exit: float, maxsize: int = 0
    ) -> None:
        self.name = name
        self.handle = handle
        self.idle_exit = idle_exit
        self.queue: queue.Queue[T] = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def put(self, item: T) -> None:
        """Enqueue ``item`` (waiting while a bounded queue is full)."""
        self.queue.put(item)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def take_waiting(self) -> list[T]:
        """Every item queued now, without waiting."""
        items: list[T] = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=self.idle_exit)
            except queue.Empty:
                with self._lock:
                    if self.queue.empty():
                        self._thread = None
                        return
                continue
            self.handle(item)


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
        overlap: bool = False,
        log_every: float = 1.0,
    ) -> None:
        self.factory = factory
        self.overlap = overlap
        self.log_every = log_every
        self.directory = directory
        self.max_requests = max(1, max_requests)
        self.max_wait = max(0.0, max_wait)
        self.idle_exit = idle_exit
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._doorbells = _Lane[list[Job]]("intake-doorbells", self._ring_now, idle_exit)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # One batch committing, one applied and waiting: the writer applies a third meanwhile.
        self._committing = _Lane[_Staged]("intake-committer", self._finish, idle_exit, maxsize=1)
        self._received: dict[str, int] = {}
        self._received_channels: set[str] = set()
        self._received_deliveries = 0
        self._logged_at = float("-inf")  # the first batch after a quiet spell is logged at once
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

    def _count(self, batch: list[_Request], results: list[service.IntakeResult]) -> None:
        """Add to the ``webhooks.received`` totals, logged at most every ``log_every`` seconds
        (a line per batch cost the writer about a tenth of its time)."""
        with self._lock:
            for result in results:
                for key, value in result.as_json().items():
                    self._received[key] = self._received.get(key, 0) + value
            self._received_channels.update(r.delivery.channel for r in batch)
            self._received_deliveries += len(batch)
            now = time.monotonic()
            if now - self._logged_at < self.log_every:
                return
            totals, channels = self._received, sorted(self._received_channels)
            deliveries = self._received_deliveries
            self._received, self._received_channels, self._received_deliveries = {}, set(), 0
            self._logged_at = now
        log.info("webhooks.received", deliveries=deliveries, channels=channels, **totals)

    def flush_log(self) -> None:
        """Log the totals not logged yet (at shutdown, or before a test reads the log)."""
        with self._lock:
            if not self._received_deliveries:
                return
            self._logged_at = float("-inf")
        self._count([], [])

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="intake-batcher", daemon=True
                )
                self._thread.start()

    def _ring(self, doorbells: list[Job]) -> None:
        """Hand committed jobs to the doorbell thread, so the next batch need not wait for the
        broker."""
        if doorbells:
            self._doorbells.put(doorbells)

    def _ring_now(self, work: list[Job]) -> None:
        # everything committed meanwhile goes out in the same broker write
        for more in self._doorbells.take_waiting():
            work = work + more
        jobs.send_many(work)

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            try:
                first = self._queue.get(timeout=min(self.idle_exit, self.log_every))
            except queue.Empty:
                self.flush_log()  # totals counted since the last line, now that it is quiet
                if time.monotonic() - idle_since < self.idle_exit:
                    continue
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
            idle_since = time.monotonic()

    def _open(self, batch: list[_Request]) -> _Staged:
        """Apply ``batch`` in a new transaction, left open for :meth:`_finish` to commit."""
        for attempt in (1, 2):
            session = self.factory()
            try:
                results = service.apply_deliveries(
                    session, [r.delivery for r in batch], self.directory
                )
                return _Staged(batch, session, results, jobs.take_buffer(session))
            except DBAPIError as exc:
                session.rollback()
                session.close()
                if attempt == 2 or not exc.connection_invalidated:
                    raise
                # The writer's connection had died (Postgres restarted): it is not pinged
                # before each batch, so the batch is applied again once on a new connection.
                log.warning("webhooks.batch_reconnected", deliveries=len(batch))
            except BaseException:
                session.rollback()
                session.close()
                raise
        raise AssertionError("unreachable")  # the second attempt returned or raised

    def _commit(self, batch: list[_Request]) -> None:
        """Apply ``batch``, then commit it here or, when commits overlap, on the committer."""
        try:
            staged = self._open(batch)
        except Exception as exc:  # noqa: BLE001  # answered by _failed, request by request
            self._failed(batch, exc)
            return
        if self.overlap:
            self._committing.put(staged)  # waits while a commit is in flight and one queued
        else:
            self._finish(staged)

    def _finish(self, staged: _Staged) -> None:
        batch = staged.batch
        try:
            try:
                staged.session.commit()
            except BaseException:
                staged.session.rollback()
                raise
            finally:
                staged.session.close()
        except Exception as exc:  # noqa: BLE001  # answered by _failed, request by request
            self._failed(batch, exc)
            return
        with self._lock:
            self._batches += 1
            self._requests += len(batch)
            self._largest = max(self._largest, len(batch))
        for request, result in zip(batch, staged.results, strict=True):
            request.done.set_result(result)
        self._ring(staged.doorbells)
        self._count(batch, staged.results)

    def _failed(self, batch: list[_Request], exc: Exception) -> None:
        """A batch that could not be applied or committed: every request hears why, or (when
        Postgres is reachable) each delivery is applied again on its own. Re-applying is safe:
        message ids and upserts make intake idempotent, and nothing was acknowledged."""
        if isinstance(exc, UNREACHABLE):
            log.error("webhooks.batch_failed", deliveries=len(batch), error=type(exc).__name__)
            for request in batch:
                request.done.set_exception(exc)
            return
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
        self._count([request], [result])
