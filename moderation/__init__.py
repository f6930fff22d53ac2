"""Moderation and privacy: every message in and every reply out passes through here.

Public surface (everything else is private to the package):

* PII: ``PiiType``, ``Finding``, ``find_pii``, ``redact``;
* inbound: ``screen_inbound`` -> ``InboundVerdict`` (redacted text for the model and the logs);
* outbound: ``make_canary``, ``canary_instruction``, ``screen_outbound`` -> ``OutboundVerdict``
  (nothing the model writes is sent without it).

All of these are pure functions of their arguments: no I/O, no logging, no settings, safe to call
from any worker, and they never raise on any ``str``. Findings hold a kind and a span, never the
value, and reasons are codes: both are safe to log. Verdicts also carry the (redacted) message
text, which is left out of their ``repr``; log their reasons, never the text.
"""

from moderation.canary import canary_instruction, make_canary
from moderation.pii import Finding, PiiType, find_pii, redact
from moderation.screen import InboundVerdict, OutboundVerdict, screen_inbound, screen_outbound

__all__ = [
    "Finding",
    "InboundVerdict",
    "OutboundVerdict",
    "PiiType",
    "canary_instruction",
    "find_pii",
    "make_canary",
    "redact",
    "screen_inbound",
    "screen_outbound",
]
