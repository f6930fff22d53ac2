"""Images reach a vision-role endpoint as OpenAI-style ``image_url`` content parts: the request
body is checked at a local OpenAI-compatible server that records it (not yet verified against
Llama 4 Scout on vLLM itself)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest

from core.models.media import image_parts
from inference import Endpoint, GenerationParams, InferenceClient
from tests.support.servers import ScriptedModel, completion

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def test_image_parts_is_a_data_url_part() -> None:
    part = image_parts("image/PNG; charset=binary", PNG)
    encoded = base64.b64encode(PNG).decode("ascii")
    assert part == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}


@pytest.mark.parametrize("mime", ["audio/ogg", "application/pdf", "image/", "", "text/html"])
def test_image_parts_refuses_what_is_not_an_image(mime: str) -> None:
    with pytest.raises(ValueError, match="not an image"):
        image_parts(mime, b"x")


@pytest.fixture
def vision_model() -> Iterator[ScriptedModel]:
    def script(request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return completion("A blue cake.", model="scout")

    model = ScriptedModel(script)
    yield model
    model.close()


def test_list_content_with_an_image_reaches_the_vision_endpoint(
    vision_model: ScriptedModel,
) -> None:
    image = image_parts("image/png", PNG)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Describe images briefly."},
        {"role": "user", "content": [{"type": "text", "text": "This one, in blue"}, image]},
    ]
    endpoints = [
        Endpoint(url="http://127.0.0.1:9", model="chat-only", role="chat"),
        Endpoint(url=vision_model.url, model="llama-4-scout", role="vision"),
    ]
    with InferenceClient(endpoints, timeout=5.0) as client:
        result = client.chat(
            messages, role="vision", params=GenerationParams(temperature=0.0, max_tokens=32)
        )

    assert result.text == "A blue cake."
    [request] = vision_model.requests
    assert request["model"] == "llama-4-scout"
    assert request["messages"] == [
        {"role": "system", "content": "Describe images briefly."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "This one, in blue"},
                {
                    "type": "image_url",
                    "image_url": {
                        "url": "data:image/png;base64," + base64.b64encode(PNG).decode("ascii")
                    },
                },
            ],
        },
    ]
    assert (request["temperature"], request["max_tokens"], request["stream"]) == (0.0, 32, True)
