"""The normalized event set: the supported-events table, reply triggers, readers."""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from webhooks.channels import events, instagram, messenger, whatsapp
from webhooks.channels.events import (
    SUPPORTED_EVENTS,
    ChannelEvent,
    read_float,
    read_id,
    read_str,
    read_time,
    triggers_reply,
)

PAYLOADS = Path(__file__).parents[1] / "payloads"
PARSERS: dict[str, Callable[[Any], list[ChannelEvent]]] = {
    "whatsapp": whatsapp.parse_events,
    "messenger": messenger.parse,
    "instagram": instagram.parse,
}
EVENT_CLASSES = typing.get_args(ChannelEvent)


def _table() -> dict[str, dict[str, bool]]:
    """event class → channel → whether the table lists a source shape for it."""
    rows = [line for line in SUPPORTED_EVENTS.splitlines() if line.startswith("| `")]
    table: dict[str, dict[str, bool]] = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        name = cells[0].strip("`")
        table[name] = {
            channel: not cell.startswith("—")
            for channel, cell in zip(PARSERS, cells[1:4], strict=True)
        }
    return table


def _produced(channel: str) -> set[str]:
    names: set[str] = set()
    for path in (PAYLOADS / channel).glob("*.json"):
        names |= {type(event).__name__ for event in PARSERS[channel](json.loads(path.read_text()))}
    return names


def test_the_table_lists_every_event_class_once() -> None:
    assert sorted(_table()) == sorted(cls.__name__ for cls in EVENT_CLASSES)


@pytest.mark.parametrize("channel", list(PARSERS))
def test_the_table_matches_the_recorded_payloads(channel: str) -> None:
    """A kind the table claims for a channel has a recorded payload, and every kind a recorded
    payload produces is in the table for that channel."""
    claimed = {name for name, channels in _table().items() if channels[channel]}
    assert _produced(channel) == claimed


def test_reply_triggers_follow_the_table() -> None:
    table_says = {
        row.split(" | ")[0].strip("| `"): row.rsplit(" | ", 1)[1].rstrip(" |").startswith("yes")
        for row in SUPPORTED_EVENTS.splitlines()
        if row.startswith("| `")
    }
    assert {cls.__name__: cls.TRIGGERS_REPLY for cls in EVENT_CLASSES} == table_says


def test_standby_events_never_trigger_a_reply() -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    message = events.InboundText("messenger", "1", "2", None, "m_1", when, "hi")
    assert triggers_reply(message)
    assert not triggers_reply(
        events.InboundText("messenger", "1", "2", None, "m_1", when, "hi", standby=True)
    )
    choice = events.InboundChoice(
        channel="messenger",
        account_id="1",
        contact_id="2",
        message_id="m_2",
        timestamp=when,
        kind="postback",
        payload="GET_STARTED",
        standby=True,
    )
    assert not triggers_reply(choice)


def test_events_are_frozen() -> None:
    event = events.InboundText("whatsapp", "1", "2", None, "wamid.1", datetime.now(UTC), "hi")
    with pytest.raises(AttributeError):
        event.text = "changed"  # type: ignore[misc]


def test_the_token_of_an_optin_stays_out_of_logs() -> None:
    optin = events.OptIn(
        channel="messenger",
        account_id="1",
        contact_id="2",
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        token="secret-notification-token",
    )
    assert "secret-notification-token" not in repr(optin)


@pytest.mark.parametrize(
    ("value", "millis", "expected"),
    [
        ("1772442900", False, datetime(2026, 3, 2, 9, 15, tzinfo=UTC)),
        (1772442900, False, datetime(2026, 3, 2, 9, 15, tzinfo=UTC)),
        (1772442900123, True, datetime(2026, 3, 2, 9, 15, 0, 123000, tzinfo=UTC)),
        ("1772442900123", True, datetime(2026, 3, 2, 9, 15, 0, 123000, tzinfo=UTC)),
        (1772442900, True, datetime(2026, 3, 2, 9, 15, tzinfo=UTC)),  # seconds on a ms channel
        (True, False, None),
        (0, False, None),
        (-5, True, None),
        (1.5, False, None),
        ("12 34", False, None),
        ("9" * 15, False, None),
        (10**14, False, None),
        (None, True, None),
    ],
)
def test_read_time(value: Any, millis: bool, expected: datetime | None) -> None:
    assert read_time(value, millis=millis) == expected


def test_readers_check_type_size_and_storability() -> None:
    assert read_str("ok") == "ok"
    assert read_str("") is None
    assert read_str("x" * 1025) is None
    assert read_str("x" * 1025, 2000) == "x" * 1025
    assert read_str("a\x00b") is None
    assert read_str("\udc80") is None
    assert read_str(5) is None
    assert read_id(1234567890123456) == "1234567890123456"
    assert read_id(True) is None
    assert read_id(-1) is None
    assert read_id("x" * 513) is None
    assert read_float(True, 90) is None
    assert read_float(float("inf"), 90) is None
    assert read_float(-90, 90) == -90.0
    assert read_float(90.5, 90) is None
