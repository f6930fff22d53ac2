"""Chaos-lite: the fault run of ``bench.chaos`` at PR size (about 1,300 deliveries, 2 worker
kills, 1 Redis restart, 1 pause past the visibility timeout). It starts its own Postgres, Redis
and processes, so it ignores the servers the rest of the suite uses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.chaos

SUMMARY = re.compile(
    r"^lost=(\d+) duplicated=(\d+) out_of_order=(\d+) ambiguous_resent=(\d+) dead=(\d+) "
    r"acked=(\d+) unique=(\d+) elapsed=(\d+)$"
)


@pytest.mark.timeout(540)
def test_chaos_lite(tmp_path: Path) -> None:
    results = tmp_path / "chaos"
    run = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--lite", "--seed", "7", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=510,
        check=False,
    )
    output = run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    match = SUMMARY.match(lines[-1]) if lines else None
    assert match is not None, f"no summary line (exit {run.returncode}):\n{output[-6000:]}"
    lost, duplicated, out_of_order = (int(match.group(i)) for i in (1, 2, 3))
    assert (lost, duplicated, out_of_order) == (0, 0, 0), f"{lines[-1]}\n{output[-6000:]}"
    assert int(match.group(7)) >= 900, f"too few messages acknowledged: {lines[-1]}"
    assert run.returncode == 0, output[-6000:]
