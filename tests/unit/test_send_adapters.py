"""Pure pieces of the send lane: cutting text, classifying errors, back-off, correlation."""

from __future__ import annotations

import random
import unicodedata
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from webhooks.channels import instagram, meta, whatsapp
from webhooks.channels.events import StatusUpdate
from webhooks.channels.text import LIMITS, Limit, graphemes, split_text
from webhooks.sandbox import Faults
from webhooks.tasks import backoff_delay

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"  # one ZWJ sequence
FLAG = "\U0001f1ea\U0001f1f8"  # regional indicators E + S
SKIN = "\U0001f44d\U0001f3fd"  # thumbs up, medium skin tone
E_ACUTE = "e\u0301"  # e + combining acute
ZALGO = "a\u0300\u0301\u0302\u0303"


def _joined(chunks: list[str]) -> str:
    return "".join(chunks)


def _is_blank(cluster: str) -> bool:
    return cluster.isspace()


def _strip_clusters(text: str) -> str:
    clusters = graphemes(text)
    while clusters and _is_blank(clusters[0]):
        clusters.pop(0)
    while clusters and _is_blank(clusters[-1]):
        clusters.pop()
    return "".join(clusters)


def _squash(text: str) -> str:
    return "".join(text.split())


# --- splitting --------------------------------------------------------------------------------


def test_short_text_is_one_chunk_and_blank_text_none() -> None:
    assert split_text("  hello  ", LIMITS["whatsapp"]) == ["hello"]
    assert split_text(" \n\t ", LIMITS["whatsapp"]) == []
    assert split_text("", LIMITS["whatsapp"]) == []


def test_ten_thousand_characters_become_ordered_chunks_within_the_limit() -> None:
    words = [f"word{i}" for i in range(1400)]
    text = " ".join(words)
    assert 10_000 <= len(text) < 3 * 4096
    chunks = split_text(text, LIMITS["whatsapp"])
    assert len(chunks) == 3
    assert all(0 < len(c) <= 4096 for c in chunks)
    # Cut at spaces: no word is broken, nothing is lost or reordered.
    assert " ".join(chunks).split() == words


def test_a_cut_prefers_paragraphs_then_lines_then_sentences() -> None:
    limit = Limit(40)
    text = "First paragraph is here.\n\nSecond one goes on and on"
    assert split_text(text, limit) == ["First paragraph is here.", "Second one goes on and on"]
    text = "One line of text here\nanother line that is long"
    assert split_text(text, limit)[0] == "One line of text here"
    text = "A sentence ends here. And then more words follow"
    assert split_text(text, limit)[0] == "A sentence ends here."


def test_text_without_spaces_is_cut_hard_at_the_limit() -> None:
    chunks = split_text("x" * 10, Limit(4))
    assert chunks == ["xxxx", "xxxx", "xx"]


@pytest.mark.parametrize("cluster", [FAMILY, FLAG, SKIN, E_ACUTE, ZALGO, "\r\n".join("ab")])
def test_grapheme_clusters_are_never_cut(cluster: str) -> None:
    text = ("ab" + cluster) * 300
    for limit in (Limit(7), Limit(50), Limit(31, "bytes"), LIMITS["instagram"]):
        chunks = split_text(text, limit)
        assert _squash(_joined(chunks)) == _squash(text)
        assert all(limit.cost(c) <= limit.size for c in chunks)
        whole = set(graphemes(text))
        for chunk in chunks:
            # A piece of a cut cluster would be a cluster the original does not have.
            assert set(graphemes(chunk)) <= whole


def test_flags_stay_pairs_and_families_stay_whole() -> None:
    flags = FLAG * 700
    chunks = split_text(flags, LIMITS["instagram"])
    assert all(c == FLAG * (len(c) // 2) for c in chunks)
    family = FAMILY * 200
    chunks = split_text(family, LIMITS["instagram"])
    assert all(graphemes(c) == [FAMILY] * len(graphemes(c)) for c in chunks)
    assert _joined(chunks) == family


def test_instagram_counts_utf8_bytes() -> None:
    text = "é" * 900  # 1,800 bytes
    chunks = split_text(text, LIMITS["instagram"])
    assert [len(c.encode()) for c in chunks] == [1000, 800]
    assert LIMITS["messenger"].size < 2000 and LIMITS["messenger"].unit == "chars"


def test_one_cluster_larger_than_the_limit_is_cut_between_code_points() -> None:
    monster = "a" + "\u0301" * 30
    chunks = split_text(monster, Limit(8))
    assert _joined(chunks) == monster
    assert all(len(c) <= 8 for c in chunks)


@settings(max_examples=300, deadline=None)
@example(text=" \u0301", size=4, unit="chars")  # a space carrying a combining mark
@example(text="\U0001f468\u200d\U0001f469\u200d\U0001f467 \u0301", size=4, unit="chars")
@given(
    text=st.lists(
        st.sampled_from(
            ["a", "b", " ", "\n", ".", "é", E_ACUTE, FAMILY, FLAG, SKIN, "\u0301", "日"]
        ),
        max_size=200,
    ).map("".join),
    size=st.integers(min_value=4, max_value=60),
    unit=st.sampled_from(["chars", "bytes"]),
)
def test_splitting_keeps_every_non_space_character_in_order(
    text: str, size: int, unit: str
) -> None:
    limit = Limit(size, unit)
    chunks = split_text(text, limit)
    assert _squash(_joined(chunks)) == _squash(text)
    # No chunk starts or ends with a whitespace-only cluster (a space carrying a combining mark
    # is one cluster, not whitespace, and is never cut apart).
    assert all(c and not _is_blank(graphemes(c)[0]) for c in chunks)
    assert all(not _is_blank(graphemes(c)[-1]) for c in chunks)
    assert all(limit.cost(c) <= size for c in chunks)
    stripped = _strip_clusters(text)
    clusters = graphemes(stripped)
    if all(limit.cost(c) <= size for c in clusters):
        # No cluster of the original is split across two chunks.
        boundaries = set()
        position = 0
        for c in clusters:
            position += len(c)
            boundaries.add(position)
        offset = 0
        for chunk in chunks:
            start = stripped.index(chunk, offset)
            offset = start + len(chunk)
            assert start == 0 or start in boundaries
            assert offset in boundaries
    assert unicodedata.is_normalized("NFC", "x")  # the splitter never normalizes text


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (429, 130429, meta.RETRY),
        (400, 131056, meta.RETRY),
        (400, 80007, meta.RETRY),
        (400, 4, meta.RETRY),
        (500, 131000, meta.RETRY),
        (503, None, meta.RETRY),
        (400, 613, meta.RETRY),
        (401, 190, meta.CREDENTIALS),
        (400, 190, meta.CREDENTIALS),
        (400, 102, meta.CREDENTIALS),
        (400, 131047, meta.NEVER),
        (400, 131026, meta.NEVER),
        (400, 131048, meta.NEVER),
        (400, 368, meta.NEVER),
        (400, 100, meta.NEVER),
        (400, 551, meta.NEVER),
        (403, 10, meta.NEVER),
    ],
)
def test_graph_errors_are_classified_by_code(status: int, code: int | None, kind: str) -> None:
    body = {"error": {"code": code, "type": "OAuthException"}} if code is not None else None
    error = meta.classify_error(status, body)
    assert error.kind == kind and error.code == code
    assert whatsapp.classify_error(status, body) == kind
    assert "graph" in error.describe() and "message" not in error.describe()


def test_auth_exception_with_code_zero_is_credentials() -> None:
    body = {"error": {"code": 0, "type": "AuthException"}}
    assert meta.classify_error(400, body).kind == meta.CREDENTIALS
    assert meta.classify_error(400, {"error": {"code": True}}).code is None


def test_retry_after_seconds_and_http_dates() -> None:
    assert meta.classify_error(429, None, "2").retry_after == 2.0
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert meta.parse_retry_after("Thu, 01 Jan 2026 12:00:05 GMT", now=now) == 5.0
    assert meta.parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert meta.parse_retry_after("soon") is None
    assert meta.parse_retry_after("nan") is None
    assert meta.parse_retry_after(None) is None
    assert meta.parse_retry_after("999999") == 3600.0


def test_transport_errors_before_the_request_are_safe_to_retry_and_after_it_ambiguous() -> None:
    request = httpx.Request("POST", "http://graph/x")
    assert meta.classify_transport_error(httpx.ConnectError("x", request=request)) == meta.NOT_SENT
    assert meta.classify_transport_error(httpx.ConnectTimeout("x", request=request)) == (
        meta.NOT_SENT
    )
    assert meta.classify_transport_error(httpx.PoolTimeout("x", request=request)) == meta.NOT_SENT
    for exc in (
        httpx.ReadTimeout("x", request=request),
        httpx.WriteTimeout("x", request=request),
        httpx.ReadError("reset", request=request),
        httpx.RemoteProtocolError("closed", request=request),
    ):
        assert meta.classify_transport_error(exc) == meta.AMBIGUOUS


def test_backoff_has_full_jitter_a_cap_and_never_undercuts_retry_after() -> None:
    rng = random.Random(1)  # noqa: S311  # a seeded draw makes the test repeatable
    delays = [backoff_delay(3, base=0.5, cap=60, retry_after=None, rng=rng) for _ in range(200)]
    assert all(0 <= d <= 2.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 150  # spread out, not synchronised
    capped = [backoff_delay(30, base=0.5, cap=10, retry_after=None, rng=rng) for _ in range(50)]
    assert max(capped) <= 10
    honoured = [backoff_delay(1, base=0.5, cap=60, retry_after=2, rng=rng) for _ in range(100)]
    assert all(2 <= d <= 2.5 for d in honoured)
    assert len({round(d, 6) for d in honoured}) > 50


# --- WhatsApp send and status shapes ----------------------------------------------------------


def test_send_carries_the_idempotency_key_as_callback_data() -> None:
    _, body = whatsapp.build_text_send(phone_number_id="1", to="2", text="hi", callback_data="41:0")
    assert body["biz_opaque_callback_data"] == "41:0"


def test_status_callback_data_is_parsed() -> None:
    from webhooks import simulator

    payload = simulator.whatsapp_status(
        phone_number_id="1",
        message_id="wamid.A",
        status="read",
        recipient_id="2",
        callback_data="41:0",
    )
    (event,) = whatsapp.parse(payload)
    assert isinstance(event, StatusUpdate)
    assert (event.status, event.callback_data, event.message_id) == ("read", "41:0", "wamid.A")


# --- Instagram correlation -------------------------------------------------------------------


def test_instagram_echo_matches_recipient_text_and_time() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    h = instagram.text_hash("Hello there")
    candidates = [
        instagram.PendingSend(1, "igsid-1", h, t0),
        instagram.PendingSend(2, "igsid-1", h, t0 + timedelta(seconds=50)),
        instagram.PendingSend(3, "igsid-2", h, t0),
        instagram.PendingSend(4, "igsid-1", instagram.text_hash("Other"), t0),
    ]
    echo = instagram.Echo(
        "igsid-1", instagram.text_hash("  Hello there\n"), t0 + timedelta(seconds=45)
    )
    assert instagram.match_echo(candidates, echo) == candidates[1]  # the closest in time
    late = instagram.Echo("igsid-1", h, t0 + timedelta(seconds=200))
    assert instagram.match_echo(candidates, late) is None
    early = instagram.Echo("igsid-1", h, t0 - timedelta(seconds=60))
    assert instagram.match_echo(candidates, early) == candidates[0]  # ±60 s inclusive
    tie = [instagram.PendingSend(9, "r", h, t0), instagram.PendingSend(5, "r", h, t0)]
    assert instagram.match_echo(tie, instagram.Echo("r", h, t0)) == tie[1]  # oldest chunk
    assert instagram.text_hash("e\u0301") == instagram.text_hash("\u00e9")  # NFC


# --- sandbox fault spec ----------------------------------------------------------------------


def test_fault_spec_parses_and_rejects_unknown_names() -> None:
    faults = Faults.parse("429=0.01, 500=0.02,stall=0.005,drop_webhooks=0.5,retry_after=2")
    assert faults == Faults(0.01, 0.02, 0.005, 0.5, 2.0)
    assert Faults.parse("") == Faults()
    with pytest.raises(ValueError, match="unknown sandbox fault"):
        Faults.parse("teapot=1")
