"""An OpenAI-compatible model server that answers at once (the model is not what chaos tests).

``python -m bench._chaos_model --port P --log FILE [--median-ms M] [--fail-rate R] [--seed N]``

Answers ``GET /v1/models`` and ``POST /v1/chat/completions`` in OpenAI's format. The reply names
the markers found in the newest user message of the prompt (``ack tbcxd``), so the checker can
tell which inbound message a reply answers and in which order replies went out. ``GET /stats``
reports requests in flight, which the nemesis uses to strike while tasks are running. Every
request is appended to ``--log`` as one JSON line (markers only, never whole prompts).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MARKER = re.compile(r"\bt[a-j]+x[a-j]+\b")


def markers(text: str) -> list[str]:
    return MARKER.findall(text)


def answer_for(messages: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The reply text for a prompt, and the markers of its newest user message."""
    found: list[str] = []
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            found = markers(content if isinstance(content, str) else json.dumps(content))
            break
    return ("ack " + " ".join(found)).strip(), found


class Model:
    def __init__(self, *, log: Path, median_ms: float, fail_rate: float, seed: int) -> None:
        self.log = log.open("a", buffering=1)
        self.median = median_ms / 1000.0
        self.fail_rate = fail_rate
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.inflight = 0
        self.total = 0

    def delay(self) -> float:
        if self.median <= 0:
            return 0.0
        with self.lock:
            # log-normal: median as given, p99 about 6x the median, capped at 2 s
            sample = self.median * math.exp(self.random.gauss(0.0, 0.75))
        return min(2.0, sample)

    def fails(self) -> bool:
        with self.lock:
            return self.random.random() < self.fail_rate

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.log.write(json.dumps(entry) + "\n")


def make_handler(model: Model) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802  # http.server's naming
            if self.path.startswith("/v1/models"):
                self._send(200, {"object": "list", "data": [{"id": "chaos", "object": "model"}]})
            elif self.path.startswith("/stats"):
                with model.lock:
                    self._send(200, {"inflight": model.inflight, "total": model.total})
            elif self.path.startswith("/health"):
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:  # noqa: N802  # http.server's naming
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, {"error": {"message": "body is not JSON"}})
                return
            if not self.path.startswith("/v1/chat/completions"):
                self._send(404, {"error": {"message": "not found"}})
                return
            with model.lock:
                model.inflight += 1
                model.total += 1
            try:
                time.sleep(model.delay())
                messages = body.get("messages") if isinstance(body, dict) else None
                text, found = answer_for(messages if isinstance(messages, list) else [])
                failed = model.fails()
                model.record({"at": time.time(), "markers": found, "failed": failed})
                if failed:
                    self._send(503, {"error": {"message": "overloaded", "type": "server_error"}})
                    return
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{model.total}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": str(body.get("model") or "chaos"),
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text},
                            }
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                    },
                )
            finally:
                with model.lock:
                    model.inflight -= 1

        def log_message(self, *args: Any) -> None:
            return

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._chaos_model")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--median-ms", type=float, default=100.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = Model(log=args.log, median_ms=args.median_ms, fail_rate=args.fail_rate, seed=args.seed)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(model))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
