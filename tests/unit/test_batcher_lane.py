"""The intake's background lanes: a thread per queue, started on demand, gone when idle."""

from __future__ import annotations

import threading
import time

from webhooks.batcher import _Lane


def test_a_lane_handles_every_item_in_order_and_restarts_after_going_idle() -> None:
    seen: list[int] = []
    done = threading.Event()

    def handle(item: int) -> None:
        seen.append(item)
        if item == 2999:
            done.set()

    lane = _Lane[int]("test-lane", handle, idle_exit=0.001, maxsize=1)
    for i in range(3000):
        lane.put(i)
        if i % 100 == 0:
            time.sleep(0.005)  # long enough for the thread to leave; the next put starts another
    assert done.wait(10)
    assert seen == list(range(3000))


def test_take_waiting_drains_without_waiting() -> None:
    lane = _Lane[int]("test-lane", lambda _: None, idle_exit=1)
    for i in range(3):
        lane.queue.put(i)
    assert lane.take_waiting() == [0, 1, 2]
    assert lane.take_waiting() == []
