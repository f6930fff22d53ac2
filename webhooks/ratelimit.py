"""Send-lane limits kept in Redis, shared by every worker: token buckets, circuit breakers,
per-workspace in-flight slots and the paused-account probe.

Every decision is one Lua script run (atomic across workers). The clock is the caller's
(``clock()`` seconds, injectable for tests); keys live under ``settings.redis_prefix + "send:"``.

When Redis cannot be reached, every limiter answers "go ahead, degraded": the caller sends
slowly (``PARLEY_SEND_DEGRADED_DELAY`` before each send) rather than not at all, and
``send.limiter_unavailable`` is logged (at most every 10 s per process).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

log = structlog.get_logger()

_BUCKET_SCRIPT = """
local now = tonumber(ARGV[1])
local wait = 0
local state = {}
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local saved = redis.call('HMGET', KEYS[i], 't', 'ts')
  local tokens = tonumber(saved[1])
  local ts = tonumber(saved[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  end
  if now > ts then
    tokens = math.min(burst, tokens + (now - ts) * rate)
    ts = now
  end
  state[i] = {tokens, ts}
  if tokens < 1 then
    local w = (1 - tokens) / rate
    if w > wait then wait = w end
  end
end
if wait > 0 then return tostring(wait) end
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  redis.call('HSET', KEYS[i], 't', tostring(state[i][1] - 1), 'ts', tostring(state[i][2]))
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
end
return '0'
"""

_BREAKER = """
local op = ARGV[1]
local now = tonumber(ARGV[2])
local threshold = tonumber(ARGV[3])
local cooldown = tonumber(ARGV[4])
local probe_ttl = tonumber(ARGV[5])
local saved = redis.call('HMGET', KEYS[1], 's', 'f', 'u', 'p')
local s = saved[1] or 'closed'
local f = tonumber(saved[2]) or 0
local u = tonumber(saved[3]) or 0
local p = tonumber(saved[4]) or 0
local keep = math.ceil((cooldown + probe_ttl) * 1000) + 600000
if op == 'allow' then
  if s == 'closed' then return '0' end
  if s == 'open' and now < u then return tostring(u - now) end
  if s == 'half' and now < p then return tostring(math.max(p - now, 0.05)) end
  redis.call('HSET', KEYS[1], 's', 'half', 'p', tostring(now + probe_ttl))
  redis.call('PEXPIRE', KEYS[1], keep)
  return '0'
elseif op == 'success' then
  if saved[1] then redis.call('DEL', KEYS[1]) end
  return s
else
  f = f + 1
  if s == 'half' or f >= threshold then
    redis.call('HSET', KEYS[1], 's', 'open', 'f', tostring(f), 'u', tostring(now + cooldown))
    redis.call('PEXPIRE', KEYS[1], keep)
    return 'open'
  end
  redis.call('HSET', KEYS[1], 's', s, 'f', tostring(f))
  redis.call('PEXPIRE', KEYS[1], keep)
  return s
end
"""

_SLOTS = """
local now = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000) + 1000)
return 1
"""


@dataclass(frozen=True)
class Bucket:
    """``rate`` tokens per second, holding at most ``burst``; each send takes one."""

    key: str
    rate: float
    burst: float


@dataclass(frozen=True)
class Decision:
    wait: float  # 0: go ahead; otherwise seconds until it is worth asking again
    degraded: bool = False  # Redis unreachable: going ahead without the limit

    @property
    def allowed(self) -> bool:
        return self.wait <= 0


def connect(url: str) -> redis.Redis:
    """A client that fails fast: no reconnect loop inside a limiter call while Redis is down."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=0.5,
        socket_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )


class Limits:
    def __init__(
        self, client: redis.Redis, prefix: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.client = client
        self.prefix = f"{prefix}send:"
        self.clock = clock
        self._buckets: Any = client.register_script(_BUCKET_SCRIPT)
        self._breaker: Any = client.register_script(_BREAKER)
        self._slots: Any = client.register_script(_SLOTS)
        self._last_warning = 0.0
        self._lock = threading.Lock()

    # -- keys --------------------------------------------------------------------------------

    def account_bucket(self, account_id: int, rate: float) -> Bucket:
        return Bucket(f"{self.prefix}rate:account:{account_id}", rate, max(1.0, rate))

    def pair_bucket(
        self, account_id: int, recipient_key: str, interval: float, burst: int
    ) -> Bucket:
        rate = 1.0 / interval if interval > 0 else 1e6
        return Bucket(f"{self.prefix}rate:pair:{account_id}:{recipient_key}", rate, float(burst))

    # -- token buckets -----------------------------------------------------------------------

    def take(self, buckets: Sequence[Bucket]) -> Decision:
        """One token from every bucket, or none at all and the wait until all have one."""
        if not buckets:
            return Decision(0.0)
        args: list[float] = [self.clock()]
        for bucket in buckets:
            args += [bucket.rate, bucket.burst]
        try:
            wait = float(self._buckets(keys=[b.key for b in buckets], args=args))
        except redis.RedisError as exc:
            return self._degraded(exc)
        return Decision(wait)

    # -- circuit breaker per channel account -------------------------------------------------

    def _breaker_call(self, op: str, account_id: int, threshold: int, cooldown: float) -> str:
        result = self._breaker(
            keys=[f"{self.prefix}breaker:{account_id}"],
            args=[op, self.clock(), threshold, cooldown, max(cooldown, 30.0)],
        )
        return result.decode() if isinstance(result, bytes) else str(result)

    def breaker_allow(self, account_id: int, *, cooldown: float) -> Decision:
        """Closed: go. Open: wait out the cooldown. Then one caller at a time is the probe."""
        try:
            return Decision(float(self._breaker_call("allow", account_id, 1, cooldown)))
        except redis.RedisError as exc:
            return self._degraded(exc)

    def breaker_success(self, account_id: int) -> bool:
        """Record a send that reached Meta; True when this closed an open breaker."""
        try:
            return self._breaker_call("success", account_id, 1, 1.0) != "closed"
        except redis.RedisError as exc:
            self._degraded(exc)
            return False

    def breaker_failure(self, account_id: int, *, threshold: int, cooldown: float) -> bool:
        """Record a retryable failure (5xx, timeout); True when the breaker is now open."""
        try:
            return self._breaker_call("failure", account_id, threshold, cooldown) == "open"
        except redis.RedisError as exc:
            self._degraded(exc)
            return False

    # -- per-workspace in-flight slots -------------------------------------------------------

    def acquire_slot(
        self, workspace_id: int, *, cap: int, ttl: float
    ) -> tuple[str | None, Decision]:
        """A slot token while fewer than ``cap`` sends of the workspace are in flight.

        A slot not released (its worker died) lapses after ``ttl`` seconds.
        """
        token = secrets.token_hex(8)
        try:
            got = self._slots(
                keys=[f"{self.prefix}inflight:{workspace_id}"],
                args=[self.clock(), cap, ttl, token],
            )
        except redis.RedisError as exc:
            return None, self._degraded(exc)
        return (token, Decision(0.0)) if int(got) == 1 else (None, Decision(0.1))

    def release_slot(self, workspace_id: int, token: str | None) -> None:
        if token is None:
            return
        try:
            self.client.zrem(f"{self.prefix}inflight:{workspace_id}", token)
        except redis.RedisError as exc:
            self._degraded(exc)

    # -- paused accounts ---------------------------------------------------------------------

    def claim_probe(self, account_id: int, *, interval: float) -> bool:
        """True for at most one caller per ``interval`` seconds (the probe of a paused account)."""
        try:
            return bool(
                self.client.set(
                    f"{self.prefix}probe:{account_id}", "1", nx=True, px=int(interval * 1000)
                )
            )
        except redis.RedisError as exc:
            self._degraded(exc)
            return False

    # -- degraded mode -----------------------------------------------------------------------

    def _degraded(self, exc: Exception) -> Decision:
        now = time.monotonic()
        with self._lock:
            warn = now - self._last_warning > 10.0
            if warn:
                self._last_warning = now
        if warn:
            log.warning("send.limiter_unavailable", error=type(exc).__name__)
        return Decision(0.0, degraded=True)
