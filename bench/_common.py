"""Shared pieces of the ingest, pipeline and database benchmarks.

Percentiles, machine calibration, loopback-only URLs, databases and Redis keys that a run creates
and always removes, child processes started in their own session and stopped by their own id,
and the Parley database setup (migrate, then one WhatsApp bot applied through ``bots.service``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import httpx

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "")


# --- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


@dataclass(frozen=True)
class Summary:
    count: int
    p50: float
    p99: float
    mean: float
    maximum: float

    def line(self, unit: str = "ms") -> str:
        return (
            f"n={self.count} p50={self.p50:.2f}{unit} p99={self.p99:.2f}{unit} "
            f"mean={self.mean:.2f}{unit} max={self.maximum:.2f}{unit}"
        )


def summarize(values: Sequence[float]) -> Summary:
    return Summary(
        count=len(values),
        p50=percentile(values, 50),
        p99=percentile(values, 99),
        mean=sum(values) / len(values),
        maximum=max(values),
    )


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def goal(ok: bool) -> str:
    return "met" if ok else "NOT met"


# --- the machine ----------------------------------------------------------------------------


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def calib_hmac(seconds: float = 1.0) -> float:
    """Single-thread HMAC-SHA256 over a 1.5 KB body, ops/s (higher = more CPU available)."""
    body, key = b"x" * 1500, b"s3cr3t"
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(500):
            hmac.new(key, body, hashlib.sha256).hexdigest()
        n += 500
    return n / (time.perf_counter() - start)


def machine_line() -> str:
    return (
        f"machine: cpus={os.cpu_count()} loadavg={loadavg()} "
        f"calib_hmac_ops_per_s={calib_hmac():.0f}"
    )


def command_line() -> str:
    """The exact command that produced the figures (as run from the repository root)."""
    module = sys.modules["__main__"].__spec__
    name = module.name if module is not None else sys.argv[0]
    return " ".join(shlex.quote(p) for p in [".venv/bin/python", "-m", name, *sys.argv[1:]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_loopback(url: str, what: str) -> None:
    host = urlsplit(url).hostname or ""
    if url.startswith("unix://"):
        return
    if host not in LOOPBACK:
        raise SystemExit(f"{what} must be on this machine (loopback), not {host!r}")


def database_server_url() -> str:
    url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    require_loopback(url, "DATABASE_URL")
    return url


def redis_url() -> str:
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    require_loopback(url, "REDIS_URL")
    return url


def new_encryption_keys() -> str:
    return "bench:" + base64.urlsafe_b64encode(os.urandom(32)).decode()


def use_bench_keys() -> str:
    """The field-encryption keys shared by this process and the servers it starts (a fresh
    key unless PARLEY_ENCRYPTION_KEYS is set); call before any setting is read."""
    if not os.environ.get("PARLEY_ENCRYPTION_KEYS"):
        os.environ["PARLEY_ENCRYPTION_KEYS"] = new_encryption_keys()
    return os.environ["PARLEY_ENCRYPTION_KEYS"]


# --- cleanup on exit, Ctrl-C included ----------------------------------------------------------


@dataclass
class Cleanup:
    """Undo actions run last-in first-out, once, on normal exit, error, Ctrl-C or SIGTERM."""

    actions: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def add(self, label: str, action: Callable[[], None]) -> None:
        self.actions.append((label, action))

    def run(self) -> None:
        while self.actions:
            label, action = self.actions.pop()
            try:
                action()
            except Exception as exc:  # noqa: BLE001  # keep cleaning up the rest
                print(f"cleanup: {label} failed: {type(exc).__name__}: {exc}", file=sys.stderr)


@contextmanager
def cleanup_on_exit() -> Iterator[Cleanup]:
    cleanup = Cleanup()

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield cleanup
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        # A second Ctrl-C while cleaning up must not leave databases or processes behind.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            cleanup.run()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, previous)


# --- databases ----------------------------------------------------------------------------------


def url_for(name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(database_server_url()).set(database=name).render_as_string(hide_password=False)


def sqlalchemy_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def libpq_dsn(url: str) -> str:
    """A psycopg connection string for a SQLAlchemy or plain Postgres URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def admin_execute(sql: str) -> None:
    import psycopg

    with psycopg.connect(libpq_dsn(database_server_url()), autocommit=True) as conn:
        conn.execute(sql)  # built from our own identifiers only


def create_database(prefix: str, cleanup: Cleanup) -> str:
    """A new empty database, dropped when the run ends; returns its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin_execute(f"CREATE DATABASE {name}")
    cleanup.add(f"drop database {name}", lambda: drop_database(name))
    return url_for(name)


def drop_database(name: str) -> None:
    admin_execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def migrate(url: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from parley import migrate as migrations

    engine = create_engine(sqlalchemy_url(url), poolclass=NullPool)
    try:
        migrations.upgrade(engine)
    finally:
        engine.dispose()


# --- Redis ------------------------------------------------------------------------------------


def delete_redis_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (never an empty prefix)."""
    import redis

    if len(prefix) < 8:
        raise ValueError("refusing to delete keys under a short prefix")
    client = redis.Redis.from_url(url)
    try:
        removed = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += int(client.delete(*batch))
                batch.clear()
        if batch:
            removed += int(client.delete(*batch))
        return removed
    finally:
        client.close()


def redis_prefix(cleanup: Cleanup, label: str) -> str:
    prefix = f"bench-{label}-{secrets.token_hex(4)}:"
    url = redis_url()
    cleanup.add(
        f"delete redis keys {prefix}*",
        lambda: print(
            f"cleanup: removed {delete_redis_prefix(url, prefix)} redis keys under {prefix}"
        ),
    )
    return prefix


# --- child processes ------------------------------------------------------------------------------


class Child:
    """A child process in its own session, logging to a file, stopped through its own id."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            argv,
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
            except ProcessLookupError:
                pass
        self._log.close()

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_child(
    cleanup: Cleanup, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path
) -> Child:
    child = Child(name, argv, env, log_dir)
    cleanup.add(f"stop {name}", child.stop)
    return child


def wait_http(url: str, *, timeout: float, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready in {timeout}s ({last})")


# --- Parley -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchBot:
    workspace: str
    phone_number_id: str
    app_secret: str
    access_token: str


def apply_bot(url: str, *, burst_window_seconds: float | None = 0.0) -> BenchBot:
    """One WhatsApp bot, applied the way ``parley bots apply`` does (``bots.service``)."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker
    from sqlalchemy.pool import NullPool

    from bots.policy import Policy
    from bots.schemas import BotsFile, BotSpec, ChannelSpec, GenerationSpec, MetaAppSpec
    from bots.service import apply_bots
    from core.db import session_scope

    bot = BenchBot(
        workspace=f"bench-{secrets.token_hex(3)}",
        phone_number_id=str(100000000000000 + secrets.randbelow(10**12)),
        app_secret=secrets.token_hex(16),
        access_token=secrets.token_hex(12),
    )
    policy = (
        Policy()
        if burst_window_seconds is None
        else Policy(burst_window_seconds=burst_window_seconds)
    )
    spec = BotsFile(
        workspace=bot.workspace,
        meta_apps=[
            MetaAppSpec(name="app", app_secret=bot.app_secret, verify_token=secrets.token_hex(8))
        ],
        bots=[
            BotSpec(
                name="bot",
                system_prompt="You are a helpful assistant for a bakery. Answer in one sentence.",
                generation=GenerationSpec(temperature=0.0, max_tokens=48, seed=7),
                history_turns=12,
                policy=policy,
                channels=[
                    ChannelSpec(
                        type="whatsapp",
                        app="app",
                        phone_number_id=bot.phone_number_id,
                        access_token=bot.access_token,
                    )
                ],
            )
        ],
    )
    engine = create_engine(sqlalchemy_url(url), poolclass=NullPool)
    try:
        with session_scope(sessionmaker(bind=engine, expire_on_commit=False)) as session:
            apply_bots(session, spec)
    finally:
        engine.dispose()
    return bot


def parley_env(
    *, database_url: str, prefix: str, data_dir: Path, keys: str, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url(),
        PARLEY_REDIS_PREFIX=prefix,
        PARLEY_DATA_DIR=str(data_dir),
        PARLEY_ENCRYPTION_KEYS=keys,
        PARLEY_API_HOST="127.0.0.1",
        PARLEY_LOG_LEVEL="INFO",
        PARLEY_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def jsonable(value: Any) -> Any:
    """Round floats for printing."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value
