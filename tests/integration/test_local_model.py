"""The inference client against a real llama.cpp server running the bundled SmolLM2 model."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from inference import (
    ContextTooLong,
    Endpoint,
    GenerationParams,
    InferenceClient,
    PoolConfig,
    parse_endpoints,
)
from inference.local import MODEL_ALIAS, local_endpoint, server_command, stop, wait_until_ready
from tests.support.tripwire import FiringTransport, SoftTimeLimit

N_CTX = 1024
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
]
GREEDY = GenerationParams(temperature=0, max_tokens=24, seed=1234)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local-model") / "server.log"


@pytest.fixture(scope="module")
def server(server_log: Path) -> Iterator[Endpoint]:
    port = free_port()
    log_path = server_log
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            server_command(port=port, threads=2, n_ctx=N_CTX),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # its "Disconnected from client" line must reach the log as it happens
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        try:
            wait_until_ready(f"http://127.0.0.1:{port}", timeout=120, proc=proc)
        except RuntimeError as exc:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
            pytest.fail(f"{exc}\n--- server log tail ---\n{tail}")
        yield local_endpoint(port)
    finally:
        stop(proc)


@pytest.fixture
def inference_client(server: Endpoint) -> Iterator[InferenceClient]:
    """Replies in one JSON body: llama-cpp-python reports usage and context errors only so."""
    with InferenceClient([replace(server, stream=False)], timeout=120) as client:
        yield client


def test_greedy_reply_with_usage(inference_client: InferenceClient, server: Endpoint) -> None:
    request_id = str(uuid.uuid4())
    first = inference_client.chat(QUESTION, params=GREEDY, request_id=request_id)
    second = inference_client.chat(QUESTION, params=GREEDY)

    assert first.text
    assert first.text == first.text.strip()
    assert first.text == second.text  # temperature 0 with a seed is repeatable
    assert first.endpoint == server.url
    assert first.model == MODEL_ALIAS
    assert first.request_id == request_id
    assert first.prompt_tokens is not None
    assert first.prompt_tokens > 10
    assert first.completion_tokens is not None
    assert 0 < first.completion_tokens <= GREEDY.max_tokens
    assert first.finish_reason in ("stop", "length")


def test_a_streamed_reply_matches_and_times_its_first_token(
    inference_client: InferenceClient, server: Endpoint
) -> None:
    plain = inference_client.chat(QUESTION, params=GREEDY)  # local_endpoint: not streamed
    with InferenceClient([replace(server, stream=True)], timeout=120) as client:
        streamed = client.chat(QUESTION, params=GREEDY)
        (stats,) = client.stats()

    assert streamed.text == plain.text
    assert (streamed.finish_reason, streamed.model) == (plain.finish_reason, plain.model)
    assert (stats.ttft.count, stats.generation.count) == (1, 1)


def test_health_falls_back_to_models(inference_client: InferenceClient, server: Endpoint) -> None:
    assert inference_client.health() == [
        (replace(server, stream=False), True, "/v1/models: HTTP 200")
    ]


def test_fails_over_from_a_closed_port(server: Endpoint) -> None:
    closed = Endpoint(f"http://127.0.0.1:{free_port()}", model=MODEL_ALIAS)
    with InferenceClient([closed, server], timeout=120) as client:
        result = client.chat(QUESTION, params=GenerationParams(temperature=0, max_tokens=4))
    assert result.endpoint == server.url


def test_prompt_over_the_context_window(
    inference_client: InferenceClient, server: Endpoint
) -> None:
    too_long = [{"role": "user", "content": "hello world " * N_CTX}]
    with pytest.raises(ContextTooLong) as info:
        inference_client.chat(too_long, params=GenerationParams(max_tokens=8))
    assert info.value.endpoint == server.url
    assert "hello" not in str(info.value)


def test_a_dns_entry_for_localhost(server: Endpoint) -> None:
    port = server.url.rsplit(":", 1)[1]
    (entry,) = parse_endpoints(f"dns+http://localhost:{port}#model={MODEL_ALIAS}")
    with InferenceClient([entry], timeout=120) as client:
        result = client.chat(QUESTION, params=GenerationParams(temperature=0, max_tokens=4))
    assert result.endpoint == f"http://127.0.0.1:{port}"
    assert result.text


def test_an_abandoned_request_is_aborted_by_the_server(server: Endpoint, server_log: Path) -> None:
    story = [{"role": "user", "content": "Write a very long story about a dragon and a king."}]
    long_reply = GenerationParams(temperature=0, max_tokens=N_CTX // 2, seed=1)
    marks = server_log.read_text(errors="replace").count("Disconnected from client")
    with SoftTimeLimit() as limit:
        transport = FiringTransport(limit, after=3)  # a few tokens in, the limit fires
        config = PoolConfig(health_interval=0)
        streamed = replace(server, stream=True)
        with InferenceClient([streamed], timeout=120, transport=transport, pool=config) as client:
            with pytest.raises(SoftTimeLimitExceeded):
                client.chat(story, params=long_reply)
            (stats,) = client.stats()
    assert stats.error_kinds == {"abandoned": 1}

    pause = threading.Event()
    for _ in range(600):  # llama.cpp notices between two tokens; allow a slow, busy machine
        if server_log.read_text(errors="replace").count("Disconnected from client") > marks:
            break
        pause.wait(0.1)
    assert server_log.read_text(errors="replace").count("Disconnected from client") > marks
    # the server is free again for the next request
    with InferenceClient([server], timeout=120) as client:
        assert client.chat(QUESTION, params=GREEDY).text
