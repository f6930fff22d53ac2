"""The demo bot ``parley run`` applies when the database has no bot yet."""

from __future__ import annotations

import secrets

from bots.schemas import BotsFile, BotSpec, ChannelSpec, GenerationSpec, MetaAppSpec

DEMO_PHONE_NUMBER_ID = "100000000000001"

SYSTEM_PROMPT = (
    "You are Parley's demo assistant for a small coffee shop called Bean There. "
    "You answer questions about opening hours (8:00 to 18:00, Monday to Saturday), the menu "
    "(coffee, tea, pastries) and orders. Keep answers short and friendly."
)


def demo_bots() -> BotsFile:
    return BotsFile(
        workspace="demo",
        meta_apps=[
            MetaAppSpec(
                name="demo-app",
                app_secret=secrets.token_hex(16),
                verify_token=secrets.token_hex(8),
            )
        ],
        bots=[
            BotSpec(
                name="demo",
                system_prompt=SYSTEM_PROMPT,
                generation=GenerationSpec(temperature=0.3, max_tokens=96),
                channels=[
                    ChannelSpec(
                        type="whatsapp",
                        app="demo-app",
                        phone_number_id=DEMO_PHONE_NUMBER_ID,
                        access_token="sandbox-" + secrets.token_hex(12),
                    )
                ],
            )
        ],
    )
