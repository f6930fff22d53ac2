"""Worker wiring: configure Celery for this process and register every task by importing it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

import bots.tasks
import core.jobs
import webhooks.media_tasks
import webhooks.tasks
from core.celery_app import configure_celery
from core.config import get_settings

TASK_MODULES = (bots.tasks, webhooks.tasks, webhooks.media_tasks, core.jobs)

POOLS = {"conversations": "prefork", "send": "threads", "maintenance": "prefork"}


def celery() -> Celery:
    return configure_celery(get_settings())


def pool_for(queues: list[str]) -> str:
    """Prefork when the CPU-bound lane is among the queues, threads for the HTTP-bound send lane."""
    pools = {POOLS.get(q, "prefork") for q in queues}
    return "prefork" if "prefork" in pools else "threads"


class _Readiness(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802  # http.server's naming
        if self.path not in ("/readyz", "/healthz"):
            self.send_response(404)
            self.end_headers()
            return
        ok = True
        if self.path == "/readyz":
            try:
                client = redis.Redis.from_url(
                    get_settings().require_redis_url(), socket_connect_timeout=1, socket_timeout=1
                )
                client.ping()
                client.close()
            except (redis.RedisError, RuntimeError):
                ok = False
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status":"ready"}' if ok else b'{"status":"redis unavailable"}')

    def log_message(self, *args: Any) -> None:
        return


def serve_readiness(port: int) -> HTTPServer:
    """A worker's own readiness endpoint: it needs Redis, unlike the API's."""
    server = HTTPServer(("0.0.0.0", port), _Readiness)  # noqa: S104  # probed by the orchestrator
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def install_readiness(port: int) -> None:
    if port <= 0:
        return

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]  # celery is untyped
    def _start(**_: Any) -> None:
        serve_readiness(port)
