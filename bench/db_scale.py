"""Per-message database work at 10 k stored messages and at a large number (default 10 M).

``python -m bench.db_scale [--rows 10000000] [--quick] [--messages 300]``

Two fresh databases (migrated with ``parley.migrate.upgrade``, a bot applied through
``bots.service``) are filled in SQL with ``INSERT … SELECT generate_series``: one to 10 k
messages, one to the large size. Every conversation holds ``--per-conversation`` messages
(inbound and replies alternating, each inbound with its outcome, each reply with its chunk, one
outbox row per message), so the work for one message touches as many rows at both sizes and
only the total table size differs. Bodies are a few valid ciphertexts (the ORM decrypts what it
loads). The two are measured in alternating rounds, so both see the same machine load.

At each size, for ``--messages`` messages on conversations sampled from the whole table, the
real repository functions run the per-message sequence, one transaction per step as the
platform does: intake (the set-wise contact/conversation statement, the message insert with its
window, the outbox job), the pipeline's reads (lease taken for the message, context, pending
lookup, history of the last N turns, limits), the reply (reply insert, outcome insert, send job,
the lease checked and released). For ``--status-messages`` of the replies the send
lane's chunk and two status webhooks are timed too, reported apart (not in the ratio). Every
statement is timed, so a statement that scales badly is named, with its EXPLAIN plan.

Prints ``db_scale ratio X.XX`` last: per-message time at the large size / at 10 k (goal ≤ 1.2).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench._common import (
    Cleanup,
    apply_bot,
    cleanup_on_exit,
    command_line,
    create_database,
    goal,
    libpq_dsn,
    loadavg,
    machine_line,
    migrate,
    percentile,
    sqlalchemy_url,
    use_bench_keys,
)

SMALL = 10_000
# Bytes of disk per stored message, all tables and indexes included (measured ≈ 0.8 kB on
# PostgreSQL 15), plus the WAL written while loading; the check asks for this much free space.
BYTES_PER_MESSAGE = 2_000
STEPS = ("intake", "pipeline_reads", "reply")
GOAL_RATIO = 1.2


@dataclass
class Timings:
    steps: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    total: list[float] = field(default_factory=list)
    statements: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    samples: dict[str, tuple[str, Any]] = field(default_factory=dict)


class StatementClock:
    """Times every statement the engine runs, keyed by its SQL text, while ``on`` is set."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.on: Timings | None = None
        self._started: dict[int, float] = {}

        @event.listens_for(engine, "before_cursor_execute")
        def _before(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
            self._started[id(cursor)] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def _after(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
            started = self._started.pop(id(cursor), None)
            if self.on is None or started is None:
                return
            key = " ".join(statement.split())
            self.on.statements[key].append((time.perf_counter() - started) * 1000)
            self.on.samples.setdefault(key, (statement, params))


# --- loading ------------------------------------------------------------------------------------


def ciphertexts() -> list[bytes]:
    from core.crypto import get_keyring

    ring = get_keyring()
    texts = ("hi", "when do you open?", "thanks!", "ok", "is it ready", "where?", "yes", "no")
    return [ring.encrypt(t) for t in texts]


@dataclass(frozen=True)
class Ids:
    workspace: int
    bot: int
    account: int


def base_ids(conn: Any) -> Ids:
    row = conn.execute(
        "SELECT a.workspace_id, a.bot_id, a.id FROM channel_accounts a ORDER BY a.id LIMIT 1"
    ).fetchone()
    return Ids(*row)


def load(dsn: str, ids: Ids, *, first_conv: int, last_conv: int, per_conv: int) -> None:
    """Conversations ``first_conv ≤ i < last_conv`` with ``per_conv`` messages each, in slices."""
    import psycopg

    bodies = ciphertexts()
    slice_size = max(1, 500_000 // per_conv)
    total = last_conv - first_conv
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:  # skip foreign-key triggers: every row is consistent by construction
            conn.execute("SET session_replication_role = replica")
        except psycopg.Error:
            print("db_scale: not a superuser, loading with foreign-key checks (slower)")
        conn.execute("SET synchronous_commit = off")
        for lo in range(first_conv, last_conv, slice_size):
            hi = min(last_conv, lo + slice_size)
            with conn.transaction():
                _load_slice(conn, ids, bodies, lo, hi, per_conv)
            done = hi - first_conv
            rate = done * per_conv / max(0.001, time.monotonic() - started)
            print(
                f"db_scale: loaded {done * per_conv:,}/{total * per_conv:,} messages "
                f"({rate:,.0f}/s, load {loadavg()})",
                flush=True,
            )


# Contact/conversation i has id 1_000_000 + i; message n (0-based over all conversations) has id
# 1_000_000 + n; within a conversation even positions are inbound, odd ones the reply to the
# previous one. Everything is two days old, so today's per-contact limits count none of it.
_LOAD = (
    """
    INSERT INTO contacts (id, workspace_id, channel, external_id, language, created_at)
    SELECT 1000000 + i, %(ws)s::bigint, 'whatsapp', 'seed' || i, 'en', now() - interval '3 days'
      FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) AS i
    """,
    """
    INSERT INTO conversations (id, workspace_id, bot_id, channel_account_id, contact_id,
                               last_inbound_at, mode, created_at)
    SELECT 1000000 + i, %(ws)s::bigint, %(bot)s::bigint, %(acct)s::bigint, 1000000 + i,
           now() - interval '2 days', 'bot', now() - interval '3 days'
      FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) AS i
    """,
    """
    INSERT INTO messages (id, workspace_id, conversation_id, direction, channel, kind, language,
                          provider_message_id, provider_ts, body, body_redacted, status,
                          reply_to_id, verdict, attempts, sent_at, created_at)
    SELECT 1000000 + n, %(ws)s::bigint, 1000000 + n / %(k)s::bigint,
           CASE WHEN n %% 2 = 0 THEN 'in' ELSE 'out' END, 'whatsapp', 'text', 'en',
           'wamid.seed.' || n, ts,
           (%(bodies)s::bytea[])[1 + n %% %(nb)s::bigint], 'short text',
           CASE WHEN n %% 2 = 0 THEN 'replied' ELSE 'sent' END,
           CASE WHEN n %% 2 = 1 THEN 1000000 + n - 1 END,
           CASE WHEN n %% 2 = 1 THEN '{"tokens": 20, "action": "send", "reasons": []}'::jsonb
                ELSE '{"action": "allow", "reasons": []}'::jsonb END,
           0, CASE WHEN n %% 2 = 1 THEN ts END, ts
      FROM (SELECT n, now() - interval '2 days' - (%(last)s::bigint - n) * interval '1 second' AS ts
              FROM generate_series(%(lo)s::bigint * %(k)s::bigint,
                                   %(hi)s::bigint * %(k)s::bigint - 1) AS n) AS s
    """,
    """
    INSERT INTO outcomes (inbound_id, conversation_id, kind, reply_id, created_at)
    SELECT 1000000 + n, 1000000 + n / %(k)s::bigint, 'replied', 1000000 + n + 1,
           now() - interval '2 days'
      FROM generate_series(%(lo)s::bigint * %(k)s::bigint,
                           %(hi)s::bigint * %(k)s::bigint - 1, 2) AS n
    """,
    """
    INSERT INTO outbox (id, task, payload, state, attempts, available_at, done_at, created_at)
    SELECT 1000000 + n,
           CASE WHEN n %% 2 = 0 THEN 'bots.reply' ELSE 'webhooks.send' END,
           jsonb_build_object('message_id', 1000000 + n), 'done', 1,
           now() - interval '2 days', now() - interval '2 days', now() - interval '2 days'
      FROM generate_series(%(lo)s::bigint * %(k)s::bigint, %(hi)s::bigint * %(k)s::bigint - 1) AS n
    """,
    """
    INSERT INTO outbound_chunks (id, workspace_id, conversation_id, message_id, channel, idx,
                                 total, body, idempotency_key, state, delivery,
                                 provider_message_id, attempts, resent, sent_at, created_at)
    SELECT 1000000 + n, %(ws)s::bigint, 1000000 + n / %(k)s::bigint, 1000000 + n, 'whatsapp', 0, 1,
           (%(bodies)s::bytea[])[1 + n %% %(nb)s::bigint], (1000000 + n) || ':0', 'sent', 'read',
           'wamid.out.' || n, 1, false, now() - interval '2 days', now() - interval '2 days'
      FROM generate_series(%(lo)s::bigint * %(k)s::bigint + 1,
                           %(hi)s::bigint * %(k)s::bigint - 1, 2) AS n
    """,
)


def move_sequences(dsn: str, live_base: int) -> None:
    """New rows (the measured messages) get ids above every seeded row, as in real life."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("contacts", "conversations", "messages", "outbox", "outbound_chunks"):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {int(live_base)})"
            )


def _load_slice(conn: Any, ids: Ids, bodies: list[bytes], lo: int, hi: int, k: int) -> None:
    params = {
        "ws": ids.workspace,
        "bot": ids.bot,
        "acct": ids.account,
        "lo": lo,
        "hi": hi,
        "k": k,
        "bodies": bodies,
        "nb": len(bodies),
        "last": hi * k,
    }
    for sql in _LOAD:
        conn.execute(sql, params)


def vacuum_analyze(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in (
            "contacts",
            "conversations",
            "messages",
            "outcomes",
            "outbox",
            "outbound_chunks",
        ):
            conn.execute(f"VACUUM (ANALYZE) {table}")
        with contextlib.suppress(psycopg.Error):  # write loaded pages out before measuring
            conn.execute("CHECKPOINT")


def table_sizes(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM messages), "
            "pg_size_pretty(pg_database_size(current_database()))"
        ).fetchone()
    assert row is not None
    return f"messages={row[0]:,} database={row[1]}"


# --- the per-message work -----------------------------------------------------------------------


@contextmanager
def step(timings: Timings | None, name: str, clock: StatementClock) -> Iterator[None]:
    clock.on = timings
    started = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings.steps[name].append((time.perf_counter() - started) * 1000)
        clock.on = None


def one_message(
    factory: Any,
    clock: StatementClock,
    account: Any,
    conv_index: int,
    timings: Timings | None,
    history_turns: int,
    with_status: bool,
) -> None:
    """The database work the platform does for one inbound message and its reply, and, with
    ``with_status``, for the reply's send and its status webhooks (timed apart)."""
    import secrets
    from datetime import timedelta

    from sqlalchemy import update
    from sqlalchemy.dialects.postgresql import insert

    from bots import lease
    from bots import repository as bots_repo
    from core import jobs
    from core.db import session_scope
    from core.models import Message, Outcome, utcnow
    from webhooks import repository as hooks
    from webhooks.channels.events import StatusUpdate

    now = utcnow()
    started = time.perf_counter()
    wamid = "wamid.bench." + secrets.token_hex(12)
    with step(timings, "intake", clock), session_scope(factory) as session:
        # The intake's set-wise statements (webhooks.service.apply_deliveries), for a run of one
        # message whose conversation is not remembered yet (the conservative case).
        contact = f"seed{conv_index}"
        threads = hooks.conversation_ids(
            session,
            [
                hooks.ThreadKey(
                    workspace_id=account.workspace_id,
                    bot_id=account.bot_id,
                    account_id=account.id,
                    channel="whatsapp",
                    contact=contact,
                )
            ],
        )
        conversation = threads[(account.id, contact)]
        stored = hooks.insert_inbound_many(
            session,
            [
                hooks.InboundRow(
                    workspace_id=account.workspace_id,
                    conversation_id=conversation,
                    channel="whatsapp",
                    kind="text",
                    provider_message_id=wamid,
                    provider_ts=now,
                    body="when do you open?",
                    content=None,
                )
            ],
        )
        message_id = stored[("whatsapp", wamid)]
        (job_id,) = jobs.enqueue_many(session, [("bots.reply", {"message_id": message_id})])
        jobs.drop_buffer(session)  # no broker here: the doorbell is not what this measures
    holder = f"bench-{secrets.token_hex(6)}"
    with step(timings, "pipeline_reads", clock), session_scope(factory) as session:
        found = bots_repo.message_conversation(session, message_id)
        assert found is not None
        assert lease.acquire_for_message(session, message_id, holder, 120) == conversation
        ctx = bots_repo.conversation_context(session, conversation)
        pending = bots_repo.pending_inbound(session, conversation)
        assert pending, "the new message must be pending"
        bots_repo.inbound_count_since(session, ctx.contact.id, now - timedelta(minutes=1))
        bots_repo.tokens_since(session, ctx.contact.id, now.replace(hour=0, minute=0))
        turns = bots_repo.history(session, conversation, history_turns)
        bots_repo.has_bot_reply(session, conversation)
        assert len(turns) == history_turns, "history must be full at both sizes"
    with step(timings, "reply", clock), session_scope(factory) as session:
        out = Message(
            workspace_id=account.workspace_id,
            conversation_id=conversation,
            direction="out",
            channel="whatsapp",
            kind="text",
            body="We open at 8.",
            body_redacted="We open at 8.",
            status="pending",
            reply_to_id=message_id,
            prompt_message_ids=[m.id for m in turns],
            verdict={"reasons": [], "action": "send", "tokens": 20},
            attempts=0,
        )
        session.add(out)
        session.flush()
        session.execute(
            insert(Outcome)
            .values(
                inbound_id=message_id, conversation_id=conversation, kind="replied", reply_id=out.id
            )
            .on_conflict_do_nothing()
            .returning(Outcome.inbound_id)
        )
        session.execute(update(Message).where(Message.id == message_id).values(status="replied"))
        jobs.enqueue(session, "webhooks.send", message_id=out.id)
        assert jobs.complete(session, job_id)
        jobs.drop_buffer(session)
        assert lease.end_turn(session, conversation, holder) == (True, True)
    if timings is not None:
        timings.total.append((time.perf_counter() - started) * 1000)
    if not with_status:
        return
    sent_wamid = "wamid.sent." + secrets.token_hex(12)
    with step(timings, "status", clock):
        with session_scope(factory) as session:  # the send lane's chunk, sent
            message = hooks.outbound(session, out.id)
            assert message is not None
            hooks.create_chunks(session, message, ["We open at 8."])
            chunk_id = hooks.chunk_ids(session, out.id)[0]
            hooks.claim_chunk(session, chunk_id, now=now)
            hooks.mark_sent(session, chunk_id, provider_message_id=sent_wamid, now=now)
            hooks.refresh_message_status(session, [out.id])
        for status in ("delivered", "read"):  # its status webhooks
            with session_scope(factory) as session:
                event = StatusUpdate(
                    channel="whatsapp",
                    account_id=account.external_id,
                    message_id=sent_wamid,
                    status=status,
                    timestamp=now,
                    error_code=None,
                    callback_data=None,
                )
                hooks.apply_statuses(
                    session, [hooks.SignedStatus(account.meta_app_id, event)], now=now
                )


def measure(
    url: str,
    *,
    conversations: int,
    messages: int,
    warmup: int,
    seed: int,
    history_turns: int,
    status_messages: int,
) -> Timings:
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    from core.db import session_scope
    from core.models import ChannelAccount

    engine = create_engine(sqlalchemy_url(url), pool_size=2)
    clock = StatementClock(engine)
    factory = sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    with session_scope(factory) as session:
        account = session.scalars(select(ChannelAccount).order_by(ChannelAccount.id)).first()
        assert account is not None
        session.expunge(account)
    rng = random.Random(seed)
    timings = Timings()
    try:
        for i in range(warmup + messages):
            conv = rng.randrange(conversations)
            one_message(
                factory,
                clock,
                account,
                conv,
                timings if i >= warmup else None,
                history_turns,
                with_status=warmup <= i < warmup + status_messages,
            )
    finally:
        engine.dispose()
    return timings


def explain(url: str, sql: str, params: Any) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of one recorded statement, in a transaction rolled back."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(sqlalchemy_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            cur = raw.cursor()
            try:
                cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
            except Exception:  # noqa: BLE001  # e.g. re-inserting a row that is unique
                raw.rollback()
                cur.execute("EXPLAIN " + sql, params)
            try:
                return "\n".join("    " + r[0] for r in cur.fetchall())
            finally:
                raw.rollback()
    finally:
        engine.dispose()


# --- report -------------------------------------------------------------------------------------


def report(small: Timings, large: Timings, rows: int, url: str, explain_over: float) -> float:
    print()
    print(f"per-message database work, p50 / p99 ms (10k vs {rows:,} stored messages)")
    print(
        f"  {'step':16} {'10k p50':>9} {'10k p99':>9} {'large p50':>10} {'large p99':>10} "
        f"{'ratio':>6}"
    )
    for name in STEPS:
        a, b = small.steps[name], large.steps[name]
        print(
            f"  {name:16} {percentile(a, 50):9.2f} {percentile(a, 99):9.2f} "
            f"{percentile(b, 50):10.2f} {percentile(b, 99):10.2f} "
            f"{percentile(b, 50) / percentile(a, 50):6.2f}"
        )
    a, b = small.total, large.total
    ratio = percentile(b, 50) / percentile(a, 50)
    print(
        f"  {'total':16} {percentile(a, 50):9.2f} {percentile(a, 99):9.2f} "
        f"{percentile(b, 50):10.2f} {percentile(b, 99):10.2f} {ratio:6.2f}"
    )
    a, b = small.steps["status"], large.steps["status"]
    if a and b:
        print(
            f"  {'status (apart)':16} {percentile(a, 50):9.2f} {percentile(a, 99):9.2f} "
            f"{percentile(b, 50):10.2f} {percentile(b, 99):10.2f} "
            f"{percentile(b, 50) / percentile(a, 50):6.2f}"
            f"   <- send lane + 2 status webhooks for {len(b)} of the replies; not in the ratio"
        )
    print()
    print("statements, p50 ms at 10k -> large (ratio), worst first:")
    rows_out: list[tuple[float, str, float, float, int]] = []
    for key, values in large.statements.items():
        base = small.statements.get(key)
        if not base:
            continue
        p_small, p_large = percentile(base, 50), percentile(values, 50)
        rows_out.append((p_large / p_small, key, p_small, p_large, len(values)))
    rows_out.sort(reverse=True)
    for r, key, p_small, p_large, n in rows_out[:12]:
        print(f"  {r:5.2f}x  {p_small:6.3f} -> {p_large:6.3f}  (n={n})  {key[:150]}")
    for r, key, _p_small, p_large, _n in rows_out[:3]:
        if r < explain_over or p_large < 0.3:
            continue
        sql, params = large.samples[key]
        print(f"\nEXPLAIN (ANALYZE, BUFFERS) of a statement {r:.2f}x slower at the large size:")
        print("    " + " ".join(sql.split())[:400])
        print(explain(url, sql, params))
    return ratio


def check_disk(dsn: str, rows: int) -> None:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    path = row[0] if row else "/"
    if not os.path.exists(path):
        path = "/"
    free = shutil.disk_usage(path).free
    need = rows * BYTES_PER_MESSAGE
    print(
        f"disk: {free / 1e9:.1f} GB free under {path}; {rows:,} messages need about "
        f"{need / 1e9:.1f} GB"
    )
    if free < need:
        raise SystemExit(
            f"db_scale: not enough free disk for {rows:,} messages "
            f"({free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed); "
            "try --quick (1 M) or a smaller --rows"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="large size (messages)")
    parser.add_argument("--quick", action="store_true", help="large size 1 M, for a developer")
    parser.add_argument("--messages", type=int, default=300, help="measured messages per size")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--per-conversation", type=int, default=100)
    parser.add_argument("--history-turns", type=int, default=12)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating measurement rounds per size"
    )
    parser.add_argument(
        "--status-messages",
        type=int,
        default=20,
        help="replies whose send and status webhooks are also timed (reported apart)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--explain-over",
        type=float,
        default=1.5,
        help="print EXPLAIN for statements slower than this ratio",
    )
    args = parser.parse_args(argv)
    rows = 1_000_000 if args.quick else args.rows
    k = args.per_conversation
    if k % 2 or k < 2 * (args.history_turns + 2):
        parser.error("--per-conversation must be even and hold a full history")
    if rows <= SMALL:
        parser.error(f"--rows must be larger than {SMALL:,}")
    use_bench_keys()
    from bench._common import database_server_url

    print(machine_line())
    check_disk(libpq_dsn(database_server_url()), rows)
    with cleanup_on_exit() as cleanup:
        ratio = run(cleanup, rows, k, args)
    print(f"command: {command_line()}")
    print(f"goal: db_scale ratio <= {GOAL_RATIO} ({goal(ratio <= GOAL_RATIO)})")
    print(f"db_scale ratio {ratio:.2f}")
    return 0


def prepare(cleanup: Cleanup, label: str, conversations: int, k: int, live_base: int) -> str:
    """A fresh database holding ``conversations`` × ``k`` messages; returns its URL."""
    import psycopg

    url = create_database(f"bench_db_scale_{label}", cleanup)
    dsn = libpq_dsn(url)
    migrate(url)
    apply_bot(url)
    with psycopg.connect(dsn) as conn:
        ids = base_ids(conn)
    move_sequences(dsn, live_base)
    started = time.monotonic()
    load(dsn, ids, first_conv=0, last_conv=conversations, per_conv=k)
    vacuum_analyze(dsn)
    print(
        f"db_scale: {label}: {table_sizes(dsn)} (loaded in {time.monotonic() - started:.0f}s, "
        f"load {loadavg()})",
        flush=True,
    )
    return url


def merge(into: Timings, part: Timings) -> None:
    for name, values in part.steps.items():
        into.steps[name].extend(values)
    into.total.extend(part.total)
    for key, values in part.statements.items():
        into.statements[key].extend(values)
    for key, sample in part.samples.items():
        into.samples.setdefault(key, sample)


def run(cleanup: Cleanup, rows: int, k: int, args: argparse.Namespace) -> float:
    """Two databases, measured in alternating rounds so both see the same machine load."""
    live_base = 2_000_000 + rows
    urls = {
        "10k": prepare(cleanup, "small", SMALL // k, k, live_base),
        "large": prepare(cleanup, "large", rows // k, k, live_base),
    }
    conversations = {"10k": SMALL // k, "large": rows // k}
    results = {label: Timings() for label in urls}
    rounds = max(1, args.rounds)
    for r in range(rounds):
        for label, url in urls.items():
            part = measure(
                url,
                conversations=conversations[label],
                messages=args.messages // rounds,
                warmup=args.warmup if r == 0 else 0,
                seed=args.seed + r,
                history_turns=args.history_turns,
                status_messages=args.status_messages // rounds,
            )
            merge(results[label], part)
            print(
                f"db_scale: round {r + 1}/{rounds} {label}: p50 "
                f"{percentile(part.total, 50):.2f} ms (load {loadavg()})",
                flush=True,
            )
    return report(results["10k"], results["large"], rows, urls["large"], args.explain_over)


if __name__ == "__main__":
    sys.exit(main())
