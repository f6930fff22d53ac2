"""Properties of the screening seam over generated text.

* Any text: screening never raises, findings are sorted, in bounds and disjoint, and redacted
  text holds nothing that ``find_pii`` would still flag.
* Planted PII of known validity inside random prose is always found, with its exact span.
"""

from __future__ import annotations

import phonenumbers
from hypothesis import given, settings
from hypothesis import strategies as st

from moderation import PiiType, find_pii, make_canary, redact, screen_inbound, screen_outbound
from moderation.pii import PHONE_REGIONS

# No example database: the run must not write into the work tree.
quick = settings(database=None, deadline=None, max_examples=200)
thorough = settings(database=None, deadline=None, max_examples=500)

# Text rich in what the detectors look at, so shrinking lands on interesting cases.
DIGITISH = st.text(
    alphabet=st.sampled_from(list("0123456789       +-().@/:,%$€abcxyz.\u00a0\u200b٣５\n")),
    max_size=120,
)
ANY_TEXT = st.one_of(st.text(max_size=300), DIGITISH)


def assert_well_formed(text: str) -> None:
    findings = find_pii(text)
    assert findings == sorted(findings, key=lambda f: f.start)
    for finding in findings:
        assert 0 <= finding.start < finding.end <= len(text)
    for before, after in zip(findings, findings[1:], strict=False):
        assert before.end <= after.start


@quick
@given(ANY_TEXT)
def test_inbound_never_raises_and_redacted_text_is_clean(text: str) -> None:
    verdict = screen_inbound(text)
    assert verdict.action == "allow"
    assert_well_formed(text)
    assert find_pii(verdict.redacted) == []
    assert verdict.reasons == tuple(sorted({f"pii.{f.kind}" for f in verdict.findings}, key=_order))


def _order(reason: str) -> int:
    return list(PiiType).index(PiiType(reason.removeprefix("pii.")))


@quick
@given(ANY_TEXT, st.sets(st.sampled_from(PiiType)))
def test_allowed_kinds_survive_and_nothing_else_does(text: str, allow: set[PiiType]) -> None:
    findings = find_pii(text)
    redacted = redact(text, findings, allow=allow)
    assert {f.kind for f in find_pii(redacted)} <= allow


@quick
@given(ANY_TEXT, ANY_TEXT, ANY_TEXT, st.text(max_size=40))
def test_outbound_never_raises(reply: str, user_text: str, system_prompt: str, seed: str) -> None:
    verdict = screen_outbound(
        reply, canary=make_canary(seed), user_text=user_text, system_prompt=system_prompt
    )
    blocking = {"empty", "canary.leak", "system_prompt.leak"}
    assert verdict.allowed == (not blocking & set(verdict.reasons))
    if not verdict.allowed:
        assert verdict.text == ""


# --- planted PII -------------------------------------------------------------------------------

FORMATS = (
    phonenumbers.PhoneNumberFormat.NATIONAL,
    phonenumbers.PhoneNumberFormat.INTERNATIONAL,
    phonenumbers.PhoneNumberFormat.E164,
)
TYPES = (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE)


def _example_phones() -> list[str]:
    phones: list[str] = []
    for region in PHONE_REGIONS:
        for number_type in TYPES:
            number = phonenumbers.example_number_for_type(region, number_type)
            assert number is not None
            phones.extend(phonenumbers.format_number(number, f) for f in FORMATS)
    return phones


PHONES = st.sampled_from(_example_phones())


def _luhn_check_digit(body: str) -> str:
    total = 0
    for position, char in enumerate(reversed(body)):
        value = int(char)
        if position % 2 == 0:  # doubled once the check digit is appended
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return str(-total % 10)


@st.composite
def cards(draw: st.DrawFn) -> str:
    body = draw(st.text(alphabet="0123456789", min_size=12, max_size=18))
    number = body + _luhn_check_digit(body)
    separator = draw(st.sampled_from(["", " ", "-"]))
    return separator.join(number[i : i + 4] for i in range(0, len(number), 4))


_LOCAL_ATOM = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=10)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@st.composite
def emails(draw: st.DrawFn) -> str:
    local = draw(st.lists(_LOCAL_ATOM, min_size=1, max_size=3))
    joined = draw(st.sampled_from([".", "+", "-"])).join(local)
    labels = draw(st.lists(_LABEL, min_size=1, max_size=3))
    tld = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=6))
    return f"{joined}@{'.'.join([*labels, tld])}"


# Prose around the PII: words in several scripts with punctuation, no digits, and none of the
# characters that change how a neighbouring number reads ('+', '@', currency signs, '%').
WORD = st.text(
    alphabet=st.characters(categories=["L", "Pd", "Po", "Ps", "Pe"], exclude_characters="+@%#"),
    min_size=1,
    max_size=12,
)
PROSE = st.lists(WORD, max_size=8).map(" ".join)


def _planted(prefix: str, value: str, suffix: str) -> tuple[str, int]:
    text = f"{prefix} {value} {suffix}"
    return text, len(prefix) + 1


@thorough
@given(PROSE, PHONES, PROSE)
def test_planted_phone_is_found(prefix: str, phone: str, suffix: str) -> None:
    text, start = _planted(prefix, phone, suffix)
    findings = [f for f in find_pii(text) if f.start < start + len(phone) and f.end > start]
    assert [(f.kind, f.start, f.end) for f in findings] == [
        (PiiType.PHONE, start, start + len(phone))
    ]


@thorough
@given(PROSE, cards(), PROSE)
def test_planted_card_is_found(prefix: str, card: str, suffix: str) -> None:
    text, start = _planted(prefix, card, suffix)
    findings = [f for f in find_pii(text) if f.start < start + len(card) and f.end > start]
    assert [(f.kind, f.start, f.end) for f in findings] == [
        (PiiType.CARD, start, start + len(card))
    ]


@thorough
@given(PROSE, emails(), PROSE)
def test_planted_email_is_found(prefix: str, email: str, suffix: str) -> None:
    text, start = _planted(prefix, email, suffix)
    findings = [f for f in find_pii(text) if f.start < start + len(email) and f.end > start]
    assert [(f.kind, f.start, f.end) for f in findings] == [
        (PiiType.EMAIL, start, start + len(email))
    ]


@quick
@given(PROSE, st.lists(st.one_of(PHONES, cards(), emails()), min_size=1, max_size=4))
def test_planted_pii_is_redacted(prose: str, values: list[str]) -> None:
    text = f" {prose} ".join(values)
    redacted = screen_inbound(text).redacted
    for value in values:
        assert value not in redacted
