"""Memory's token counting against a real vLLM server (``make test-vllm``; skipped otherwise):
vLLM's ``/tokenize`` applies the model's chat template, so counts and token ids are the
server's own."""

from __future__ import annotations

from typing import Any

import httpx

from inference import Endpoint, Tokenizer
from tests.support.vllm import MAX_MODEL_LEN, SERVED_MODEL

CONVERSATION = [
    {"role": "system", "content": "You help customers of a bakery. Be brief."},
    {"role": "user", "content": "Do you have rye bread today?"},
    {"role": "assistant", "content": "Yes, we baked rye bread this morning."},
    {"role": "user", "content": "Great, please keep two loaves for me."},
]


def _chat_ids(url: str, messages: list[dict[str, str]]) -> list[int]:
    with httpx.Client(timeout=60, trust_env=False) as http:
        data = http.post(
            f"{url}/tokenize",
            json={"model": SERVED_MODEL, "messages": messages, "add_generation_prompt": True},
        ).json()
    ids: list[int] = data["tokens"]
    assert data["count"] == len(ids)
    return ids


def test_counts_framing_and_prefix_against_vllm(vllm_pair: list[Any]) -> None:
    url = vllm_pair[0].url
    with Tokenizer([Endpoint(url, model=SERVED_MODEL)], timeout=60) as tokenizer:
        assert tokenizer.available()
        assert tokenizer.context_length() == MAX_MODEL_LEN
        framing = tokenizer.framing()
        counted = framing.base + sum(tokenizer.count_many([m["content"] for m in CONVERSATION]))
        counted += sum(framing.of(m["role"]) for m in CONVERSATION[1:])
        assert counted == len(_chat_ids(url, CONVERSATION))
        hits = tokenizer.cache_info().hits
        tokenizer.count_many([m["content"] for m in CONVERSATION])
        assert tokenizer.cache_info().hits == hits + len(CONVERSATION)

    # The next turn's prompt starts with this turn's prompt and then its reply.
    first = _chat_ids(url, CONVERSATION[:2])
    second = _chat_ids(url, CONVERSATION)
    assert second[: len(first)] == first
    with httpx.Client(timeout=60, trust_env=False) as http:
        reply = http.post(
            f"{url}/tokenize",
            json={
                "model": SERVED_MODEL,
                "prompt": CONVERSATION[2]["content"],
                "add_special_tokens": False,
            },
        ).json()["tokens"]
    assert second[len(first) : len(first) + len(reply)] == reply
