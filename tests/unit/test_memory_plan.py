"""The folding arithmetic of ``bots.memory``: the plan alone, then a whole conversation counted
and rendered with the real SmolLM2 tokenizer and chat template (the GGUF the local server runs,
loaded vocabulary-only in-process)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from bots import memory
from bots.memory import FOLD_TO, Plan, TooLong, plan
from inference.local import model_path


def _plan(**overrides: Any) -> Plan:
    args: dict[str, Any] = {
        "fixed": 100,
        "history": [20] * 10,
        "sizes": [1] * 10,
        "newest": 20,
        "budget": 1000,
        "max_messages": 40,
        "summary_room": 150,
        "fold_pending": False,
    }
    args.update(overrides)
    return plan(**args)


def test_a_prompt_that_fits_keeps_every_turn_and_folds_nothing() -> None:
    assert _plan() == Plan(start=0, fold=0, tokens=100 + 200 + 20)


def test_over_budget_drops_the_oldest_for_now_and_folds_to_sixty_percent() -> None:
    layout = _plan(history=[100] * 10)  # 100 + 1000 + 20 > 1000
    assert layout.start == 2  # 100 + 800 + 20 = 920 <= 1000
    assert layout.tokens == 920
    # After the fold: summary_room + what is left + newest <= 600.
    assert layout.fold == 6  # 150 + 400 + 20 = 570; one turn fewer folded would be 670
    assert 150 + 100 * (10 - layout.fold) + 20 <= FOLD_TO * 1000 < 150 + 100 * 5 + 20


def test_a_pending_fold_is_not_asked_for_again_and_the_reply_still_fits() -> None:
    layout = _plan(history=[100] * 10, fold_pending=True)
    assert layout == Plan(start=2, fold=0, tokens=920)


def test_too_many_messages_fold_like_too_many_tokens() -> None:
    layout = _plan(sizes=[2] * 10, max_messages=10)  # 20 messages > 10
    assert layout.start == 5
    assert layout.fold == 7  # 3 turns = 6 messages <= 60 % of 10


def test_older_unread_turns_force_a_fold() -> None:
    layout = _plan(must_fold=True)
    assert layout.start == 0 and layout.fold > 0


def test_uncounted_prompts_are_bounded_by_messages_only() -> None:
    layout = _plan(budget=None, history=[10**6] * 10, sizes=[1] * 10, max_messages=8)
    assert layout.start == 2 and layout.fold == 6


def test_a_turn_that_cannot_fit_at_all_is_too_long() -> None:
    with pytest.raises(TooLong):
        _plan(newest=901)


def test_no_history_means_no_fold() -> None:
    assert _plan(history=[], sizes=[], must_fold=True) == Plan(0, 0, 120)


@settings(max_examples=300, deadline=None)
@given(
    history=st.lists(st.integers(1, 400), max_size=40),
    fixed=st.integers(1, 300),
    newest=st.integers(1, 300),
    budget=st.integers(300, 3000),
    room_extra=st.integers(0, 200),
    max_messages=st.integers(1, 60),
    pending=st.booleans(),
)
def test_the_plan_never_exceeds_the_budget_and_folds_to_sixty_percent(
    history: list[int],
    fixed: int,
    newest: int,
    budget: int,
    room_extra: int,
    max_messages: int,
    pending: bool,
) -> None:
    sizes = [1] * len(history)
    kwargs: dict[str, Any] = {
        "fixed": fixed,
        "history": history,
        "sizes": sizes,
        "newest": newest,
        "budget": budget,
        "max_messages": max_messages,
        "summary_room": fixed + room_extra,
        "fold_pending": pending,
    }
    if fixed + newest > budget:
        with pytest.raises(TooLong):
            plan(**kwargs)
        return
    layout = plan(**kwargs)
    assert layout.tokens <= budget
    assert layout.tokens == fixed + sum(history[layout.start :]) + newest
    assert len(history) - layout.start <= max_messages
    # Only the oldest turns go, and only as few as needed.
    if layout.start:
        assert fixed + sum(history[layout.start - 1 :]) + newest > budget or (
            len(history) - layout.start + 1 > max_messages
        )
    if pending or layout.start == 0:
        assert layout.fold == 0
    else:
        assert layout.fold >= 1
        after = fixed + room_extra + sum(history[layout.fold :]) + newest
        fits = after <= math.floor(FOLD_TO * budget)
        fits = fits and len(history) - layout.fold <= math.floor(FOLD_TO * max_messages)
        assert fits or layout.fold == len(history)


# --- a conversation with the real tokenizer and chat template -----------------------------------


class RealTemplate:
    """The local model's own vocabulary and chat template, rendered the way llama.cpp's server
    renders them (Jinja over the GGUF's ``tokenizer.chat_template``, special tokens parsed)."""

    def __init__(self, llama: Llama) -> None:
        self.llama = llama
        eos = llama._model.token_get_text(llama.token_eos())
        bos = llama._model.token_get_text(llama.token_bos())
        self.formatter = Jinja2ChatFormatter(
            template=llama.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos
        )

    def count(self, text: str) -> int:
        return len(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        prompt = self.formatter(messages=messages).prompt  # type: ignore[arg-type]
        return self.llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)


@pytest.fixture(scope="module")
def template() -> Iterator[RealTemplate]:
    llama = Llama(model_path=str(model_path()), vocab_only=True, verbose=False)
    yield RealTemplate(llama)
    llama.close()


def _framing(t: RealTemplate) -> tuple[int, int, int]:
    """Measured the way ``inference.Tokenizer.framing`` measures it."""
    w = t.count("ok")
    s, u, a = (
        {"role": "system", "content": "ok"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "ok"},
    )
    p1, p2, p3 = len(t.ids([s])), len(t.ids([s, u])), len(t.ids([s, u, a, u]))
    user = p2 - p1 - w
    return p1 - w, user, p3 - p2 - user - 2 * w


def _turn(i: int) -> tuple[str, str]:
    return (
        f"Message {i}: do you have rye bread and {i} croissants for Saturday, please?",
        f"Reply {i}: yes, we have rye bread, and {i} croissants can be ready on Saturday.",
    )


def test_counted_sizes_match_the_rendered_prompt_and_prompts_grow_only_at_the_end(
    template: RealTemplate,
) -> None:
    """Twelve turns through the arithmetic with real counts: each prompt's counted size is its
    real size (to a token per message where contents meet the template), never over budget;
    between folds each prompt's token ids start with the previous prompt's plus its reply."""
    base, user_frame, reply_frame = _framing(template)
    system = "You help customers of a bakery.\n\nOnly help with bread and pastries."
    budget = 260
    summary_room = base + template.count(memory.with_summary(system, " ")) + 40
    history: list[tuple[str, str]] = []  # (role, content)
    summary: str | None = None
    previous: list[int] | None = None
    previous_reply: str | None = None
    folds = 0
    for i in range(12):
        question, answer = _turn(i)
        system_text = memory.with_summary(system, summary)
        fixed = base + template.count(system_text)
        sizes = [
            (reply_frame if role == "assistant" else user_frame) + template.count(content)
            for role, content in history
        ]
        layout = plan(
            fixed=fixed,
            history=sizes,
            sizes=[1] * len(history),
            newest=user_frame + template.count(question),
            budget=budget,
            max_messages=100,
            summary_room=summary_room,
            fold_pending=False,
        )
        messages = [{"role": "system", "content": system_text}]
        messages += [{"role": r, "content": c} for r, c in history[layout.start :]]
        messages.append({"role": "user", "content": question})
        ids = template.ids(messages)
        assert abs(len(ids) - layout.tokens) <= len(messages)
        assert layout.tokens <= budget
        if layout.fold == 0 and previous is not None:
            assert ids[: len(previous)] == previous
            assert previous_reply is not None
            between = template.llama.detokenize(ids[len(previous) :]).decode("utf-8")
            assert between.startswith(previous_reply)
        if layout.fold:
            # The fold lands before the next turn: a summary replaces the folded turns.
            folds += 1
            summary = f"The customer asked about rye bread and croissants {folds} times."
            history = history[layout.fold :]
            previous = None
        else:
            previous = ids
        history += [("user", question), ("assistant", answer)]
        previous_reply = answer
        if layout.fold:
            after = memory.with_summary(system, summary)
            size = (
                base
                + template.count(after)
                + sum(
                    (reply_frame if r == "assistant" else user_frame) + template.count(c)
                    for r, c in history
                )
            )
            assert size <= FOLD_TO * budget + reply_frame + template.count(answer)
    assert folds >= 2
