"""A real HTTP server streaming OpenAI chat-completion chunks slowly, for the pool client's
streaming, abandonment and deadline tests.

It speaks HTTP/1.1 with chunked bodies and keep-alive, as vLLM does, and records how every
request ended: ``completed`` when the whole stream went out, ``disconnected`` when the client
closed the socket first (seen by peeking at the socket between chunks, as vLLM's server
notices a disconnect and aborts the request). ``/health`` and a vLLM-style ``/metrics``
answer too.
"""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.processes import free_port

METRICS = (
    "# TYPE vllm:num_requests_waiting gauge\n"
    'vllm:num_requests_waiting{{engine="0",model_name="slow"}} 1\n'
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{{engine="0",model_name="slow"}} {running}\n'
    "# TYPE vllm:request_queue_time_seconds histogram\n"
    'vllm:request_queue_time_seconds_bucket{{engine="0",le="+Inf",model_name="slow"}} {count}\n'
    'vllm:request_queue_time_seconds_sum{{engine="0",model_name="slow"}} {total}\n'
    'vllm:request_queue_time_seconds_count{{engine="0",model_name="slow"}} {count}\n'
)


class StreamingModel:
    """``/v1/chat/completions`` streaming ``tokens`` chunks, one every ``interval`` seconds.

    ``stall_after`` chunks, it sends nothing more until the client leaves. ``on_chunk`` is
    called (on the server's thread) with the request id and the count of chunks sent.
    """

    def __init__(
        self,
        *,
        tokens: int = 5,
        interval: float = 0.0,
        stall_after: int | None = None,
        usage: bool = True,
        on_chunk: Callable[[str, int], None] | None = None,
    ) -> None:
        self.tokens = tokens
        self.interval = interval
        self.stall_after = stall_after
        self.usage = usage
        self.on_chunk = on_chunk
        self.bodies: list[dict[str, Any]] = []
        self.peers: dict[str, tuple[str, int]] = {}
        self.ended: dict[str, str] = {}
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.queue_count = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # quiet test output

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/health":
                    self._send(200, b"", "text/plain")
                elif self.path == "/metrics":
                    with outer._lock:
                        count = outer.queue_count
                    text = METRICS.format(running=0, count=count, total=count * 0.25)
                    self._send(200, text.encode(), "text/plain; version=0.0.4")
                else:
                    self._send(404, b'{"detail":"Not Found"}', "application/json")

            def _send(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request_id = self.headers.get("X-Request-Id", "")
                with outer._lock:
                    outer.bodies.append(body)
                    outer.peers[request_id] = self.client_address[:2]
                    outer._events.setdefault(request_id, threading.Event())
                    outer.queue_count += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                outcome = "completed" if outer._stream(self, body, request_id) else "disconnected"
                if outcome == "disconnected":
                    self.close_connection = True
                with outer._lock:
                    outer.ended[request_id] = outcome
                    outer._events[request_id].set()

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _stream(
        self, handler: BaseHTTPRequestHandler, body: dict[str, Any], request_id: str
    ) -> bool:
        """Send the chunks; False as soon as the client is seen gone."""
        model = body.get("model", "slow")

        def chunk(payload: dict[str, Any] | str) -> bool:
            data = (
                b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            )
            data += b"\n\n"
            try:
                handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                handler.wfile.flush()
            except OSError:
                return False
            return True

        def delta(fields: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-slow",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": fields, "finish_reason": finish}],
            }

        if not chunk(delta({"role": "assistant"})):
            return False
        for n in range(1, self.tokens + 1):
            if self.stall_after is not None and n > self.stall_after:
                return not self._client_gone(handler.connection, None)
            if self._client_gone(handler.connection, self.interval):
                return False
            if not chunk(delta({"content": f"tok{n} "})):
                return False
            if self.on_chunk is not None:
                self.on_chunk(request_id, n)
        if not chunk(delta({}, "length")):
            return False
        if self.usage:
            usage = {"prompt_tokens": 7, "completion_tokens": self.tokens, "total_tokens": 7}
            usage["total_tokens"] += self.tokens
            payload = {"id": "chatcmpl-slow", "object": "chat.completion.chunk", "model": model}
            if not chunk(payload | {"choices": [], "usage": usage}):
                return False
        if not chunk("[DONE]"):
            return False
        try:
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except OSError:
            return False
        return True

    @staticmethod
    def _client_gone(sock: socket.socket, wait: float | None) -> bool:
        """Wait up to ``wait`` seconds (``None``: until it happens) for the client to close."""
        readable, _, _ = select.select([sock], [], [], wait)
        if not readable:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def wait_ended(self, request_id: str, timeout: float = 30) -> str | None:
        """How the request ended, waiting for it; ``None`` when it has not ended by then."""
        with self._lock:
            event = self._events.setdefault(request_id, threading.Event())
        event.wait(timeout)
        with self._lock:
            return self.ended.get(request_id)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def sse_events(*payloads: dict[str, Any] | str) -> bytes:
    """A server-sent event stream body: one ``data:`` event per payload."""
    return b"".join(
        b"data: " + (p if isinstance(p, str) else json.dumps(p)).encode() + b"\n\n"
        for p in payloads
    )


def chunk(
    content: str | None = None, *, finish: str | None = None, model: str = "served"
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` carrying ``content`` (or the role, when ``None``)."""
    delta = {"role": "assistant"} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": {} if finish else delta, "finish_reason": finish}],
    }


def usage_chunk(prompt: int = 21, completion: int = 4) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage}


def streamed(*parts: str, usage: bool = True) -> bytes:
    """The stream vLLM sends for a reply made of ``parts``, with usage when asked."""
    events: list[dict[str, Any] | str] = [chunk(), *(chunk(p) for p in parts)]
    events.append(chunk(finish="stop"))
    if usage:
        events.append(usage_chunk())
    events.append("[DONE]")
    return sse_events(*events)
