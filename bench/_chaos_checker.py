"""The chaos checker: decides lost / duplicated / out-of-order over the recorded histories.

Inputs are plain data, so a kept results directory can be checked again without the platform:

* deliveries: every webhook POST the load generator made (``wamid``, ``conv``, ``seq``,
  ``status``, ``t1`` = wall-clock time the answer arrived);
* sends: every send the sandbox Graph API accepted (``seq``, ``id``, ``to``, ``text``, ``at`` and,
  when the sandbox records it, the chunk's idempotency key / ``biz_opaque_callback_data``);
* a database snapshot: inbound and outbound messages, outcomes, outbound chunks, dead jobs.

Rules (reliability reference, section 8):

* ``U`` = unique provider ids acknowledged with a 2xx at least once.
* A logical reply is found by the chunk idempotency key (when the sandbox records it) or, failing
  that, by recipient + text: the model stand-in names the newest user message it answered, so the
  text is unique per logical reply. A reply covers the inbound it names plus every inbound whose
  outcome points at the same reply (a coalesced burst).
* ``duplicated`` = inbound messages whose reply was accepted more than once (a chunk key accepted
  twice, or two different logical replies), not counting chunks marked ``resent`` after an
  ambiguous timeout; those are ``ambiguous_resent``.
* ``lost`` = messages in ``U`` with no delivered reply and no recorded non-reply outcome (a
  dead-lettered or failed reply counts as recorded: it is in the dead-letter set instead).
* ``out_of_order``: per conversation, replies in sandbox acceptance order. A reply is out of order
  when an earlier-accepted reply answered a later message although this reply's message had
  already been acknowledged before that earlier reply went out (a message that arrives after a
  later message's reply went out may be answered in a new turn).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

MARKER = re.compile(r"\bt[a-j]+x[a-j]+\b")
KEY_FIELDS = ("idempotency_key", "biz_opaque_callback_data", "key")
NON_REPLY_KINDS = frozenset(
    {"held", "blocked", "opted_out", "human_mode", "window_expired", "limited", "dead"}
)
FAILED_STATES = frozenset({"failed", "dead"})


def _letters(number: int) -> str:
    return "".join("abcdefghij"[int(d)] for d in str(number))


def marker(conv: int, seq: int) -> str:
    """A token naming (conversation, message) in letters only, so no PII screen rewrites it."""
    return f"t{_letters(conv)}x{_letters(seq)}"


@dataclass
class Snapshot:
    """What the database says at the end of a run (plain rows, see ``bench.chaos.snapshot``)."""

    inbound: dict[str, dict[str, Any]]  # provider id -> {id, status, conversation_id}
    outbound: dict[int, dict[str, Any]]  # message id -> {reply_to_id, status, kind, ...}
    outcomes: dict[int, dict[str, Any]]  # inbound id -> {kind, reply_id}
    chunks: list[dict[str, Any]]  # {message_id, idx, idempotency_key, state, resent, ...}
    dead_jobs: list[dict[str, Any]]  # {id, task, last_error}


@dataclass
class Verdict:
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    ambiguous_resent: int = 0
    dead: int = 0
    acked: int = 0
    unique: int = 0
    notices: int = 0
    outcome_mode: str = "legacy"
    key_mode: str = "text"
    dead_detail: dict[str, int] = field(default_factory=dict)
    lost_detail: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.out_of_order)

    def line(self, elapsed: float) -> str:
        return (
            f"lost={len(self.lost)} duplicated={len(self.duplicated)} "
            f"out_of_order={len(self.out_of_order)} ambiguous_resent={self.ambiguous_resent} "
            f"dead={self.dead} acked={self.acked} unique={self.unique} elapsed={elapsed:.0f}"
        )


def _send_key(send: dict[str, Any]) -> str | None:
    for name in KEY_FIELDS:
        value = send.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def check(deliveries: list[dict[str, Any]], sends: list[dict[str, Any]], snap: Snapshot) -> Verdict:
    verdict = Verdict()
    # --- the acknowledged messages -----------------------------------------------------------
    acked_at: dict[str, float] = {}
    where: dict[str, tuple[int, int]] = {}
    by_marker: dict[str, str] = {}
    for d in deliveries:
        wamid = d["wamid"]
        where[wamid] = (d["conv"], d["seq"])
        by_marker[marker(d["conv"], d["seq"])] = wamid
        status = d.get("status")
        if isinstance(status, int) and 200 <= status < 300:
            verdict.acked += 1
            acked_at[wamid] = min(acked_at.get(wamid, d["t1"]), d["t1"])
    verdict.unique = len(acked_at)
    verdict.outcome_mode = "outcomes" if snap.outcomes else "legacy"

    inbound_id = {wamid: row["id"] for wamid, row in snap.inbound.items()}
    wamid_of = {row["id"]: wamid for wamid, row in snap.inbound.items()}
    reply_of: dict[int, int] = {}  # inbound id -> reply message id
    for out_id, row in snap.outbound.items():
        if row.get("reply_to_id") is not None and row.get("kind", "text") == "text":
            reply_of[row["reply_to_id"]] = out_id
    for in_id, outcome in snap.outcomes.items():
        if outcome.get("reply_id") is not None:
            reply_of[in_id] = outcome["reply_id"]
    covers: dict[int, set[int]] = defaultdict(set)  # reply id -> inbound ids
    for in_id, out_id in reply_of.items():
        covers[out_id].add(in_id)
    chunk_by_key = {c["idempotency_key"]: c for c in snap.chunks if c.get("idempotency_key")}
    chunk_by_provider = {
        c["provider_message_id"]: c for c in snap.chunks if c.get("provider_message_id")
    }
    outbound_by_provider = {
        row["provider_message_id"]: out_id
        for out_id, row in snap.outbound.items()
        if row.get("provider_message_id") and row.get("kind", "text") == "text"
    }
    verdict.ambiguous_resent = sum(1 for c in snap.chunks if c.get("resent"))
    resent_messages = {c["message_id"] for c in snap.chunks if c.get("resent")}

    # --- group accepted sends into logical replies -------------------------------------------
    # unit = (reply identity); per unit: chunk key -> times accepted, first acceptance, markers
    accepted: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    first_at: dict[str, tuple[int, float]] = {}
    unit_inbound: dict[str, set[str]] = defaultdict(set)
    unit_resent: dict[str, bool] = defaultdict(bool)
    keyed = 0
    for send in sorted(sends, key=lambda s: s["seq"]):
        named = [by_marker[m] for m in MARKER.findall(send.get("text", "")) if m in by_marker]
        key = _send_key(send)
        chunk: dict[str, Any] | None = chunk_by_key.get(key) if key else None
        if chunk is None:
            chunk = chunk_by_provider.get(send.get("id", ""))
        reply_id: int | None = chunk["message_id"] if chunk else None
        if reply_id is None:
            reply_id = outbound_by_provider.get(send.get("id", ""))
        if reply_id is not None and snap.outbound.get(reply_id, {}).get("kind") == "notice":
            verdict.notices += 1
            continue
        if reply_id is None and named:
            named_id = inbound_id.get(named[-1])
            reply_id = reply_of.get(named_id) if named_id is not None else None
        if not named and reply_id is None:
            verdict.notices += 1
            continue
        if key:
            keyed += 1
        unit = (
            f"reply:{reply_id}"
            if reply_id is not None
            else f"text:{send.get('to')}:{send.get('text')}"
        )
        chunk_key = key or f"{send.get('to')}:{send.get('text')}"
        accepted[unit][chunk_key] += 1
        first_at.setdefault(unit, (send["seq"], float(send.get("at", 0.0))))
        # The database says which messages a reply answers; the text is the fallback (the
        # model stand-in may name messages of the prompt that another reply already answered).
        covered = {wamid_of[i] for i in covers.get(reply_id or -1, ()) if i in wamid_of}
        unit_inbound[unit].update(covered or named)
        if reply_id is not None:
            unit_resent[unit] = unit_resent[unit] or reply_id in resent_messages
        if chunk is not None and chunk.get("resent"):
            unit_resent[unit] = True
    verdict.key_mode = "idempotency_key" if keyed else "text"

    sends_of: dict[str, int] = defaultdict(int)
    for unit, keys in accepted.items():
        times = max(keys.values())
        if unit_resent[unit]:
            times = min(times, 1)
        for wamid in unit_inbound[unit]:
            sends_of[wamid] += times

    # --- lost and duplicated -----------------------------------------------------------------
    for wamid in sorted(acked_at):
        if sends_of[wamid] > 1:
            verdict.duplicated.append(wamid)
        if sends_of[wamid] >= 1:
            continue
        stored = snap.inbound.get(wamid)
        if stored is None:
            verdict.lost.append(wamid)
            verdict.lost_detail["not_stored"] = verdict.lost_detail.get("not_stored", 0) + 1
            continue
        ending = snap.outcomes.get(stored["id"])
        reply = snap.outbound.get(reply_of.get(stored["id"], -1))
        reply_failed = reply is not None and (
            reply.get("status") in FAILED_STATES
            or any(
                c["state"] in FAILED_STATES for c in snap.chunks if c["message_id"] == reply["id"]
            )
        )
        if ending is not None and ending.get("kind") in NON_REPLY_KINDS:
            continue
        if ending is None and stored.get("status") in ("blocked", "dead"):
            continue
        if reply_failed:
            continue
        reason = "no_ending" if ending is None and reply is None else "reply_not_delivered"
        verdict.lost.append(wamid)
        verdict.lost_detail[reason] = verdict.lost_detail.get(reason, 0) + 1

    # --- order ---------------------------------------------------------------------------------
    per_conv: dict[int, list[tuple[int, float, int, str]]] = defaultdict(list)
    for unit, (seq, at) in first_at.items():
        places = [where[w] for w in unit_inbound[unit] if w in where]
        if not places:
            continue
        conv = places[0][0]
        newest = max(s for _, s in places)
        oldest = min(s for _, s in places)
        oldest_wamid = next(w for w in unit_inbound[unit] if where.get(w) == (conv, oldest))
        per_conv[conv].append((seq, at, newest, oldest_wamid))
    for units in per_conv.values():
        units.sort()
        for i, (_, _, _, wamid_i) in enumerate(units):
            own_seq = where[wamid_i][1]
            acked = acked_at.get(wamid_i)
            for _, at_j, newest_j, _ in units[:i]:
                if newest_j > own_seq and acked is not None and acked < at_j:
                    verdict.out_of_order.append(wamid_i)
                    break

    # --- dead letters ----------------------------------------------------------------------------
    verdict.dead = len(snap.dead_jobs)
    for job in snap.dead_jobs:
        name = f"job:{job.get('task')}"
        verdict.dead_detail[name] = verdict.dead_detail.get(name, 0) + 1
    for outcome in snap.outcomes.values():
        if outcome.get("kind") == "dead":
            verdict.dead_detail["outcome:dead"] = verdict.dead_detail.get("outcome:dead", 0) + 1
    for row in snap.inbound.values():
        if row.get("status") == "dead":
            verdict.dead_detail["inbound:dead"] = verdict.dead_detail.get("inbound:dead", 0) + 1
    for row in snap.outbound.values():
        if row.get("status") in FAILED_STATES:
            name = f"reply:{row['status']}"
            verdict.dead_detail[name] = verdict.dead_detail.get(name, 0) + 1
    return verdict
