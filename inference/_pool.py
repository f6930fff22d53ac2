"""Routing state of the pool: rendezvous order, in-flight counts, load, breakers, counters.

Everything here is in-process and guarded by one lock; no I/O happens under it.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    """

    max_in_flight: int = 32
    spill_waiting: int = 8
    breaker_failures: int = 3
    breaker_cooldown: float = 15.0
    health_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.max_in_flight < 0 or self.spill_waiting < 0:
            raise ValueError("max_in_flight and spill_waiting must be >= 0")
        if self.breaker_failures < 1:
            raise ValueError("breaker_failures must be >= 1")
        if self.breaker_cooldown < 0 or self.health_interval < 0:
            raise ValueError("breaker_cooldown and health_interval must be >= 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(
            max_in_flight=settings.inference_max_in_flight,
            spill_waiting=settings.inference_spill_waiting,
            breaker_failures=settings.inference_breaker_failures,
            breaker_cooldown=settings.inference_breaker_cooldown,
            health_interval=settings.inference_health_interval,
        )


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """A snapshot of one endpoint's counters and state, kept since the client was built.

    ``requests`` counts attempts sent (failovers included), ``errors`` the attempts that
    failed for any reason. ``generation_s`` sums the wall time of successful requests;
    ``ttft_s``/``ttft_samples`` sum the prompt-processing time servers report (llama.cpp's
    ``timings.prompt_ms``; vLLM reports it only in ``/metrics``). ``spilled`` counts
    requests whose conversation belongs here but went elsewhere because this endpoint was
    saturated. ``waiting``, ``running`` and ``kv_cache_usage`` are the last ``/metrics``
    readings (``None`` when the server has no such metric). ``healthy`` is the last active
    check (``None`` before the first).
    """

    url: str
    role: str
    state: BreakerState
    consecutive_failures: int
    in_flight: int
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    generation_s: float
    ttft_s: float
    ttft_samples: int
    spilled: int
    probes: int
    healthy: bool | None
    waiting: float | None
    running: float | None
    kv_cache_usage: float | None


@dataclass(slots=True)
class _State:
    endpoint: Endpoint
    opened_at: float | None = None
    probing: bool = False
    consecutive_failures: int = 0
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_s: float = 0.0
    ttft_s: float = 0.0
    ttft_samples: int = 0
    spilled: int = 0
    probes: int = 0
    healthy: bool | None = None
    metrics_missing: bool = False
    waiting: float | None = None
    running: float | None = None
    kv_cache_usage: float | None = None


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
    """The per-endpoint state behind ``InferenceClient``; every method is thread-safe."""

    def __init__(
        self, endpoints: Sequence[Endpoint], config: PoolConfig, clock: Callable[[], float]
    ) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._states = [_State(endpoint) for endpoint in endpoints]

    # --- routing -------------------------------------------------------------------------

    def plan(self, role: str, key: str | None, *, count_spill: bool = True) -> list[int]:
        """Endpoint indices in the order one request tries them.

        With a ``key``: rendezvous order, so every turn of a conversation goes to the same
        server while it is healthy and not saturated; without one, the configured order.
        Saturated endpoints (over their in-flight cap, or a long waiting queue) move behind
        the others, keeping their relative order; open breakers and half-open endpoints
        whose probe is already out are left out, unless nothing else is left — then every
        endpoint of the role is tried rather than none.
        """
        indices = [i for i, state in enumerate(self._states) if state.endpoint.role == role]
        if key is not None:
            urls = {i: self._states[i].endpoint.url for i in indices}
            indices.sort(key=lambda i: rendezvous_weight(key, urls[i]), reverse=True)
        with self._lock:
            now = self._clock()
            ready: list[int] = []
            saturated: list[int] = []
            for index in indices:
                state = self._states[index]
                breaker = self._breaker(state, now)
                if breaker == "open" or (breaker == "half_open" and state.probing):
                    continue
                (saturated if self._saturated(state) else ready).append(index)
            order = ready + saturated
            if not order:
                return indices
            owner = min(order, key=indices.index)
            if count_spill and key is not None and ready and owner in saturated:
                self._states[owner].spilled += 1
            return order

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

    def begin(self, index: int) -> None:
        """Count a request going out; a half-open endpoint's request is its probe."""
        with self._lock:
            state = self._states[index]
            state.in_flight += 1
            state.requests += 1
            if self._breaker(state, self._clock()) == "half_open":
                state.probing = True
                state.probes += 1

    def succeeded(
        self,
        index: int,
        *,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        elapsed_s: float,
        ttft_s: float | None,
    ) -> None:
        with self._lock:
            state = self._states[index]
            state.in_flight -= 1
            state.prompt_tokens += prompt_tokens or 0
            state.completion_tokens += completion_tokens or 0
            state.generation_s += elapsed_s
            if ttft_s is not None:
                state.ttft_s += ttft_s
                state.ttft_samples += 1
            self._close(state)

    def failed(self, index: int, *, server_fault: bool) -> None:
        """End a request that failed; ``server_fault`` counts towards the breaker.

        A server that answered a well-formed 4xx is alive: that closes a half-open breaker
        and resets the consecutive count, as a success does.
        """
        with self._lock:
            state = self._states[index]
            state.in_flight -= 1
            state.errors += 1
            if server_fault:
                self._fail(state)
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
        self, index: int, *, healthy: bool, metrics: dict[str, list[float]] | None, missing: bool
    ) -> None:
        """Record one active check.

        A failed check counts like a failed request. A passed check closes a half-open
        breaker (the probe after the cooldown); while the breaker is closed it does not
        reset failures, since a server can answer ``/health`` and still fail requests;
        while it is open it changes nothing. ``metrics`` is ``None`` when none were read.
        """
        with self._lock:
            state = self._states[index]
            state.healthy = healthy
            state.metrics_missing = state.metrics_missing or missing
            state.waiting = _finite(metrics.get(WAITING), sum) if metrics else None
            state.running = _finite(metrics.get(RUNNING), sum) if metrics else None
            usage = None
            for name in KV_CACHE:
                usage = _finite(metrics.get(name), max) if metrics else None
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

    def wants_metrics(self, index: int) -> bool:
        with self._lock:
            return not self._states[index].metrics_missing

    # --- reading -------------------------------------------------------------------------

    def stats(self) -> list[EndpointStats]:
        with self._lock:
            now = self._clock()
            return [
                EndpointStats(
                    url=s.endpoint.url,
                    role=s.endpoint.role,
                    state=self._breaker(s, now),
                    consecutive_failures=s.consecutive_failures,
                    in_flight=s.in_flight,
                    requests=s.requests,
                    errors=s.errors,
                    prompt_tokens=s.prompt_tokens,
                    completion_tokens=s.completion_tokens,
                    generation_s=s.generation_s,
                    ttft_s=s.ttft_s,
                    ttft_samples=s.ttft_samples,
                    spilled=s.spilled,
                    probes=s.probes,
                    healthy=s.healthy,
                    waiting=s.waiting,
                    running=s.running,
                    kv_cache_usage=s.kv_cache_usage,
                )
                for s in self._states
            ]
