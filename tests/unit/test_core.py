"""Settings, field encryption and the log scrubber."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import structlog
from pydantic import SecretStr

from core.config import Environment, Settings
from core.crypto import KeyError_, Keyring, keyring_from_settings, new_key_spec, parse_keys
from core.logging import configure_logging, scrub


def test_database_url_gets_the_psycopg_driver_and_empty_means_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h:5432/db")
    monkeypatch.setenv("REDIS_URL", "")
    s = Settings()
    assert s.database_url == "postgresql+psycopg://u@h:5432/db"
    assert s.redis_url is None
    with pytest.raises(RuntimeError, match="REDIS_URL is not set"):
        s.require_redis_url()


def test_production_refuses_embedded_defaults() -> None:
    s = Settings(
        env=Environment.production,
        database_url=None,
        redis_url=None,
        inference_endpoints=None,
        encryption_keys=None,
        sandbox=True,
    )
    problems = " ".join(s.check_production())
    for needed in (
        "DATABASE_URL",
        "REDIS_URL",
        "PARLEY_INFERENCE_ENDPOINTS",
        "PARLEY_ENCRYPTION_KEYS",
        "PARLEY_SANDBOX",
    ):
        assert needed in problems
    ok = Settings(
        env=Environment.production,
        database_url="postgresql://x/y",
        redis_url="redis://x",
        inference_endpoints="http://gpu:8000",
        encryption_keys=SecretStr(new_key_spec("k1")),
        sandbox=False,
    )
    assert ok.check_production() == []


def test_encryption_round_trip_and_rotation() -> None:
    old = parse_keys(new_key_spec("k1"))
    blob = old.encrypt("héllo \U0001f600")
    assert b"h\xc3\xa9llo" not in blob
    assert Keyring.key_id_of(blob) == "k1"
    rotated = parse_keys(new_key_spec("k2") + "," + old_spec(old))
    assert rotated.decrypt(blob) == "héllo \U0001f600"  # old rows stay readable
    assert Keyring.key_id_of(rotated.encrypt("x")) == "k2"
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(Exception):  # noqa: B017, PT011  # cryptography's InvalidTag
        old.decrypt(tampered)
    with pytest.raises(KeyError_, match="unknown encryption key"):
        parse_keys(new_key_spec("k9")).decrypt(blob)


def old_spec(ring: Keyring) -> str:
    import base64

    kid, key = ring.keys[0]
    return f"{kid}:{base64.urlsafe_b64encode(key).decode()}"


@pytest.mark.parametrize("spec", ["", "nokey", "k1:notbase64!!", "k1:" + "A" * 10, ":abc"])
def test_bad_key_specs_are_refused(spec: str) -> None:
    with pytest.raises(KeyError_):
        parse_keys(spec)


def test_development_key_is_generated_once_with_private_mode(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, encryption_keys=None)
    first = keyring_from_settings(s)
    second = keyring_from_settings(s)
    assert first == second
    assert (tmp_path / "encryption-keys").stat().st_mode & 0o077 == 0
    with pytest.raises(KeyError_):
        keyring_from_settings(
            Settings(env=Environment.production, data_dir=tmp_path, encryption_keys=None)
        )


def test_pseudonyms_are_stable_and_keyed() -> None:
    a, b = parse_keys(new_key_spec("k1")), parse_keys(new_key_spec("k1"))
    assert a.pseudonym("15551234567") == a.pseudonym("15551234567")
    assert a.pseudonym("15551234567") != b.pseudonym("15551234567")
    assert "1555" not in a.pseudonym("15551234567")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call +44 20 7946 0958 now", "call [redacted] now"),
        ("mail ana@example.com", "mail [redacted]"),
        ("card 4111-1111-1111-1111", "card [redacted]"),
        ("job 42 took 3.5 s", "job 42 took 3.5 s"),
    ],
)
def test_scrub(text: str, expected: str) -> None:
    assert scrub(text) == expected


def test_logs_drop_sensitive_keys_and_scrub_values(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    structlog.get_logger("t").info(
        "pipeline.test",
        body="secret body",
        access_token="EAA123",
        note="from +1 650 555 1234",
        message_id=7,
    )
    logging.getLogger("celery").warning("stdlib line with ana@example.com")
    err = capsys.readouterr().err.strip().splitlines()
    first = json.loads(err[0])
    assert first["body"] == "[redacted]" and first["access_token"] == "[redacted]"
    assert first["note"] == "from [redacted]" and first["message_id"] == 7
    assert "timestamp" in first and first["event"] == "pipeline.test"
    assert "ana@example.com" not in err[1]


def test_logs_go_to_stderr_as_it_is_when_emitted(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    configure_logging("INFO", "json")
    closed = io.StringIO()
    closed.close()  # the stream current when logging was configured, closed since
    monkeypatch.setattr(sys, "stderr", closed)
    configure_logging("INFO", "json")
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    structlog.get_logger("t").info("late.line", deliveries=3)
    assert json.loads(now.getvalue())["event"] == "late.line"
