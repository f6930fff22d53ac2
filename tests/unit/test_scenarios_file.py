"""The conversations file of ``parley test``: validation that names the line and field, and the
check of one turn's result against its expectations."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from bots.policy import DEFAULT_NOTICES
from core.errors import ConfigError
from core.models import OUTCOME_KINDS
from parley.scenarios import (
    Expect,
    NoticeKind,
    Outcome,
    Report,
    TurnResult,
    check,
    load_scenarios,
    parse_scenarios,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "conversations.yaml"


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_scenarios(text, source="c.yaml")
    return err.value.message


def test_the_vocabularies_are_the_platforms() -> None:
    assert set(get_args(Outcome)) == {*OUTCOME_KINDS, "reply"}
    assert set(get_args(NoticeKind)) == {*DEFAULT_NOTICES, "template"}


def test_the_example_is_valid() -> None:
    scenarios = load_scenarios(EXAMPLE)
    assert scenarios.spec.bot == "demo"
    assert len(scenarios.spec.conversations) >= 4
    # Lines point at the turn as written.
    first = EXAMPLE.read_text().splitlines()[scenarios.line("conversations", 0, "turns", 0) - 1]
    assert first.strip().startswith("- user:")


def test_an_unknown_outcome_names_its_line_and_field() -> None:
    message = _error(
        "conversations:\n"
        "  - name: a\n"
        "    turns:\n"
        "      - user: hi\n"
        "        expect:\n"
        "          outcome: replyed\n"
    )
    assert message.startswith("c.yaml:6: conversations.0.turns.0.expect.outcome: Input should be")
    assert "'replied'" in message


def test_unknown_fields_and_bad_regexes_are_reported_together() -> None:
    message = _error(
        "conversations:\n"
        "  - name: a\n"
        "    turns:\n"
        "      - user: hi\n"
        "        expect: {reply: '('}\n"
        "      - user: hi\n"
        "        expcet: {}\n"
    )
    lines = message.splitlines()
    assert lines[0].startswith("c.yaml:5: conversations.0.turns.0.expect.reply: not a regular")
    assert lines[1].startswith("c.yaml:7: conversations.0.turns.1.expcet: Extra inputs")


@pytest.mark.parametrize(
    ("turn", "expected"),
    [
        ("{user: hi, react: x}", "exactly one of 'user', 'react', 'delete'"),
        ("{expect: {mode: bot}}", "exactly one of 'user', 'react', 'delete'"),
        ("{react: x, expect: {outcome: replied}}", "a react turn stores no message"),
    ],
)
def test_a_turn_does_one_thing(turn: str, expected: str) -> None:
    message = _error(f"conversations:\n  - name: a\n    turns:\n      - user: hi\n      - {turn}\n")
    assert message.startswith("c.yaml:5: conversations.0.turns.1: ")
    assert expected in message


def test_cross_checks_name_their_line() -> None:
    message = _error(
        "conversations:\n"
        "  - name: a\n"
        "    channel: messenger\n"
        "    turns:\n"
        "      - delete: true\n"
        "  - name: a\n"
        "    turns: [{user: hi}]\n"
    )
    assert message.splitlines() == [
        "c.yaml:5: conversations.0.turns.0.delete: a delete turn needs an earlier 'user' turn",
        "c.yaml:5: conversations.0.turns.0.delete: Messenger has no unsend",
        "c.yaml:6: conversations.1.name: 'a' is used twice",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("conversations: [\n", "c.yaml:2: invalid YAML"),
        ("- a\n", "c.yaml:1: expected a mapping"),
        ("bot: demo\n", "c.yaml:1: conversations: Field required"),
        ("conversations: []\n", "c.yaml:1: conversations: List should have at least 1 item"),
    ],
)
def test_a_file_that_is_not_a_conversations_file(text: str, expected: str) -> None:
    assert _error(text).startswith(expected)


REPLIED = TurnResult(
    outcome="replied",
    reply="We open at 8:00, Monday to Saturday.",
    notices=("disclosure",),
    reasons=("pii.email",),
    mode="bot",
    opted_out=False,
)


def test_check_passes_when_everything_expected_holds() -> None:
    expect = Expect(
        outcome="reply",
        reply=r"\b8:00\b",
        notices=["disclosure"],
        reasons=["pii.email"],
        mode="bot",
        opted_out=False,
    )
    assert check(expect, REPLIED) == []
    assert check(Expect(), REPLIED) == []


def test_check_says_what_was_expected_and_what_came() -> None:
    expect = Expect(
        outcome="opted_out",
        reply="^Closed",
        notices=[],
        reasons=[],
        mode="human",
        opted_out=True,
    )
    assert check(expect, REPLIED) == [
        "outcome: expected opted_out, got replied",
        "reply: expected a match for /^Closed/, got 'We open at 8:00, Monday to Saturday.'",
        "notices: expected [], got [disclosure]",
        "reasons: expected [], got [pii.email]",
        "mode: expected human, got bot",
        "opted_out: expected true, got false",
    ]


def test_a_reply_expected_where_none_came() -> None:
    got = TurnResult(outcome="opted_out", detail=None, mode="bot", opted_out=True)
    assert check(Expect(reply="."), got) == ["reply: expected a match for /./, got no reply"]
    assert check(Expect(outcome="replied"), TurnResult(error="no outcome within 90 s")) == [
        "no outcome within 90 s"
    ]


def test_exit_code_and_summary() -> None:
    report = Report(conversations=2, conversations_failed=1, turns=5, turns_failed=1)
    assert report.exit_code == 1
    assert report.summary() == ("FAILED: 2 conversations (1 failed), 5 turns (4 passed, 1 failed)")
    assert Report(conversations=1, turns=1).exit_code == 0
