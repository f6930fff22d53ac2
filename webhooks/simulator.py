"""Webhook deliveries exactly as Meta sends them: used by ``parley chat`` and the tests.

Meta serializes with escaped unicode (``\\u00e9``) and signs those raw bytes with the app secret.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from webhooks.channels.meta import sign


def new_wamid() -> str:
    return "wamid.HBgL" + secrets.token_hex(16).upper()


def whatsapp_text(
    *,
    phone_number_id: str,
    wa_id: str,
    text: str,
    name: str = "Test User",
    message_id: str | None = None,
    timestamp: int | None = None,
    display_phone_number: str = "15550000000",
) -> dict[str, Any]:
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
                                "display_phone_number": display_phone_number,
                                "phone_number_id": phone_number_id,
                            },
                            "contacts": [{"profile": {"name": name}, "wa_id": wa_id}],
                            "messages": [
                                {
                                    "from": wa_id,
                                    "id": message_id or new_wamid(),
                                    "timestamp": str(timestamp or int(time.time())),
                                    "type": "text",
                                    "text": {"body": text},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }


def encode(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode()


def signed(payload: Any, secret: str) -> tuple[bytes, dict[str, str]]:
    body = encode(payload)
    return body, {"Content-Type": "application/json", "X-Hub-Signature-256": sign(body, secret)}


def whatsapp_status(
    *,
    phone_number_id: str,
    message_id: str,
    status: str,
    recipient_id: str,
    callback_data: str | None = None,
    timestamp: int | None = None,
    error_code: int | None = None,
    display_phone_number: str = "15550000000",
) -> dict[str, Any]:
    """A ``statuses`` webhook for one outbound message, as Meta sends it."""
    item: dict[str, Any] = {
        "id": message_id,
        "status": status,
        "timestamp": str(timestamp or int(time.time())),
        "recipient_id": recipient_id,
    }
    if status in ("sent", "delivered"):
        item["conversation"] = {"id": secrets.token_hex(16), "origin": {"type": "service"}}
        item["pricing"] = {"billable": False, "pricing_model": "PMP", "category": "service"}
    if callback_data is not None:
        item["biz_opaque_callback_data"] = callback_data
    if error_code is not None:
        item["errors"] = [{"code": error_code, "title": "Message failed to send"}]
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
                                "display_phone_number": display_phone_number,
                                "phone_number_id": phone_number_id,
                            },
                            "statuses": [item],
                        },
                    }
                ],
            }
        ],
    }
