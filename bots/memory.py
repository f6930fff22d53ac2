"""Conversation memory: the prompt for one reply, built from what Postgres stores.

The prompt is the bot's system prompt (with its canary line), then the recent turns oldest
first, as OpenAI-style ``messages``; the model server applies the model's own chat template.
Only the redacted copy of each message ever enters a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.models import Bot, Message


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]
    message_ids: list[int]


def build_prompt(bot: Bot, turns: Sequence[Message], *, canary_line: str) -> Prompt:
    messages = [{"role": "system", "content": f"{bot.system_prompt.rstrip()}\n\n{canary_line}"}]
    ids: list[int] = []
    for turn in turns:
        if turn.body_redacted is None:
            continue
        role = "user" if turn.direction == "in" else "assistant"
        if messages[-1]["role"] == role and role == "user":
            # Consecutive user messages (a burst) read as one turn.
            messages[-1] = {
                "role": role,
                "content": messages[-1]["content"] + "\n" + turn.body_redacted,
            }
        else:
            messages.append({"role": role, "content": turn.body_redacted})
        ids.append(turn.id)
    return Prompt(messages, ids)
