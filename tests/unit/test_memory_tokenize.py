"""``inference.Tokenizer`` over ``httpx.MockTransport``: vLLM's ``/v1/models`` and ``/tokenize``
shapes, llama-cpp-python's ``/openapi.json`` and ``/extras/tokenize``, a server with neither. The
real tokenizer is exercised against the local llama.cpp server in
``tests/integration/test_memory.py``."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from inference import Endpoint, Tokenizer, Unavailable

VLLM = Endpoint("http://vllm:8000", model="meta-llama/Llama-3.1-8B-Instruct")
LLAMA = Endpoint("http://llama:8181", model="smollm2")


def _words(text: str) -> list[int]:
    return [len(w) for w in text.split()]


def _chat_ids(messages: list[dict[str, str]]) -> list[int]:
    """A Llama-3-like framing: BOS, 4 tokens around each message, 4 for the generation prompt."""
    ids = [128000]
    for m in messages:
        ids += [128006, 1, 128007, 271, *_words(m["content"]), 128009]
    return ids + [128006, 2, 128007, 271]


class Recorder:
    def __init__(self, routes: dict[tuple[str, str], Any]) -> None:
        self.routes = routes
        self.calls: list[tuple[str, str, dict[str, Any] | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, request.url.path, body))
        handler = self.routes.get((request.method, request.url.path))
        if handler is None:
            return httpx.Response(404, json={"detail": "Not Found"})
        return httpx.Response(200, json=handler(body))


def _vllm() -> Recorder:
    def tokenize(body: dict[str, Any]) -> dict[str, Any]:
        assert body["model"] == VLLM.model
        if "messages" in body:
            assert body["add_generation_prompt"] is True
            ids = _chat_ids(body["messages"])
        else:
            assert body["add_special_tokens"] is False
            ids = _words(body["prompt"])
        return {"count": len(ids), "max_model_len": 8192, "tokens": ids}

    models = {
        "object": "list",
        "data": [{"id": VLLM.model, "owned_by": "vllm", "max_model_len": 8192}],
    }
    return Recorder({("GET", "/v1/models"): lambda _: models, ("POST", "/tokenize"): tokenize})


def test_vllm_counts_are_cached_and_its_framing_is_measured_from_the_template() -> None:
    server = _vllm()
    with Tokenizer([VLLM], transport=httpx.MockTransport(server)) as tokenizer:
        assert tokenizer.available()
        assert tokenizer.context_length() == 8192
        assert tokenizer.count("when do you open tomorrow") == 5
        posts = sum(1 for c in server.calls if c[0] == "POST")
        assert tokenizer.count_many(["when do you open tomorrow", "at eight"]) == [5, 2]
        assert sum(1 for c in server.calls if c[0] == "POST") == posts + 1  # only the new text
        info = tokenizer.cache_info()
        assert (info.hits, info.misses, info.size) == (1, 2, 2)

        framing = tokenizer.framing()
        assert (framing.base, framing.user, framing.assistant) == (1 + 4 + 1 + 4, 5, 5)
        messages = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "when do you open"},
        ]
        counted = framing.base + sum(tokenizer.count(m["content"]) for m in messages)
        counted += sum(framing.of(m["role"]) for m in messages[1:])
        assert counted == len(_chat_ids(messages))
        calls = len(server.calls)
        assert tokenizer.framing() == framing  # measured once
        assert len(server.calls) == calls


def test_llama_cpp_is_found_by_its_openapi_paths_and_measured_with_chat_usage() -> None:
    def usage(body: dict[str, Any]) -> dict[str, Any]:
        assert body["max_tokens"] == 1
        size = 3 + sum(3 + len(_words(m["content"])) for m in body["messages"])
        return {"choices": [], "usage": {"prompt_tokens": size, "completion_tokens": 1}}

    server = Recorder(
        {
            ("GET", "/v1/models"): lambda _: {"data": [{"id": "smollm2", "owned_by": "me"}]},
            ("GET", "/openapi.json"): lambda _: {
                "paths": {"/extras/tokenize": {}, "/extras/tokenize/count": {}}
            },
            ("POST", "/extras/tokenize/count"): lambda b: {"count": len(_words(b["input"]))},
            ("POST", "/extras/tokenize"): lambda b: {"tokens": _words(b["input"])},
            ("POST", "/v1/chat/completions"): usage,
        }
    )
    with Tokenizer([LLAMA], transport=httpx.MockTransport(server)) as tokenizer:
        assert tokenizer.available()
        assert tokenizer.context_length() is None
        assert tokenizer.count("one two three") == 3
        assert tokenizer.tokens("one two") == [3, 3]
        framing = tokenizer.framing()
        assert (framing.base, framing.user, framing.assistant) == (6, 3, 3)


def test_a_server_without_a_tokenizer_is_not_available() -> None:
    """Like a router or a stand-in: every GET answers a model list, nothing tokenizes."""
    server = Recorder(
        {
            ("GET", "/v1/models"): lambda _: {"data": [{"id": "scripted"}]},
            ("GET", "/openapi.json"): lambda _: {"data": [{"id": "scripted"}]},
        }
    )
    with Tokenizer([LLAMA], transport=httpx.MockTransport(server)) as tokenizer:
        assert not tokenizer.available()
        assert not tokenizer.available()
        assert len(server.calls) == 2  # found out once
        with pytest.raises(Unavailable):
            tokenizer.count("hello")


def test_an_unreachable_server_is_skipped_and_asked_again_later() -> None:
    down = Endpoint("http://down:1", model="smollm2")
    state = {"up": False}
    vllm = _vllm()

    def transport(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down" and not state["up"]:
            raise httpx.ConnectError("refused", request=request)
        return vllm(request)

    with (
        Tokenizer([down], transport=httpx.MockTransport(transport)) as alone,
        Tokenizer([down, VLLM], transport=httpx.MockTransport(transport)) as pair,
    ):
        with pytest.raises(Unavailable):
            alone.available()
        assert pair.available()  # the second endpoint answers
        state["up"] = True
        assert alone.available()  # discovery was not cached while the server was down


def test_a_dns_entry_is_asked_through_the_servers_it_resolves_to() -> None:
    server = _vllm()
    seen: list[str] = []

    def transport(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return server(request)

    entry = Endpoint("dns+http://vllm.pool.svc:8000", model=VLLM.model)
    with Tokenizer(
        [entry],
        transport=httpx.MockTransport(transport),
        resolver=lambda host, port: ["10.0.0.7", "10.0.0.5"],
    ) as tokenizer:
        assert tokenizer.count("one two") == 2
    assert set(seen) == {"10.0.0.5"}  # the first in address order answered
