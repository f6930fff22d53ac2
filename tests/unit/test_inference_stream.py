"""Streamed replies, abandoned requests, call deadlines and request logs of the pool client,
against httpx.MockTransport servers speaking the OpenAI chat-completion stream format."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from structlog.testing import capture_logs

from inference import (
    BadRequest,
    BadResponse,
    Endpoint,
    EndpointStats,
    InferenceClient,
    InferenceError,
    Timeout,
    Unavailable,
    parse_endpoints,
)
from inference._client import _Deadline
from tests.support.streaming_model import chunk, sse_events, streamed, usage_chunk
from tests.unit.test_inference import MESSAGES, REQUEST_ID, Recorder, completion

A = "http://gpu-a:8000"
B = "http://gpu-b:8000"


def sse(content: bytes) -> httpx.Response:
    return httpx.Response(200, content=content, headers={"Content-Type": "text/event-stream"})


class Stream(httpx.SyncByteStream):
    """A response body produced chunk by chunk, remembering whether the client closed it."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks

    def close(self) -> None:
        self.closed = True


def by_url(client: InferenceClient) -> dict[str, EndpointStats]:
    return {stats.url: stats for stats in client.stats()}


def test_a_streamed_reply_is_assembled_with_usage_and_model() -> None:
    body = (
        b": ping - 2026-11-27 10:00:00\n\n"  # llama.cpp's keep-alive comment
        + sse_events(chunk(), chunk(" Hel"), chunk("lo"))
        + b"data:"
        + json.dumps(chunk(" there. \n")).encode()  # no space after the colon
        + b"\n\n"
        + sse_events(chunk(finish="length"), usage_chunk(prompt=30, completion=3), "[DONE]")
    )
    recorder = Recorder(lambda request: sse(body))
    with recorder.client(Endpoint(A, model="llama")) as client:
        result = client.chat(MESSAGES, request_id=REQUEST_ID)
        (stats,) = client.stats()

    sent = json.loads(recorder.requests[0].content)
    assert (sent["stream"], sent["stream_options"]) == (True, {"include_usage": True})
    assert recorder.requests[0].headers["Accept"] == "text/event-stream"
    assert (result.text, result.model, result.finish_reason) == ("Hello there.", "served", "length")
    assert (result.prompt_tokens, result.completion_tokens) == (30, 3)
    assert (result.request_id, result.endpoint) == (REQUEST_ID, A)
    assert (stats.ttft.count, stats.generation.count) == (1, 1)
    assert stats.ttft.sum_s <= result.elapsed_s


def test_a_stream_without_usage_leaves_token_counts_unknown() -> None:
    recorder = Recorder(lambda request: sse(streamed("Hi.", usage=False)))
    with recorder.client(Endpoint(A)) as client:
        result = client.chat(MESSAGES)
        (stats,) = client.stats()

    assert result.text == "Hi."
    assert (result.prompt_tokens, result.completion_tokens) == (None, None)
    assert (stats.prompt_tokens, stats.completion_tokens) == (0, 0)


@pytest.mark.parametrize(
    ("event", "error", "kind"),
    [
        ({"error": {"message": "engine died", "code": 500}}, Unavailable, "unavailable"),
        (
            {"object": "error", "message": "x", "type": "BadRequestError", "code": 400},
            BadRequest,
            "bad_request",
        ),
    ],
)
def test_an_error_event_mid_stream(
    event: dict[str, object], error: type[InferenceError], kind: str
) -> None:
    body = sse_events(chunk(), chunk("partial"), event)
    recorder = Recorder(lambda request: sse(body))
    with recorder.client(Endpoint(A), Endpoint(B)) as client, pytest.raises(error) as info:
        client.chat(MESSAGES)

    assert info.value.endpoint == A
    assert "partial" not in str(info.value)
    assert recorder.hosts == ["gpu-a"]  # it may have run: never sent again
    assert by_url(client)[A].error_kinds == {kind: 1}


@pytest.mark.parametrize(
    "body",
    [
        sse_events(chunk(), chunk("cut off")),  # neither a finish reason nor [DONE]
        sse_events(chunk(), chunk("cut off"), "[DONE]"),  # ended early by the server
        b"",  # llama-cpp-python's answer to a prompt over its context while streaming
        sse_events(chunk(), "{not json"),
        sse_events(usage_chunk(), "[DONE]"),  # no choices at all
        sse_events(chunk(), {"choices": [{"index": 0}]}, "[DONE]"),  # a choice with no delta
        sse_events(chunk(), chunk(None) | {"choices": [{"delta": {"content": 7}}]}, "[DONE]"),
    ],
)
def test_malformed_streams_are_bad_response(body: bytes) -> None:
    recorder = Recorder(lambda request: sse(body))
    with recorder.client(Endpoint(A), Endpoint(B)) as client, pytest.raises(BadResponse):
        client.chat(MESSAGES)
    assert recorder.hosts == ["gpu-a"]


def test_a_connection_dropped_mid_stream_is_unavailable_and_not_resent() -> None:
    def chunks() -> Iterator[bytes]:
        yield sse_events(chunk(), chunk("Hel"))
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")

    recorder = Recorder(
        lambda request: httpx.Response(
            200, stream=Stream(chunks()), headers={"Content-Type": "text/event-stream"}
        )
    )
    with recorder.client(Endpoint(A), Endpoint(B)) as client, pytest.raises(Unavailable):
        client.chat(MESSAGES)
    assert recorder.hosts == ["gpu-a"]


def test_an_exception_in_the_callers_thread_closes_the_request_and_propagates() -> None:
    streams: list[Stream] = []

    def chunks() -> Iterator[bytes]:
        yield sse_events(chunk(), chunk("Hel"))
        # what Celery's soft time limit does: its signal handler raises in the task's thread
        raise SoftTimeLimitExceeded()

    def handler(request: httpx.Request) -> httpx.Response:
        streams.append(Stream(chunks()))
        return httpx.Response(
            200, stream=streams[-1], headers={"Content-Type": "text/event-stream"}
        )

    recorder = Recorder(handler)
    with (
        capture_logs() as logs,
        recorder.client(Endpoint(A), Endpoint(B), breaker_failures=1) as client,
    ):
        with pytest.raises(SoftTimeLimitExceeded):
            client.chat(MESSAGES, request_id=REQUEST_ID)
        stats = by_url(client)[A]

    assert streams[0].closed
    assert recorder.hosts == ["gpu-a"]
    # the caller gave up: not a fault of the server, whose breaker stays closed
    assert (stats.in_flight, stats.errors, stats.error_kinds) == (0, 1, {"abandoned": 1})
    assert (stats.state, stats.consecutive_failures) == ("closed", 0)
    assert [(e["event"], e["request_id"], e["endpoint"]) for e in logs] == [
        ("inference.abandoned", REQUEST_ID, A)
    ]


def test_the_call_timeout_closes_a_stream_that_never_ends() -> None:
    streams: list[Stream] = []

    def chunks() -> Iterator[bytes]:
        yield sse_events(chunk())
        while True:
            time.sleep(0.01)
            yield sse_events(chunk("more "))

    def handler(request: httpx.Request) -> httpx.Response:
        streams.append(Stream(chunks()))
        return httpx.Response(
            200, stream=streams[-1], headers={"Content-Type": "text/event-stream"}
        )

    recorder = Recorder(handler)
    with recorder.client(Endpoint(A), Endpoint(B)) as client:
        with pytest.raises(Timeout, match="closed") as info:
            client.chat(MESSAGES, timeout=0.2)
        with pytest.raises(ValueError, match="timeout"):
            client.chat(MESSAGES, timeout=0)
        stats = by_url(client)[A]

    assert info.value.endpoint == A
    assert streams[0].closed
    assert recorder.hosts == ["gpu-a"]
    assert stats.error_kinds == {"timeout": 1}


def test_every_log_line_of_a_request_names_it_and_its_endpoint_and_no_content() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "gpu-a":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "gpu-b":
            return sse(streamed("secret reply text"))
        return httpx.Response(503, json={"error": {"message": "secret prompt text echoed"}})

    endpoints = [Endpoint(A), Endpoint(B), Endpoint("http://guard:8000", role="guard")]
    with capture_logs() as logs, Recorder(handler).client(*endpoints) as client:
        client.chat(MESSAGES, request_id=REQUEST_ID)
        with pytest.raises(Unavailable):
            client.chat(MESSAGES, role="guard", request_id=REQUEST_ID)

    assert [(e["event"], e["endpoint"]) for e in logs] == [
        ("inference.error", A),
        ("inference.request", B),
        ("inference.error", "http://guard:8000"),
    ]
    assert all(e["request_id"] == REQUEST_ID for e in logs)
    assert logs[1]["ttft_s"] is not None
    assert "secret" not in repr(logs)


def test_an_endpoint_can_ask_for_one_json_body(tmp_path: Path) -> None:
    (plain,) = parse_endpoints(f"{A}#stream=false&model=llama")
    pool = tmp_path / "pool.yaml"
    pool.write_text(f"endpoints: [{{url: '{A}', stream: false}}]\n", encoding="utf-8")
    assert parse_endpoints(f"@{pool}") == [Endpoint(A, stream=False)]
    assert parse_endpoints(f"{A}#stream=true") == [Endpoint(A)]
    with pytest.raises(ValueError, match="stream must be true or false"):
        parse_endpoints(f"{A}#stream=maybe")

    recorder = Recorder(lambda request: httpx.Response(200, json=completion()))
    with recorder.client(plain) as client:
        result = client.chat(MESSAGES)
        (stats,) = client.stats()

    body = json.loads(recorder.requests[0].content)
    assert body["stream"] is False and "stream_options" not in body
    assert recorder.requests[0].headers["Accept"] == "application/json"
    assert (result.text, result.prompt_tokens) == ("Hello there.", 21)
    assert (stats.ttft.count, stats.generation.count) == (0, 1)


class _NetworkStream:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, info: str) -> object:
        return self.sock if info == "socket" else None


def test_the_deadline_shuts_a_blocked_socket_and_never_a_disarmed_one() -> None:
    # A read blocked on a silent server is woken by shutting the socket down at the deadline.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        response = httpx.Response(200, extensions={"network_stream": _NetworkStream(ours)})
        guard = _Deadline(response, time.monotonic())
        ours.settimeout(30)
        assert ours.recv(1) == b""  # woken by the shutdown, not by data or the 30 s timeout
        guard.disarm()
        assert guard.fired

    # Disarmed before its time (the response was read to its end): the socket, back in the
    # connection pool, is left alone.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        response = httpx.Response(200, extensions={"network_stream": _NetworkStream(ours)})
        guard = _Deadline(response, time.monotonic() + 0.05)
        guard.disarm()
        threading.Event().wait(0.2)
        theirs.sendall(b"x")
        assert ours.recv(1) == b"x"
        assert not guard.fired
