"""The screening seam: one verdict for every inbound message and every draft reply.

``screen_inbound`` runs before anything reaches the model or the logs; ``screen_outbound`` runs
on the whole draft reply before any of it is sent. Both are pure functions: no I/O, no logging,
deterministic, and they never raise on any ``str``. Reasons and findings are codes and spans, safe
to log; the text a verdict carries is left out of its ``repr``.

Reason codes (the vocabulary the review queue shows):

=======================  ========================================================================
``pii.<type>``           inbound: PII of that type was found and redacted
``pii.leak.<type>``      outbound: the reply holds PII the user did not write; redacted, still sent
``canary.leak``          outbound: the system prompt's canary came back; not sent
``system_prompt.leak``   outbound: 12+ consecutive words of the system prompt; not sent
``empty``                outbound: nothing visible to send; not sent
=======================  ========================================================================

Later checks (abuse and injection classifiers, Llama Guard) add their reasons to the same tuple
and may raise ``action`` above ``allow``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

from moderation.canary import contains_canary
from moderation.pii import Finding, PiiType, find_pii, redact

__all__ = [
    "ALLOW",
    "PROMPT_LEAK_WORDS",
    "InboundVerdict",
    "OutboundVerdict",
    "screen_inbound",
    "screen_outbound",
]

ALLOW = "allow"
PROMPT_LEAK_WORDS = 12
"""A reply quoting this many consecutive words of the system prompt is a leak."""

_WORD = re.compile(r"\w+")


@dataclass(frozen=True, slots=True)
class InboundVerdict:
    """What to do with one inbound message.

    ``redacted`` is the text for the model, the logs and the dashboard list; ``findings`` are the
    PII spans in the *original* text (allowed kinds included); ``reasons`` name each redacted kind
    once, in ``PiiType`` order.
    """

    redacted: str = field(repr=False)
    findings: tuple[Finding, ...]
    reasons: tuple[str, ...]
    action: str = ALLOW


@dataclass(frozen=True, slots=True)
class OutboundVerdict:
    """Whether and what to send for one draft reply.

    ``text`` is what to send when ``allowed`` (PII leaks redacted) and empty otherwise, so a
    blocked reply cannot be sent by mistake. ``findings`` are the PII spans in the draft reply.
    """

    allowed: bool
    reasons: tuple[str, ...]
    text: str = field(repr=False)
    findings: tuple[Finding, ...]


def screen_inbound(text: str, *, allow: Collection[PiiType] = ()) -> InboundVerdict:
    """Find PII in an inbound message and redact every kind not in ``allow``.

    The action is always ``allow`` for now. Pure, no I/O, never raises.
    """
    findings = tuple(find_pii(text))
    return InboundVerdict(
        redacted=redact(text, findings, allow=allow),
        findings=findings,
        reasons=tuple(f"pii.{kind}" for kind in _kinds(findings) if kind not in allow),
    )


def screen_outbound(
    reply: str, *, canary: str, user_text: str = "", system_prompt: str = ""
) -> OutboundVerdict:
    """Screen a draft reply before anything of it is sent.

    Not allowed: a reply with nothing visible (``empty``), one that carries ``canary`` in any
    spacing or case (``canary.leak``), one that quotes ``PROMPT_LEAK_WORDS`` consecutive words of
    ``system_prompt`` (``system_prompt.leak``; pass the confidential instructions, not facts the
    bot is meant to tell customers).

    Allowed but redacted: PII in the reply that is neither in ``user_text`` (the user's own
    message) nor in ``system_prompt`` (contact details the operator gave the bot to share), with
    a ``pii.leak.<type>`` reason per kind. Every reason found is reported, also on a blocked reply.
    Pure, no I/O, never raises.
    """
    findings = tuple(find_pii(reply))
    reasons: list[str] = []
    if _is_blank(reply):
        reasons.append("empty")
    if contains_canary(reply, canary):
        reasons.append("canary.leak")
    if _quotes(reply, system_prompt, PROMPT_LEAK_WORDS):
        reasons.append("system_prompt.leak")
    allowed = not reasons

    known = _keys(user_text, find_pii(user_text)) | _keys(system_prompt, find_pii(system_prompt))
    leaks = [f for f in findings if not _is_known(_key(reply, f), known)]
    reasons.extend(f"pii.leak.{kind}" for kind in _kinds(leaks))
    return OutboundVerdict(
        allowed=allowed,
        reasons=tuple(reasons),
        text=redact(reply, leaks) if allowed else "",
        findings=findings,
    )


def _kinds(findings: Iterable[Finding]) -> Iterator[PiiType]:
    present = {finding.kind for finding in findings}
    return (kind for kind in PiiType if kind in present)


def _is_blank(text: str) -> bool:
    return all(char.isspace() or unicodedata.category(char) == "Cf" for char in text)


def _words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _quotes(reply: str, source: str, run: int) -> bool:
    """Whether ``reply`` holds ``run`` consecutive words of ``source`` (case, spacing and
    punctuation ignored)."""
    source_words = _words(source)
    if len(source_words) < run:
        return False
    shingles = {tuple(source_words[i : i + run]) for i in range(len(source_words) - run + 1)}
    reply_words = _words(reply)
    return any(
        tuple(reply_words[i : i + run]) in shingles for i in range(len(reply_words) - run + 1)
    )


# --- whose PII is it ---------------------------------------------------------------------------

_Key = tuple[PiiType, str]


def _key(text: str, finding: Finding) -> _Key:
    value = finding.text(text)
    if finding.kind is PiiType.EMAIL:
        return finding.kind, value.casefold()
    digits = "".join(str(unicodedata.decimal(char, 0)) for char in value if char.isdecimal())
    if finding.kind is PiiType.PHONE:
        # "+49 151 ..." and "0151 ..." are the same number: compare without country code and
        # trunk prefix, by suffix (see _is_known).
        digits = digits.lstrip("0")
    return finding.kind, digits


def _keys(text: str, findings: Iterable[Finding]) -> set[_Key]:
    return {_key(text, finding) for finding in findings}


def _is_known(key: _Key, known: set[_Key]) -> bool:
    if key in known:
        return True
    kind, value = key
    if kind is not PiiType.PHONE:
        return False
    for other_kind, other in known:
        if other_kind is PiiType.PHONE:
            short, long = sorted((value, other), key=len)
            if len(short) >= 7 and long.endswith(short):
                return True
    return False
