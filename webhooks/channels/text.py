"""Cutting one reply into the chunks a channel accepts.

Limits (meta-channels reference a.5): WhatsApp 4096 characters; Messenger "less than 2000
characters"; Instagram "1000 bytes or less" of UTF-8. A chunk is never cut inside a grapheme
cluster (an emoji ZWJ sequence, a flag, a letter with its combining marks stay whole), and a cut
prefers, in order, a blank line, a line break, the end of a sentence and any whitespace in the
second half of the chunk. Whitespace at a cut is dropped; nothing else is.
"""

from __future__ import annotations

from dataclasses import dataclass

import regex

_GRAPHEME = regex.compile(r"\X")
_SENTENCE_END = frozenset(".!?…。！？")


@dataclass(frozen=True)
class Limit:
    """At most ``size`` units per chunk, counted in characters or in UTF-8 bytes."""

    size: int
    unit: str = "chars"  # chars | bytes

    def cost(self, text: str) -> int:
        return len(text.encode()) if self.unit == "bytes" else len(text)


LIMITS: dict[str, Limit] = {
    "whatsapp": Limit(4096),
    "messenger": Limit(1999),
    "instagram": Limit(1000, "bytes"),
}


def limit_for(channel: str) -> Limit:
    return LIMITS[channel]


def graphemes(text: str) -> list[str]:
    return list(_GRAPHEME.findall(text))


def split_text(text: str, limit: Limit) -> list[str]:
    """The chunks of ``text`` in order; ``[]`` when it has nothing but whitespace."""
    clusters = _trim(graphemes(text))
    costs = [limit.cost(c) for c in clusters]
    chunks: list[str] = []
    start, n = 0, len(clusters)
    while start < n:
        end, size = start, 0
        while end < n and size + costs[end] <= limit.size:
            size += costs[end]
            end += 1
        if end == n:
            chunks.append("".join(clusters[start:]))
            break
        if end == start:
            # One cluster larger than the limit (thousands of combining marks): only here is a
            # cluster cut, between code points.
            chunks.extend(_split_code_points(clusters[start], limit))
            start += 1
        else:
            cut = _best_cut(clusters, start, end)
            chunks.append("".join(_trim(clusters[start:cut])))
            start = cut
        while start < n and clusters[start].isspace():
            start += 1
    return [c for c in chunks if c]


def _trim(clusters: list[str]) -> list[str]:
    """Drop whitespace-only clusters at both ends (``str.strip`` could cut a space out of the
    cluster it starts, e.g. a space carrying a combining mark)."""
    start, end = 0, len(clusters)
    while start < end and clusters[start].isspace():
        start += 1
    while end > start and clusters[end - 1].isspace():
        end -= 1
    return clusters[start:end]


def _best_cut(clusters: list[str], start: int, end: int) -> int:
    """Index after the preferred break in ``clusters[start:end]`` (``end`` when none is good)."""
    floor = start + max(1, (end - start) // 2)
    found: dict[int, int] = {}
    for i in range(end - 1, floor - 1, -1):
        c = clusters[i]
        if not c.isspace():
            continue
        if "\n" in c:
            rank = 0 if i > start and "\n" in clusters[i - 1] else 1
        elif i > start and clusters[i - 1][-1:] in _SENTENCE_END:
            rank = 2
        else:
            rank = 3
        found.setdefault(rank, i + 1)
        if rank == 0:
            break
    return found[min(found)] if found else end


def _split_code_points(cluster: str, limit: Limit) -> list[str]:
    out: list[str] = []
    current = ""
    for ch in cluster:
        if current and limit.cost(current + ch) > limit.size:
            out.append(current)
            current = ""
        current += ch
    if current:
        out.append(current)
    return out
