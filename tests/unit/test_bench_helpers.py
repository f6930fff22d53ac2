"""The benchmark helpers' pure parts: percentiles, wrk output, body files, markers, the baseline
app's answers (no database, nothing timed)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bench import _loadgen as load
from bench._baseline_app import create_app, extract, verify
from bench._common import percentile, summarize
from bench._instant_servers import (
    FRAMING_PER_MESSAGE,
    FRAMING_PER_PROMPT,
    completion,
    marker_for,
    markers,
    newest_user_markers,
    tokenize,
)

WRK_OUTPUT = """\
Running 15s test @ http://127.0.0.1:8000/webhooks/whatsapp
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.12ms    1.02ms  40.31ms   91.00%
    Req/Sec     5.13k   301.22     5.61k    80.00%
  Latency Distribution
     50%    2.87ms
     75%    3.20ms
     90%    3.90ms
     99%   13.90ms
  76543 requests in 15.00s, 9.87MB read
  Non-2xx or 3xx responses: 3
  Socket errors: connect 0, read 1, write 0, timeout 2
Requests/sec:   5102.86
Transfer/sec:    673.51KB
"""


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([3, 1, 2], 0) == 1
    assert percentile([3, 1, 2], 100) == 3


def test_percentile_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 101)


def test_summary() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert (s.count, s.p50, s.mean, s.maximum) == (4, 2.5, 2.5, 4.0)
    assert "p99=" in s.line()


def test_wrk_output_is_parsed() -> None:
    result = load.parse_wrk(WRK_OUTPUT)
    assert result.requests == 76543
    assert result.seconds == 15.0
    assert result.rps == pytest.approx(5102.86)
    assert result.p50_ms == pytest.approx(2.87)
    assert result.p99_ms == pytest.approx(13.9)
    assert result.errors == 6
    assert not result.wrapped


def test_wrk_durations() -> None:
    assert load.duration_ms("950.00us") == pytest.approx(0.95)
    assert load.duration_ms("1.20s") == pytest.approx(1200)
    assert load.duration_ms("1.00m") == pytest.approx(60_000)
    with pytest.raises(ValueError, match="duration"):
        load.duration_ms("fast")


def test_unexpected_wrk_output_is_an_error() -> None:
    with pytest.raises(ValueError, match="unexpected"):
        load.parse_wrk("wrk: connection refused")


def test_body_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "bodies"
    items = [("sha256=aa", b'{"a":1}'), ("sha256=bb", b'{"b":"x y"}')]
    assert load.write_bodies(path, items) == 2
    assert load.read_bodies(path) == items
    with pytest.raises(ValueError, match="one line"):
        load.write_bodies(path, [("sha256=cc", b"{\n}")])


def test_python_generator_summary() -> None:
    result = load.summarize_python([1.0, 3.0], 2.0, 1, False, cpu=1)
    assert (result.requests, result.rps, result.p50_ms, result.errors) == (2, 1.0, 2.0, 1)
    assert "pinned to cpu 1" in result.tool


def test_markers_are_distinct_words() -> None:
    seen = {marker_for(i) for i in range(2000)}
    assert len(seen) == 2000
    text = f"ref {marker_for(7)} and {marker_for(8)}."
    assert markers(text) == [marker_for(7), marker_for(8)]


def test_newest_user_turn_names_the_markers() -> None:
    prompt = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"old {marker_for(1)}"},
        {"role": "assistant", "content": f"ok {marker_for(1)}"},
        {"role": "user", "content": f"new {marker_for(2)}\nmore {marker_for(3)}"},
    ]
    assert newest_user_markers(prompt) == [marker_for(2), marker_for(3)]
    assert newest_user_markers("nonsense") == []
    answer = completion("ok", "m")
    assert answer["choices"][0]["message"]["content"] == "ok"


def _sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def test_baseline_signature_and_extraction() -> None:
    body = json.dumps(
        {
            "entry": [
                {
                    "changes": [
                        {
                            "value": {
                                "messages": [
                                    {"from": "15550001234", "id": "wamid.X", "text": {"body": "hi"}}
                                ]
                            }
                        }
                    ]
                }
            ]
        }
    ).encode()
    assert verify(b"k", body, _sign(b"k", body))
    assert not verify(b"k", body, _sign(b"other", body))
    assert not verify(b"k", body, None)
    assert extract(body) == (15550001234 % 10000, "wamid.X", "hi")
    assert extract(b'{"entry": []}') is None
    assert extract(b"not json") is None


def test_baseline_app_answers_without_storage() -> None:
    app = create_app(secret=b"k", dsn=None, redis_url=None, key="unused")
    body = json.dumps(
        {
            "entry": [
                {
                    "changes": [
                        {"value": {"messages": [{"from": "1", "id": "w", "text": {"body": "x"}}]}}
                    ]
                }
            ]
        }
    ).encode()
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ok = client.post(
            "/webhooks/whatsapp", content=body, headers={"X-Hub-Signature-256": _sign(b"k", body)}
        )
        assert ok.status_code == 200
        forged = client.post(
            "/webhooks/whatsapp", content=body, headers={"X-Hub-Signature-256": _sign(b"x", body)}
        )
        assert forged.status_code == 401
        malformed = client.post(
            "/webhooks/whatsapp", content=b"{}", headers={"X-Hub-Signature-256": _sign(b"k", b"{}")}
        )
        assert malformed.status_code == 400


def test_the_instant_model_tokenizes_like_vllm() -> None:
    assert tokenize({"model": "instant", "prompt": "three words here"})["count"] == 3
    chat = tokenize(
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    )
    assert chat["count"] == FRAMING_PER_PROMPT + 2 * FRAMING_PER_MESSAGE + 3
    assert len(chat["tokens"]) == chat["count"] and chat["max_model_len"] == 8192
