"""The pipeline as a state machine: deliver / duplicate / crash / redeliver / send-fails /
LLM-fails, in any order Hypothesis finds, against the real intake, the real job runner and the
real task bodies on a real Postgres transaction per example.

Only three things are fakes, all outside Parley: the broker (Celery's ``send_task`` records the
doorbell instead of talking to Redis), the model server and the Graph API (answered in-process
at the HTTP transport, so whichever ``httpx`` client the code builds reaches them). A crash is a
``BaseException`` raised where the process would die: inside the model call, or right after the
Graph API accepted a send and before the worker wrote that down. The broker then redelivers the
message, as ``acks_late`` + ``task_reject_on_worker_lost`` do.

Time: every run happens at once, so waiting (a crashed worker's lease running out, a back-off
becoming due, an ambiguous send's grace period) is modelled by moving those deadlines into the
past in the rows that hold them.

Invariants: never two outcomes for one inbound message; never a chunk accepted twice by the
Graph API (unless it is marked ``resent`` after an ambiguous send); replies leave in the order
of the messages they answer; once faults stop and the queues drain, every acknowledged message
has exactly one outcome and every reply went out.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session, sessionmaker

from core.celery_app import celery_app
from core.config import reset_settings
from core.db import session_scope, use_sessionmaker
from tests.support.factories import WhatsAppBot, create_whatsapp_bot
from webhooks import simulator
from webhooks.directory import Directory

MODEL = "model.fake"
GRAPH = "graph.fake"
MARKER = re.compile(r"\bt[a-j]+x[a-j]+\b")
CONVERSATIONS = 3


def _letters(number: int) -> str:
    return "".join("abcdefghij"[int(d)] for d in str(number))


def marker(conv: int, seq: int) -> str:
    return f"t{_letters(conv)}x{_letters(seq)}"


class WorkerCrash(BaseException):
    """The worker process dies here: nothing after this line of the task runs or commits."""


# --- the three fakes ----------------------------------------------------------------------------


@dataclass
class Doorbell:
    task: str
    job_id: int
    countdown: float | None


@dataclass
class Broker:
    """Celery's view of Redis: messages wait until a worker takes them; ``acks_late`` puts a
    message back when its worker dies."""

    queue: list[Doorbell] = field(default_factory=list)

    def send_task(self, name: str, *args: Any, **options: Any) -> None:
        kwargs = options.get("kwargs") or (args[1] if len(args) > 1 else {})
        self.queue.append(Doorbell(name, int(kwargs["job_id"]), options.get("countdown")))


@dataclass
class Accepted:
    step: int
    to: str
    text: str
    key: str | None
    wamid: str


@dataclass
class Network:
    """The model server and the Graph API, answered at the HTTP transport. ``fault`` applies to
    the next request of its kind only."""

    model_fault: str | None = None  # "fail" (HTTP 503) | "crash"
    graph_fault: str | None = None  # "fail" (HTTP 500) | "crash_after_accept"
    accepted: list[Accepted] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == MODEL:
            return self._model(request)
        if request.url.host == GRAPH:
            return self._graph(request)
        raise httpx.ConnectError(f"no route to {request.url.host}", request=request)

    def _model(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake"}]})
        fault, self.model_fault = self.model_fault, None
        if fault == "crash":
            raise WorkerCrash("died while the model was answering")
        if fault == "fail":
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        body = json.loads(request.content)
        last = next(
            (m.get("content") for m in reversed(body["messages"]) if m.get("role") == "user"), ""
        )
        found = MARKER.findall(last if isinstance(last, str) else json.dumps(last))
        return httpx.Response(
            200,
            json={
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": "fake",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "ack " + " ".join(found)},
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
            },
        )

    def _graph(self, request: httpx.Request) -> httpx.Response:
        fault, self.graph_fault = self.graph_fault, None
        if fault == "fail":
            return httpx.Response(
                500, json={"error": {"message": "unknown", "type": "OAuthException", "code": 1}}
            )
        body = json.loads(request.content)
        if body.get("status") == "read":
            # Mark-as-read (with the typing indicator): Meta answers it, it is not a message.
            return httpx.Response(200, json={"success": True})
        wamid = "wamid.FAKE" + secrets.token_hex(8).upper()
        key = body.get("biz_opaque_callback_data")
        self.accepted.append(
            Accepted(
                self.step, body.get("to", ""), body.get("text", {}).get("body", ""), key, wamid
            )
        )
        self.statuses.append({"id": wamid, "to": body.get("to", ""), "callback": key})
        if fault == "crash_after_accept":
            raise WorkerCrash("died after the Graph API accepted the send")
        return httpx.Response(
            200,
            json={
                "messaging_product": "whatsapp",
                "contacts": [{"input": body.get("to"), "wa_id": body.get("to")}],
                "messages": [{"id": wamid}],
            },
        )


def status_payload(phone_number_id: str, status: dict[str, Any], kind: str) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": status["id"],
        "status": kind,
        "timestamp": str(int(time.time())),
        "recipient_id": status["to"],
    }
    if status["callback"]:
        item["biz_opaque_callback_data"] = status["callback"]
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "WABA_ID",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550000000",
                                "phone_number_id": phone_number_id,
                            },
                            "statuses": [item],
                        },
                    }
                ],
            }
        ],
    }


# --- the machine --------------------------------------------------------------------------------


@dataclass
class Sent:
    wamid: str
    conv: int
    seq: int
    body: bytes
    headers: dict[str, str]


class Pipeline(RuleBasedStateMachine):
    engine: Engine
    broker: Broker
    network: Network

    def __init__(self) -> None:
        super().__init__()
        self.conn: Connection = self.engine.connect()
        self.outer = self.conn.begin()
        self.factory = sessionmaker(
            bind=self.conn,
            join_transaction_mode="create_savepoint",
            expire_on_commit=False,
            autoflush=False,
        )
        self.scope = use_sessionmaker(self.factory)
        self.scope.__enter__()
        self.directory = Directory(self.factory)  # per example: its rows roll back with it
        self.broker.queue.clear()
        self.network.accepted.clear()
        self.network.statuses.clear()
        self.network.model_fault = self.network.graph_fault = None
        with session_scope(self.factory) as session:
            self.bot: WhatsAppBot = create_whatsapp_bot(session, max_tokens=16, history_turns=4)
        self.sent: list[Sent] = []
        self.acked: dict[str, tuple[int, int, int]] = {}  # wamid -> (conv, seq, step acked)
        self.next_seq = [0] * CONVERSATIONS
        self.ts = int(time.time()) - 600  # inside the 24-hour window
        self.step = 0

    def teardown(self) -> None:
        try:
            self.scope.__exit__(None, None, None)
            self.outer.rollback()
        finally:
            self.conn.close()

    # --- helpers -----------------------------------------------------------------------------

    def _post(self, item: Sent) -> None:
        from webhooks.service import intake

        signature = item.headers["X-Hub-Signature-256"]
        with session_scope(self.factory) as session:
            intake(session, "whatsapp", item.body, signature, self.directory)
        self.acked.setdefault(item.wamid, (item.conv, item.seq, self.step))

    def _run(self, doorbell: Doorbell) -> str:
        task = celery_app.tasks[doorbell.task]
        self.network.step = self.step
        try:
            outcome: str = task(doorbell.job_id)
        except WorkerCrash:
            # acks_late + reject_on_worker_lost: the message goes back to the queue.
            self.broker.queue.append(doorbell)
            return "crashed"
        return outcome

    def _rows(self, sql: str) -> list[Any]:
        with session_scope(self.factory) as session:
            return list(session.execute(text(sql)).all())

    def _time_passes(self) -> None:
        """Every wait is over: leases of dead workers, back-offs, grace periods, bursts."""
        with session_scope(self.factory) as session:
            session.execute(
                text(
                    "UPDATE outbox SET available_at = now() - interval '1 day' "
                    "WHERE state = 'pending'"
                )
            )
            _maybe(session, "UPDATE conversation_leases SET expires_at = now() - interval '1 day'")
            _maybe(
                session,
                "UPDATE outbound_chunks SET sending_since = sending_since - interval '1 day' "
                "WHERE sending_since IS NOT NULL",
            )

    # --- rules --------------------------------------------------------------------------------

    @rule(conv=st.integers(0, CONVERSATIONS - 1))
    def deliver(self, conv: int) -> None:
        self.step += 1
        seq = self.next_seq[conv]
        self.next_seq[conv] += 1
        self.ts += 1
        wamid = simulator.new_wamid()
        payload = simulator.whatsapp_text(
            phone_number_id=self.bot.phone_number_id,
            wa_id=f"1555300000{conv}",
            text=f"hello {marker(conv, seq)}",
            message_id=wamid,
            timestamp=self.ts,
        )
        body, headers = simulator.signed(payload, self.bot.app_secret)
        item = Sent(wamid, conv, seq, body, headers)
        self.sent.append(item)
        self._post(item)

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        self.step += 1
        self._post(data.draw(st.sampled_from(self.sent)))

    @precondition(lambda self: bool(self.broker.queue))
    @rule(
        data=st.data(),
        fault=st.sampled_from([None, None, "crash", "llm_fail", "send_fail", "crash_after_accept"]),
    )
    def work(self, data: st.DataObject, fault: str | None) -> None:
        """A worker takes any waiting message (Celery promises no order) and runs it."""
        self.step += 1
        index = data.draw(st.integers(0, len(self.broker.queue) - 1))
        doorbell = self.broker.queue.pop(index)
        if fault == "crash":
            self.network.model_fault = "crash"
        elif fault == "llm_fail":
            self.network.model_fault = "fail"
        elif fault == "send_fail":
            self.network.graph_fault = "fail"
        elif fault == "crash_after_accept":
            self.network.graph_fault = "crash_after_accept"
        self._run(doorbell)
        self.network.model_fault = self.network.graph_fault = None

    @precondition(lambda self: bool(self.broker.queue))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """The visibility timeout hands a message that is still running to a second worker."""
        self.step += 1
        doorbell = data.draw(st.sampled_from(self.broker.queue))
        self.broker.queue.append(Doorbell(doorbell.task, doorbell.job_id, None))

    @precondition(lambda self: bool(self.network.statuses))
    @rule()
    def status_webhooks(self) -> None:
        """Meta reports what it accepted (sent, delivered), carrying the send's callback data."""
        from webhooks.service import intake

        self.step += 1
        statuses, self.network.statuses = self.network.statuses, []
        for status in statuses:
            for kind in ("sent", "delivered"):
                payload = status_payload(self.bot.phone_number_id, status, kind)
                body, headers = simulator.signed(payload, self.bot.app_secret)
                with session_scope(self.factory) as session:
                    intake(
                        session, "whatsapp", body, headers["X-Hub-Signature-256"], self.directory
                    )

    @rule()
    def relay(self) -> None:
        """Time passes and beat's relay re-rings every pending job (a lost doorbell)."""
        from core import jobs

        self.step += 1
        self._time_passes()
        jobs.relay(self.factory)

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def at_most_one_outcome(self) -> None:
        rows = self._rows(
            "SELECT inbound_id, count(*) FROM outcomes GROUP BY inbound_id HAVING count(*) > 1"
        )
        assert rows == []

    @invariant()
    def no_chunk_accepted_twice(self) -> None:
        resent = {
            r[0]
            for r in _maybe_rows(self, "SELECT idempotency_key FROM outbound_chunks WHERE resent")
        }
        seen: dict[tuple[str, str], int] = {}
        for item in self.network.accepted:
            key = (item.to, item.key or item.text)
            seen[key] = seen.get(key, 0) + 1
            assert seen[key] == 1 or item.key in resent, f"accepted twice: {item}"

    @invariant()
    def replies_in_order(self) -> None:
        newest: dict[str, tuple[int, int]] = {}  # recipient -> (seq answered, step sent)
        for item in self.network.accepted:
            found = MARKER.findall(item.text)
            if not found:
                continue  # a notice
            seqs = [self._seq_of(m) for m in found]
            answered = (
                max(s for s in seqs if s is not None) if any(s is not None for s in seqs) else None
            )
            if answered is None:
                continue
            before = newest.get(item.to)
            if before is not None and answered < before[0]:
                # Allowed only for a message acknowledged after the later reply went out.
                wamid = self._wamid_of(item.to, answered)
                acked_step = self.acked.get(wamid, (0, 0, 10**9))[2] if wamid else 10**9
                assert acked_step > before[1], (
                    f"reply to message {answered} went out after the reply to {before[0]}"
                )
            if before is None or answered > before[0]:
                newest[item.to] = (answered, item.step)

    def _seq_of(self, found: str) -> int | None:
        for item in self.sent:
            if marker(item.conv, item.seq) == found:
                return item.seq
        return None

    def _wamid_of(self, to: str, seq: int) -> str | None:
        for item in self.sent:
            if f"1555300000{item.conv}" == to and item.seq == seq:
                return item.wamid
        return None

    # --- faults heal ----------------------------------------------------------------------------

    def drain(self) -> None:
        from core import jobs

        for _ in range(60):
            self.network.model_fault = self.network.graph_fault = None
            if self.network.statuses:
                self.status_webhooks()
            while self.broker.queue:
                self._run(self.broker.queue.pop(0))
            self._time_passes()
            jobs.relay(self.factory)
            if not self.broker.queue and not self.network.statuses:
                pending = self._rows("SELECT count(*) FROM outbox WHERE state = 'pending'")
                if pending[0][0] == 0:
                    return

    def check_healed(self) -> None:
        self.drain()
        pending = self._rows(
            "SELECT id, task, attempts, last_error FROM outbox WHERE state = 'pending'"
        )
        assert pending == [], f"jobs still pending after the queues drained: {pending}"
        missing = self._rows(
            "SELECT m.provider_message_id FROM messages m WHERE m.direction = 'in' AND NOT EXISTS "
            "(SELECT 1 FROM outcomes o WHERE o.inbound_id = m.id)"
        )
        assert missing == [], f"acknowledged messages without an outcome: {missing}"
        stored = {
            r[0]
            for r in self._rows("SELECT provider_message_id FROM messages WHERE direction = 'in'")
        }
        assert set(self.acked) <= stored
        unsent = _maybe_rows(
            self,
            "SELECT id, state FROM outbound_chunks WHERE state NOT IN ('sent', 'failed', 'dead')",
        )
        assert unsent == [], f"chunks never finished: {unsent}"
        # Every reply stored went out, and every message answered by a reply has it delivered.
        replied = self._rows(
            "SELECT m.provider_message_id FROM outcomes o JOIN messages m ON m.id = o.inbound_id "
            "WHERE o.kind = 'replied'"
        )
        answered = {m for a in self.network.accepted for m in MARKER.findall(a.text)}
        by_wamid = {s.wamid: marker(s.conv, s.seq) for s in self.sent}
        covered = self._rows(
            "SELECT m.provider_message_id, o.reply_id FROM outcomes o "
            "JOIN messages m ON m.id = o.inbound_id WHERE o.kind = 'replied'"
        )
        delivered_replies = {
            reply_id for wamid, reply_id in covered if by_wamid.get(wamid) in answered
        }
        for (wamid,) in replied:
            reply = next(r for w, r in covered if w == wamid)
            assert reply in delivered_replies, f"reply for {wamid} never reached the Graph API"


def _maybe(session: Session, sql: str) -> None:
    """Run a statement on a table another change may not have created yet."""
    with session.begin_nested():
        try:
            session.execute(text(sql))
        except Exception:  # noqa: BLE001  # a missing table or column: nothing to move
            session.rollback()


def _maybe_rows(machine: Pipeline, sql: str) -> list[Any]:
    try:
        return machine._rows(sql)
    except Exception:  # noqa: BLE001  # a missing table or column: no rows
        return []


EXERCISED = {"examples": 0, "replies_sent": 0}


class HealingPipeline(Pipeline):
    def teardown(self) -> None:
        try:
            self.check_healed()
            EXERCISED["examples"] += 1
            EXERCISED["replies_sent"] += sum("ack t" in a.text for a in self.network.accepted)
        finally:
            super().teardown()


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Broker, Network]]:
    import parley.worker  # noqa: F401  # registers every task with the Celery app

    broker, network = Broker(), Network()
    monkeypatch.setattr(celery_app, "send_task", broker.send_task)
    monkeypatch.setattr(
        httpx.HTTPTransport, "handle_request", lambda _self, request: network.handle(request)
    )
    monkeypatch.setenv("PARLEY_INFERENCE_ENDPOINTS", f"http://{MODEL}#model=fake")
    monkeypatch.setenv("PARLEY_GRAPH_API_URL", f"http://{GRAPH}")
    monkeypatch.setenv("PARLEY_OUTBOX_RELAY_AFTER", "0")
    monkeypatch.setenv("PARLEY_SEND_PAIR_INTERVAL", "0")
    monkeypatch.setenv("PARLEY_SEND_ORDER_DELAY", "0.05")
    monkeypatch.setenv("PARLEY_SANDBOX_WEBHOOKS", "false")
    reset_settings()
    yield broker, network
    monkeypatch.undo()
    reset_settings()


def test_pipeline_model(engine: Engine, fakes: tuple[Broker, Network]) -> None:
    EXERCISED.update(examples=0, replies_sent=0)
    machine = HealingPipeline
    machine.engine, (machine.broker, machine.network) = engine, fakes
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=int(os.environ.get("PARLEY_PROPERTY_EXAMPLES", "200")),
            stateful_step_count=20,
            deadline=None,
            derandomize=bool(os.environ.get("CI")),
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            print_blob=True,
        ),
    )
    # A model that never reaches the Graph API would pass every invariant above.
    assert EXERCISED["replies_sent"] >= max(1, EXERCISED["examples"] // 4), EXERCISED
