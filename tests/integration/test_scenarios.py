"""``parley test``: scripted conversations through the real intake, reply pipeline and local model.

The command runs as a child process against a migrated database of its own (it rolls everything
back, which the test checks); the in-process runs use the test's transaction."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from bots.policy import Policy
from bots.schemas import BotsFile, BotSpec, ChannelSpec, GenerationSpec, MetaAppSpec
from core.errors import ConfigError
from core.models import Bot, Message
from parley import scenarios
from parley.scenarios import Report, parse_scenarios

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "conversations.yaml"


def _parley_test(
    *args: str, engine: Engine | None = None, model: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if engine is not None:
        env["DATABASE_URL"] = engine.url.render_as_string(hide_password=False)
    if model is not None:
        env["PARLEY_INFERENCE_ENDPOINTS"] = f"{model}#model=smollm2"
    return subprocess.run(  # noqa: S603  # our own CLI with fixed arguments
        [sys.executable, "-m", "parley", "test", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_example_passes_and_leaves_nothing_behind(engine: Engine, model_server: str) -> None:
    done = _parley_test(str(EXAMPLE), engine=engine, model=model_server)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("passed: 5 conversations (0 failed), 11 turns (11 passed")
    assert not [line for line in lines if "FAIL" in line]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Bot)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(Message)).scalar() == 0


def test_a_wrong_expectation_exits_1_naming_the_turn(
    engine: Engine, model_server: str, tmp_path: Path
) -> None:
    path = tmp_path / "wrong.yaml"
    path.write_text(
        "bot: demo\n"
        "conversations:\n"
        "  - name: stop\n"
        "    turns:\n"
        "      - user: Hi, are you open today?\n"
        "        expect: {outcome: replied}\n"
        "      - user: STOP\n"
        "        expect:\n"
        "          outcome: replied\n"
        "          notices: [opt_out]\n"
    )
    done = _parley_test(str(path), engine=engine, model=model_server)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].startswith(f"  PASS turn 1 ({path}:5): replied ")
    assert lines[2] == f"  FAIL turn 2 ({path}:7): outcome: expected replied, got opted_out"
    assert lines[-1] == "FAILED: 1 conversations (1 failed), 2 turns (1 passed, 1 failed)"


def test_an_invalid_file_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "invalid.yaml"
    path.write_text(
        "conversations:\n  - name: a\n    turns:\n      - user: hi\n        expect: {mode: robot}\n"
    )
    # No database and no model: the file is checked before anything starts.
    done = _parley_test(str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(
        f"error: {path}:5: conversations.0.turns.0.expect.mode: Input should be 'bot'"
    )


def test_an_unknown_bot_is_an_invalid_file(db: Session) -> None:
    spec = parse_scenarios(
        "conversations:\n  - name: a\n    bot: nobody\n    turns: [{user: hi}]\n", source="c.yaml"
    )
    with pytest.raises(ConfigError, match=r"^c.yaml:3: conversations.0.bot: no bot named 'nobody'"):
        scenarios.run(spec, out=lambda _: None)


def _run(text: str, *, bots: BotsFile | None = None, seed: int = 0) -> tuple[Report, list[str]]:
    said: list[str] = []
    report = scenarios.run(parse_scenarios(text), bots=bots, seed=seed, out=said.append)
    return report, said


def _replies(report: Report) -> list[str | None]:
    return [c.result.reply for c in report.checked]


def test_the_reply_regex(db: Session, model_server: str, use_model: Callable[..., None]) -> None:
    use_model(model_server)
    ask = "conversations:\n  - name: {name}\n    turns:\n      - user: Do you have tea?\n{expect}"
    report, _ = _run(ask.format(name="first", expect=""))
    [reply] = _replies(report)
    assert reply
    first_words = "^" + re.escape(" ".join(reply.split()[:3]))
    expect = f"        expect: {{reply: {json.dumps(first_words)}}}\n"
    report, said = _run(ask.format(name="again", expect=expect))
    assert report.exit_code == 0, said
    expect = "        expect: {reply: '(?i)we are closed forever'}\n"
    report, said = _run(ask.format(name="closed", expect=expect))
    assert report.exit_code == 1
    failure = next(line for line in said if "FAIL turn 1" in line)
    assert "reply: expected a match for /(?i)we are closed forever/, got " in failure
    assert "got no reply" not in failure


def test_replies_are_the_same_on_every_run(
    db: Session, model_server: str, use_model: Callable[..., None]
) -> None:
    use_model(model_server)
    text = (
        "conversations:\n"
        "  - name: two turns\n"
        "    turns:\n"
        "      - user: What pastries do you have?\n"
        "        expect: {outcome: replied}\n"
        "      - user: And which one do you recommend?\n"
        "        expect: {outcome: replied}\n"
    )
    first, _ = _run(text, seed=7)
    second, _ = _run(text, seed=7)
    assert first.exit_code == second.exit_code == 0
    replies = _replies(first)
    assert len(replies) == 2 and all(replies)
    assert _replies(second) == replies


def test_messenger_and_instagram_turns_with_a_bots_file(
    db: Session, model_server: str, use_model: Callable[..., None]
) -> None:
    use_model(model_server)
    bots = BotsFile(
        workspace="scenarios",
        meta_apps=[
            MetaAppSpec(
                name="app", app_secret="s3cret", verify_token="v", instagram_app_secret="ig"
            )
        ],
        bots=[
            BotSpec(
                name="shop",
                system_prompt="You answer questions about a bakery. Keep answers short.",
                generation=GenerationSpec(max_tokens=32),
                policy=Policy(disclose_ai=False),
                channels=[
                    ChannelSpec(type="messenger", app="app", page_id="4001", access_token="t"),
                    ChannelSpec(
                        type="instagram", app="app", instagram_account_id="4002", access_token="t"
                    ),
                ],
            )
        ],
    )
    report, said = _run(
        "conversations:\n"
        "  - name: messenger\n"
        "    turns:\n"
        "      - user: Hello\n"
        "        expect: {outcome: reply, notices: []}\n"
        "      - react: '❤'\n"
        "      - user: unsubscribe\n"
        "        expect: {outcome: opted_out, notices: [opt_out], opted_out: true}\n"
        "  - name: instagram\n"
        "    channel: instagram\n"
        "    turns:\n"
        "      - user: Do you bake bread?\n"
        "        expect: {outcome: replied}\n"
        "      - delete: true\n"
        "        expect: {notices: [], mode: bot}\n",
        bots=bots,
    )
    assert report.exit_code == 0, said
    assert said[0].endswith("bot shop on messenger")
    assert "bot shop on instagram" in said[5]
    db.expire_all()
    bot = db.execute(select(Bot).where(Bot.name == "shop")).scalar_one()
    assert (bot.temperature, bot.seed) == (0.0, 0)
    deleted = db.execute(
        select(Message).where(Message.channel == "instagram", Message.direction == "in")
    ).scalar_one()
    assert deleted.kind == "deleted" and deleted.body is None
