"""Webhook intake: verify, parse, store in one transaction, enqueue after commit.

The caller (the group-commit writer in ``webhooks/batcher.py``) owns the transaction: this
module only flushes. A 2xx may be returned only after the session commits. Every event of a
delivery is applied in one transaction; if any of them raises, the exception propagates, the
delivery is rolled back (alone: the batcher re-applies the others of its batch) and answered
5xx so Meta retries it (message ids and upserts make the retry safe).

What each event does (``webhooks/channels/events.py`` defines them):

- a message of any content kind is stored once (``UNIQUE (channel, provider_message_id)``) with
  ``messages.kind`` and a text rendering in ``body``; the details go to ``content`` (JSON).
  Text, location, contacts, choices and story replies enqueue ``bots.reply``; media,
  unsupported messages and story mentions get the outcome ``notice`` at intake (not answerable
  yet; ``detail`` says why); anything from ``standby[]`` gets ``human_mode``. So every stored
  inbound message has exactly one outcome.
- reactions keep the newest reaction per message (``reactions``); a Messenger reaction also
  reopens the 24-hour window.
- edits replace the body and clear ``body_redacted`` (screened again before any prompt);
  deletes erase body, redacted copy and content (kind ``deleted``), and a message still
  waiting for its reply gets the outcome ``deleted``.
- echoes of our own app settle an ``unknown`` chunk (Messenger ``metadata`` is the chunk's
  idempotency key; Instagram has no such field, so the echo's text is matched against the
  unresolved chunks); an echo from another app or from staff is stored as an outbound ``human``
  message and puts the conversation in human mode.
- handover: control passed to another app → human mode; passed to or taken back by our app →
  bot mode; a request for control flags the conversation ``handover_requested``.
- reads / deliveries move sent chunks forward; WhatsApp statuses as before.
- WhatsApp ``user_preferences`` stop/resume set/clear ``marketing_opted_out_at`` and
  ``opted_out_at``; template status updates are kept in ``templates``; Messenger opt-ins in
  ``optins`` (token encrypted); referrals and everything else in ``unhandled_events``.
- an event for an account the signing app does not own is recorded as ``unroutable``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy.orm import Session

from core import jobs
from core.errors import BadRequest, Forbidden, Unauthorized
from core.models import ChannelAccount, utcnow
from webhooks import repository
from webhooks.channels import instagram, messenger, meta, whatsapp
from webhooks.channels.events import (
    ChannelEvent,
    DeliveryReceipt,
    Handover,
    InboundChoice,
    InboundContacts,
    InboundLocation,
    InboundMedia,
    InboundReferral,
    InboundStoryMention,
    InboundStoryReply,
    InboundText,
    InboundUnsupported,
    MarketingPreference,
    Media,
    MessageDeleted,
    MessageEcho,
    MessageEdited,
    OptIn,
    Reaction,
    ReadReceipt,
    StatusUpdate,
    TemplateStatus,
    Unhandled,
    triggers_reply,
)
from webhooks.directory import Directory, Route

log = structlog.get_logger()

CHANNELS = ("whatsapp", "messenger", "instagram")
PARSERS: dict[str, Callable[[Any], list[ChannelEvent]]] = {
    "whatsapp": whatsapp.parse_events,
    "messenger": messenger.parse,
    "instagram": instagram.parse,
}

InboundMessage = (
    InboundText
    | InboundMedia
    | InboundLocation
    | InboundContacts
    | InboundChoice
    | InboundStoryReply
    | InboundUnsupported
    | InboundStoryMention
)
_INBOUND = (
    InboundText,
    InboundMedia,
    InboundLocation,
    InboundContacts,
    InboundChoice,
    InboundStoryReply,
    InboundUnsupported,
    InboundStoryMention,
)
# Fields of an event that are columns or routing, not content.
_NOT_CONTENT = frozenset(
    {"channel", "account_id", "contact_id", "contact_name", "message_id", "timestamp", "standby"}
)


@dataclass
class IntakeResult:
    stored: list[int] = field(default_factory=list)
    duplicates: int = 0
    statuses: int = 0
    updated: int = 0  # edits, deletes, reactions, receipts, echoes, modes, preferences …
    unhandled: int = 0
    unroutable: int = 0

    def as_json(self) -> dict[str, int]:
        return {
            "stored": len(self.stored),
            "duplicates": self.duplicates,
            "statuses": self.statuses,
            "updated": self.updated,
            "unhandled": self.unhandled,
            "unroutable": self.unroutable,
        }


def verify_handshake(session: Session, query: meta.Handshake, channel: str = "whatsapp") -> str:
    """Answer ``channel``'s handshake with any app's token for that channel."""
    tokens = [app.verify_token_for(channel) for app in repository.meta_apps(session)]
    return meta.answer_handshake(query, tokens)


def signing_app(
    apps: Sequence[repository.AppSecrets], body: bytes, signature: str | None, channel: str
) -> repository.AppSecrets | None:
    """The app whose secret for ``channel`` signed ``body``; None when none did. Raises
    :class:`Unauthorized` when the signature header is missing or malformed."""
    try:
        index = meta.verify_signature(body, signature, [app.secret_for(channel) for app in apps])
    except meta.SignatureError as exc:
        if exc.missing:
            log.warning("webhooks.signature_rejected", channel=channel, reason=exc.reason)
            raise Unauthorized(exc.reason) from exc
        return None
    return apps[index]


def reject_signature(channel: str) -> Forbidden:
    reason = "signature does not match any app secret"
    log.warning("webhooks.signature_rejected", channel=channel, reason=reason)
    return Forbidden(reason)


def authenticate(
    session: Session, body: bytes, signature: str | None, channel: str = "whatsapp"
) -> repository.AppSecrets:
    """The Meta app whose secret for ``channel`` signed ``body`` (401/403 otherwise)."""
    app = signing_app(repository.meta_apps(session), body, signature, channel)
    if app is None:
        raise reject_signature(channel)
    return app


def decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest("body is not valid JSON", code="invalid_json") from exc


def parse(channel: str, body: bytes) -> list[ChannelEvent]:
    """The typed events of a verified delivery (400 when the body is not JSON)."""
    return PARSERS[channel](decode(body))


def signed_statuses(
    app: repository.AppSecrets, events: Sequence[ChannelEvent]
) -> list[repository.SignedStatus]:
    return [repository.SignedStatus(app.id, e) for e in events if isinstance(e, StatusUpdate)]


def intake(
    session: Session, channel: str, body: bytes, signature: str | None, directory: Directory
) -> IntakeResult:
    """One delivery in the caller's transaction, through the same set-wise path as the group
    commit (for in-process callers). The caller must not reuse ``directory`` after a rollback
    without :meth:`Directory.forget`; this forgets it when the delivery fails."""
    app = authenticate(session, body, signature, channel)
    try:
        return apply_deliveries(session, [Delivery(channel, app, parse(channel, body))], directory)[
            0
        ]
    except Exception:
        directory.forget()
        raise


def store_events(
    session: Session,
    app: repository.AppSecrets,
    events: Sequence[ChannelEvent],
    *,
    channel: str,
) -> IntakeResult:
    """Apply every event of one delivery in the caller's transaction (flushes only), event by
    event with uncached routing. An exception from any event propagates: the caller must roll
    the whole delivery back."""
    intake = _Intake(session, app)
    for event in events:
        intake.apply(event)
    result = intake.result
    if result.statuses:
        repository.apply_statuses(session, signed_statuses(app, events), now=utcnow())
    return result


# --- many deliveries in one transaction ----------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One verified, parsed webhook request."""

    channel: str
    app: repository.AppSecrets
    events: list[ChannelEvent]


def apply_deliveries(
    session: Session, deliveries: Sequence[Delivery], directory: Directory
) -> list[IntakeResult]:
    """Apply deliveries in arrival order in the caller's transaction; one result each.

    Runs of deliveries made only of inbound messages and statuses whose accounts the signing app
    owns (the common case) are applied set-wise: a few statements for the whole run
    (:func:`_apply_run`). Any other delivery is applied event by event (:func:`store_events`)
    after the run before it, so the order of effects is the order of arrival."""
    keys = {
        (e.channel, e.account_id) for d in deliveries for e in d.events if isinstance(e, _INBOUND)
    }
    routed = directory.routes(session, keys) if keys else {}
    results: list[IntakeResult] = []
    run: list[tuple[Delivery, IntakeResult]] = []
    for delivery in deliveries:
        if _set_wise(delivery, routed):
            result = IntakeResult()
            run.append((delivery, result))
        else:
            _apply_run(session, run, routed, directory)
            run = []
            result = store_events(session, delivery.app, delivery.events, channel=delivery.channel)
        results.append(result)
    _apply_run(session, run, routed, directory)
    return results


def _set_wise(delivery: Delivery, routed: dict[tuple[str, str], Route]) -> bool:
    for event in delivery.events:
        if isinstance(event, StatusUpdate):
            continue
        if not isinstance(event, _INBOUND):
            return False
        route = routed.get((event.channel, event.account_id))
        if route is None or route.meta_app_id != delivery.app.id:
            return False  # the event-wise path records it as unroutable
    return True


def _apply_run(
    session: Session,
    run: Sequence[tuple[Delivery, IntakeResult]],
    routed: dict[tuple[str, str], Route],
    directory: Directory,
) -> None:
    if not run:
        return
    statuses: list[repository.SignedStatus] = []
    pending: list[tuple[InboundMessage, Route, IntakeResult]] = []
    seen: set[tuple[str, str]] = set()
    for delivery, result in run:
        for event in delivery.events:
            if isinstance(event, StatusUpdate):
                result.statuses += 1
                statuses.append(repository.SignedStatus(delivery.app.id, event))
                continue
            assert isinstance(event, _INBOUND)
            if (event.channel, event.message_id) in seen:
                result.duplicates += 1  # the same message earlier in this batch
                continue
            seen.add((event.channel, event.message_id))
            pending.append((event, routed[(event.channel, event.account_id)], result))
    threads = _conversations(session, pending, directory)
    rows = []
    for event, route, _ in pending:
        kind, body = render(event)
        rows.append(
            repository.InboundRow(
                workspace_id=route.workspace_id,
                conversation_id=threads[(route.id, event.contact_id)],
                channel=event.channel,
                kind=kind,
                provider_message_id=event.message_id,
                provider_ts=event.timestamp,
                body=body,
                content=content_of(event),
            )
        )
    stored = repository.insert_inbound_many(session, rows)
    work: list[tuple[str, dict[str, Any]]] = []
    for (event, _, result), row in zip(pending, rows, strict=True):
        message_id = stored.get((row.channel, row.provider_message_id))
        if message_id is None:
            result.duplicates += 1
            continue
        result.stored.append(message_id)
        if row.kind == "media":
            work.append(("maintenance.fetch_media", {"message_id": message_id}))
        settled = _settle_kind(event)
        if settled is None:
            work.append(("bots.reply", {"message_id": message_id}))
        else:
            repository.settle_at_intake(
                session,
                inbound_id=message_id,
                conversation=row.conversation_id,
                kind=settled[0],
                detail=settled[1],
            )
    jobs.enqueue_many(session, work)
    if statuses:
        repository.apply_statuses(session, statuses, now=utcnow())


# --- rendering ------------------------------------------------------------------------------


def _media_label(media: Sequence[Media]) -> str:
    kinds = ["voice" if m.voice else m.kind for m in media]
    return "[" + ", ".join(dict.fromkeys(kinds) or ["attachment"]) + "]"


def _join(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)


def _coords(lat: float, lon: float) -> str:
    return f"({lat:g}, {lon:g})"


def render(event: InboundMessage) -> tuple[str, str | None]:
    """``(messages.kind, body)``: the stored kind and the text the pipeline and views show."""
    if isinstance(event, InboundText):
        return "text", event.text
    if isinstance(event, InboundMedia):
        return "media", _join(_media_label(event.media), event.caption)
    if isinstance(event, InboundLocation):
        place = _join(event.name, event.address)
        return "location", _join("[location]", place, _coords(event.latitude, event.longitude))
    if isinstance(event, InboundContacts):
        names = ", ".join(
            c.name or (c.phones[0].phone if c.phones else None) or "?" for c in event.contacts
        )
        return "contacts", _join("[contacts]", names or None)
    if isinstance(event, InboundChoice):
        return "choice", event.title or event.payload
    if isinstance(event, InboundStoryReply):
        return "story_reply", _join("[story reply]", event.text)
    if isinstance(event, InboundUnsupported):
        return "unsupported", _join("[unsupported]", event.unsupported_type)
    return "story_mention", "[story mention]"


def content_of(event: Any) -> str | None:
    """The event's content beyond ``body`` as JSON (None for plain text)."""
    if isinstance(event, InboundText) and not (event.reply_to or event.referral or event.forwarded):
        return None
    data = {
        k: v
        for k, v in dataclasses.asdict(event).items()
        if k not in _NOT_CONTENT and v not in (None, (), [], False)
    }
    data["type"] = type(event).__name__
    return json.dumps(data, ensure_ascii=False, default=str, sort_keys=True)


def _not_answered(event: InboundMessage) -> str | None:
    """Why an inbound message is settled at intake instead of going to the pipeline."""
    if getattr(event, "standby", False):
        return None  # handled as human_mode by the caller
    # Media and unsupported messages go to the conversation lane like text (so everything a
    # user sends is handled in order); the pipeline answers them with a localized notice.
    if isinstance(event, InboundStoryMention):
        return "not answered: story mention"
    return None


def _conversations(
    session: Session,
    pending: Sequence[tuple[InboundMessage, Route, IntakeResult]],
    directory: Directory,
) -> dict[tuple[int, str], int]:
    """``(account id, contact) -> conversation id`` for the run: remembered ones from the
    directory, the others read or created in one statement."""
    wanted = {(route.id, event.contact_id) for event, route, _ in pending}
    known = directory.conversations(wanted)
    new = [
        repository.ThreadKey(
            workspace_id=route.workspace_id,
            bot_id=route.bot_id,
            account_id=route.id,
            channel=route.channel,
            contact=event.contact_id,
            name=getattr(event, "contact_name", None),
        )
        for event, route, _ in pending
        if (route.id, event.contact_id) not in known
    ]
    if new:
        found = repository.conversation_ids(session, new)
        directory.remember(found)
        known.update(found)
    return known


def _settle_kind(event: InboundMessage) -> tuple[str, str] | None:
    """``(outcome kind, detail)`` for an inbound message settled at intake; None when it goes to
    the pipeline (``bots.reply``)."""
    if getattr(event, "standby", False):
        return "human_mode", "standby: another app controls the thread"
    reason = _not_answered(event)
    if reason is not None or not triggers_reply(event):
        return "notice", reason or "not answered"
    return None


# --- the per-delivery applier ---------------------------------------------------------------


class _Intake:
    def __init__(self, session: Session, app: repository.AppSecrets) -> None:
        self.session = session
        self.app = app
        self.result = IntakeResult()
        self._accounts: dict[tuple[str, str], ChannelAccount | None] = {}

    def apply(self, event: ChannelEvent) -> None:
        if isinstance(event, Unhandled):
            self._record(event.channel, event.reason, event.raw)
            return
        if isinstance(event, StatusUpdate):
            self.result.statuses += 1  # applied together after the loop
            return
        if isinstance(event, TemplateStatus):
            self._template(event)
            return
        account = self._route(event)
        if account is None:
            return
        if isinstance(event, _INBOUND):
            self._inbound(account, event)
        elif isinstance(event, Reaction):
            self._reaction(account, event)
        elif isinstance(event, MessageEdited):
            self._edit(account, event)
        elif isinstance(event, MessageDeleted):
            self._delete(account, event)
        elif isinstance(event, MessageEcho):
            self._echo(account, event)
        elif isinstance(event, ReadReceipt | DeliveryReceipt):
            self._receipt(account, event)
        elif isinstance(event, Handover):
            self._handover(account, event)
        elif isinstance(event, MarketingPreference):
            self._preference(account, event)
        elif isinstance(event, OptIn):
            self._optin(account, event)
        elif isinstance(event, InboundReferral):  # context only, kept for the record
            self._record(event.channel, "referral", dataclasses.asdict(event))

    # --- helpers

    def _record(self, channel: str, reason: str, raw: Any) -> None:
        self.result.unhandled += 1
        repository.record_unhandled(
            self.session,
            channel=channel,
            reason=reason,
            payload=json.dumps(raw, ensure_ascii=False, default=str),
        )

    def _route(self, event: Any) -> ChannelAccount | None:
        key = (event.channel, event.account_id)
        if key not in self._accounts:
            self._accounts[key] = repository.routed_account(
                self.session, channel=key[0], external_id=key[1], meta_app_id=self.app.id
            )
        account = self._accounts[key]
        if account is None:
            # A valid signature for an account this app does not own: acknowledge, record,
            # count, and do nothing else (a non-2xx would only make Meta retry for days).
            self.result.unroutable += 1
            repository.record_unhandled(
                self.session,
                channel=event.channel,
                reason="unroutable",
                payload=json.dumps(
                    {
                        "account_id": event.account_id,
                        "event": type(event).__name__,
                        "message_id": getattr(event, "message_id", None),
                    }
                ),
            )
            log.warning("webhooks.unroutable", channel=event.channel, account_id=event.account_id)
        return account

    def _thread(
        self, account: ChannelAccount, contact: str, name: str | None = None
    ) -> tuple[int, int]:
        """(contact id, conversation id), created when new."""
        contact_id = repository.contact_id(
            self.session,
            workspace_id=account.workspace_id,
            channel=account.channel,
            external_id=contact,
            name=name,
        )
        conversation = repository.conversation_id(self.session, account=account, contact=contact_id)
        return contact_id, conversation

    # --- events

    def _inbound(self, account: ChannelAccount, event: InboundMessage) -> None:
        _, conversation = self._thread(
            account, event.contact_id, getattr(event, "contact_name", None)
        )
        kind, body = render(event)
        message_id = repository.insert_inbound(
            self.session,
            workspace_id=account.workspace_id,
            conversation=conversation,
            channel=event.channel,
            provider_message_id=event.message_id,
            provider_ts=event.timestamp,
            body=body,
            kind=kind,
            content=content_of(event),
        )
        if message_id is None:
            self.result.duplicates += 1
            return
        self.result.stored.append(message_id)
        if kind == "media":
            # Downloaded in the maintenance lane, through the SSRF-safe fetcher, stored encrypted.
            jobs.enqueue(self.session, "maintenance.fetch_media", message_id=message_id)
        repository.touch_conversation(self.session, conversation, event.timestamp)
        settled = _settle_kind(event)
        if settled is None:
            jobs.enqueue(self.session, "bots.reply", message_id=message_id)
        else:
            repository.settle_at_intake(
                self.session,
                inbound_id=message_id,
                conversation=conversation,
                kind=settled[0],
                detail=settled[1],
            )

    def _reaction(self, account: ChannelAccount, event: Reaction) -> None:
        _, conversation = self._thread(account, event.contact_id)
        target = repository.message_by_provider_id(
            self.session,
            conversation=conversation,
            channel=event.channel,
            provider_message_id=event.target_message_id,
        )
        repository.upsert_reaction(
            self.session,
            workspace_id=account.workspace_id,
            conversation=conversation,
            channel=event.channel,
            target=event.target_message_id,
            message_id=target,
            emoji=event.emoji,
            reaction=event.reaction,
            removed=event.removed,
            at=event.timestamp,
        )
        if event.channel == "messenger" and not event.standby:
            # A reaction is a user action: it reopens Messenger's 24-hour window.
            repository.touch_conversation(self.session, conversation, event.timestamp)
        self.result.updated += 1

    def _edit(self, account: ChannelAccount, event: MessageEdited) -> None:
        conversation = repository.find_conversation(
            self.session, account=account, contact=event.contact_id
        )
        body = _join(_media_label(event.media) if event.media else None, event.text)
        edited = None
        if conversation is not None:
            edited = repository.edit_inbound(
                self.session,
                conversation=conversation,
                channel=event.channel,
                provider_message_id=event.original_message_id,
                body=body or None,
                content=content_of(event) if event.media else None,
            )
        if edited is None:
            self._record(
                event.channel, "edit_of_unknown_message", {"id": event.original_message_id}
            )
            return
        self.result.updated += 1

    def _delete(self, account: ChannelAccount, event: MessageDeleted) -> None:
        conversation = repository.find_conversation(
            self.session, account=account, contact=event.contact_id
        )
        erased = None
        if conversation is not None:
            erased = repository.erase_inbound(
                self.session,
                conversation=conversation,
                channel=event.channel,
                provider_message_id=event.original_message_id,
            )
        if conversation is None or erased is None:
            self._record(
                event.channel, "delete_of_unknown_message", {"id": event.original_message_id}
            )
            return
        # Still waiting for its reply: it is settled as deleted (no-op if it has an outcome).
        repository.settle_at_intake(
            self.session,
            inbound_id=erased,
            conversation=conversation,
            kind="deleted",
            detail="deleted by the contact",
        )
        self.result.updated += 1

    def _echo(self, account: ChannelAccount, event: MessageEcho) -> None:
        _, conversation = self._thread(account, event.contact_id)
        self.result.updated += 1
        if self._ours(conversation, event):
            return
        # Staff replying from the Page inbox / Instagram app, or another app: a human has the
        # conversation.
        stored = repository.insert_human_outbound(
            self.session,
            workspace_id=account.workspace_id,
            conversation=conversation,
            channel=event.channel,
            provider_message_id=event.message_id,
            provider_ts=event.timestamp,
            body=_join(_media_label(event.media) if event.media else None, event.text) or None,
            content=content_of(event) if event.media else None,
        )
        if stored is not None:
            repository.set_mode(self.session, conversation, mode="human", at=event.timestamp)
            log.info("webhooks.human_echo", channel=event.channel, conversation_id=conversation)

    def _ours(self, conversation: int, event: MessageEcho) -> bool:
        """Whether the echo is of a message this app sent, settling its chunk if unresolved."""
        now = utcnow()
        if repository.chunk_of_provider_id(
            self.session, channel=event.channel, provider_message_id=event.message_id
        ):
            return True
        # Messenger echoes our metadata (the chunk's idempotency key), whether or not the bots
        # file names the Meta app id; the app id alone also marks an echo as ours.
        by_key = bool(event.metadata) and repository.is_our_chunk_key(
            self.session, conversation=conversation, key=event.metadata or ""
        )
        by_app = self.app.app_id is not None and event.app_id == self.app.app_id
        if by_key or by_app:
            repository.settle_echoed_chunk(
                self.session,
                conversation=conversation,
                provider_message_id=event.message_id,
                now=now,
                key=event.metadata,
            )
            return True
        if event.channel != "instagram" or event.app_id is not None:
            return False
        # Instagram echoes carry no app id and no metadata: an echo whose text matches a send
        # of ours that has no answer yet is ours (instagram.match_echo).
        echo = instagram.echo_of(event)
        if echo is None:
            return False
        candidates = [
            instagram.PendingSend(
                chunk_id=c.id,
                recipient=event.contact_id,
                text_hash=instagram.text_hash(c.body),
                sent_at=c.since or now,
            )
            for c in repository.unresolved_chunks(self.session, conversation)
        ]
        match = instagram.match_echo(candidates, echo)
        if match is None:
            return False
        repository.settle_echoed_chunk(
            self.session,
            conversation=conversation,
            provider_message_id=event.message_id,
            now=now,
            chunk_id=match.chunk_id,
        )
        return True

    def _receipt(self, account: ChannelAccount, event: ReadReceipt | DeliveryReceipt) -> None:
        conversation = repository.find_conversation(
            self.session, account=account, contact=event.contact_id
        )
        if conversation is None:
            return
        if isinstance(event, ReadReceipt):
            repository.advance_delivery(
                self.session,
                conversation=conversation,
                delivery="read",
                up_to=event.watermark,
                through_provider_message_id=event.message_id,
            )
        else:
            repository.advance_delivery(
                self.session,
                conversation=conversation,
                delivery="delivered",
                up_to=event.watermark,
                provider_message_ids=event.message_ids,
            )
        self.result.updated += 1

    def _handover(self, account: ChannelAccount, event: Handover) -> None:
        _, conversation = self._thread(account, event.contact_id)
        self.result.updated += 1
        if event.action == "request_thread_control":
            repository.flag_conversation(self.session, conversation, reason="handover_requested")
            return
        if event.new_owner_app_id is not None:
            ours = self.app.app_id is not None and event.new_owner_app_id == self.app.app_id
        else:
            ours = event.action == "take_thread_control"
        mode = "bot" if ours else "human"
        repository.set_mode(self.session, conversation, mode=mode, at=event.timestamp)

    def _preference(self, account: ChannelAccount, event: MarketingPreference) -> None:
        contact, _ = self._thread(account, event.contact_id)
        repository.set_marketing_preference(
            self.session, contact, stop=event.value == "stop", at=event.timestamp
        )
        self.result.updated += 1

    def _template(self, event: TemplateStatus) -> None:
        repository.upsert_template(
            self.session,
            meta_app_id=self.app.id,
            waba_id=event.account_id,
            name=event.name,
            language=event.language or "",
            template_id=event.template_id,
            status=event.status,
            reason=event.reason,
            at=event.timestamp,
        )
        self.result.updated += 1

    def _optin(self, account: ChannelAccount, event: OptIn) -> None:
        contact = self._thread(account, event.contact_id)[0] if event.contact_id else None
        subject = event.contact_id or (f"user_ref:{event.user_ref}" if event.user_ref else None)
        if subject is None:
            self._record(event.channel, "optin_without_subject", {"type": event.type})
            return
        repository.upsert_optin(
            self.session,
            values={
                "workspace_id": account.workspace_id,
                "channel_account_id": account.id,
                "contact_id": contact,
                "subject": subject,
                "topic": event.type or "plugin",
                "payload": event.payload,
                "ref": event.ref,
                "title": event.title,
                "token": event.token,
                "token_expires_at": event.token_expires_at,
                "notification_status": event.notification_status,
                "frequency": event.frequency,
                "opted_at": event.timestamp,
            },
        )
        self.result.updated += 1
