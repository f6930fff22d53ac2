"""Routing state of the pool: rendezvous order, in-flight counts, load, breakers, counters.

Everything here is in-process and guarded by one lock; no I/O happens under it.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Self

from core.config import Settings

from ._endpoints import Endpoint

BreakerState = Literal["closed", "open", "half_open"]

# vLLM's load gauges (V1 names, and the older name of the KV-cache gauge).
WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """How the client spreads load and ejects servers.

    ``max_in_flight`` caps requests this process has open to one endpoint (an endpoint's
    own ``max_in_flight`` wins; 0 means no cap). ``spill_waiting`` is the
    ``vllm:num_requests_waiting`` reading at which a server counts as saturated (0: never).
    ``breaker_failures`` consecutive failures open an endpoint's breaker for
    ``breaker_cooldown`` seconds, then one probe decides. ``health_interval`` is the
    period of the background health checks (0: none; failures still eject passively).
    ``dns_interval`` is the period of the re-resolution of ``dns+http://`` entries.
    """

    max_in_flight: int = 32
    spill_waiting: int = 8
    breaker_failures: int = 3
    breaker_cooldown: float = 15.0
    health_interval: float = 10.0
    dns_interval: float = 30.0

    def __post_init__(self) -> None:
        if self.max_in_flight < 0 or self.spill_waiting < 0:
            raise ValueError("max_in_flight and spill_waiting must be >= 0")
        if self.breaker_failures < 1:
            raise ValueError("breaker_failures must be >= 1")
        if self.breaker_cooldown < 0 or self.health_interval < 0:
            raise ValueError("breaker_cooldown and health_interval must be >= 0")
        if self.dns_interval <= 0:
            raise ValueError("dns_interval must be > 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(
            max_in_flight=settings.inference_max_in_flight,
            spill_waiting=settings.inference_spill_waiting,
            breaker_failures=settings.inference_breaker_failures,
            breaker_cooldown=settings.inference_breaker_cooldown,
            health_interval=settings.inference_health_interval,
            dns_interval=settings.inference_dns_interval,
        )


# Upper bounds (seconds) of the timing histograms: first token and generation time.
TIMING_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# vLLM's histogram of the time requests waited in its queue (its sum and count).
QUEUE_SUM = "vllm:request_queue_time_seconds_sum"
QUEUE_COUNT = "vllm:request_queue_time_seconds_count"


@dataclass(frozen=True, slots=True)
class Timing:
    """Observations of one duration: how many, their sum in seconds, and ``buckets``, the
    cumulative count of observations at or under each bound of ``TIMING_BUCKETS``."""

    count: int = 0
    sum_s: float = 0.0
    buckets: tuple[int, ...] = (0,) * len(TIMING_BUCKETS)

    def observe(self, seconds: float) -> Timing:
        return Timing(
            count=self.count + 1,
            sum_s=self.sum_s + seconds,
            buckets=tuple(
                n + (seconds <= bound)
                for n, bound in zip(self.buckets, TIMING_BUCKETS, strict=True)
            ),
        )


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """A snapshot of one endpoint's counters and state, kept since it joined the pool.

    ``requests`` counts attempts sent (failovers included), ``errors`` the attempts that
    failed for any reason and ``error_kinds`` the same split by kind: ``connect`` (never
    reached the server), ``timeout``, ``unavailable`` (5xx, 429, a broken stream),
    ``bad_request``, ``context_too_long``, ``bad_response`` and ``abandoned`` (the caller
    gave up: an exception in its thread). ``ttft`` is the time from sending a request to its
    first streamed chunk, ``generation`` the time from that chunk to the end of the stream
    (for a server that answers in one JSON body, the whole request, and no ``ttft``); both
    for successful requests. Tokens are those the servers reported. ``spilled`` counts
    requests whose conversation belongs here but went elsewhere because this endpoint was
    saturated. ``waiting``, ``running`` and ``kv_cache_usage`` are the last ``/metrics``
    readings and ``queue_wait_s``/``queue_wait_count`` the server's own
    ``vllm:request_queue_time_seconds`` sum and count, over every client it serves (``None``
    when the server has no such metric). ``healthy`` is the last active check (``None``
    before the first).
    """

    url: str
    role: str
    model: str | None
    state: BreakerState
    consecutive_failures: int
    in_flight: int
    requests: int
    errors: int
    error_kinds: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    ttft: Timing
    generation: Timing
    spilled: int
    probes: int
    healthy: bool | None
    waiting: float | None
    running: float | None
    kv_cache_usage: float | None
    queue_wait_s: float | None
    queue_wait_count: float | None


@dataclass(slots=True, eq=False)
class _State:
    endpoint: Endpoint
    opened_at: float | None = None
    probing: bool = False
    consecutive_failures: int = 0
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: Timing = Timing()
    generation: Timing = Timing()
    spilled: int = 0
    probes: int = 0
    healthy: bool | None = None
    metrics_missing: bool = False
    waiting: float | None = None
    running: float | None = None
    kv_cache_usage: float | None = None
    queue_wait_s: float | None = None
    queue_wait_count: float | None = None


Ticket = _State
"""What ``Pool.begin`` hands out and ``succeeded``/``failed`` take back: the endpoint's state,
still counted when the endpoint left the pool meanwhile."""


def rendezvous_weight(key: str, url: str) -> int:
    """Highest-random-weight score of ``url`` for ``key``: stable across processes and runs."""
    digest = hashlib.blake2b(f"{url}\n{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def parse_metrics(text: str) -> dict[str, list[float]]:
    """Sample values by metric name from the Prometheus text exposition format.

    Labels are skipped (quoted values may hold spaces, braces and escaped quotes); a
    metric with several label sets (one per engine or model) yields several values.
    Lines that do not parse are ignored, so a partial or foreign body gives fewer values.
    """
    samples: dict[str, list[float]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name, rest = line[:brace], _after_labels(line, brace)
        elif space != -1:
            name, rest = line[:space], line[space:]
        else:
            continue
        fields = rest.split()
        if not name or not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        samples.setdefault(name, []).append(value)
    return samples


def _after_labels(line: str, brace: int) -> str:
    quoted = escaped = False
    for index in range(brace + 1, len(line)):
        char = line[index]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            return line[index + 1 :]
    return ""


def _finite(values: list[float] | None, combine: Callable[[list[float]], float]) -> float | None:
    kept = [value for value in values or [] if math.isfinite(value)]
    return combine(kept) if kept else None


class Pool:
    """The per-endpoint state behind ``InferenceClient``; every method is thread-safe.

    Endpoints join and leave with ``set_members`` (DNS discovery); an endpoint that stays
    keeps its counters and breaker.
    """

    def __init__(
        self, endpoints: Sequence[Endpoint], config: PoolConfig, clock: Callable[[], float]
    ) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[Endpoint, _State] = {}
        self.set_members(endpoints)

    def set_members(self, endpoints: Sequence[Endpoint]) -> tuple[list[Endpoint], list[Endpoint]]:
        """Make ``endpoints`` the pool, in this order; returns ``(joined, left)``.

        A duplicate of an endpoint already listed is dropped.
        """
        with self._lock:
            old = self._states
            states: dict[Endpoint, _State] = {}
            for endpoint in endpoints:
                if endpoint not in states:
                    states[endpoint] = old.get(endpoint) or _State(endpoint)
            self._states = states
        return [e for e in states if e not in old], [e for e in old if e not in states]

    def members(self) -> list[Endpoint]:
        with self._lock:
            return list(self._states)

    # --- routing -------------------------------------------------------------------------

    def plan(self, role: str, key: str | None, *, count_spill: bool = True) -> list[Endpoint]:
        """Endpoints in the order one request tries them.

        With a ``key``: rendezvous order, so every turn of a conversation goes to the same
        server while it is healthy and not saturated; without one, the configured order.
        Saturated endpoints (over their in-flight cap, or a long waiting queue) move behind
        the others, keeping their relative order; open breakers and half-open endpoints
        whose probe is already out are left out, unless nothing else is left — then every
        endpoint of the role is tried rather than none.
        """
        with self._lock:
            candidates = [state for state in self._states.values() if state.endpoint.role == role]
            if key is not None:
                candidates.sort(key=lambda s: rendezvous_weight(key, s.endpoint.url), reverse=True)
            now = self._clock()
            ready: list[_State] = []
            saturated: list[_State] = []
            for state in candidates:
                breaker = self._breaker(state, now)
                if breaker == "open" or (breaker == "half_open" and state.probing):
                    continue
                (saturated if self._saturated(state) else ready).append(state)
            order = ready + saturated
            if not order:
                return [state.endpoint for state in candidates]
            owner = min(order, key=candidates.index)
            if count_spill and key is not None and ready and owner in saturated:
                owner.spilled += 1
            return [state.endpoint for state in order]

    def _breaker(self, state: _State, now: float) -> BreakerState:
        if state.opened_at is None:
            return "closed"
        if now - state.opened_at >= self.config.breaker_cooldown:
            return "half_open"
        return "open"

    def _saturated(self, state: _State) -> bool:
        cap = state.endpoint.max_in_flight
        if cap is None:
            cap = self.config.max_in_flight
        if cap and state.in_flight >= cap:
            return True
        threshold = self.config.spill_waiting
        return bool(threshold) and state.waiting is not None and state.waiting >= threshold

    # --- one request ---------------------------------------------------------------------

    def begin(self, endpoint: Endpoint) -> Ticket:
        """Count a request going out; a half-open endpoint's request is its probe."""
        with self._lock:
            state = self._states.get(endpoint) or _State(endpoint)
            state.in_flight += 1
            state.requests += 1
            if self._breaker(state, self._clock()) == "half_open":
                state.probing = True
                state.probes += 1
            return state

    def succeeded(
        self,
        ticket: Ticket,
        *,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        ttft_s: float | None,
        generation_s: float,
    ) -> None:
        with self._lock:
            state = ticket
            state.in_flight -= 1
            state.prompt_tokens += prompt_tokens or 0
            state.completion_tokens += completion_tokens or 0
            if ttft_s is not None:
                state.ttft = state.ttft.observe(ttft_s)
            state.generation = state.generation.observe(generation_s)
            self._close(state)

    def failed(self, ticket: Ticket, *, kind: str, server_fault: bool) -> None:
        """End a request that failed with an error of ``kind``; ``server_fault`` counts
        towards the breaker.

        A server that answered a well-formed 4xx is alive: that closes a half-open breaker
        and resets the consecutive count, as a success does. An abandoned request says
        nothing about the server: it releases a half-open probe and changes nothing else.
        """
        with self._lock:
            state = ticket
            state.in_flight -= 1
            state.errors += 1
            state.error_kinds[kind] = state.error_kinds.get(kind, 0) + 1
            if server_fault:
                self._fail(state)
            elif kind == "abandoned":
                state.probing = False
            else:
                self._close(state)

    def _close(self, state: _State) -> None:
        state.opened_at = None
        state.probing = False
        state.consecutive_failures = 0

    def _fail(self, state: _State) -> None:
        now = self._clock()
        breaker = self._breaker(state, now)
        state.consecutive_failures += 1
        state.probing = False
        if breaker == "half_open" or (
            breaker == "closed" and state.consecutive_failures >= self.config.breaker_failures
        ):
            state.opened_at = now

    # --- active checks -------------------------------------------------------------------

    def checked(
        self,
        endpoint: Endpoint,
        *,
        healthy: bool,
        metrics: dict[str, list[float]] | None,
        missing: bool,
    ) -> None:
        """Record one active check (ignored when the endpoint left the pool meanwhile).

        A failed check counts like a failed request. A passed check closes a half-open
        breaker (the probe after the cooldown); while the breaker is closed it does not
        reset failures, since a server can answer ``/health`` and still fail requests;
        while it is open it changes nothing. ``metrics`` is ``None`` when none were read.
        """
        with self._lock:
            state = self._states.get(endpoint)
            if state is None:
                return
            state.healthy = healthy
            state.metrics_missing = state.metrics_missing or missing
            samples = metrics or {}
            state.waiting = _finite(samples.get(WAITING), sum)
            state.running = _finite(samples.get(RUNNING), sum)
            state.queue_wait_s = _finite(samples.get(QUEUE_SUM), sum)
            state.queue_wait_count = _finite(samples.get(QUEUE_COUNT), sum)
            usage = None
            for name in KV_CACHE:
                usage = _finite(samples.get(name), max)
                if usage is not None:
                    break
            state.kv_cache_usage = usage
            breaker = self._breaker(state, self._clock())
            if breaker == "half_open":
                state.probes += 1
            if not healthy:
                if breaker != "open":
                    self._fail(state)
            elif breaker == "half_open":
                self._close(state)

    def wants_metrics(self, endpoint: Endpoint) -> bool:
        with self._lock:
            state = self._states.get(endpoint)
            return state is not None and not state.metrics_missing

    # --- reading -------------------------------------------------------------------------

    def stats(self) -> list[EndpointStats]:
        with self._lock:
            now = self._clock()
            return [
                EndpointStats(
                    url=s.endpoint.url,
                    role=s.endpoint.role,
                    model=s.endpoint.model,
                    state=self._breaker(s, now),
                    consecutive_failures=s.consecutive_failures,
                    in_flight=s.in_flight,
                    requests=s.requests,
                    errors=s.errors,
                    error_kinds=dict(s.error_kinds),
                    prompt_tokens=s.prompt_tokens,
                    completion_tokens=s.completion_tokens,
                    ttft=s.ttft,
                    generation=s.generation,
                    spilled=s.spilled,
                    probes=s.probes,
                    healthy=s.healthy,
                    waiting=s.waiting,
                    running=s.running,
                    kv_cache_usage=s.kv_cache_usage,
                    queue_wait_s=s.queue_wait_s,
                    queue_wait_count=s.queue_wait_count,
                )
                for s in self._states.values()
            ]
