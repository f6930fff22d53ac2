"""``parley run``: everything on one machine, with embedded defaults for what is not configured.

Postgres, Redis and the model server are the configured ones when their settings are present,
otherwise embedded ones under ``$PARLEY_DATA_DIR``. The API, two worker processes and beat run as
child processes; Ctrl-C (or SIGTERM) stops every one of them and the embedded services.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from types import FrameType

import httpx
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from bots import repository as bot_repository
from bots.service import apply_bots
from core.config import Settings, get_settings, reset_settings
from core.db import make_sessionmaker, session_scope
from inference import local
from parley import embedded, migrate, runtime
from parley.demo import DEMO_PHONE_NUMBER_ID, demo_bots


def say(message: str) -> None:
    print(f"parley: {message}", flush=True)


def _start_model(settings: Settings, stack: ExitStack) -> str:
    port = settings.local_model_port
    say(f"starting the local model server (SmolLM2-135M-Instruct) on 127.0.0.1:{port} …")
    base = local.start(
        stack,
        port=port,
        threads=settings.local_model_threads,
        n_ctx=settings.local_model_ctx,
        log_path=settings.data_dir / "model-server.log",
    )
    return local.local_spec(base)


def prepare(settings: Settings, stack: ExitStack) -> dict[str, str]:
    """Start what is not configured; returns the environment every child process gets."""
    env: dict[str, str] = {}
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not settings.database_url:
        say("starting embedded Postgres …")
        pg = embedded.start_postgres(settings.data_dir)
        stack.callback(pg.stop)
        env["DATABASE_URL"] = pg.url
    if not settings.redis_url:
        say("starting embedded Redis …")
        rd = embedded.start_redis(settings.data_dir)
        stack.callback(rd.stop)
        env["REDIS_URL"] = rd.url
    if not settings.inference_endpoints:
        env["PARLEY_INFERENCE_ENDPOINTS"] = _start_model(settings, stack)
    if "graph_api_url" not in settings.model_fields_set and settings.sandbox:
        env["PARLEY_GRAPH_API_URL"] = f"http://127.0.0.1:{settings.api_port}/sandbox/graph"
    return env


def setup_database(settings: Settings) -> bool:
    """Migrate to head and apply the demo bot when there is no bot; True if the demo was added."""
    engine = create_engine(settings.require_database_url(), poolclass=NullPool)
    migrate.upgrade(engine)
    engine.dispose()
    with session_scope(make_sessionmaker()) as session:
        if bot_repository.any_bot_exists(session):
            return False
        apply_bots(session, demo_bots())
    return True


def children(settings: Settings) -> dict[str, list[str]]:
    py = [sys.executable, "-m", "parley"]
    return {
        "api": [*py, "api"],
        "worker-conversations": [*py, "worker", "--queues", "conversations", "--concurrency", "2"],
        "worker-send": [*py, "worker", "--queues", "send", "--concurrency", "4"],
        "worker-maintenance": [*py, "worker", "--queues", "maintenance", "--concurrency", "1"],
        "beat": [*py, "beat"],
    }


def run() -> int:
    settings = get_settings()
    problems = settings.check_production()
    if problems:
        for problem in problems:
            say(problem)
        return 2
    with ExitStack() as stack:
        env = prepare(settings, stack)
        os.environ.update(env)
        reset_settings()
        settings = get_settings()
        say("migrating the database …")
        if setup_database(settings):
            say("applied the demo bot (workspace 'demo')")
        runtime.write_runtime(
            settings, {k: v for k, v in os.environ.items() if k in runtime.ENV_KEYS}
        )
        stack.callback(runtime.clear_runtime, settings)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, argv in children(settings).items():
            procs[name] = subprocess.Popen(argv)  # noqa: S603  # our own CLI
            stack.callback(local.stop, procs[name])
        api = f"http://{settings.api_host}:{settings.api_port}"
        if not _wait_api(f"{api}/healthz", procs["api"]):
            say("the API did not come up; see the log above")
            return 1
        say("ready:")
        say(f"  API        {api}   (docs: {api}/docs, health: {api}/readyz)")
        say("  status     .venv/bin/parley status   (the dashboard's overview, as JSON)")
        say(f"  chat       .venv/bin/parley chat  (WhatsApp number {DEMO_PHONE_NUMBER_ID})")
        say("  stop       Ctrl-C")
        return _supervise(procs)
    return 0


def _wait_api(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def _supervise(procs: dict[str, subprocess.Popen[bytes]]) -> int:
    stopping = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    say(f"{name} exited with code {proc.returncode}; stopping everything")
                    return 1
            time.sleep(0.5)
        say("stopping …")
        return 0
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
