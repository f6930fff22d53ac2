"""What a new user does: `parley run` on a blank data dir with nothing configured, `parley chat`
from another terminal, Ctrl-C, and a second `parley run` that reuses the data."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import free_port, wait_http

pytestmark = pytest.mark.e2e


def _env(data_dir: Path, api_port: int, model_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    for key in ("DATABASE_URL", "REDIS_URL"):
        env.pop(key, None)
    env.update(
        PARLEY_DATA_DIR=str(data_dir),
        PARLEY_API_PORT=str(api_port),
        PARLEY_LOCAL_MODEL_PORT=str(model_port),
        PARLEY_LOG_FORMAT="console",
    )
    return env


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "parley", "run"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _interrupt(proc: subprocess.Popen[bytes]) -> int:
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's process group
    return proc.wait(timeout=60)


def _descendants_gone(pgid: int) -> bool:
    for _ in range(50):
        alive = subprocess.run(
            ["pgrep", "-g", str(pgid)], capture_output=True, text=True, check=False
        ).stdout.split()
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_parley_run_chat_ctrl_c_and_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    api_port = free_port()
    env = _env(data, api_port, free_port())
    log = tmp_path / "run.log"
    api = f"http://127.0.0.1:{api_port}"

    run = _start(env, log)
    try:
        wait_http(f"{api}/readyz", timeout=180)
        deadline = time.monotonic() + 30
        while "parley: ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        out = log.read_text()
        assert "applied the demo bot" in out
        assert f"{api}/docs" in out and "parley chat" in out

        chat = subprocess.run(
            [sys.executable, "-m", "parley", "chat", "-m", "Hello, are you open today?"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert chat.returncode == 0, chat.stdout + chat.stderr
        assert len(re.findall(r"^bot> \S", chat.stdout, re.M)) == 2, chat.stdout
    finally:
        code = _interrupt(run)
    assert code == 0, log.read_text()[-3000:]
    assert _descendants_gone(run.pid), "child processes survived Ctrl-C"
    assert not (data / "runtime.json").exists()

    # Second start: same data, no new demo bot, up again.
    started = time.monotonic()
    run = _start(env, log)
    try:
        wait_http(f"{api}/readyz", timeout=120)
        assert time.monotonic() - started < 120
        assert log.read_text().count("applied the demo bot") == 1
    finally:
        assert _interrupt(run) == 0
    assert _descendants_gone(run.pid)
