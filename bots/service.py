"""Applying bots YAML to the database: idempotent, declarative, never deletes.

The caller owns the transaction. A running platform reads bots and channel accounts from the
database on every webhook and task, so an applied change is live at the next message.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bots import repository
from bots.schemas import BotsFile, BotSpec
from core.errors import BadRequest, ConfigError, NotFound
from core.models import Bot, ChannelAccount, Conversation, MetaApp, Workspace, utcnow


@dataclass
class ApplyReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.created)} created, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged"
        )


def _sync(obj: Any, values: dict[str, Any]) -> bool:
    changed = False
    for key, value in values.items():
        if getattr(obj, key) != value:
            setattr(obj, key, value)
            changed = True
    return changed


def _note(report: ApplyReport, label: str, *, created: bool, changed: bool) -> None:
    if created:
        report.created.append(label)
    elif changed:
        report.updated.append(label)
    else:
        report.unchanged.append(label)


def _extra(current: dict[str, Any], bot_spec: BotSpec) -> dict[str, Any]:
    """The bot's ``extra``: its policy, memory settings and scope, and its window template when
    it has one."""
    extra = {**current, "policy": bot_spec.policy.model_dump(mode="json")}
    extra["memory"] = bot_spec.memory.model_dump(mode="json", exclude_none=True)
    extra["scope"] = bot_spec.scope
    extra.pop("window_template", None)
    if bot_spec.window_template is not None:
        extra["window_template"] = bot_spec.window_template.model_dump(mode="json")
    return extra


def apply_bots(session: Session, spec: BotsFile) -> ApplyReport:
    problems = spec.reference_errors()
    if problems:
        raise ConfigError("; ".join(message for _, message in problems))
    report = ApplyReport()
    workspace = repository.workspace_by_name(session, spec.workspace)
    created = workspace is None
    if workspace is None:
        workspace = Workspace(name=spec.workspace)
        session.add(workspace)
        session.flush()
    _note(report, f"workspace {spec.workspace}", created=created, changed=False)

    apps: dict[str, MetaApp] = {}
    for app_spec in spec.meta_apps:
        app = repository.meta_app(session, workspace.id, app_spec.name)
        created = app is None
        if app is None:
            app = MetaApp(workspace_id=workspace.id, name=app_spec.name)
            session.add(app)
        changed = _sync(
            app,
            {
                "app_id": app_spec.app_id,
                "app_secret": app_spec.app_secret,
                "verify_token": app_spec.verify_token,
                "messenger_verify_token": app_spec.messenger_verify_token,
                "instagram_verify_token": app_spec.instagram_verify_token,
                "instagram_app_secret": app_spec.instagram_app_secret,
            },
        )
        session.flush()
        apps[app_spec.name] = app
        _note(report, f"meta app {app_spec.name}", created=created, changed=changed)

    for bot_spec in spec.bots:
        bot = repository.bot(session, workspace.id, bot_spec.name)
        created = bot is None
        if bot is None:
            bot = Bot(
                workspace_id=workspace.id,
                name=bot_spec.name,
                canary_seed=secrets.token_hex(16),
                extra={},
            )
            session.add(bot)
        gen = bot_spec.generation
        changed = _sync(
            bot,
            {
                "system_prompt": bot_spec.system_prompt,
                "model": bot_spec.model,
                "temperature": gen.temperature,
                "max_tokens": gen.max_tokens,
                "top_p": gen.top_p,
                "stop": list(gen.stop),
                "seed": gen.seed,
                "history_turns": bot_spec.history_turns,
                "fallback_reply": bot_spec.fallback_reply,
                "extra": _extra(bot.extra, bot_spec),
            },
        )
        session.flush()
        _note(report, f"bot {bot_spec.name}", created=created, changed=changed)

        for channel in bot_spec.channels:
            label = f"{channel.type} account {channel.external_id}"
            account = repository.channel_account(session, channel.type, channel.external_id)
            if account is not None and account.workspace_id != workspace.id:
                raise ConfigError(f"{label} already belongs to another workspace")
            created = account is None
            if account is None:
                account = ChannelAccount(
                    workspace_id=workspace.id,
                    channel=channel.type,
                    external_id=channel.external_id,
                    status="active",
                )
                session.add(account)
            changed = _sync(
                account,
                {
                    "bot_id": bot.id,
                    "meta_app_id": apps[channel.app].id,
                    "access_token": channel.access_token,
                },
            )
            session.flush()
            _note(report, label, created=created, changed=changed)
    return report


MODES = ("bot", "human", "paused")


def set_mode(session: Session, *, workspace_id: int, conversation_id: int, mode: str) -> None:
    """Take a conversation over (``human``), pause it, or hand it back to the bot (``bot``).

    Scoped by workspace: a conversation of another workspace is :class:`NotFound`. Handing back
    also clears the "asked for a human" flag. The caller owns the transaction.
    """
    if mode not in MODES:
        raise BadRequest(f"mode must be one of {', '.join(MODES)}")
    conversation = session.scalars(
        select(Conversation).where(
            Conversation.id == conversation_id, Conversation.workspace_id == workspace_id
        )
    ).one_or_none()
    if conversation is None:
        raise NotFound("no such conversation")
    if conversation.mode != mode:
        conversation.mode, conversation.mode_changed_at = mode, utcnow()
    if mode == "bot" and conversation.flagged == "human_requested":
        conversation.flagged = None
    session.flush()
