"""Parley's webhook ingest against a minimal endpoint in the same server layout, same run.

``python -m bench.ingest [--seconds 15] [--connections 16] [--mode both|ingest|status]``

Both servers are uvicorn with one worker on 127.0.0.1, each with its own database on the same
Postgres server (created and dropped here) and its own key prefix on the same Redis:

* baseline (``bench._baseline_app``): HMAC + JSON parse + one ``INSERT … ON CONFLICT`` + one
  Redis ``LPUSH``, sync psycopg 3 pool of 8;
* Parley (``python -m parley api``): the real intake with a bot applied through
  ``bots.service.apply_bots``, default settings (logging at INFO).

Load: ``--connections`` concurrent senders posting pre-signed, unique WhatsApp text webhooks
built with ``webhooks.simulator`` from ``--senders`` contacts, through ``wrk`` (installed with
apt-get when missing and running as root) or, failing that, an asyncio/httpx generator pinned
to one core. Each server gets a warm-up, then the measured run; the baseline runs first.

Status mode: after the ingest run, Parley receives ``statuses`` webhooks (sent, delivered, read)
for outbound messages seeded in its database (one status per request, as Meta sends them). They
go through the same group commit as every delivery. Its ratio is against
the same baseline ingest rate (the goal in the performance reference is ≥ 3 × B_ingest).

Prints ``status ratio X.XX`` and, last, ``ingest ratio X.XX`` (Parley / baseline req/s).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import _loadgen as load
from bench._common import (
    BenchBot,
    Child,
    Cleanup,
    apply_bot,
    cleanup_on_exit,
    command_line,
    create_database,
    free_port,
    goal,
    libpq_dsn,
    loadavg,
    machine_line,
    migrate,
    parley_env,
    python_module,
    redis_prefix,
    redis_url,
    start_child,
    use_bench_keys,
    wait_http,
)

GOAL_INGEST = 1.0
GOAL_INGEST_LATER = 1.25
GOAL_P99_MS = 100.0
GOAL_STATUS = 3.0
TEXT = (
    "Hello, I would like to know the status of my order and whether the delivery can be moved "
    "to next week, because I will be travelling. "
)


@dataclass(frozen=True)
class Measured:
    label: str
    result: load.LoadResult
    server_cpu_ms: float  # server process CPU per request
    machine_cpu_ms: float  # whole machine busy CPU per request (server, Postgres, Redis, load)
    parts_ms: dict[str, float]  # CPU per request by part (postgres, redis, load, other)

    def line(self) -> str:
        return (
            f"{self.label:17} {self.result.line()}\n"
            f"{'':17} cpu per request: server {self.server_cpu_ms:.2f} ms, "
            f"whole machine {self.machine_cpu_ms:.2f} ms ("
            + ", ".join(f"{k} {v:.2f}" for k, v in self.parts_ms.items() if k != "server")
            + ")"
        )


# --- bodies -------------------------------------------------------------------------------------


def sender_ids(count: int) -> list[str]:
    return [str(15550000000 + i) for i in range(count)]


def text_bodies(
    bot: BenchBot, senders: list[str], count: int, text_bytes: int
) -> Iterator[tuple[str, bytes]]:
    from webhooks import simulator

    text = (TEXT * (text_bytes // len(TEXT) + 1))[:text_bytes]
    now = int(time.time())
    for i in range(count):
        payload = simulator.whatsapp_text(
            phone_number_id=bot.phone_number_id,
            wa_id=senders[i % len(senders)],
            text=text,
            name="Bench Sender",
            timestamp=now,
        )
        body, headers = simulator.signed(payload, bot.app_secret)
        yield headers["X-Hub-Signature-256"], body


def status_bodies(
    bot: BenchBot, targets: list[tuple[str, str]], block: int = 100
) -> Iterator[tuple[str, bytes]]:
    """sent, delivered, read for each (wamid, recipient), a block of messages at a time."""
    from webhooks import simulator

    now = int(time.time())
    for start in range(0, len(targets), block):
        part = targets[start : start + block]
        for status in ("sent", "delivered", "read"):
            for wamid, recipient in part:
                payload = simulator.whatsapp_status(
                    phone_number_id=bot.phone_number_id,
                    message_id=wamid,
                    status=status,
                    recipient_id=recipient,
                    timestamp=now,
                )
                body, headers = simulator.signed(payload, bot.app_secret)
                yield headers["X-Hub-Signature-256"], body


def seed_outbound(url: str, count: int) -> list[tuple[str, str]]:
    """``count`` sent outbound messages (one chunk each) spread over existing conversations."""
    import psycopg

    tag = secrets.token_hex(4).upper()
    with psycopg.connect(libpq_dsn(url)) as conn:
        conn.execute(
            """
            WITH conv AS (
                SELECT cv.id, cv.workspace_id, row_number() OVER (ORDER BY cv.id) - 1 AS rn,
                       count(*) OVER () AS total
                  FROM conversations AS cv
            )
            INSERT INTO messages (workspace_id, conversation_id, direction, channel, kind,
                                  provider_message_id, status, attempts, sent_at, verdict)
            SELECT conv.workspace_id, conv.id, 'out', 'whatsapp', 'text',
                   'wamid.BENCH' || %(tag)s || g, 'sent', 1, now(), '{"tokens": 20}'::jsonb
              FROM generate_series(0, %(n)s::bigint - 1) AS g
              JOIN conv ON conv.rn = g %% conv.total
            """,
            {"tag": tag, "n": count},
        )
        conn.execute(
            """
            INSERT INTO outbound_chunks (workspace_id, conversation_id, message_id, channel, idx,
                                         total, body, idempotency_key, state,
                                         provider_message_id, attempts, resent, sent_at)
            SELECT m.workspace_id, m.conversation_id, m.id, 'whatsapp', 0, 1, '\\x00'::bytea,
                   m.id || ':0', 'sent', m.provider_message_id, 1, false, now()
              FROM messages AS m
             WHERE m.provider_message_id LIKE 'wamid.BENCH' || %(tag)s || '%%'
            """,
            {"tag": tag},
        )
        rows = conn.execute(
            """
            SELECT m.provider_message_id, ct.external_id
              FROM messages AS m
              JOIN conversations AS cv ON cv.id = m.conversation_id
              JOIN contacts AS ct ON ct.id = cv.contact_id
             WHERE m.provider_message_id LIKE 'wamid.BENCH' || %(tag)s || '%%'
             ORDER BY m.id
            """,
            {"tag": tag},
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def count_rows(url: str, sql: str) -> int:
    import psycopg

    with psycopg.connect(libpq_dsn(url)) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


# --- running ------------------------------------------------------------------------------------


@dataclass
class Runner:
    seconds: float
    warmup: float
    connections: int
    work: Path
    wrk: str | None

    def run(self, child: Child, url: str, bodies: Path, seconds: float) -> load.LoadResult:
        if self.wrk:
            return load.run_wrk(
                url,
                bodies,
                seconds=seconds,
                connections=self.connections,
                script=self.work / "post.lua",
            )
        return load.run_python(url, bodies, seconds=seconds, connections=self.connections)

    def measure(self, label: str, child: Child, url: str, warm: Path, bodies: Path) -> Measured:
        if self.warmup > 0:
            self.run(child, url, warm, self.warmup)
        procs0 = load.cpu_by_process()
        cpu0, busy0 = load.process_cpu_seconds(child.pid), load.machine_busy_seconds()
        result = self.run(child, url, bodies, self.seconds)
        cpu1, busy1 = load.process_cpu_seconds(child.pid), load.machine_busy_seconds()
        parts = load.cpu_groups(procs0, load.cpu_by_process(), child.pid)
        if not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
        n = max(1, result.requests)
        print(f"  {label}: {result.line()}  (load {loadavg()})", flush=True)
        return Measured(
            label,
            result,
            (cpu1 - cpu0) * 1000 / n,
            (busy1 - busy0) * 1000 / n,
            {k: v * 1000 / n for k, v in parts.items()},
        )


def start_baseline(cleanup: Cleanup, work: Path, bot: BenchBot, db_url: str) -> tuple[Child, str]:
    import psycopg

    from bench._baseline_app import SCHEMA

    with psycopg.connect(libpq_dsn(db_url), autocommit=True) as conn:
        conn.execute(SCHEMA)
    key = redis_prefix(cleanup, "ingest-baseline") + "inbound"
    port = free_port()
    env = dict(os.environ, BENCH_BASELINE_SECRET=bot.app_secret)
    child = start_child(
        cleanup,
        "baseline",
        python_module(
            "bench._baseline_app",
            "--port",
            str(port),
            "--dsn",
            libpq_dsn(db_url),
            "--redis-url",
            redis_url(),
            "--key",
            key,
        ),
        env,
        work,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/healthz", timeout=60, child=child)
    return child, f"{base}/webhooks/whatsapp"


def start_parley(cleanup: Cleanup, work: Path, db_url: str) -> tuple[Child, str]:
    port = free_port()
    env = parley_env(
        database_url=db_url,
        prefix=redis_prefix(cleanup, "ingest-parley"),
        data_dir=work / "parley-data",
        keys=use_bench_keys(),
        PARLEY_API_PORT=str(port),
        PARLEY_GRAPH_API_URL="http://127.0.0.1:9/unused",
    )
    child = start_child(cleanup, "parley-api", python_module("parley", "api"), env, work)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/readyz", timeout=90, child=child)
    return child, f"{base}/webhooks/whatsapp"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per server")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--mode", choices=("both", "ingest", "status"), default="both")
    parser.add_argument("--senders", type=int, default=1000, help="distinct WhatsApp contacts")
    parser.add_argument("--text-bytes", type=int, default=1000, help="message text length")
    parser.add_argument(
        "--max-rate", type=int, default=4000, help="req/s the body files are sized for"
    )
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args(argv)

    use_bench_keys()
    wrk = None
    if args.generator != "python":
        wrk = load.ensure_wrk()
        if wrk is None and args.generator == "wrk":
            parser.error("wrk is not installed and could not be installed")
    print(machine_line())
    print(
        "load generator: "
        + (
            "wrk -t1 with a Lua script over pre-generated signed bodies"
            if wrk
            else "asyncio/httpx generator pinned to one core (wrk not available)"
        )
    )
    with cleanup_on_exit() as cleanup:
        work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
        if args.keep_logs:
            print(f"logs: {work}")
        else:
            cleanup.add(f"remove {work}", lambda: shutil.rmtree(work, ignore_errors=True))
        runner = Runner(args.seconds, args.warmup, args.connections, work, wrk)
        results = run(cleanup, runner, args)
    print()
    return report(results, args)


def run(cleanup: Cleanup, runner: Runner, args: argparse.Namespace) -> dict[str, Measured]:
    work = runner.work
    parley_db = create_database("bench_ingest_parley", cleanup)
    base_db = create_database("bench_ingest_baseline", cleanup)
    migrate(parley_db)
    bot = apply_bot(parley_db)
    senders = sender_ids(args.senders)
    warm_n = int(args.max_rate * args.warmup) + args.senders
    run_n = int(args.max_rate * args.seconds)
    started = time.monotonic()
    warm_file, run_file = work / "warm.bodies", work / "run.bodies"
    load.write_bodies(warm_file, text_bodies(bot, senders, warm_n, args.text_bytes))
    load.write_bodies(run_file, text_bodies(bot, senders, run_n, args.text_bytes))
    print(
        f"bodies: {warm_n} warm-up + {run_n} measured, "
        f"{run_file.stat().st_size // max(1, run_n)} bytes each "
        f"(built in {time.monotonic() - started:.1f}s)",
        flush=True,
    )
    results: dict[str, Measured] = {}

    child, url = start_baseline(cleanup, work, bot, base_db)
    results["baseline"] = runner.measure("baseline ingest", child, url, warm_file, run_file)
    child.stop()
    stored = count_rows(base_db, "SELECT count(*) FROM messages")
    print(f"  baseline stored {stored} rows")

    child, url = start_parley(cleanup, work, parley_db)
    if args.mode in ("both", "ingest"):
        results["parley"] = runner.measure("parley ingest", child, url, warm_file, run_file)
        stored = count_rows(parley_db, "SELECT count(*) FROM messages WHERE direction = 'in'")
        jobs = count_rows(parley_db, "SELECT count(*) FROM outbox")
        print(f"  parley stored {stored} inbound messages, {jobs} outbox jobs")
    else:  # the conversations the statuses belong to
        runner.run(child, url, warm_file, args.warmup or 2.0)
    if args.mode in ("both", "status"):
        per_file = int(args.max_rate * max(args.seconds, args.warmup)) // 3 + 100
        targets = seed_outbound(parley_db, 2 * per_file)
        print(f"  seeded {len(targets)} sent outbound messages (one chunk each) for statuses")
        status_warm, status_run = work / "status-warm.bodies", work / "status-run.bodies"
        load.write_bodies(status_warm, status_bodies(bot, targets[:per_file]))
        load.write_bodies(status_run, status_bodies(bot, targets[per_file:]))
        results["status"] = runner.measure("parley status", child, url, status_warm, status_run)
        read = count_rows(parley_db, "SELECT count(*) FROM outbound_chunks WHERE delivery = 'read'")
        print(f"  parley marked {read} chunks read")
        print(f"  parley status path: {status_path()}")
    child.stop()
    return results


def status_path() -> str:
    from core.config import Settings

    settings = Settings()
    most, wait = settings.intake_batch_max, settings.intake_batch_wait
    if most > 1:
        return f"group commit (up to {most} deliveries or {wait * 1000:.0f} ms per transaction)"
    return "one commit per delivery"


def report(results: dict[str, Measured], args: argparse.Namespace) -> int:
    base = results["baseline"]
    print(
        f"results ({args.connections} concurrent senders, {args.seconds:.0f}s each, "
        f"load {loadavg()}):"
    )
    for item in results.values():
        print(item.line())
    for item in results.values():
        if item.result.errors or item.result.wrapped:
            print(
                f"WARNING: {item.label}: {item.result.errors} errors"
                + (", bodies wrapped" if item.result.wrapped else "")
            )
    print(f"command: {command_line()}")
    if "status" in results:
        status = results["status"].result
        ratio = status.rps / base.result.rps
        print(
            f"goal: status-only >= {GOAL_STATUS:.0f}x baseline ingest "
            f"({goal(ratio >= GOAL_STATUS)})"
        )
        print(f"status ratio {ratio:.2f}")
    if "parley" in results:
        parley = results["parley"].result
        ratio = parley.rps / base.result.rps
        met = ratio >= GOAL_INGEST and parley.p99_ms < GOAL_P99_MS
        print(
            f"goal: ingest >= {GOAL_INGEST:.2f}x with p99 < {GOAL_P99_MS:.0f} ms at "
            f"{args.connections} senders ({goal(met)}"
            f"; p99 {parley.p99_ms:.1f} ms); later >= {GOAL_INGEST_LATER:.2f}x "
            f"({goal(ratio >= GOAL_INGEST_LATER)})"
        )
        print(f"ingest ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
