"""Bots YAML: validation with line numbers, ${ENV} interpolation, idempotent apply."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from bots.config import load_bots, parse_bots
from bots.service import apply_bots
from core.errors import ConfigError
from core.models import Bot, ChannelAccount, MetaApp, Workspace

GOOD = """\
workspace: acme
meta_apps:
  - name: acme-app
    app_id: "1234567890"
    app_secret: ${ACME_SECRET}
    verify_token: ${ACME_VERIFY:-verify-me}
bots:
  - name: support
    system_prompt: |
      You answer questions about Acme's delivery times.
    model: llama-3.1-8b-instruct
    generation:
      temperature: 0.2
      max_tokens: 200
      stop: ["</s>"]
    history_turns: 8
    channels:
      - type: whatsapp
        app: acme-app
        phone_number_id: "555000111"
        access_token: ${ACME_WA_TOKEN}
"""
ENV = {"ACME_SECRET": "s3cret", "ACME_WA_TOKEN": "EAAtoken"}


def test_parse_interpolates_environment_and_defaults() -> None:
    spec = parse_bots(GOOD, environ=ENV)
    assert spec.meta_apps[0].app_secret == "s3cret"
    assert spec.meta_apps[0].verify_token == "verify-me"
    assert spec.bots[0].channels[0].access_token == "EAAtoken"
    assert spec.bots[0].generation.stop == ["</s>"]


def test_unset_variable_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"bots.yaml:5: environment variable ACME_SECRET"):
        parse_bots(GOOD, environ={"ACME_WA_TOKEN": "x"})


def test_invalid_yaml_names_the_line() -> None:
    broken = GOOD.replace("    history_turns: 8", "    history_turns: [8")
    with pytest.raises(ConfigError, match=r"bots.yaml:16: invalid YAML"):
        parse_bots(broken, environ=ENV)


@pytest.mark.parametrize(
    ("old", "new", "line", "what"),
    [
        ("      temperature: 0.2", "      temperature: 9", 13, "generation.temperature"),
        ("        app: acme-app", "        app: nobody", 19, "unknown meta app"),
        ("    history_turns: 8", "    history_turn: 8", 16, "history_turn"),
        ('        phone_number_id: "555000111"\n', "", 18, "needs phone_number_id"),
    ],
)
def test_schema_errors_name_the_line(old: str, new: str, line: int, what: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_bots(GOOD.replace(old, new), environ=ENV)
    assert what in err.value.message
    assert f"bots.yaml:{line}:" in err.value.message


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="bots.yaml:1: expected a mapping"):
        parse_bots("- just\n- a list\n", environ={})


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_bots(tmp_path / "missing.yaml", {})


def _counts(db: Session) -> tuple[int, ...]:
    return tuple(
        db.execute(select(func.count()).select_from(m)).scalar_one()
        for m in (Workspace, MetaApp, Bot, ChannelAccount)
    )


def test_apply_twice_is_idempotent_and_a_change_is_an_update(db: Session) -> None:
    spec = parse_bots(GOOD, environ=ENV)
    first = apply_bots(db, spec)
    assert len(first.created) == 4 and not first.updated
    second = apply_bots(db, spec)
    assert not second.created and not second.updated and len(second.unchanged) == 4
    assert _counts(db) == (1, 1, 1, 1)

    changed = parse_bots(GOOD.replace("temperature: 0.2", "temperature: 0.5"), environ=ENV)
    third = apply_bots(db, changed)
    assert third.updated == ["bot support"]
    bot = db.execute(select(Bot)).scalar_one()
    assert bot.temperature == 0.5
    # Secrets are stored encrypted, never as plain text.
    raw = db.connection().exec_driver_sql("SELECT app_secret FROM meta_apps").scalar_one()
    assert b"s3cret" not in bytes(raw)


def test_an_account_cannot_move_to_another_workspace(db: Session) -> None:
    apply_bots(db, parse_bots(GOOD, environ=ENV))
    other = parse_bots(GOOD.replace("workspace: acme", "workspace: rival"), environ=ENV)
    with pytest.raises(ConfigError, match="belongs to another workspace"):
        apply_bots(db, other)


def test_cli_apply_reports_and_is_idempotent(
    db: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from parley.cli import app

    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "bots.yaml"
    path.write_text(GOOD)
    runner = CliRunner()
    result = runner.invoke(app, ["bots", "apply", "-f", str(path)])
    assert result.exit_code == 0, result.output
    assert "4 created, 0 updated, 0 unchanged" in result.output
    result = runner.invoke(app, ["bots", "apply", "-f", str(path)])
    assert "0 created, 0 updated, 4 unchanged" in result.output

    path.write_text(GOOD.replace("temperature: 0.2", "temperature: [oops"))
    result = runner.invoke(app, ["bots", "apply", "-f", str(path)])
    assert result.exit_code == 2
    assert f"{path}:13: invalid YAML" in result.output
