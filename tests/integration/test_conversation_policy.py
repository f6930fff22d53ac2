"""One test per conversation rule of the pipeline, in-process, with a scripted model that
echoes what it was asked (so order and coalescing are visible in the replies)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from bots import lease, pipeline
from bots.policy import DEFAULT_NOTICES, Limits, Policy
from core.models import (
    Contact,
    Conversation,
    ConversationLease,
    Message,
    Notice,
    OutboxJob,
    Outcome,
    utcnow,
)
from tests.support.factories import WhatsAppBot, create_whatsapp_bot
from tests.support.servers import ScriptedModel, completion
from webhooks import simulator

USER = "15553334444"


@pytest.fixture
def echo_model(use_model: Callable[..., None]) -> Iterator[ScriptedModel]:
    def script(request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return completion("echo: " + request["messages"][-1]["content"])

    model = ScriptedModel(script)
    use_model(model.url)
    yield model
    model.close()


def make_bot(db: Session, **policy: Any) -> WhatsAppBot:
    bot = create_whatsapp_bot(db, policy=Policy(**{"burst_window_seconds": 0, **policy}))
    db.commit()
    return bot


def deliver(
    client: TestClient, bot: WhatsAppBot, text: str, *, ts: int | None = None, user: str = USER
) -> None:
    payload = simulator.whatsapp_text(
        phone_number_id=bot.phone_number_id, wa_id=user, text=text, timestamp=ts
    )
    body, headers = simulator.signed(payload, bot.app_secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200


def run_replies(db: Session) -> list[str]:
    db.expire_all()
    jobs = (
        db.execute(
            select(OutboxJob)
            .where(OutboxJob.task == "bots.reply", OutboxJob.state == "pending")
            .order_by(OutboxJob.id)
        )
        .scalars()
        .all()
    )
    return [pipeline.reply(j.id) for j in jobs]


def outcomes(db: Session) -> list[tuple[str, str]]:
    db.expire_all()
    rows = db.execute(
        select(Message.body, Outcome.kind)
        .join(Outcome, Outcome.inbound_id == Message.id)
        .order_by(Message.provider_ts, Message.id)
    ).all()
    return [(str(b), k) for b, k in rows]


def sent_texts(db: Session, kind: str = "text") -> list[str]:
    db.expire_all()
    return [
        str(b)
        for b in db.execute(
            select(Message.body)
            .where(Message.direction == "out", Message.kind == kind)
            .order_by(Message.id)
        ).scalars()
    ]


def notice_kinds(db: Session) -> list[str]:
    db.expire_all()
    return list(db.execute(select(Notice.kind).order_by(Notice.id)).scalars())


# --- order and bursts -----------------------------------------------------------------------


def test_a_burst_inside_the_window_is_answered_once(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db, burst_window_seconds=30)
    deliver(client, bot, "hi")
    deliver(client, bot, "I want to order")
    deliver(client, bot, "two croissants")
    assert set(run_replies(db)) == {"deferred"}  # the window is still open
    # Time passes (moved in the database rather than slept, so the test cannot race).
    db.execute(update(Message).values(created_at=Message.created_at - timedelta(seconds=31)))
    db.commit()
    assert "done" in run_replies(db)
    assert sent_texts(db) == ["echo: hi\nI want to order\ntwo croissants"]
    kinds = outcomes(db)
    assert [k for _, k in kinds] == ["replied"] * 3
    reply_ids = set(db.execute(select(Outcome.reply_id)).scalars())
    assert len(reply_ids) == 1
    assert len(echo_model.requests) == 1


def test_messages_are_answered_in_provider_timestamp_order(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db, burst_window_seconds=0)
    now = int(time.time())
    deliver(client, bot, "second", ts=now)
    deliver(client, bot, "first", ts=now - 5)  # Meta delivered it late
    run_replies(db)
    # One turn covers both, in timestamp order.
    assert sent_texts(db) == ["echo: first\nsecond"]


def test_a_late_message_after_a_later_reply_is_a_new_turn(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db)
    now = int(time.time())
    deliver(client, bot, "later", ts=now)
    run_replies(db)
    deliver(client, bot, "earlier", ts=now - 30)
    run_replies(db)
    assert sent_texts(db) == ["echo: later", "echo: earlier"]
    assert [k for _, k in outcomes(db)] == ["replied", "replied"]


def test_the_ai_disclosure_precedes_only_the_first_reply(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db)
    for text in ("hello", "and again"):
        deliver(client, bot, text)
        run_replies(db)
    assert notice_kinds(db) == ["disclosure"]
    out = (
        db.execute(select(Message.kind).where(Message.direction == "out").order_by(Message.id))
        .scalars()
        .all()
    )
    assert out == ["notice", "text", "text"]
    first_prompt = echo_model.requests[1]["messages"]
    # Notices never enter a prompt.
    assert all("automated assistant" not in m["content"] for m in first_prompt)


# --- opt-out, opt-in, languages ----------------------------------------------------------------


def test_stop_opts_out_with_one_confirmation_then_silence_until_start(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db, disclose_ai=False)
    deliver(client, bot, "STOP")
    run_replies(db)
    deliver(client, bot, "are you there?")
    run_replies(db)
    deliver(client, bot, "Start")
    run_replies(db)
    deliver(client, bot, "what time do you open?")
    run_replies(db)
    assert outcomes(db) == [
        ("STOP", "opted_out"),
        ("are you there?", "opted_out"),
        ("Start", "notice"),
        ("what time do you open?", "replied"),
    ]
    assert notice_kinds(db) == ["opt_out", "opt_in"]
    assert sent_texts(db) == ["echo: what time do you open?"]
    assert len(echo_model.requests) == 1


@pytest.mark.parametrize(
    ("greeting", "stop", "language"),
    [
        ("Hello, what time do you open tomorrow?", "STOP", "en"),
        ("Hola, ¿a qué hora abren mañana?", "BAJA", "es"),
        ("Hallo, wann habt ihr morgen geöffnet?", "STOPP", "de"),
        ("Bonjour, vous êtes ouverts demain ?", "ARRÊT", "fr"),
        ("Olá, vocês abrem amanhã de manhã?", "PARAR", "pt"),
        ("Ciao, siete aperti domani mattina?", "ANNULLA", "it"),
        ("नमस्ते, आप कल कितने बजे खुलते हैं?", "रोकें", "hi"),
    ],
)
def test_opt_out_keywords_and_notices_per_language(
    client: TestClient,
    db: Session,
    echo_model: ScriptedModel,
    greeting: str,
    stop: str,
    language: str,
) -> None:
    bot = make_bot(db, disclose_ai=False)
    deliver(client, bot, greeting)
    run_replies(db)
    deliver(client, bot, stop)
    run_replies(db)
    assert outcomes(db)[-1] == (stop, "opted_out")
    contact = db.execute(select(Contact)).scalar_one()
    assert contact.language == language and contact.opted_out_at is not None
    assert sent_texts(db, "notice") == [DEFAULT_NOTICES["opt_out"][language]]


def test_notices_fall_back_to_the_bots_language_and_accept_overrides(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db, language="es", notices={"opt_out": {"es": "Vale, ya no te escribimos."}})
    deliver(client, bot, "STOP")  # too short to tell its language: the bot's default applies
    run_replies(db)
    assert sent_texts(db, "notice") == ["Vale, ya no te escribimos."]


# --- humans --------------------------------------------------------------------------------------


def test_asking_for_a_human_hands_over_and_the_bot_stays_silent(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db, disclose_ai=False)
    deliver(client, bot, "Can I talk to a human please?")
    run_replies(db)
    deliver(client, bot, "hello?")
    run_replies(db)
    assert [k for _, k in outcomes(db)] == ["human_mode", "human_mode"]
    conversation = db.execute(select(Conversation)).scalar_one()
    assert conversation.mode == "human" and conversation.flagged == "human_requested"
    assert notice_kinds(db) == ["human"]
    assert echo_model.requests == []


def test_human_mode_ends_after_the_idle_timeout(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db, disclose_ai=False, human_idle_timeout_minutes=5)
    deliver(client, bot, "talk to a human")
    run_replies(db)
    db.execute(update(Conversation).values(mode_changed_at=utcnow() - timedelta(minutes=6)))
    db.commit()
    deliver(client, bot, "anyone?")
    run_replies(db)
    assert outcomes(db)[-1] == ("anyone?", "replied")
    assert db.execute(select(Conversation.mode)).scalar_one() == "bot"


def test_a_paused_conversation_stays_silent(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db)
    deliver(client, bot, "hi")
    db.execute(update(Conversation).values(mode="paused", mode_changed_at=utcnow()))
    db.commit()
    run_replies(db)
    assert outcomes(db) == [("hi", "human_mode")]


def test_blocked_contacts_get_nothing(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db)
    deliver(client, bot, "hi")
    db.execute(update(Contact).values(blocked_at=utcnow()))
    db.commit()
    run_replies(db)
    assert outcomes(db) == [("hi", "blocked")]
    assert sent_texts(db) == [] and sent_texts(db, "notice") == []


# --- limits and the window -------------------------------------------------------------------


def test_over_the_message_rate_one_notice_then_silence(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db, disclose_ai=False, limits=Limits(messages_per_minute=2))
    for i in range(4):
        deliver(client, bot, f"message {i}")
        run_replies(db)
    assert [k for _, k in outcomes(db)] == ["replied", "replied", "limited", "limited"]
    assert notice_kinds(db) == ["limit"]


def test_repeated_limits_propose_a_block(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db, disclose_ai=False, limits=Limits(tokens_per_day=1, propose_block_after=1))
    deliver(client, bot, "first")
    run_replies(db)  # answered: the scripted model reports 15 tokens
    deliver(client, bot, "second")
    run_replies(db)
    assert outcomes(db)[-1] == ("second", "limited")
    assert db.execute(select(Conversation.flagged)).scalar_one() == "propose_block"


def test_outside_the_window_nothing_is_generated(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db)
    deliver(client, bot, "old message", ts=int(time.time()) - 25 * 3600)
    run_replies(db)
    assert outcomes(db) == [("old message", "window_expired")]
    assert echo_model.requests == []


# --- the lane ---------------------------------------------------------------------------------


def test_a_held_lease_defers_and_an_expired_one_is_taken_over(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db)
    deliver(client, bot, "hi")
    conversation_id = db.execute(select(Conversation.id)).scalar_one()
    assert lease.acquire(db, conversation_id, "someone-else", 60)
    db.commit()
    assert run_replies(db) == ["deferred"]
    db.execute(update(ConversationLease).values(expires_at=utcnow() - timedelta(seconds=1)))
    db.commit()
    assert run_replies(db) == ["done"]
    assert db.execute(select(ConversationLease)).first() is None  # released


def test_a_worker_that_lost_its_lease_writes_nothing(
    client: TestClient, db: Session, use_model: Callable[..., None]
) -> None:
    bot = make_bot(db)
    deliver(client, bot, "hi")
    conversation_id = db.execute(select(Conversation.id)).scalar_one()

    def slow_then_stolen(request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        # While "this" worker waits on the model, another takes the conversation over.
        db.execute(update(ConversationLease).values(holder="thief"))
        return completion("too late")

    model = ScriptedModel(slow_then_stolen)
    try:
        use_model(model.url)
        assert run_replies(db) == ["deferred"]
    finally:
        model.close()
    assert outcomes(db) == [] and sent_texts(db) == []
    assert db.execute(select(ConversationLease.holder)).scalar_one() == "thief"
    assert conversation_id


def test_take_over_and_hand_back(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    from bots.service import set_mode
    from core.errors import BadRequest, NotFound

    bot = make_bot(db, disclose_ai=False)
    deliver(client, bot, "hello")
    run_replies(db)
    conversation = db.execute(select(Conversation)).scalar_one()
    set_mode(
        db, workspace_id=conversation.workspace_id, conversation_id=conversation.id, mode="human"
    )
    db.commit()
    deliver(client, bot, "is someone there?")
    run_replies(db)
    set_mode(
        db, workspace_id=conversation.workspace_id, conversation_id=conversation.id, mode="bot"
    )
    db.commit()
    deliver(client, bot, "back to the bot")
    run_replies(db)
    assert [k for _, k in outcomes(db)] == ["replied", "human_mode", "replied"]
    with pytest.raises(NotFound):
        set_mode(
            db,
            workspace_id=conversation.workspace_id + 999,
            conversation_id=conversation.id,
            mode="human",
        )
    with pytest.raises(BadRequest):
        set_mode(
            db,
            workspace_id=conversation.workspace_id,
            conversation_id=conversation.id,
            mode="robot",
        )


def test_a_message_arriving_while_the_model_answers_sees_that_answer_in_its_prompt(
    client: TestClient, db: Session, use_model: Callable[..., None]
) -> None:
    bot = make_bot(db, disclose_ai=False)
    prompts: list[list[dict[str, str]]] = []

    def script(request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        prompts.append(request["messages"])
        if len(prompts) == 1:
            # The user writes again while the first answer is being generated.
            deliver(client, bot, "second")
        return completion(f"answer {len(prompts)}")

    model = ScriptedModel(script)
    try:
        use_model(model.url)
        deliver(client, bot, "first")
        run_replies(db)
    finally:
        model.close()
    assert sent_texts(db) == ["answer 1", "answer 2"]
    # The second turn's prompt: first, its answer, then second — never "first\nsecond".
    assert [(m["role"], m["content"]) for m in prompts[1][1:]] == [
        ("user", "first"),
        ("assistant", "answer 1"),
        ("user", "second"),
    ]


def _deliver_image(client: TestClient, bot: WhatsAppBot, *, caption: str = "") -> None:
    payload = simulator.whatsapp_text(phone_number_id=bot.phone_number_id, wa_id=USER, text="x")
    message = payload["entry"][0]["changes"][0]["value"]["messages"][0]
    message.pop("text")
    message.update(
        type="image",
        image={"id": "1234567890", "mime_type": "image/jpeg", "sha256": "abc", "caption": caption},
    )
    body, headers = simulator.signed(payload, bot.app_secret)
    assert client.post("/webhooks/whatsapp", content=body, headers=headers).status_code == 200


def test_media_gets_a_localized_notice_and_text_in_the_same_burst_is_answered(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db, disclose_ai=False, language="es")
    _deliver_image(client, bot, caption="mira")
    deliver(client, bot, "¿Tenéis pan sin gluten?")
    run_replies(db)
    assert sent_texts(db, "notice") == [DEFAULT_NOTICES["media"]["es"]]
    assert sent_texts(db) == ["echo: ¿Tenéis pan sin gluten?"]
    kinds = dict(outcomes(db))
    assert kinds == {"[image] mira": "notice", "¿Tenéis pan sin gluten?": "replied"}
    # The image never reached the model's prompt.
    assert all("[image]" not in m["content"] for m in echo_model.requests[0]["messages"])


def test_a_turn_that_goes_to_the_model_asks_for_the_typing_indicator_once(
    client: TestClient, db: Session, echo_model: ScriptedModel
) -> None:
    bot = make_bot(db, disclose_ai=False)
    deliver(client, bot, "STOP")  # settled by policy: no model, no typing
    run_replies(db)
    deliver(client, bot, "START")
    run_replies(db)
    deliver(client, bot, "what's good today?")
    run_replies(db)
    db.expire_all()
    typing = (
        db.execute(select(OutboxJob.payload).where(OutboxJob.task == "webhooks.send_typing"))
        .scalars()
        .all()
    )
    newest = db.execute(select(func.max(Message.id)).where(Message.direction == "in")).scalar_one()
    assert typing == [{"message_id": newest}]


def _with_vision(monkeypatch: pytest.MonkeyPatch, chat: str, vision: str) -> None:
    from core.config import reset_settings

    monkeypatch.setenv(
        "PARLEY_INFERENCE_ENDPOINTS",
        f"{chat}#model=smollm2,{vision}#model=scout&role=vision",
    )
    reset_settings()


def test_with_a_vision_endpoint_a_downloaded_image_reaches_the_model(
    client: TestClient,
    db: Session,
    echo_model: ScriptedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.models.media import MediaItem

    vision = ScriptedModel(lambda _: completion("A croissant, freshly baked."))
    try:
        _with_vision(monkeypatch, echo_model.url, vision.url)
        bot = make_bot(db, disclose_ai=False)
        _deliver_image(client, bot, caption="what is this?")
        message = db.execute(select(Message).where(Message.kind == "media")).scalar_one()
        assert run_replies(db) == ["deferred"]  # the download has not run yet
        db.add(
            MediaItem(
                workspace_id=message.workspace_id,
                message_id=message.id,
                idx=0,
                kind="image",
                mime_type="image/jpeg",
                size=4,
                content=b"\xff\xd8jp",
                state="stored",
            )
        )
        db.commit()
        assert "done" in run_replies(db)
    finally:
        vision.close()
    assert sent_texts(db) == ["A croissant, freshly baked."]
    assert outcomes(db) == [("[image] what is this?", "replied")]
    assert echo_model.requests == []
    (request,) = vision.requests
    assert request["model"] == "scout"
    assert request["messages"][-1] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "[image] what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9hqcA=="}},
        ],
    }
