"""The inference client against a real llama.cpp server running the bundled SmolLM2 model."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from inference import ContextTooLong, Endpoint, GenerationParams, InferenceClient
from inference.local import MODEL_ALIAS, local_endpoint, server_command, wait_until_ready

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
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("local-model") / "server.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            server_command(port=port, threads=2, n_ctx=N_CTX),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_until_ready(f"http://127.0.0.1:{port}", timeout=120, proc=proc)
        except RuntimeError as exc:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
            pytest.fail(f"{exc}\n--- server log tail ---\n{tail}")
        yield local_endpoint(port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def inference_client(server: Endpoint) -> Iterator[InferenceClient]:
    with InferenceClient([server], timeout=120) as client:
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


def test_health_falls_back_to_models(inference_client: InferenceClient, server: Endpoint) -> None:
    assert inference_client.health() == [(server, True, "/v1/models: HTTP 200")]


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
