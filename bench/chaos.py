"""Chaos run: signed deliveries with duplicates and concurrency while a nemesis kills workers,
pauses one past the visibility timeout and restarts Redis and Postgres; then the checker.

    python -m bench.chaos [--full | --lite] [--seed N] [--keep] [--results DIR]

The run owns every server it talks to (its own embedded Postgres, its own ``redis-server`` on a
free port with ``appendonly yes``, an instant OpenAI-compatible model, the API with the sandbox
Graph API, two workers and beat), whatever the environment says, so it can kill and restart them.
Raw histories (deliveries, sandbox sends, model requests, nemesis events, database snapshot,
verdict) stay in the results directory it prints, so a failure can be checked again.

The last line printed is always the summary::

    lost=0 duplicated=0 out_of_order=0 ambiguous_resent=N dead=M acked=A unique=U elapsed=S

Exit status: 0 when lost, duplicated and out_of_order are 0; 1 when not; 2 when the harness
itself failed (no summary line then).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import json
import os
import random
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psycopg

from bench._chaos_checker import Snapshot, Verdict, check, marker
from bench._chaos_platform import (
    Child,
    HarnessError,
    OwnPostgres,
    OwnRedis,
    free_port,
    python_child,
    wait_http,
)

SANDBOX_FAULTS = "429=0.01,500=0.02,stall=0.005,drop_webhooks=0.01"
# The values the fault tests ask for; used only when the product has a setting for them.
TEST_VISIBILITY_TIMEOUT = 60.0
TEST_TASK_TIME_LIMIT = 45.0
PRODUCT_VISIBILITY_TIMEOUT = 120.0  # core.celery_app, while it is not a setting


@dataclass(frozen=True)
class Plan:
    name: str
    deliveries: int
    unique: int
    conversations: int
    accounts: int
    kills: int
    redis_restarts: int
    pg_restarts: int
    pauses: int
    rate: float  # deliveries per second
    concurrent_share: float = 0.10
    model_median_ms: float = 80.0
    llm_fail_rate: float = 0.01
    quiesce_after_heal: float = 240.0
    budget: float = 0.0  # wall-clock cap for the whole run (0: none)


LITE = Plan(
    name="lite",
    deliveries=1300,
    unique=1000,
    conversations=100,
    accounts=3,
    kills=2,
    redis_restarts=1,
    pg_restarts=0,
    pauses=1,
    rate=14.0,
    quiesce_after_heal=150.0,
    budget=450.0,
)
FULL = Plan(
    name="full",
    deliveries=10_000,
    unique=7_000,
    conversations=700,
    accounts=4,
    kills=5,
    redis_restarts=1,
    pg_restarts=1,
    pauses=1,
    rate=50.0,
    quiesce_after_heal=600.0,
)


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Item:
    wamid: str
    conv: int
    seq: int
    ts: int
    account: str
    wa_id: str
    body: bytes
    headers: dict[str, str]
    concurrent: bool
    duplicate: bool


@dataclass
class Load:
    items: list[Item]
    secret: str
    accounts: list[str]


def build_load(plan: Plan, rng: random.Random, secret: str) -> Load:
    from webhooks import simulator

    accounts = [
        str(106_540_000_000_000 + 1_000 * i + rng.randrange(1_000)) for i in range(plan.accounts)
    ]
    slots = [c % plan.conversations for c in range(plan.unique)]
    rng.shuffle(slots)
    start = int(time.time())
    next_seq = [0] * plan.conversations
    last_ts = [0] * plan.conversations
    originals: list[Item] = []
    for position, conv in enumerate(slots):
        seq = next_seq[conv]
        next_seq[conv] += 1
        # Provider timestamps follow the planned send time, strictly increasing per conversation.
        ts = max(last_ts[conv] + 1, start + int(position / plan.rate))
        last_ts[conv] = ts
        wa_id = f"1555{2_000_000 + conv:07d}"
        account = accounts[conv % len(accounts)]
        wamid = simulator.new_wamid()
        payload = simulator.whatsapp_text(
            phone_number_id=account,
            wa_id=wa_id,
            text=f"hello {marker(conv, seq)} please answer",
            name=f"Chaos {conv}",
            message_id=wamid,
            timestamp=ts,
        )
        body, headers = simulator.signed(payload, secret)
        originals.append(
            Item(wamid, conv, seq, ts, account, wa_id, body, headers, False, duplicate=False)
        )
    # Meta redelivers the same bytes: soon (a retry racing the first answer) or later.
    keyed = [(float(i), item) for i, item in enumerate(originals)]
    for _ in range(plan.deliveries - plan.unique):
        source = rng.randrange(len(originals))
        offset = 0.5 if rng.random() < 0.2 else rng.randrange(1, 300) + rng.random()
        copy = Item(**{**asdict(originals[source]), "duplicate": True})
        keyed.append((source + offset, copy))
    keyed.sort(key=lambda pair: pair[0])
    items = [item for _, item in keyed]
    for item in items:
        item.concurrent = rng.random() < plan.concurrent_share
    return Load(items=items, secret=secret, accounts=accounts)


class History:
    """Append-only JSON-lines files of everything the run observed."""

    def __init__(self, results: Path) -> None:
        self.results = results
        self._lock = threading.Lock()
        self._files: dict[str, Any] = {}

    def write(self, name: str, entry: dict[str, Any]) -> None:
        with self._lock:
            handle = self._files.get(name)
            if handle is None:
                handle = (self.results / f"{name}.jsonl").open("a", buffering=1)
                self._files[name] = handle
            handle.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        with self._lock:
            for handle in self._files.values():
                handle.close()
            self._files.clear()


class Sender:
    """Replays the deliveries at a paced rate; ~10 % go out without waiting for the previous one.

    A delivery that is not answered 2xx is retried later, the way Meta retries, at most
    ``retries`` times. Every attempt is recorded; only 2xx answers count as acknowledged.
    """

    def __init__(self, api: str, history: History, *, rate: float, retries: int = 8) -> None:
        self.url = f"{api}/webhooks/whatsapp"
        self.history = history
        self.rate = rate
        self.retries = retries
        self.http = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=16))
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
        self.sent = 0
        self.acked = 0
        self.done = threading.Event()
        self._retry: list[tuple[float, Item, int]] = []
        self._lock = threading.Lock()

    def post(self, item: Item, attempt: int) -> None:
        t0 = time.time()
        status: int | None = None
        error = None
        try:
            status = self.http.post(self.url, content=item.body, headers=item.headers).status_code
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        t1 = time.time()
        self.history.write(
            "deliveries",
            {
                "wamid": item.wamid,
                "conv": item.conv,
                "seq": item.seq,
                "ts": item.ts,
                "to": item.wa_id,
                "account": item.account,
                "duplicate": item.duplicate,
                "attempt": attempt,
                "status": status,
                "error": error,
                "t0": t0,
                "t1": t1,
            },
        )
        with self._lock:
            self.sent += 1
            if status is not None and 200 <= status < 300:
                self.acked += 1
            elif attempt < self.retries:
                self._retry.append((time.monotonic() + 2.0 * attempt, item, attempt + 1))

    def run(self, items: list[Item], stop: threading.Event) -> None:
        start = time.monotonic()
        pending: list[concurrent.futures.Future[None]] = []
        for index, item in enumerate(items):
            if stop.is_set():
                break
            self._sleep_until(start + index / self.rate, stop)
            self._due_retries()
            future = self.pool.submit(self.post, item, 1)
            if item.concurrent:
                pending.append(future)
            else:
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    future.result(timeout=35)
        concurrent.futures.wait(pending, timeout=60)
        # Meta keeps retrying what was not acknowledged; so do we, within bounds.
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                left = len(self._retry)
            if not left:
                break
            self._due_retries(wait=True)
            time.sleep(0.2)
        self.done.set()

    def _due_retries(self, wait: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            due = [r for r in self._retry if r[0] <= now]
            self._retry = [r for r in self._retry if r[0] > now]
        futures = [self.pool.submit(self.post, item, attempt) for _, item, attempt in due]
        if wait:
            concurrent.futures.wait(futures, timeout=60)

    @staticmethod
    def _sleep_until(when: float, stop: threading.Event) -> None:
        delay = when - time.monotonic()
        if delay > 0:
            stop.wait(delay)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()


# --- the platform -----------------------------------------------------------------------------


def _optional_settings(env: dict[str, str], notes: list[str]) -> float:
    """Set the test values for settings the product has; say which ones it lacks.

    Returns the visibility timeout the workers will run with.
    """
    from core.config import Settings

    fields = set(Settings.model_fields)
    visibility = PRODUCT_VISIBILITY_TIMEOUT
    vt_fields = sorted(f for f in fields if "visibility" in f)
    if vt_fields:
        for name in vt_fields:
            env[f"PARLEY_{name.upper()}"] = str(int(TEST_VISIBILITY_TIMEOUT))
        visibility = TEST_VISIBILITY_TIMEOUT
    else:
        notes.append(
            "no visibility-timeout setting: workers run with the hard-coded "
            f"{PRODUCT_VISIBILITY_TIMEOUT:.0f} s instead of {TEST_VISIBILITY_TIMEOUT:.0f} s"
        )
    limits = sorted(f for f in fields if "time_limit" in f)
    if limits:
        for name in limits:
            value = TEST_TASK_TIME_LIMIT - (5 if "soft" in name else 0)
            env[f"PARLEY_{name.upper()}"] = str(int(value))
    else:
        notes.append(
            f"no task time limit setting: workers run with the hard-coded limit instead of "
            f"{TEST_TASK_TIME_LIMIT:.0f} s"
        )
    if "sandbox_faults" in fields:
        env.setdefault("PARLEY_SANDBOX_FAULTS", SANDBOX_FAULTS)
    else:
        notes.append("no sandbox fault setting: the sandbox Graph API answers every send")
    if "sandbox_seed" in fields:
        env.setdefault("PARLEY_SANDBOX_SEED", "7")
    return visibility


def _apply_bots(load: Load, plan: Plan) -> None:
    from bots.schemas import BotsFile, BotSpec, ChannelSpec, GenerationSpec, MetaAppSpec
    from bots.service import apply_bots
    from core.db import make_sessionmaker, session_scope

    spec = BotsFile(
        workspace="chaos",
        meta_apps=[
            MetaAppSpec(name="app", app_secret=load.secret, verify_token=secrets.token_hex(8))
        ],
        bots=[
            BotSpec(
                name=f"bot{i}",
                system_prompt="You are a terse assistant. Answer in a few words.",
                model="chaos",
                generation=GenerationSpec(temperature=0.0, max_tokens=32, seed=7),
                history_turns=4,
                channels=[
                    ChannelSpec(
                        type="whatsapp",
                        app="app",
                        phone_number_id=account,
                        access_token=f"chaos-token-{i}",
                    )
                ],
            )
            for i, account in enumerate(load.accounts)
        ],
    )
    with session_scope(make_sessionmaker()) as session:
        apply_bots(session, spec)


def _own_environment(env: dict[str, str]) -> None:
    """Point this process at the run's servers (settings, keyring and engines reload)."""
    for key in list(os.environ):
        if key.startswith("PARLEY_") or key in ("DATABASE_URL", "REDIS_URL"):
            del os.environ[key]
    os.environ.update(
        {k: v for k, v in env.items() if k.startswith("PARLEY_") or k.endswith("_URL")}
    )
    from core.config import reset_settings
    from core.crypto import get_keyring

    reset_settings()
    get_keyring.cache_clear()


def _child_environment() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("PARLEY_") or k in ("DATABASE_URL", "REDIS_URL"))
    }


@dataclass
class Platform:
    root: Path
    results: Path
    env: dict[str, str]
    pg: OwnPostgres
    redis: OwnRedis
    api_url: str
    model_url: str
    visibility: float
    children: dict[str, Child] = field(default_factory=dict)

    @property
    def workers(self) -> list[Child]:
        return [c for name, c in self.children.items() if name.startswith("worker")]

    def stop(self) -> None:
        for child in reversed(list(self.children.values())):
            with contextlib.suppress(Exception):
                child.stop()
        with contextlib.suppress(Exception):
            self.redis.stop()
        with contextlib.suppress(Exception):
            self.pg.stop()


WORKERS = {
    "worker1": ["--pool", "threads", "--concurrency", "4"],
    "worker2": ["--pool", "prefork", "--concurrency", "2"],
}


@contextlib.contextmanager
def platform(
    plan: Plan, results: Path, load: Load, keep: bool, notes: list[str]
) -> Iterator[Platform]:
    root = Path(tempfile.mkdtemp(prefix="parley-chaos-"))
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started: list[Callable[[], None]] = []
    pf: Platform | None = None
    try:
        pg = OwnPostgres(root)
        started.append(pg.stop)
        redis_server = OwnRedis(root / "redis", logs)
        started.append(redis_server.stop)
        api_port, model_port = free_port(), free_port()
        api_url = f"http://127.0.0.1:{api_port}"
        model_url = f"http://127.0.0.1:{model_port}"
        env = _child_environment()
        key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        env.update(
            DATABASE_URL=pg.url,
            REDIS_URL=redis_server.url,
            PARLEY_ENV="development",
            PARLEY_DATA_DIR=str(root / "data"),
            PARLEY_ENCRYPTION_KEYS=f"chaos1:{key}",
            PARLEY_INFERENCE_ENDPOINTS=f"{model_url}#model=chaos",
            PARLEY_INFERENCE_TIMEOUT="20",
            PARLEY_API_HOST="127.0.0.1",
            PARLEY_API_PORT=str(api_port),
            PARLEY_GRAPH_API_URL=f"{api_url}/sandbox/graph",
            PARLEY_GRAPH_TIMEOUT="10",
            PARLEY_SANDBOX="true",
            PARLEY_OUTBOX_RELAY_INTERVAL="1",
            PARLEY_OUTBOX_RELAY_AFTER="3",
            PARLEY_LOG_LEVEL="INFO",
            PARLEY_LOG_FORMAT="json",
        )
        visibility = _optional_settings(env, notes)
        _own_environment(env)
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        from core.config import get_settings
        from parley import migrate

        engine = create_engine(get_settings().require_database_url(), poolclass=NullPool)
        migrate.upgrade(engine)
        engine.dispose()
        _apply_bots(load, plan)

        pf = Platform(root, results, env, pg, redis_server, api_url, model_url, visibility)
        model = python_child(
            "model",
            [
                "bench._chaos_model",
                "--port",
                str(model_port),
                "--log",
                str(results / "model.jsonl"),
                "--median-ms",
                str(plan.model_median_ms),
                "--fail-rate",
                str(plan.llm_fail_rate),
            ],
            env,
            logs,
        )
        pf.children["model"] = model
        wait_http(f"{model_url}/v1/models", timeout=30, child=model)
        pf.children["api"] = python_child("api", ["parley", "api"], env, logs)
        wait_http(f"{api_url}/readyz", timeout=90, child=pf.children["api"])
        for name, args in WORKERS.items():
            health = free_port()
            worker_env = {**env, "PARLEY_WORKER_HEALTH_PORT": str(health)}
            queues = ["--queues", "conversations,send,maintenance"]
            child = python_child(name, ["parley", "worker", *queues, *args], worker_env, logs)
            pf.children[name] = child
            wait_http(f"http://127.0.0.1:{health}/readyz", timeout=90, child=child)
        pf.children["beat"] = python_child("beat", ["parley", "beat"], env, logs)
        yield pf
    finally:
        if pf is not None:
            pf.stop()
        else:
            for stop in reversed(started):
                with contextlib.suppress(Exception):
                    stop()
        if keep:
            print(f"chaos: kept the servers' data in {root}", flush=True)
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


# --- the nemesis ------------------------------------------------------------------------------


class Nemesis:
    """Faults at planned fractions of the load, one at a time; a pause heals on its own timer."""

    def __init__(self, pf: Platform, plan: Plan, history: History, rng: random.Random) -> None:
        self.pf = pf
        self.plan = plan
        self.history = history
        self.rng = rng
        self.last_heal = time.monotonic()
        self.errors: list[str] = []
        self.pause_timers: list[threading.Timer] = []
        self.counts = {"kill": 0, "pause": 0, "redis": 0, "postgres": 0}

    def schedule(self) -> list[tuple[float, str]]:
        plan = self.plan
        events: list[tuple[float, str]] = []
        for i in range(plan.kills):
            events.append(((i + 1) / (plan.kills + 1) * 0.9, "kill"))
        for i in range(plan.pauses):
            events.append((0.22 + 0.3 * i, "pause"))
        for i in range(plan.redis_restarts):
            events.append((0.5 + 0.1 * i, "redis"))
        for i in range(plan.pg_restarts):
            events.append((0.68 + 0.1 * i, "postgres"))
        return sorted(events)

    def event(self, kind: str, **detail: Any) -> None:
        entry = {"at": time.time(), "kind": kind, **detail}
        self.history.write("nemesis", entry)
        print(f"chaos: nemesis {kind} {json.dumps(detail)}", flush=True)

    def run(self, duration: float, stop: threading.Event) -> None:
        start = time.monotonic()
        for fraction, kind in self.schedule():
            wait = start + fraction * duration - time.monotonic()
            if wait > 0 and stop.wait(wait):
                return
            try:
                getattr(self, f"do_{kind}")()
                self.counts[kind] += 1
            except Exception as exc:  # noqa: BLE001  # recorded; the run reports it
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                self.event(f"{kind}_failed", error=str(exc)[:300])

    def _inflight(self) -> int:
        try:
            return int(httpx.get(f"{self.pf.model_url}/stats", timeout=2).json()["inflight"])
        except (httpx.HTTPError, ValueError, KeyError):
            return 0

    def _wait_mid_task(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            inflight = self._inflight()
            if inflight:
                return inflight
            time.sleep(0.02)
        return 0

    def do_kill(self) -> None:
        candidates = [w for w in self.pf.workers if not w.paused and w.alive()]
        if not candidates:
            raise HarnessError("no running worker to kill")
        target = self.rng.choice(candidates)
        inflight = self._wait_mid_task()
        pool = target.children()
        if self.counts["kill"] % 2 == 1 and pool:
            pid = self.rng.choice(pool)
            os.kill(pid, signal.SIGKILL)
            self.event("kill_pool_child", worker=target.name, pid=pid, model_inflight=inflight)
        else:
            target.kill()
            self.event("kill_worker", worker=target.name, pid=target.pid, model_inflight=inflight)
            time.sleep(1.0)
            target.restart()
            self.event("restart_worker", worker=target.name, pid=target.pid)
        self.last_heal = max(self.last_heal, time.monotonic())

    def do_pause(self) -> None:
        candidates = [w for w in self.pf.workers if not w.paused and w.alive()]
        if len(candidates) < 2:
            raise HarnessError("pausing needs another running worker")
        target = candidates[0]
        inflight = self._wait_mid_task()
        seconds = 1.5 * self.pf.visibility
        target.pause()
        self.event("sigstop", worker=target.name, seconds=seconds, model_inflight=inflight)

        def cont() -> None:
            target.resume()
            self.last_heal = time.monotonic()
            self.event("sigcont", worker=target.name)

        timer = threading.Timer(seconds, cont)
        timer.daemon = True
        timer.start()
        self.pause_timers.append(timer)
        self.last_heal = time.monotonic() + seconds

    def do_redis(self) -> None:
        self.pf.redis.crash()
        self.event("redis_killed", port=self.pf.redis.port)
        time.sleep(3.0)
        self.pf.redis.start_again()
        self.event("redis_started", port=self.pf.redis.port)
        self.last_heal = max(self.last_heal, time.monotonic())

    def do_postgres(self) -> None:
        self.pf.pg.crash()
        self.event("postgres_killed")
        time.sleep(3.0)
        self.pf.pg.start_again()
        self.event("postgres_started")
        self.last_heal = max(self.last_heal, time.monotonic())

    def heal_all(self) -> None:
        for timer in self.pause_timers:
            if timer.is_alive():
                timer.cancel()
                timer.function()

    @property
    def healed_at(self) -> float:
        return self.last_heal


# --- reading the end state --------------------------------------------------------------------


def _libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _tables(conn: psycopg.Connection[Any]) -> dict[str, set[str]]:
    rows = conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public'"
    ).fetchall()
    tables: dict[str, set[str]] = {}
    for table, column in rows:
        tables.setdefault(table, set()).add(column)
    return tables


@dataclass
class Progress:
    inbound: int
    open_inbound: int
    open_sends: int
    pending_jobs: int
    outcomes: int

    @property
    def quiet(self) -> bool:
        return self.inbound > 0 and not (self.open_inbound or self.open_sends or self.pending_jobs)


def progress(database_url: str) -> Progress | None:
    try:
        with psycopg.connect(_libpq_url(database_url), connect_timeout=3) as conn:
            tables = _tables(conn)
            inbound = conn.execute(
                "SELECT count(*) FROM messages WHERE direction = 'in'"
            ).fetchone()
            outcomes = 0
            if "outcomes" in tables:
                outcomes = conn.execute("SELECT count(*) FROM outcomes").fetchone()[0]  # type: ignore[index]
            if outcomes:
                open_in = conn.execute(
                    "SELECT count(*) FROM messages m WHERE m.direction = 'in' AND NOT EXISTS "
                    "(SELECT 1 FROM outcomes o WHERE o.inbound_id = m.id)"
                ).fetchone()
            else:
                open_in = conn.execute(
                    "SELECT count(*) FROM messages WHERE direction = 'in' AND status = 'received'"
                ).fetchone()
            chunks = 0
            if "outbound_chunks" in tables:
                chunks = conn.execute("SELECT count(*) FROM outbound_chunks").fetchone()[0]  # type: ignore[index]
            if chunks:
                open_sends = conn.execute(
                    "SELECT count(*) FROM outbound_chunks "
                    "WHERE state NOT IN ('sent', 'failed', 'dead')"
                ).fetchone()
            else:
                open_sends = conn.execute(
                    "SELECT count(*) FROM messages WHERE direction = 'out' "
                    "AND status IN ('pending', 'sending')"
                ).fetchone()
            jobs = conn.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()
    except psycopg.Error:
        return None
    assert inbound is not None
    assert open_in is not None
    assert open_sends is not None
    assert jobs is not None
    return Progress(inbound[0], open_in[0], open_sends[0], jobs[0], outcomes)


def snapshot(database_url: str) -> Snapshot:
    with psycopg.connect(_libpq_url(database_url), connect_timeout=10) as conn:
        tables = _tables(conn)
        msg_cols = tables.get("messages", set())
        kind = "kind" if "kind" in msg_cols else "'text'"
        inbound = {
            r[0]: {"id": r[1], "status": r[2], "conversation_id": r[3]}
            for r in conn.execute(
                "SELECT provider_message_id, id, status, conversation_id FROM messages "
                "WHERE direction = 'in'"
            )
        }
        outbound = {
            r[0]: {
                "id": r[0],
                "reply_to_id": r[1],
                "status": r[2],
                "kind": r[3],
                "provider_message_id": r[4],
                "conversation_id": r[5],
            }
            for r in conn.execute(
                f"SELECT id, reply_to_id, status, {kind}, provider_message_id, conversation_id "  # noqa: S608  # column name from the catalog
                "FROM messages WHERE direction = 'out'"
            )
        }
        outcomes: dict[int, dict[str, Any]] = {}
        if "outcomes" in tables:
            outcomes = {
                r[0]: {"kind": r[1], "reply_id": r[2]}
                for r in conn.execute("SELECT inbound_id, kind, reply_id FROM outcomes")
            }
        chunks: list[dict[str, Any]] = []
        if "outbound_chunks" in tables:
            chunks = [
                {
                    "id": r[0],
                    "message_id": r[1],
                    "idx": r[2],
                    "idempotency_key": r[3],
                    "state": r[4],
                    "resent": r[5],
                    "provider_message_id": r[6],
                    "attempts": r[7],
                }
                for r in conn.execute(
                    "SELECT id, message_id, idx, idempotency_key, state, resent, "
                    "provider_message_id, attempts FROM outbound_chunks"
                )
            ]
        dead_jobs = [
            {"id": r[0], "task": r[1], "payload": r[2], "attempts": r[3], "last_error": r[4]}
            for r in conn.execute(
                "SELECT id, task, payload, attempts, last_error FROM outbox WHERE state = 'dead'"
            )
        ]
    return Snapshot(inbound, outbound, outcomes, chunks, dead_jobs)


def sandbox_sends(api_url: str) -> list[dict[str, Any]]:
    sends: list[dict[str, Any]] = httpx.get(f"{api_url}/sandbox/sent", timeout=60).json()[
        "messages"
    ]
    return sends


# --- the run ----------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: stop and clean up like Ctrl-C."""


def _on_signal(signum: int, _: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _results_dir(plan: Plan, seed: int, given: Path | None) -> Path:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("test-artifacts") / "chaos" / f"{plan.name}-{stamp}-seed{seed}"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def run(plan: Plan, *, seed: int, keep: bool, results: Path | None = None) -> tuple[Verdict, float]:
    started = time.monotonic()
    results = _results_dir(plan, seed, results)
    print(f"chaos: {plan.name} run, seed {seed}, results in {results}", flush=True)
    rng = random.Random(seed)
    load = build_load(plan, rng, secret=secrets.token_hex(16))
    history = History(results)
    notes: list[str] = []
    stop = threading.Event()
    try:
        with platform(plan, results, load, keep, notes) as pf:
            for note in notes:
                print(f"chaos: note: {note}", flush=True)
            print(
                f"chaos: platform up in {time.monotonic() - started:.0f}s "
                f"(visibility timeout {pf.visibility:.0f}s); {len(load.items)} deliveries, "
                f"{plan.unique} unique, {plan.conversations} conversations",
                flush=True,
            )
            sender = Sender(pf.api_url, history, rate=plan.rate)
            nemesis = Nemesis(pf, plan, history, rng)
            duration = len(load.items) / plan.rate
            threads = [
                threading.Thread(target=sender.run, args=(load.items, stop), daemon=True),
                threading.Thread(target=nemesis.run, args=(duration, stop), daemon=True),
            ]
            for t in threads:
                t.start()
            last = 0.0
            while any(t.is_alive() for t in threads):
                threads[0].join(timeout=1)
                threads[1].join(timeout=0.1)
                if time.monotonic() - last > 15:
                    last = time.monotonic()
                    _report(pf, sender, started)
                _watch(pf)
            sender.close()
            deadline = max(nemesis.healed_at, time.monotonic()) + plan.quiesce_after_heal
            if plan.budget:
                deadline = min(deadline, started + plan.budget - 30)
            quiet = _quiesce(pf, deadline, started)
            nemesis.heal_all()
            sends = sandbox_sends(pf.api_url)
            (results / "sandbox.json").write_text(json.dumps(sends))
            snap = snapshot(pf.env["DATABASE_URL"])
            (results / "snapshot.json").write_text(json.dumps(asdict(snap), default=str))
            for error in nemesis.errors:
                print(f"chaos: nemesis error: {error}", flush=True)
            print(
                f"chaos: nemesis done {json.dumps(nemesis.counts)}; quiescent={quiet}", flush=True
            )
    finally:
        stop.set()
        history.close()
    deliveries = [json.loads(line) for line in (results / "deliveries.jsonl").open()]
    verdict = check(deliveries, sends, snap)
    elapsed = time.monotonic() - started
    (results / "verdict.json").write_text(json.dumps({**asdict(verdict), "elapsed": elapsed}))
    return verdict, elapsed


def _report(pf: Platform, sender: Sender, started: float) -> None:
    state = progress(pf.env["DATABASE_URL"])
    print(
        f"chaos: t={time.monotonic() - started:.0f}s posted={sender.sent} acked={sender.acked} "
        f"db={state}",
        flush=True,
    )


def _watch(pf: Platform) -> None:
    for name in ("api", "model", "beat"):
        child = pf.children[name]
        if not child.alive():
            raise HarnessError(f"{name} exited:\n{child.tail()}")
    for worker in pf.workers:
        if not worker.alive() and not worker.paused and not worker.killed:
            # Died on its own (not by the nemesis, which restarts what it kills): a finding.
            print(
                f"chaos: {worker.name} exited by itself; restarting:\n{worker.tail(10)}", flush=True
            )
            worker.restart()


def _quiesce(pf: Platform, deadline: float, started: float) -> bool:
    quiet_since: float | None = None
    last = 0.0
    while time.monotonic() < deadline:
        state = progress(pf.env["DATABASE_URL"])
        if time.monotonic() - last > 15:
            last = time.monotonic()
            print(f"chaos: t={time.monotonic() - started:.0f}s settling db={state}", flush=True)
        _watch(pf)
        if state is not None and state.quiet and not any(w.paused for w in pf.workers):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 3:
                return True
        else:
            quiet_since = None
        time.sleep(1)
    return False


def _recheck(results: Path) -> int:
    deliveries = [json.loads(line) for line in (results / "deliveries.jsonl").open()]
    sends = json.loads((results / "sandbox.json").read_text())
    raw = json.loads((results / "snapshot.json").read_text())
    snap = Snapshot(
        inbound=raw["inbound"],
        outbound={int(k): v for k, v in raw["outbound"].items()},
        outcomes={int(k): v for k, v in raw["outcomes"].items()},
        chunks=raw["chunks"],
        dead_jobs=raw["dead_jobs"],
    )
    verdict = check(deliveries, sends, snap)
    _print_verdict(verdict)
    print(verdict.line(0.0), flush=True)
    return 0 if verdict.ok else 1


def _print_verdict(verdict: Verdict) -> None:
    print(
        f"chaos: modes outcomes={verdict.outcome_mode} keys={verdict.key_mode} "
        f"notices={verdict.notices} dead_detail={json.dumps(verdict.dead_detail)} "
        f"lost_detail={json.dumps(verdict.lost_detail)}",
        flush=True,
    )
    for name in ("lost", "duplicated", "out_of_order"):
        sample = getattr(verdict, name)[:5]
        if sample:
            print(f"chaos: {name} e.g. {' '.join(sample)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n")[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="10,000 deliveries, 5 kills (default)")
    mode.add_argument("--lite", action="store_true", help="1,300 deliveries, 2 kills (< 8 min)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the servers' data directory")
    parser.add_argument("--results", type=Path, default=None, help="where to write histories")
    parser.add_argument(
        "--check", type=Path, default=None, help="run only the checker on a kept results dir"
    )
    args = parser.parse_args(argv)
    if args.check is not None:
        return _recheck(args.check)
    plan = LITE if args.lite else FULL
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        verdict, elapsed = run(plan, seed=seed, keep=args.keep, results=args.results)
    except (KeyboardInterrupt, Interrupted):
        print("chaos: interrupted; everything stopped", file=sys.stderr, flush=True)
        return 130
    except HarnessError as exc:
        print(f"chaos: harness error: {exc}", file=sys.stderr, flush=True)
        return 2
    _print_verdict(verdict)
    print(verdict.line(elapsed), flush=True)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
