"""Structured PII in chat text: find it, then replace it with typed placeholders.

Contract of every public function here: pure (no I/O, no logging, no global state that changes),
deterministic, and safe for any ``str`` (arbitrary unicode, lone surrogates, huge inputs) -- they
never raise on their input.

How ``find_pii`` works: one pre-compiled regex pass over the text yields cheap *candidates*
(e-mail-shaped runs, and runs of digits joined by phone/card separators). Only candidates are
validated, so text without '@' and without long digit runs costs one regex scan:

* e-mail: a sane ASCII ``local@domain.tld`` (no dot at either end of the local part, no '..',
  DNS-shaped labels, an alphabetic or punycode TLD);
* card: 13-19 digits in whole digit groups joined by spaces or dashes (one kind throughout is
  tried first), Luhn-valid; issuer prefixes are not checked;
* phone: 7+ digits, ``phonenumbers`` validity (``is_valid_number``) for ``+CC`` forms in any
  region and for national forms in ``PHONE_REGIONS``; national forms must carry the trunk prefix
  where the region writes one (libphonenumber's VALID leniency), so a bare 9-digit order number is
  not a French phone number.

Not PII: digit runs glued to a word ("A1234567", "1234567kg"), runs next to a currency or percent
sign (amounts), dates ("2024-05-01", "01.05.2024"; nothing is read across a date).

Cards win over phones: a run is searched for cards first, and only the gaps between cards for
phones. Findings never overlap and are sorted by position. Redaction is stable: nothing is found
in ``redact(text, find_pii(text))``.

Adding a detector (IBAN, URL, ...) means a new ``PiiType`` member, a named alternative in
``_CANDIDATES`` and a validator branch in ``_scan``; a recognizer that needs a model (NER)
belongs in a separate pass that returns the same ``Finding`` type.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from enum import StrEnum, auto
from functools import partial

import phonenumbers

__all__ = [
    "PHONE_REGIONS",
    "Finding",
    "PiiType",
    "find_pii",
    "placeholder",
    "redact",
]

PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "ES", "FR", "IT", "PT", "NL", "BE", "IN", "BR")
"""Regions whose national number formats (no ``+CC``) are recognised."""


class PiiType(StrEnum):
    """Kinds of PII; the value is used in reason codes (``pii.phone``)."""

    EMAIL = auto()
    PHONE = auto()
    CARD = auto()


@dataclass(frozen=True, slots=True)
class Finding:
    """A span of PII in the text it was found in.

    Holds only the kind and the span, never the value, so a finding can be logged or stored
    next to the redacted text without leaking what it points at.
    """

    kind: PiiType
    start: int
    end: int

    def text(self, original: str) -> str:
        """The PII itself, cut from ``original`` (the text this finding was made from)."""
        return original[self.start : self.end]


def placeholder(kind: PiiType) -> str:
    """The token that replaces PII of ``kind`` in redacted text, e.g. ``<PHONE>``."""
    return f"<{kind.name}>"


# --- candidates --------------------------------------------------------------------------------

_LOCAL_CHARS = r"A-Za-z0-9._%+\-"
# Characters that glue a digit run to a word ("A1234567", "1234567kg", "x_1234567"). Letters
# outside the Latin blocks do not, so digits written inside CJK or Thai text are still seen.
_WORD_CHARS = r"0-9A-Za-z_\u00c0-\u024f\u1e00-\u1eff"
_SEPARATORS = " \u00a0\u202f.\\-\u2010-\u2015\u2212()/"
# A digit group glued to a word on its right, or opening an e-mail address, ends the run before
# it: it belongs to an identifier ("1234567kg") or to the address ("call 0151 23456789 0.a@b.de").
_UNGLUED = rf"(?![{_WORD_CHARS}@]|(?<=[0-9])[{_LOCAL_CHARS}]{{1,64}}+@)"

_EMAIL = rf"[{_LOCAL_CHARS}]++@[A-Za-z0-9\-]++(?:\.[A-Za-z0-9\-]++)++"
_NUMBER = rf"(?:\(?\+|\()?\d++{_UNGLUED}(?:[{_SEPARATORS}]{{1,3}}+\d++{_UNGLUED})*+"
_CANDIDATES = re.compile(
    # Possessive quantifiers and the look-behinds (a candidate starts only where a run starts)
    # keep the scan linear on adversarial input such as 100k letters or digits. A '+' opens a
    # number wherever it stands ("0151 2345678+4930123456" is two numbers).
    rf"(?P<email>(?<![{_LOCAL_CHARS}]){_EMAIL})"
    rf"|(?P<number>(?:(?=\(?\+)|(?<![\d{_WORD_CHARS}+])){_NUMBER})"
)
# Right after an e-mail address the text is read as it will read once the address is redacted
# (after '>'), so that a second pass over redacted text finds nothing new.
_CANDIDATES_AFTER_EMAIL = re.compile(rf"(?P<email>{_EMAIL})|(?P<number>{_NUMBER})")
_DIGIT_GROUP = re.compile(r"\d+")

_MIN_DIGITS = 7
_CARD_DIGITS = range(13, 20)
_CARD_SEPARATORS = frozenset({" ", "\u00a0", "-"})
_PHONE_DIGITS = range(_MIN_DIGITS, 18)  # 15 digits of E.164 plus a two-digit IDD prefix
_PHONE_MAX_GROUPS = 8
_PHONE_MAX_SINGLE_DIGIT_GROUPS = 3
_DATE_SEPARATORS = frozenset({".", "-", "/"})


def find_pii(text: str) -> list[Finding]:
    """Every e-mail address, phone number and payment card number in ``text``.

    Returns non-overlapping findings sorted by ``start``; spans index into ``text``. Pure, no
    I/O, never raises. See the module docstring for what counts as each kind.
    """
    findings: list[Finding] = []
    _scan(text, 0, len(text), findings)
    return findings


def redact(text: str, findings: Iterable[Finding], *, allow: Collection[PiiType] = ()) -> str:
    """``text`` with every finding whose kind is not in ``allow`` replaced by its placeholder.

    ``findings`` must come from ``text``. Spans are clipped to the text, and overlapping spans
    are merged so that no part of any of them survives (the merged span takes the placeholder of
    the finding that starts first). Pure, never raises.
    """
    spans: list[tuple[int, int, PiiType]] = []
    size = len(text)
    for finding in findings:
        if finding.kind in allow:
            continue
        start, end = max(finding.start, 0), min(finding.end, size)
        if start < end:
            spans.append((start, end, finding.kind))
    spans.sort(key=lambda span: (span[0], -span[1]))

    parts: list[str] = []
    cursor = 0  # end of the last replaced span
    for start, end, kind in spans:
        if start < cursor:
            cursor = max(cursor, end)
            continue
        parts.append(text[cursor:start])
        parts.append(placeholder(kind))
        cursor = end
    parts.append(text[cursor:])
    return "".join(parts)


def _scan(text: str, start: int, end: int, out: list[Finding]) -> None:
    position = start
    after_email = False
    while position < end:
        match = _CANDIDATES_AFTER_EMAIL.match(text, position, end) if after_email else None
        after_email = False
        if match is None:
            match = _CANDIDATES.search(text, position, end)
            if match is None:
                return
        position = match.end()
        if match.lastgroup == "number":
            _number_findings(text, match.start(), match.end(), out)
            continue
        email = _email_span(text, match.start(), match.end())
        if email is not None:
            out.append(Finding(PiiType.EMAIL, *email))
            # Labels cut from the end of the domain ("a@b.de.0151 2345678") are text again.
            position = email[1]
            after_email = True


# --- e-mail ------------------------------------------------------------------------------------


def _email_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    candidate = text[start:end]
    at = candidate.index("@")
    local = candidate[:at]
    stripped = local.lstrip(".-+%")
    lead = len(local) - len(stripped)
    local = stripped
    if not local or len(local) > 64 or local.endswith(".") or ".." in local:
        return None
    labels = candidate[at + 1 :].split(".")
    while len(labels) > 2 and not _is_tld(labels[-1]):
        labels.pop()
    if not _is_tld(labels[-1]) or not all(_is_label(label) for label in labels):
        return None
    span_end = start + at + 1 + len(".".join(labels))
    if span_end - (start + lead) > 254:
        return None
    return start + lead, span_end


def _is_label(label: str) -> bool:
    return 0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-"


def _is_tld(label: str) -> bool:
    if label.startswith("xn--"):
        return _is_label(label)
    return 2 <= len(label) <= 63 and label.isascii() and label.isalpha()


# --- digit runs: cards, then phones ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Group:
    """One maximal run of digits inside a candidate."""

    start: int
    end: int
    lead: int  # where a window starting at this group starts: before a '(' or '+' that opens it
    digits: str  # ASCII digits


def _number_findings(text: str, start: int, end: int, out: list[Finding]) -> None:
    groups = _groups(text, start, end)
    if not groups or sum(len(group.digits) for group in groups) < _MIN_DIGITS:
        return
    if _is_amount(text, start, groups[-1].end):
        return
    # Dates split the run: no card or phone is read across one.
    dates = _date_groups(text, groups)
    plus = "+" in text[start : groups[0].start]
    first = 0
    for index in [*sorted(dates), len(groups)]:
        if index >= first:
            segment = groups[first:index]
            _segment_findings(text, segment, plus_first=plus and first == 0, out=out)
        first = max(first, index + 1)


def _segment_findings(
    text: str, groups: list[_Group], *, plus_first: bool, out: list[Finding]
) -> None:
    if sum(len(group.digits) for group in groups) < _MIN_DIGITS:
        return
    cards = _card_windows(text, groups, plus_first=plus_first)
    previous = 0
    for first, last in [*cards, (len(groups), len(groups))]:
        for phone_first, phone_last in _phone_windows(text, groups[previous:first]):
            a, b = groups[previous + phone_first], groups[previous + phone_last]
            out.append(Finding(PiiType.PHONE, a.lead, b.end))
        if first < len(groups):
            out.append(Finding(PiiType.CARD, groups[first].lead, groups[last].end))
        previous = last + 1


def _groups(text: str, start: int, end: int) -> list[_Group]:
    groups: list[_Group] = []
    for match in _DIGIT_GROUP.finditer(text, start, end):
        lead = match.start()
        if not groups:
            lead = start
        elif text[lead - 1] == "(":
            lead -= 1
        groups.append(_Group(match.start(), match.end(), lead, _ascii_digits(match.group())))
    return groups


def _ascii_digits(run: str) -> str:
    if run.isascii():
        return run
    return "".join(str(unicodedata.decimal(char, 0)) for char in run)


def _is_amount(text: str, start: int, end: int) -> bool:
    """A run next to a currency sign or a percent sign is a price or a rate, not PII."""
    before = text[max(start - 2, 0) : start].rstrip(" \u00a0")
    after = text[end : end + 2].lstrip(" \u00a0")
    return bool(
        (before and unicodedata.category(before[-1]) == "Sc")
        or (after and (after[0] == "%" or unicodedata.category(after[0]) == "Sc"))
    )


def _card_windows(text: str, groups: list[_Group], *, plus_first: bool) -> list[tuple[int, int]]:
    """Leftmost, then longest, Luhn-valid windows of whole groups; they do not overlap.

    Windows with one kind of separator are taken first ("4111 1111 1111 1111"), so a card next
    to another number is cut at the right place; a card typed with mixed separators is still
    found in what is left.
    """
    first = 1 if plus_first else 0  # '+' opens a phone number, never a card
    strict = _windows(groups, first, partial(_longest_card, text, groups, strict=True))
    windows: list[tuple[int, int]] = []
    previous = first
    for window in [*strict, (len(groups), len(groups))]:
        head = groups[: window[0]]
        windows.extend(_windows(head, previous, partial(_longest_card, text, head, strict=False)))
        if window[0] < len(groups):
            windows.append(window)
        previous = window[1] + 1
    return windows


def _windows(
    groups: list[_Group], first: int, longest: Callable[[int], int | None]
) -> list[tuple[int, int]]:
    """Scan left to right, taking at each group the longest window that ``longest`` accepts.

    Every window start is tried, so what is left between the windows holds no window that
    ``longest`` would accept: a second pass over redacted text finds nothing new.
    """
    windows: list[tuple[int, int]] = []
    while first < len(groups):
        last = longest(first)
        if last is None:
            first += 1
        else:
            windows.append((first, last))
            first = last + 1
    return windows


def _longest_card(text: str, groups: list[_Group], first: int, *, strict: bool) -> int | None:
    separator: str | None = None
    digits = ""
    ends: list[tuple[int, str]] = []
    for index in range(first, len(groups)):
        if index > first:
            gap = text[groups[index - 1].end : groups[index].start]
            if gap not in _CARD_SEPARATORS or (strict and separator not in (None, gap)):
                break
            separator = gap
        digits += groups[index].digits
        if len(digits) > _CARD_DIGITS.stop - 1:
            break
        if len(digits) in _CARD_DIGITS:
            ends.append((index, digits))
    for index, number in reversed(ends):
        if _luhn_ok(number):
            return index
    return None


def _luhn_ok(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _phone_windows(text: str, groups: list[_Group]) -> list[tuple[int, int]]:
    """Leftmost, then longest, valid phone windows of whole groups; they do not overlap."""
    return _windows(groups, 0, partial(_longest_phone, text, groups))


def _longest_phone(text: str, groups: list[_Group], first: int) -> int | None:
    ends: list[int] = []
    digits = 0
    singles = 0
    for index in range(first, min(first + _PHONE_MAX_GROUPS, len(groups))):
        digits += len(groups[index].digits)
        singles += len(groups[index].digits) == 1
        if digits > _PHONE_DIGITS.stop - 1 or singles > _PHONE_MAX_SINGLE_DIGIT_GROUPS:
            break
        if digits in _PHONE_DIGITS:
            ends.append(index)
    for last in reversed(ends):
        if _is_phone(text[groups[first].lead : groups[last].end]):
            return last
    return None


def _date_groups(text: str, groups: list[_Group]) -> set[int]:
    """Indexes of groups that form dates: three groups joined by one of . - / ("2024-05-01",
    "01.05.2024", "5/1/24").

    A two-digit year counts only when the same separator does not go on past the three groups,
    so a dotted French number ("06.12.34.56.78") is not read as a date.
    """
    dates: set[int] = set()
    gaps = [text[a.end : b.start] for a, b in zip(groups, groups[1:], strict=False)]
    for index in range(len(groups) - 2):
        gap = gaps[index]
        if gap not in _DATE_SEPARATORS or gaps[index + 1] != gap:
            continue
        a, b, c = (group.digits for group in groups[index : index + 3])
        alone = (index == 0 or gaps[index - 1] != gap) and (
            index + 2 == len(gaps) or gaps[index + 2] != gap
        )
        if _is_ymd(a, b, c) or _is_dmy(a, b, c, short_year=alone):
            dates.update(range(index, index + 3))
    return dates


def _is_ymd(year: str, month: str, day: str) -> bool:
    return (
        len(year) == 4
        and len(month) <= 2
        and len(day) <= 2
        and 1 <= int(month) <= 12
        and 1 <= int(day) <= 31
    )


def _is_dmy(first: str, second: str, year: str, *, short_year: bool) -> bool:
    if not (len(year) == 4 or (short_year and len(year) == 2)):
        return False
    if len(first) > 2 or len(second) > 2:
        return False
    one, two = int(first), int(second)
    day_month = 1 <= one <= 31 and 1 <= two <= 12
    month_day = 1 <= one <= 12 and 1 <= two <= 31
    return day_month or month_day


def _is_phone(candidate: str) -> bool:
    international = candidate.lstrip("(").startswith("+")
    for region in (None,) if international else PHONE_REGIONS:
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number) and _written_validly(candidate, region):
            return True
    return False


def _written_validly(candidate: str, region: str | None) -> bool:
    """libphonenumber's VALID leniency on the whole candidate.

    On top of validity it demands the trunk prefix where the region writes one ("030 ..." in
    Germany, not "30 ..."), and rejects time stamps and slash-separated dates. It runs only on
    candidates that already parsed as valid, so its cost stays off the common path.
    """
    digits = _ascii_digits("".join(_DIGIT_GROUP.findall(candidate)))
    matcher = phonenumbers.PhoneNumberMatcher(candidate, region, phonenumbers.Leniency.VALID)
    return any(
        _ascii_digits("".join(_DIGIT_GROUP.findall(match.raw_string))) == digits
        for match in matcher
    )
