"""The inference client against httpx.MockTransport servers speaking the OpenAI wire format."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from core.config import Settings
from inference import (
    BadRequest,
    BadResponse,
    ChatResult,
    ContextTooLong,
    Endpoint,
    GenerationParams,
    InferenceClient,
    InferenceError,
    PoolConfig,
    Timeout,
    Unavailable,
    parse_endpoints,
)

REQUEST_ID = "0b6f4e1c-5a43-4d8e-9a57-2f1f0f0f3c11"
A = "http://gpu-a:8000"
B = "http://gpu-b:8000"
MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "secret prompt text"},
]

Handler = Callable[[httpx.Request], httpx.Response]


def completion(
    text: str = " Hello there. \n", *, model: str = "served", usage: bool = True
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
    }
    if usage:
        body["usage"] = {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25}
    return body


class Recorder:
    """A transport that records every request and answers with ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.requests: list[httpx.Request] = []
        self._handler = handler
        self.transport = httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._handler(request)

    @property
    def hosts(self) -> list[str]:
        return [request.url.host for request in self.requests]

    def client(self, *endpoints: Endpoint, **pool: Any) -> InferenceClient:
        config = PoolConfig(**{"health_interval": 0, **pool})
        return InferenceClient(endpoints, transport=self.transport, pool=config)


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=completion())


def answer(status: int, body: object) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    return handler


# --- request shape ---------------------------------------------------------------------------


def test_request_body_and_headers() -> None:
    recorder = Recorder(ok)
    with recorder.client(Endpoint(A, model="llama-8b")) as client:
        result = client.chat(MESSAGES, request_id=REQUEST_ID)

    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == f"{A}/v1/chat/completions"
    assert request.headers["X-Request-Id"] == REQUEST_ID
    assert json.loads(request.content) == {
        "model": "llama-8b",
        "messages": MESSAGES,
        "temperature": 0.7,
        "max_tokens": 256,
        "top_p": 0.95,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert result == ChatResult(
        text="Hello there.",
        model="served",
        endpoint=A,
        prompt_tokens=21,
        completion_tokens=4,
        finish_reason="stop",
        request_id=REQUEST_ID,
        elapsed_s=result.elapsed_s,
    )
    assert result.elapsed_s >= 0


def test_stop_and_seed_sent_only_when_set() -> None:
    recorder = Recorder(ok)
    params = GenerationParams(temperature=0, max_tokens=8, top_p=1, stop=("\n\n",), seed=7)
    with recorder.client(Endpoint(A)) as client:
        client.chat(MESSAGES, params=params, model="asked")

    body = json.loads(recorder.requests[0].content)
    assert body["stop"] == ["\n\n"]
    assert body["seed"] == 7
    assert (body["temperature"], body["max_tokens"], body["top_p"]) == (0, 8, 1)
    assert body["model"] == "asked"  # the endpoint names no model, so the argument is used


def test_model_defaults_and_endpoint_model_wins() -> None:
    recorder = Recorder(ok)
    with recorder.client(Endpoint(A), Endpoint(B, model="pinned", role="guard")) as client:
        client.chat(MESSAGES)
        client.chat(MESSAGES, role="guard", model="ignored")

    models = [json.loads(request.content)["model"] for request in recorder.requests]
    assert models == ["default", "pinned"]


def test_the_conversation_goes_out_as_the_session_for_a_router() -> None:
    recorder = Recorder(ok)
    with recorder.client(Endpoint(A)) as client:
        client.chat(MESSAGES, conversation_key=4242)
        client.chat(MESSAGES)

    with_key, without = recorder.requests
    assert with_key.headers["X-Session-ID"] == "4242"
    assert "X-Session-ID" not in without.headers


def test_request_id_generated_when_missing() -> None:
    recorder = Recorder(ok)
    with recorder.client(Endpoint(A)) as client:
        first = client.chat(MESSAGES)
        second = client.chat(MESSAGES)

    assert first.request_id
    assert first.request_id != second.request_id
    assert recorder.requests[0].headers["X-Request-Id"] == first.request_id


def test_missing_usage_and_empty_text() -> None:
    recorder = Recorder(answer(200, completion("   ", usage=False)))
    with recorder.client(Endpoint(A)) as client:
        result = client.chat(MESSAGES)

    assert result.text == ""
    assert (result.prompt_tokens, result.completion_tokens) == (None, None)


def test_request_id_must_be_a_uuid() -> None:
    recorder = Recorder(ok)
    with recorder.client(Endpoint(A)) as client:
        with pytest.raises(ValueError, match="UUID"):
            client.chat(MESSAGES, request_id="conversation-7")
        client.chat(MESSAGES, request_id=REQUEST_ID.replace("-", "").upper())

    assert len(recorder.requests) == 1


# --- routing and failover --------------------------------------------------------------------


def test_role_routing() -> None:
    recorder = Recorder(ok)
    endpoints = (
        Endpoint("http://chat:8000"),
        Endpoint("http://guard:8000", role="guard"),
        Endpoint("http://vision:8000", role="vision"),
    )
    with recorder.client(*endpoints) as client:
        assert client.chat(MESSAGES, role="guard").endpoint == "http://guard:8000"
        assert client.chat(MESSAGES, role="vision").endpoint == "http://vision:8000"
        assert client.chat(MESSAGES).endpoint == "http://chat:8000"

    assert recorder.hosts == ["guard", "vision", "chat"]


def test_no_endpoint_for_role_is_unavailable() -> None:
    recorder = Recorder(ok)
    with (
        recorder.client(Endpoint(A)) as client,
        pytest.raises(Unavailable, match="role 'guard'") as info,
    ):
        client.chat(MESSAGES, role="guard")

    assert info.value.endpoint is None
    assert recorder.requests == []


def test_connect_error_fails_over_to_next_endpoint() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "gpu-a":
            raise httpx.ConnectError("connection refused", request=request)
        return ok(request)

    recorder = Recorder(handler)
    with recorder.client(Endpoint(A), Endpoint(B)) as client:
        result = client.chat(MESSAGES, request_id=REQUEST_ID)

    assert result.endpoint == B
    assert recorder.hosts == ["gpu-a", "gpu-b"]
    assert [request.headers["X-Request-Id"] for request in recorder.requests] == [
        REQUEST_ID,
        REQUEST_ID,
    ]


def test_connect_errors_everywhere_raise_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    recorder = Recorder(handler)
    with recorder.client(Endpoint(A), Endpoint(B)) as client, pytest.raises(Unavailable) as info:
        client.chat(MESSAGES)

    assert recorder.hosts == ["gpu-a", "gpu-b"]
    assert info.value.endpoint == B


def test_read_timeout_is_not_resent() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    recorder = Recorder(handler)
    with recorder.client(Endpoint(A), Endpoint(B)) as client, pytest.raises(Timeout) as info:
        client.chat(MESSAGES)

    assert recorder.hosts == ["gpu-a"]
    assert info.value.endpoint == A


def test_dropped_connection_is_not_resent() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("server disconnected", request=request)

    recorder = Recorder(handler)
    with recorder.client(Endpoint(A), Endpoint(B)) as client, pytest.raises(Unavailable):
        client.chat(MESSAGES)

    assert recorder.hosts == ["gpu-a"]


def test_server_error_is_unavailable_and_not_resent() -> None:
    recorder = Recorder(answer(503, {"error": {"message": "engine dead", "code": "EngineDead"}}))
    with recorder.client(Endpoint(A), Endpoint(B)) as client, pytest.raises(Unavailable) as info:
        client.chat(MESSAGES)

    assert recorder.hosts == ["gpu-a"]
    assert info.value.endpoint == A
    assert "503" in str(info.value)
    assert "EngineDead" in str(info.value)


def test_rate_limited_is_unavailable() -> None:
    recorder = Recorder(answer(429, {"error": {"message": "slow down"}}))
    with recorder.client(Endpoint(A)) as client, pytest.raises(Unavailable, match="429"):
        client.chat(MESSAGES)


def test_logs_carry_ids_and_counts_never_content() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "gpu-a":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=completion("secret reply text"))

    with capture_logs() as logs, Recorder(handler).client(Endpoint(A), Endpoint(B)) as client:
        client.chat(MESSAGES, request_id=REQUEST_ID)

    assert [(entry["event"], entry["endpoint"]) for entry in logs] == [
        ("inference.error", A),
        ("inference.request", B),
    ]
    assert logs[0]["failover"] is True
    assert logs[1]["request_id"] == REQUEST_ID
    assert (logs[1]["prompt_tokens"], logs[1]["completion_tokens"]) == (21, 4)
    assert "secret" not in repr(logs)


# --- error mapping ---------------------------------------------------------------------------

VLLM_CONTEXT = {
    "object": "error",
    "message": "This model's maximum context length is 2048 tokens. However, you requested "
    "3000 tokens (2900 in the messages, 100 in the completion).",
    "type": "BadRequestError",
    "code": 400,
}
LLAMA_CPP_CONTEXT = {
    "error": {
        "message": "This model's maximum context length is 512 tokens. However, you "
        "requested 900 tokens (884 in the messages, 16 in the completion).",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}


@pytest.mark.parametrize(
    "body",
    [
        VLLM_CONTEXT,
        LLAMA_CPP_CONTEXT,
        "The decoder prompt (length 9000) is longer than the maximum model length of 8192.",
        "Input tokens exceed the configured context window",
    ],
)
def test_context_errors(body: object) -> None:
    recorder = Recorder(answer(400, body))
    with recorder.client(Endpoint(A), Endpoint(B)) as client, pytest.raises(ContextTooLong) as info:
        client.chat(MESSAGES)

    assert isinstance(info.value, BadRequest)
    assert info.value.endpoint == A
    assert recorder.hosts == ["gpu-a"]


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_client_errors_are_bad_request(status: int) -> None:
    echo = {"detail": [{"msg": "field required", "input": MESSAGES}]}
    recorder = Recorder(answer(status, echo))
    with recorder.client(Endpoint(A), Endpoint(B)) as client, pytest.raises(BadRequest) as info:
        client.chat(MESSAGES)

    assert not isinstance(info.value, ContextTooLong)
    assert str(status) in str(info.value)
    assert "secret prompt text" not in str(info.value)
    assert recorder.hosts == ["gpu-a"]


def test_error_code_copied_only_when_it_is_an_identifier() -> None:
    body = {"error": {"message": "The model `x` does not exist", "code": "model_not_found"}}
    with Recorder(answer(400, body)).client(Endpoint(A)) as client:
        with pytest.raises(BadRequest, match="model_not_found") as info:
            client.chat(MESSAGES)
        assert "does not exist" not in str(info.value)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>proxy error</html>"),
        httpx.Response(200, json=[]),
        httpx.Response(200, json={"choices": []}),
        httpx.Response(200, json={"choices": [{"finish_reason": "stop"}]}),
        httpx.Response(200, json={"choices": [{"message": {"content": 42}}]}),
        httpx.Response(302, headers={"Location": "http://elsewhere/"}),
    ],
)
def test_malformed_responses_are_bad_response(response: httpx.Response) -> None:
    recorder = Recorder(lambda request: response)
    with recorder.client(Endpoint(A), Endpoint(B)) as client, pytest.raises(BadResponse) as info:
        client.chat(MESSAGES)

    assert info.value.endpoint == A
    assert recorder.hosts == ["gpu-a"]


def test_error_tree() -> None:
    for error in (Unavailable, Timeout, BadRequest, ContextTooLong, BadResponse):
        assert issubclass(error, InferenceError)
    assert issubclass(ContextTooLong, BadRequest)
    assert str(Timeout("read timed out", endpoint=A)) == f"read timed out [{A}]"


# --- generation params -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -0.1}, {"max_tokens": 0}, {"top_p": 0}, {"top_p": 1.5}],
)
def test_generation_params_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        GenerationParams(**kwargs)


# --- health ----------------------------------------------------------------------------------


def test_health_uses_health_then_falls_back_to_models() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        if host == "vllm":
            return httpx.Response(200) if path == "/health" else httpx.Response(500)
        if host == "llamacpp":  # llama.cpp's server has no /health
            return httpx.Response(404) if path == "/health" else httpx.Response(200, json={})
        if host == "dead-engine":
            return httpx.Response(503)
        if host == "slow":
            raise httpx.ReadTimeout("timed out", request=request)
        raise httpx.ConnectError("connection refused", request=request)

    recorder = Recorder(handler)
    endpoints = [
        Endpoint(f"http://{host}:8000")
        for host in ("vllm", "llamacpp", "dead-engine", "slow", "down")
    ]
    with recorder.client(*endpoints) as client:
        report = client.health()

    assert [(endpoint, healthy) for endpoint, healthy, _ in report] == [
        (endpoints[0], True),
        (endpoints[1], True),
        (endpoints[2], False),
        (endpoints[3], False),
        (endpoints[4], False),
    ]
    details = [detail for _, _, detail in report]
    assert details[1] == "/v1/models: HTTP 200"
    assert "503" in details[2]
    assert "timeout" in details[3]
    assert "ConnectError" in details[4]
    assert [request.method for request in recorder.requests] == ["GET"] * len(recorder.requests)
    # a 503 from /health means a dead engine: no fall back to /v1/models
    assert [r.url.path for r in recorder.requests if r.url.host == "dead-engine"] == ["/health"]


# --- from_settings ---------------------------------------------------------------------------


def test_from_settings_prefers_configured_endpoints(tmp_path: Path) -> None:
    recorder = Recorder(ok)
    local = [Endpoint("http://127.0.0.1:8181", model="smollm2")]
    configured = Settings(inference_endpoints=f"{A}/v1#model=llama", data_dir=tmp_path)
    unset = Settings(inference_endpoints=None, data_dir=tmp_path)

    with InferenceClient.from_settings(configured, local, transport=recorder.transport) as client:
        assert client.endpoints == (Endpoint(A, model="llama"),)
    with InferenceClient.from_settings(unset, local, transport=recorder.transport) as client:
        assert client.endpoints == tuple(local)
        assert client.chat(MESSAGES).endpoint == "http://127.0.0.1:8181"


# --- parse_endpoints -------------------------------------------------------------------------


def test_parse_endpoints_happy_path() -> None:
    spec = (
        " http://gpu-a:8000/v1/ ,"
        "https://gpu-b.internal/v1#model=meta-llama/Llama-3.1-8B-Instruct,"
        "http://guard:8001#role=guard&model=llama-guard-3,"
        "http://10.0.0.5:9000/prefix#model=llava&role=vision,"
    )
    assert parse_endpoints(spec) == [
        Endpoint("http://gpu-a:8000", None, "chat"),
        Endpoint("https://gpu-b.internal", "meta-llama/Llama-3.1-8B-Instruct", "chat"),
        Endpoint("http://guard:8001", "llama-guard-3", "guard"),
        Endpoint("http://10.0.0.5:9000/prefix", "llava", "vision"),
    ]


def test_parse_endpoints_decodes_model_names() -> None:
    assert parse_endpoints("http://a:1#model=org%2Fname%26more") == [
        Endpoint("http://a:1", model="org/name&more")
    ]


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ("http://a:1#role=judge", "http://a:1#role=judge"),
        ("http://a:1,gpu-b:8000", "gpu-b:8000"),
        ("ftp://a:1", "ftp://a:1"),
        ("http://a:1#temperature=0", "temperature=0"),
        ("http://a:1#model=", "model="),
        ("http://a:1#model=x&model=y", "model=y"),
        ("http://a:1?key=v", "http://a:1?key=v"),
        ("http://a:99999", "http://a:99999"),
        ("http://", "http://"),
    ],
)
def test_parse_endpoints_rejects_bad_items(spec: str, bad: str) -> None:
    with pytest.raises(ValueError, match="'.*'") as info:
        parse_endpoints(spec)
    assert bad in str(info.value)


@pytest.mark.parametrize("spec", ["", " , ", "@"])
def test_parse_endpoints_rejects_empty(spec: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        parse_endpoints(spec)


def test_parse_endpoints_pool_file(tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        "endpoints:\n"
        "  - url: http://gpu-a:8000/v1\n"
        "    model: llama-8b\n"
        "  - {url: 'http://gpu-b:8000/', model: llama-8b, role: chat}\n"
        "  - url: http://guard:8001\n"
        "    role: guard\n",
        encoding="utf-8",
    )
    assert parse_endpoints(f"@{pool}") == [
        Endpoint(A, "llama-8b", "chat"),
        Endpoint(B, "llama-8b", "chat"),
        Endpoint("http://guard:8001", None, "guard"),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- url: http://a:1\n", "'endpoints' list"),
        ("endpoints: [{model: x}]\n", "'url' string"),
        ("endpoints: [{url: 'http://a:1', role: judge}]\n", "unknown role 'judge'"),
        ("endpoints: [{url: 'http://a:1', weight: 2}]\n", "unknown keys: weight"),
        ("endpoints: [{url: 'http://a:1', model: 3}]\n", "'model' must be"),
        ("endpoints: [{url: 'a:1'}]\n", "endpoints\\[0\\]"),
        ("endpoints: []\n", "no endpoints"),
        ("endpoints: [\n", "cannot read"),
    ],
)
def test_parse_endpoints_pool_file_errors(tmp_path: Path, content: str, message: str) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        parse_endpoints(f"@{pool}")


def test_parse_endpoints_missing_pool_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read endpoint pool"):
        parse_endpoints(f"@{tmp_path / 'missing.yaml'}")
