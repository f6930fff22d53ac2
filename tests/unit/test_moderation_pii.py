"""find_pii and redact: what counts as an e-mail, a phone number and a card, and what does not."""

from __future__ import annotations

import phonenumbers
import pytest

from moderation import Finding, PiiType, find_pii, redact
from moderation.pii import PHONE_REGIONS


def found(text: str) -> list[tuple[PiiType, str]]:
    return [(finding.kind, finding.text(text)) for finding in find_pii(text)]


def only(kind: PiiType, value: str) -> None:
    text = f"hi, it's {value} thanks"
    assert found(text) == [(kind, value)]


# --- phones ------------------------------------------------------------------------------------

NATIONAL_PHONES = [
    ("US", "(201) 555-0123"),
    ("US", "201-555-0123"),
    ("US", "201.555.0123"),
    ("GB", "020 7946 0958"),
    ("GB", "07400 123456"),
    ("DE", "030 123456"),
    ("DE", "0151 23456789"),
    ("DE", "030/1234567"),
    ("ES", "612 34 56 78"),
    ("ES", "912 345 678"),
    ("FR", "06 12 34 56 78"),
    ("FR", "01.23.45.67.89"),
    ("IT", "02 1234 5678"),
    ("IT", "312 345 6789"),
    ("PT", "912 345 678"),
    ("PT", "21 234 5678"),
    ("NL", "06 12345678"),
    ("NL", "010-123 4567"),
    ("BE", "0470 12 34 56"),
    ("BE", "02 511 12 34"),
    ("IN", "98765 43210"),
    ("IN", "081234 56789"),
    ("BR", "(11) 96123-4567"),
    ("BR", "(11) 2345-6789"),
]

INTERNATIONAL_PHONES = [
    "+1 201-555-0123",
    "+1 (201) 555-0123",
    "+44 20 7946 0958",
    "+44 7400 123456",
    "+49 151 23456789",
    "+49 (0) 30 123456",
    "(+49) 151 23456789",
    "+4915123456789",
    "0049 151 23456789",
    "+34 612 34 56 78",
    "+33 6 12 34 56 78",
    "+39 312 345 6789",
    "+351 912 345 678",
    "+31 6 12345678",
    "+32 470 12 34 56",
    "+91 98765 43210",
    "+55 11 96123-4567",
    "+81 3-1234-5678",  # Japan: any country code works in international form
    "+61 2 9374 4000",
]


@pytest.mark.parametrize(("region", "phone"), NATIONAL_PHONES)
def test_national_phone_of_each_default_region(region: str, phone: str) -> None:
    assert phonenumbers.is_valid_number(phonenumbers.parse(phone, region))
    only(PiiType.PHONE, phone)


def test_national_table_covers_every_default_region() -> None:
    assert {region for region, _ in NATIONAL_PHONES} == set(PHONE_REGIONS)


@pytest.mark.parametrize("phone", INTERNATIONAL_PHONES)
def test_international_phone(phone: str) -> None:
    only(PiiType.PHONE, phone)


@pytest.mark.parametrize("region", PHONE_REGIONS)
@pytest.mark.parametrize(
    "number_format",
    [
        phonenumbers.PhoneNumberFormat.NATIONAL,
        phonenumbers.PhoneNumberFormat.INTERNATIONAL,
        phonenumbers.PhoneNumberFormat.E164,
    ],
    ids=["national", "international", "e164"],
)
@pytest.mark.parametrize(
    "number_type",
    [phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE],
    ids=["fixed", "mobile"],
)
def test_example_numbers_of_each_region(region: str, number_format: int, number_type: int) -> None:
    number = phonenumbers.example_number_for_type(region, number_type)
    assert number is not None
    only(PiiType.PHONE, phonenumbers.format_number(number, number_format))


@pytest.mark.parametrize(
    "phone",
    ["٠١٥١ ٢٣٤٥٦٧٨٩", "０１５１ ２３４５６７８９"],
    ids=["arabic-indic", "fullwidth"],
)
def test_phone_in_other_digit_scripts(phone: str) -> None:
    only(PiiType.PHONE, phone)


def test_phone_next_to_punctuation() -> None:
    text = "Tel.:0151-23456789, or (201) 555-0123."
    assert found(text) == [(PiiType.PHONE, "0151-23456789"), (PiiType.PHONE, "(201) 555-0123")]


# --- cards -------------------------------------------------------------------------------------

CARDS = [
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "4111111111111111",
    "5555 5555 5555 4444",
    "3782 822463 10005",  # 15 digits, 4-6-5
    "6011-1111-1111-1117",
    "30569309025904",  # 14 digits
    "4222222222222",  # 13 digits
    "6304000000000000018",  # 19 digits
    "4111-1111 1111 1111",  # mixed separators
    "0000 0000 0000 0",  # Luhn is the only test; issuer prefixes are not checked
]

NOT_CARDS = [
    "4111 1111 1111 1112",
    "4111-1111-1111-1112",
    "1234 5678 9012 3456",
    "5555 5555 5555 4440",
    "411111111111",  # 12 digits
    "41111111111111111111",  # 20 digits
]


@pytest.mark.parametrize("card", CARDS)
def test_luhn_valid_card(card: str) -> None:
    only(PiiType.CARD, card)


@pytest.mark.parametrize("number", NOT_CARDS)
def test_luhn_invalid_or_wrong_length_is_no_card(number: str) -> None:
    assert PiiType.CARD not in {kind for kind, _ in found(f"ref {number} ok")}


def test_card_keeps_expiry_out() -> None:
    text = "card 4111 1111 1111 1111 exp 12/27 cvc 123"
    assert found(text) == [(PiiType.CARD, "4111 1111 1111 1111")]


# --- e-mails -----------------------------------------------------------------------------------

EMAILS = [
    "john.doe@example.com",
    "a+tag@sub.example.co.uk",
    "first_last@x-y.io",
    "UPPER@EXAMPLE.ORG",
    "o.brien@x.com",
    "user%relay@example.net",
    "x@xn--bcher-kva.de",
    "12345@numbers.example",
]

NOT_EMAILS = [
    "@handle",
    "john@localhost",
    "a@b",
    "john..doe@example.com",
    "john.@example.com",
    "name@domain.c",
    "foo@-bar.com",
    "user@exa_mple.com",
    "me at example dot com",
]


@pytest.mark.parametrize("email", EMAILS)
def test_email(email: str) -> None:
    only(PiiType.EMAIL, email)


@pytest.mark.parametrize("text", NOT_EMAILS)
def test_not_email(text: str) -> None:
    assert found(text) == []


def test_email_at_sentence_end_and_in_brackets() -> None:
    text = "write to jane@example.com. Or <bob@example.org>, (ann@example.de)"
    assert found(text) == [
        (PiiType.EMAIL, "jane@example.com"),
        (PiiType.EMAIL, "bob@example.org"),
        (PiiType.EMAIL, "ann@example.de"),
    ]


def test_labels_cut_from_an_email_are_scanned_again() -> None:
    text = "x@example.com.5551234567"
    assert found(text) == [(PiiType.EMAIL, "x@example.com"), (PiiType.PHONE, "5551234567")]


# --- things that are not PII -------------------------------------------------------------------

NOT_PII = [
    "Your order 123456789 has shipped",  # a valid French number, but written without its 0
    "ref 48291337",
    "ticket 7654321",
    "in 2024 and 2025",
    "between 1999 and 2024",
    "on 2024-05-01",
    "on 01.05.2024 at 10:30",
    "on 2024-05-01 10:30",
    "on 12/05/2024",
    "on 5/1/24 10:00",
    "at 10:30-11:45",
    "it costs $1,299.99",
    "it costs € 1.250.000",
    "it costs 1 250 000 €",
    "50 % off 1234567",
    "call 112 or 911",
    "room 101, floor 7",
    "1234567",
    "123456",
    "code 4829",
    "build 20240501",
    "2024-05-01T10:30:00Z",
    "SKU A1234567890",
    "1234567890kg",
    "v1.2.3 and 3.14159265",
    "order no. 4111111111111112",
    "tracking 1Z999AA10123456784",
]


@pytest.mark.parametrize("text", NOT_PII)
def test_not_pii(text: str) -> None:
    assert found(text) == []


# --- several in one text, overlaps -------------------------------------------------------------


def test_several_kinds_in_order() -> None:
    text = "mail a@example.com, card 4111 1111 1111 1111, phone +44 20 7946 0958"
    assert found(text) == [
        (PiiType.EMAIL, "a@example.com"),
        (PiiType.CARD, "4111 1111 1111 1111"),
        (PiiType.PHONE, "+44 20 7946 0958"),
    ]


def test_card_wins_when_a_span_is_both() -> None:
    number = "0044 20 7946 0006"  # a valid UK number dialled with 00, and Luhn-valid
    assert phonenumbers.is_valid_number(phonenumbers.parse(number, "DE"))
    only(PiiType.CARD, number)


def test_plus_opens_a_phone_never_a_card() -> None:
    assert found("+4111111111111111") == []


def test_phone_and_card_in_one_run_do_not_overlap() -> None:
    text = "+1 201-555-0123 4111 1111 1111 1111"
    assert found(text) == [
        (PiiType.PHONE, "+1 201-555-0123"),
        (PiiType.CARD, "4111 1111 1111 1111"),
    ]


def test_two_phones_in_one_run() -> None:
    text = "0151 23456789 / 030 123456"
    assert found(text) == [(PiiType.PHONE, "0151 23456789"), (PiiType.PHONE, "030 123456")]


def test_date_next_to_phone() -> None:
    text = "01.05.2024 0151 23456789"
    assert found(text) == [(PiiType.PHONE, "0151 23456789")]


def test_findings_never_overlap_and_are_sorted() -> None:
    text = "4111 1111 1111 1111 0151 23456789 a@b.de +49 30 123456 5555555555554444"
    findings = find_pii(text)
    assert [f.kind for f in findings] == [
        PiiType.CARD,
        PiiType.PHONE,
        PiiType.EMAIL,
        PiiType.PHONE,
        PiiType.CARD,
    ]
    for before, after in zip(findings, findings[1:], strict=False):
        assert before.end <= after.start


# --- Finding -----------------------------------------------------------------------------------


def test_finding_has_span_but_no_value() -> None:
    text = "call 0151 23456789"
    (finding,) = find_pii(text)
    assert finding == Finding(PiiType.PHONE, 5, 18)
    assert finding.text(text) == "0151 23456789"
    assert not hasattr(finding, "value")
    assert "23456789" not in repr(finding)
    with pytest.raises(AttributeError):
        finding.start = 0  # type: ignore[misc]  # frozen: assignment must fail at run time


# --- redact ------------------------------------------------------------------------------------


def test_redact_exact_output() -> None:
    text = "Hi, I'm at jane@example.com or +49 151 23456789; card 4111-1111-1111-1111."
    assert redact(text, find_pii(text)) == "Hi, I'm at <EMAIL> or <PHONE>; card <CARD>."


def test_redact_allow_list() -> None:
    text = "jane@example.com, 0151 23456789, 4111111111111111"
    findings = find_pii(text)
    assert redact(text, findings, allow={PiiType.EMAIL}) == "jane@example.com, <PHONE>, <CARD>"
    assert redact(text, findings, allow=[PiiType.PHONE, PiiType.CARD]) == (
        "<EMAIL>, 0151 23456789, 4111111111111111"
    )
    assert redact(text, findings, allow=set(PiiType)) == text


def test_redact_without_findings_is_identity() -> None:
    assert redact("nothing here", []) == "nothing here"
    assert redact("", []) == ""


def test_redact_merges_overlapping_spans() -> None:
    text = "0123456789"
    findings = [
        Finding(PiiType.PHONE, 2, 6),
        Finding(PiiType.CARD, 4, 8),
        Finding(PiiType.EMAIL, 5, 6),
    ]
    assert redact(text, findings) == "01<PHONE>89"


def test_redact_overlap_with_allowed_kind_still_hides_the_other() -> None:
    text = "0123456789"
    findings = [Finding(PiiType.EMAIL, 0, 6), Finding(PiiType.PHONE, 4, 8)]
    assert redact(text, findings, allow={PiiType.EMAIL}) == "0123<PHONE>89"


def test_redact_clips_spans_outside_the_text() -> None:
    findings = [
        Finding(PiiType.PHONE, -3, 2),
        Finding(PiiType.CARD, 8, 99),
        Finding(PiiType.EMAIL, 5, 5),
    ]
    assert redact("0123456789", findings) == "<PHONE>234567<CARD>"


# --- PII glued together ------------------------------------------------------------------------

GLUED = [
    (
        "0151 23456789+4930123456",
        [(PiiType.PHONE, "0151 23456789"), (PiiType.PHONE, "+4930123456")],
    ),
    ("a@b.de+4915123456789", [(PiiType.EMAIL, "a@b.de"), (PiiType.PHONE, "+4915123456789")]),
    ("a@b.de.x.y@ex.co.uk", [(PiiType.EMAIL, "a@b.de"), (PiiType.EMAIL, "x.y@ex.co.uk")]),
    ("(201) 555-0123 0.0@0.aa", [(PiiType.PHONE, "(201) 555-0123"), (PiiType.EMAIL, "0.0@0.aa")]),
    ("(201) 555-0123 0a@b.de", [(PiiType.PHONE, "(201) 555-0123"), (PiiType.EMAIL, "0a@b.de")]),
    ("1234567890123@numbers.example", [(PiiType.EMAIL, "1234567890123@numbers.example")]),
]


@pytest.mark.parametrize(("text", "expected"), GLUED)
def test_pii_glued_together(text: str, expected: list[tuple[PiiType, str]]) -> None:
    assert found(text) == expected


# Inputs on which an earlier version left something for a second pass to find.
SECOND_PASS = [
    "x.y@ex.co.uk-010 123 4567-%-555)",
    "+3212345678,a@b.de.x.y@ex.co.uk.030)",
    "074104 10123+34612345678 - 23456789  ab +32450001234@ab.",
    ".@a@b.de.07400 123456)555/+33123456789  01512 3456789)",
    "( - +351912345678-x.y@ex.co.ukx+917410410123)+91 81234 56789 - x.y@ex.co.uk.",
    "x.y@ex.co.uk٣06 12 34 56 78(201) 555-0123@0958(+441212345678.",
    "(201) 555-0123@+5511961234567 a@b.dex.+12015550123xx.y@ex.co.uk.",
    "a@b.dex%-a@b.dex",
    "01 23 45 67 89012 34 56 78\xa023456789٣.a@b.dex",
]


@pytest.mark.parametrize("text", SECOND_PASS)
def test_redacted_text_has_nothing_left(text: str) -> None:
    assert find_pii(text)
    assert find_pii(redact(text, find_pii(text))) == []
