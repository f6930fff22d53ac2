"""An OpenAI-compatible model server and a WhatsApp Graph API stand-in that answer at once and
record when each request arrived (``time.monotonic()``, comparable across processes on one
machine), for measuring the platform's own overhead.

``python -m bench._instant_servers --model-port P --graph-port Q``

* ``POST /v1/chat/completions`` answers ``ok <markers>``, the markers found in the prompt's
  newest user turn, and records (markers, arrived, answered).
* ``GET /v1/models`` and ``POST /tokenize`` answer as vLLM's do (a context of
  ``MAX_MODEL_LEN``; a token per whitespace-separated word, plus a fixed framing per chat
  message), so conversation memory counts its prompts here as it does against vLLM.
* ``POST /{version}/{phone_number_id}/messages`` answers Meta's success shape with a fresh
  wamid and records (markers found in ``text.body``, arrived). It posts no status webhooks.
* ``GET /records`` on either port returns what that server recorded.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MARKER = re.compile(r"\bzq[a-z]{6}\b")


def markers(text: str) -> list[str]:
    return MARKER.findall(text)


def marker_for(index: int) -> str:
    """A word the screens leave alone (letters only) that names message ``index``."""
    letters = []
    for _ in range(6):
        index, digit = divmod(index, 26)
        letters.append(chr(ord("a") + digit))
    return "zq" + "".join(reversed(letters))


def newest_user_markers(messages: Any) -> list[str]:
    if not isinstance(messages, list):
        return []
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return markers(content if isinstance(content, str) else json.dumps(content))
    return []


MAX_MODEL_LEN = 8192
# What this stand-in's "chat template" adds: per message, and once per prompt.
FRAMING_PER_MESSAGE = 4
FRAMING_PER_PROMPT = 3


def tokenize(body: Any) -> dict[str, Any]:
    """vLLM's ``/tokenize`` answer for ``{"prompt": …}`` or ``{"messages": […]}``."""
    if isinstance(body.get("messages"), list):
        count = FRAMING_PER_PROMPT
        for message in body["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            count += FRAMING_PER_MESSAGE + len(str(content or "").split())
    else:
        count = len(str(body.get("prompt") or "").split())
    return {"count": count, "tokens": list(range(count)), "max_model_len": MAX_MODEL_LEN}


def completion(text: str, model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + secrets.token_hex(8),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        ],
        "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55},
    }


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.model: list[dict[str, Any]] = []
        self.graph: list[dict[str, Any]] = []


def make_handler(recorder: Recorder, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Answer at once: without TCP_NODELAY the body, written after the headers, can wait for
        # the client's delayed ACK (about 40 ms on Linux), time that is not the platform's.
        disable_nagle_algorithm = True

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802  # http.server's naming
            if self.path == "/records":
                with recorder.lock:
                    self._send(200, recorder.model if role == "model" else recorder.graph)
            elif self.path in ("/v1/models", "/health"):
                model = {"id": "instant", "owned_by": "vllm", "max_model_len": MAX_MODEL_LEN}
                self._send(200, {"object": "list", "data": [model]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            arrived = time.monotonic()
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, {"error": "not json"})
                return
            if role == "model" and self.path.endswith("/chat/completions"):
                found = newest_user_markers(body.get("messages"))
                payload = completion("ok " + " ".join(found), str(body.get("model") or "instant"))
                answered = time.monotonic()
                self._send(200, payload)
                with recorder.lock:
                    recorder.model.append(
                        {"markers": found, "arrived": arrived, "answered": answered}
                    )
            elif role == "model" and self.path == "/tokenize":
                self._send(200, tokenize(body))
            elif role == "graph" and self.path.endswith("/messages"):
                text = body.get("text") if isinstance(body, dict) else None
                found = markers(text.get("body", "") if isinstance(text, dict) else "")
                wamid = "wamid.INSTANT" + secrets.token_hex(12).upper()
                self._send(
                    200,
                    {
                        "messaging_product": "whatsapp",
                        "contacts": [{"input": body.get("to"), "wa_id": body.get("to")}],
                        "messages": [{"id": wamid}],
                    },
                )
                with recorder.lock:
                    recorder.graph.append({"markers": found, "arrived": arrived})
            else:
                self._send(404, {"error": "not found"})

        def log_message(self, *args: Any) -> None:
            return

    return Handler


def serve(model_port: int, graph_port: int) -> tuple[ThreadingHTTPServer, ThreadingHTTPServer]:
    recorder = Recorder()
    servers = (
        ThreadingHTTPServer(("127.0.0.1", model_port), make_handler(recorder, "model")),
        ThreadingHTTPServer(("127.0.0.1", graph_port), make_handler(recorder, "graph")),
    )
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return servers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-port", type=int, required=True)
    parser.add_argument("--graph-port", type=int, required=True)
    args = parser.parse_args()
    serve(args.model_port, args.graph_port)
    threading.Event().wait()


if __name__ == "__main__":
    main()
