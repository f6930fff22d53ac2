"""Typed factories: keyword-only, each returning what it created."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session

from bots import repository
from bots.policy import Policy
from bots.schemas import BotsFile, BotSpec, ChannelSpec, GenerationSpec, MetaAppSpec
from bots.service import apply_bots


@dataclass(frozen=True)
class WhatsAppBot:
    workspace: str
    bot_id: int
    phone_number_id: str
    app_secret: str
    verify_token: str
    access_token: str


def create_whatsapp_bot(
    session: Session,
    *,
    workspace: str | None = None,
    phone_number_id: str | None = None,
    system_prompt: str = "You are a helpful assistant for a bakery. Answer in one sentence.",
    max_tokens: int = 48,
    history_turns: int = 12,
    policy: Policy | None = None,
) -> WhatsAppBot:
    """A WhatsApp bot; its burst window is 0 unless ``policy`` says otherwise, so a test's
    message is answered on the first run of its job."""
    workspace = workspace or f"ws-{secrets.token_hex(3)}"
    phone_number_id = phone_number_id or str(100000000000000 + secrets.randbelow(10**12))
    secret, verify, token = secrets.token_hex(16), secrets.token_hex(8), secrets.token_hex(12)
    spec = BotsFile(
        workspace=workspace,
        meta_apps=[MetaAppSpec(name="app", app_secret=secret, verify_token=verify)],
        bots=[
            BotSpec(
                name="bot",
                system_prompt=system_prompt,
                generation=GenerationSpec(temperature=0.0, max_tokens=max_tokens, seed=7),
                history_turns=history_turns,
                policy=policy or Policy(burst_window_seconds=0),
                channels=[
                    ChannelSpec(
                        type="whatsapp",
                        app="app",
                        phone_number_id=phone_number_id,
                        access_token=token,
                    )
                ],
            )
        ],
    )
    apply_bots(session, spec)
    session.flush()
    ws = repository.workspace_by_name(session, workspace)
    assert ws is not None
    bot = repository.bot(session, ws.id, "bot")
    assert bot is not None
    return WhatsAppBot(workspace, bot.id, phone_number_id, secret, verify, token)
