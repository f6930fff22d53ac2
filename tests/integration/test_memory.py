"""Conversation memory against real Postgres and the real local model (SmolLM2 on llama.cpp's
server): whole turns go through the webhook, the reply pipeline and the fold job in-process.

What a turn sent is rebuilt from the reply's ``prompt_message_ids`` (and the summary stored at the
time), rendered with the GGUF's own chat template the way llama.cpp's server renders it, and
tokenized by the server; its length must equal the server's own count for the same messages, and
memory's count recorded with the reply (``verdict["counted"]``, made from the prompt the
pipeline really sent) must match it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified

from bots import memory, memory_tasks, pipeline, repository
from core import jobs
from core.models import Bot, ConversationMemory, Message, OutboxJob
from inference import Endpoint, Tokenizer, local
from inference.local import MODEL_ALIAS, model_path
from moderation import canary_instruction, make_canary
from tests.support.factories import WhatsAppBot, create_whatsapp_bot
from tests.support.processes import Proc, free_port
from webhooks import repository as intake_repository
from webhooks import simulator

WA_ID = "15557654321"
QUESTIONS = [
    "Hi! Do you sell sourdough bread?",
    "How much is a large sourdough loaf?",
    "Can I order two loaves for Saturday morning?",
    "Do you also have croissants?",
    "Are your croissants made with butter?",
    "What time do you open on Saturday?",
    "Is there parking near the bakery?",
    "Can I pay by card?",
    "Do you bake gluten-free bread too?",
    "Could you put my name, Ana, on the order?",
    "Do you have chocolate cake on weekends?",
    "Thanks, see you on Saturday!",
]


class CountingTransport(httpx.BaseTransport):
    """Real HTTP, counting the requests that went out."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.requests: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The local model on a server of this module's own, started like the session's one but
    with ``--interrupt_requests False``: by default llama-cpp-python's server ends a streamed
    completion whenever another request comes in, the pool's background health check
    included, and these tests stream many turns in a row."""
    port = free_port()
    command = local.server_command(port=port, threads=2, n_ctx=4096)
    proc = Proc(
        "memory-model",
        [*command, "--interrupt_requests", "False"],
        os.environ,
        tmp_path_factory.mktemp("memory-model"),
    )
    try:
        local.wait_until_ready(f"http://127.0.0.1:{port}", timeout=120, proc=proc.popen)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture
def use_local_model(use_model: Any, model_server: str, graph_sandbox: str) -> None:
    use_model(model_server, graph_sandbox)


@pytest.fixture
def tokenizer(model_server: str) -> Iterator[Tokenizer]:
    with Tokenizer([Endpoint(model_server, model=MODEL_ALIAS)], timeout=120) as t:
        yield t


@pytest.fixture(scope="module")
def chat_template() -> Iterator[Jinja2ChatFormatter]:
    """The chat template embedded in the GGUF, as llama.cpp's server builds its formatter."""
    llama = Llama(model_path=str(model_path()), vocab_only=True, verbose=False)
    formatter = Jinja2ChatFormatter(
        template=llama.metadata["tokenizer.chat_template"],
        eos_token=llama._model.token_get_text(llama.token_eos()),
        bos_token=llama._model.token_get_text(llama.token_bos()),
    )
    yield formatter
    llama.close()


def _deliver(client: TestClient, bot: WhatsAppBot, text: str) -> None:
    payload = simulator.whatsapp_text(phone_number_id=bot.phone_number_id, wa_id=WA_ID, text=text)
    body, headers = simulator.signed(payload, bot.app_secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200


def _pending_jobs(db: Session, task: str) -> list[OutboxJob]:
    db.expire_all()
    return list(
        db.scalars(
            select(OutboxJob)
            .where(OutboxJob.task == task, OutboxJob.state == "pending")
            .order_by(OutboxJob.id)
        )
    )


def _turn(client: TestClient, db: Session, bot: WhatsAppBot, text: str) -> Message:
    """One message in, one reply out (not sent: the send lane is not needed here)."""
    _deliver(client, bot, text)
    (job,) = _pending_jobs(db, "bots.reply")
    assert pipeline.reply(job.id) == "done"
    db.expire_all()
    reply = db.scalars(
        select(Message)
        .where(Message.direction == "out", Message.kind == "text")
        .order_by(Message.id.desc())
        .limit(1)
    ).one()
    assert reply.verdict is not None and reply.verdict["action"] in ("send", "fallback")
    return reply


def _sent(db: Session, bot_id: int, reply: Message, summary: str | None) -> list[dict[str, str]]:
    """The messages the turn that wrote ``reply`` sent (see the module docstring)."""
    bot = db.get(Bot, bot_id)
    assert bot is not None
    ids = list(reply.prompt_message_ids or [])
    rows = {m.id: m for m in db.scalars(select(Message).where(Message.id.in_(ids)))}
    system = memory.system_text(bot, canary_line=canary_instruction(make_canary(bot.canary_seed)))
    messages = [{"role": "system", "content": memory.with_summary(system, summary)}]
    messages += [
        {"role": t.role, "content": t.content} for t in memory.turns_of([rows[i] for i in ids])
    ]
    return messages


def _ids(
    tokenizer: Tokenizer, template: Jinja2ChatFormatter, messages: Sequence[dict[str, str]]
) -> list[int]:
    prompt = template(messages=list(messages)).prompt  # type: ignore[arg-type]
    return tokenizer.tokens(prompt)


def _served(model_server: str, messages: Sequence[dict[str, str]]) -> tuple[int, str]:
    """The server's own prompt size for ``messages``, and its reply (the pipeline streams, and
    llama.cpp's server reports no usage while streaming). The reply is not compared with the
    pipeline's: llama.cpp's reuse of a cached prefix can change a greedy reply's last tokens."""
    with httpx.Client(timeout=120, trust_env=False) as http:
        data = http.post(
            f"{model_server}/v1/chat/completions",
            json={
                "model": MODEL_ALIAS,
                "messages": list(messages),
                "max_tokens": 32,
                "temperature": 0,
                "top_p": 0.95,
                "seed": 7,
            },
        ).json()
    return data["usage"]["prompt_tokens"], (data["choices"][0]["message"]["content"] or "").strip()


def _bot(db: Session, **memory_settings: Any) -> WhatsAppBot:
    bot = create_whatsapp_bot(db, max_tokens=32, history_turns=100)
    row = db.get(Bot, bot.bot_id)
    assert row is not None
    row.extra = {**row.extra, "memory": memory_settings, "scope": "bread, cakes and orders"}
    flag_modified(row, "extra")
    db.commit()
    return bot


def test_each_prompt_is_the_previous_one_plus_its_reply_on_token_ids(
    client: TestClient,
    db: Session,
    model_server: str,
    use_local_model: None,
    tokenizer: Tokenizer,
    chat_template: Jinja2ChatFormatter,
) -> None:
    bot = _bot(db)
    previous: tuple[list[int], Message] | None = None
    for question in QUESTIONS[:9]:
        reply = _turn(client, db, bot, question)
        verdict = reply.verdict or {}
        messages = _sent(db, bot.bot_id, reply, summary=None)
        ids = _ids(tokenizer, chat_template, messages)
        served, _ = _served(model_server, messages)
        assert len(ids) == served
        assert served <= verdict["budget"]
        # Memory's own count (contents counted alone, framing measured once) is the server's.
        assert abs(verdict["counted"] - served) <= 1
        assert messages[-1] == {"role": "user", "content": question}
        if previous is not None:
            before, answered = previous
            assert ids[: len(before)] == before
            reply_ids = tokenizer.tokens(answered.body_redacted or "")
            assert ids[len(before) : len(before) + len(reply_ids)] == reply_ids
        previous = (ids, reply)
    conversation = db.scalars(select(Message.conversation_id).limit(1)).one()
    assert _pending_jobs(db, memory.FOLD_TASK) == []
    assert repository.conversation_memory(db, conversation) is None  # nothing was folded


def test_history_folds_in_steps_into_a_stored_summary_within_the_budget(
    client: TestClient,
    db: Session,
    model_server: str,
    use_local_model: None,
    tokenizer: Tokenizer,
    chat_template: Jinja2ChatFormatter,
) -> None:
    bot = _bot(db, context_tokens=420, summary_tokens=32)
    framing = tokenizer.framing()
    summary: str | None = None
    through = 0
    folds = 0
    held_back = False  # the first fold waits one turn, to answer while it is pending
    after_fold: int | None = None
    for question in QUESTIONS:
        reply = _turn(client, db, bot, question)
        verdict = reply.verdict or {}
        budget = verdict["budget"]
        assert budget == 420 - 32 - 32
        messages = _sent(db, bot.bot_id, reply, summary)
        served, _ = _served(model_server, messages)
        assert served <= budget  # the server's own count
        assert len(_ids(tokenizer, chat_template, messages)) == served
        assert min(reply.prompt_message_ids or [0]) > through
        if after_fold is not None:
            # The first prompt after a fold: what the fold left (<= 60 % of the budget) plus
            # the reply written while it was requested and the new message.
            grown = framing.assistant + tokenizer.count(messages[-2]["content"])
            grown += framing.user + tokenizer.count(question)
            assert served - grown <= math.floor(0.6 * budget) + len(messages)
            after_fold = None
        pending = _pending_jobs(db, memory.FOLD_TASK)
        if not pending:
            continue
        (job,) = pending  # one pending fold at a time
        if not held_back:
            held_back = True
            continue  # the next turn is answered while this fold is pending
        requested_now = folds > 0  # only the first fold was held back a turn
        assert memory_tasks.fold_memory(job.id) == "done"
        db.expire_all()
        row = db.get(ConversationMemory, reply.conversation_id)
        assert row is not None and row.summary and row.fold_through_id is None
        assert row.through_id == job.payload["through_id"] > through
        assert row.source_ids and max(row.source_ids) <= row.through_id
        summary, through, folds = row.summary, row.through_id, folds + 1
        after_fold = reply.id if requested_now else None
        assert memory_tasks.fold_memory(job.id) == "skipped"  # a redelivery changes nothing
    assert folds >= 2, "the history folded in steps"
    assert summary is not None and memory.SUMMARY_HEADING not in summary


def test_deleted_unsent_and_edited_messages_and_failed_replies_never_reenter_a_prompt(
    client: TestClient,
    db: Session,
    model_server: str,
    use_local_model: None,
) -> None:
    bot = _bot(db)
    replies = [_turn(client, db, bot, q) for q in QUESTIONS[:4]]
    conversation = replies[0].conversation_id
    inbound = list(
        db.scalars(
            select(Message)
            .where(Message.conversation_id == conversation, Message.direction == "in")
            .order_by(Message.id)
        )
    )
    every = [m.id for m in inbound] + [r.id for r in replies]
    # A summary written from the first turn, stored as a fold would store it.
    db.add(
        ConversationMemory(
            conversation_id=conversation,
            summary="Asked for sourdough.",
            through_id=replies[0].id,
            source_ids=[inbound[0].id, replies[0].id],
        )
    )
    db.commit()
    bot_row = db.get(Bot, bot.bot_id)
    assert bot_row is not None
    ctx = memory.load(db, bot_row, conversation, [], canary_line="c")
    assert ctx.summary == "Asked for sourdough."
    assert [i for t in ctx.history for i in t.message_ids] == sorted(every)[2:]

    # The contact deletes (unsends) the first message and edits the second; a reply fails.
    assert inbound[0].provider_message_id and inbound[1].provider_message_id
    intake_repository.erase_inbound(
        db,
        conversation=conversation,
        channel="whatsapp",
        provider_message_id=inbound[0].provider_message_id,
    )
    intake_repository.edit_inbound(
        db,
        conversation=conversation,
        channel="whatsapp",
        provider_message_id=inbound[1].provider_message_id,
        body="an edit, not screened yet",
        content=None,
    )
    replies[2].status = "failed"
    db.commit()
    db.expire_all()
    gone = {inbound[0].id, inbound[1].id, replies[2].id}
    kept = [i for i in sorted(every) if i not in gone]
    assert [m.id for m in repository.history(db, conversation, 100)] == kept
    ctx = memory.load(db, bot_row, conversation, [], canary_line="c")
    # The summary was written from the deleted message: it is dropped, and the turns it
    # covered (those still allowed) are back until a fold writes it again.
    assert ctx.summary is None
    assert [i for t in ctx.history for i in t.message_ids] == kept
    prompt = memory.fit(ctx, memory.tokenizer())
    assert set(prompt.message_ids).isdisjoint(gone)
    assert "sourdough" not in prompt.messages[0]["content"]

    # A fold writes the summary again from what is left, never from what is gone.
    repository.request_fold(db, conversation, replies[1].id)
    db.commit()
    job_id = jobs.enqueue(
        db, memory.FOLD_TASK, conversation_id=conversation, through_id=replies[1].id
    ).id
    db.commit()
    with db.begin_nested():
        work = memory_tasks.prepare(
            db, job_id=job_id, conversation_id=conversation, through_id=replies[1].id
        )
    assert work is not None and work.summary is None and work.base_through == replies[0].id
    assert [i for t in work.turns for i in t.message_ids] == [replies[0].id, replies[1].id]


def test_token_counts_are_cached_and_exact_against_the_server(model_server: str) -> None:
    transport = CountingTransport()
    with Tokenizer([Endpoint(model_server, model=MODEL_ALIAS)], transport=transport) as tok:
        messages = [
            {"role": "system", "content": "You help customers of a bakery. Be brief."},
            {"role": "user", "content": "Do you have rye bread today?"},
            {"role": "assistant", "content": "Yes, we baked rye bread this morning."},
            {"role": "user", "content": "Great, please keep two loaves for me."},
        ]
        framing = tok.framing()
        counted = framing.base + sum(tok.count_many([m["content"] for m in messages]))
        counted += sum(framing.of(m["role"]) for m in messages[1:])
        with httpx.Client() as http:
            served = http.post(
                f"{model_server}/v1/chat/completions",
                json={"model": MODEL_ALIAS, "messages": messages, "max_tokens": 1},
            ).json()["usage"]["prompt_tokens"]
        assert counted == served

        sent = len(transport.requests)
        hits = tok.cache_info().hits
        assert tok.count_many([m["content"] for m in messages]) == [
            tok.count(m["content"]) for m in messages
        ]
        assert len(transport.requests) == sent  # every count came from the cache
        assert tok.cache_info().hits == hits + 2 * len(messages)
        assert tok.count("A text never counted before.") > 0
        assert transport.requests[sent:] == ["/extras/tokenize/count"]


def test_the_pipeline_counts_old_turns_from_the_cache(
    client: TestClient,
    db: Session,
    model_server: str,
    use_local_model: None,
) -> None:
    bot = _bot(db)
    _turn(client, db, bot, QUESTIONS[0])
    shared = memory.tokenizer()
    assert shared is not None
    before = shared.cache_info()
    _turn(client, db, bot, QUESTIONS[1])
    after = shared.cache_info()
    # The system message, the first question and the first reply were counted last turn.
    assert after.hits - before.hits >= 3
    # New: the second question, and the first reply if the previous turn had not seen it.
    assert after.misses - before.misses <= 2


def test_a_message_too_long_for_any_prompt_gets_the_fallback_without_the_model(
    client: TestClient, db: Session, model_server: str, use_local_model: None
) -> None:
    bot = _bot(db, context_tokens=256)  # budget 256 - 32 - 32 = 192 tokens
    reply = _turn(client, db, bot, "Please bake " + "a very large cake, " * 60)
    verdict = reply.verdict or {}
    assert "memory.too_long" in verdict["reasons"]
    assert verdict["action"] == "fallback" and verdict["budget"] == 192
    assert "prompt_tokens" not in verdict  # the model was not asked


def test_a_fold_already_covered_by_the_summary_only_clears_its_pending_mark(
    client: TestClient, db: Session, model_server: str, use_local_model: None
) -> None:
    bot = _bot(db)
    reply = _turn(client, db, bot, QUESTIONS[0])
    assert reply.reply_to_id is not None
    db.add(
        ConversationMemory(
            conversation_id=reply.conversation_id,
            summary="Asked for sourdough.",
            through_id=reply.id,
            source_ids=[reply.reply_to_id, reply.id],
            fold_through_id=reply.reply_to_id,
        )
    )
    job = jobs.enqueue(
        db, memory.FOLD_TASK, conversation_id=reply.conversation_id, through_id=reply.reply_to_id
    )
    db.commit()
    assert memory_tasks.fold_memory(job.id) == "done"
    db.expire_all()
    row = db.get(ConversationMemory, reply.conversation_id)
    assert row is not None and row.fold_through_id is None
    assert (row.summary, row.through_id, row.folds) == ("Asked for sourdough.", reply.id, 0)
