"""HTTP load over pre-signed bodies: ``wrk`` with a Lua script when it is installed, else an
asyncio/httpx generator pinned to one core (so it cannot take both cores from the server).

Every request carries a different body from a file of ``signature<TAB>body`` lines, so no
provider id repeats; a run that needs more bodies than the file holds is flagged ``wrapped``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench._common import percentile

LUA = r"""
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

function init(args)
  sigs, bodies = {}, {}
  for line in io.lines(args[1]) do
    local tab = line:find("\t", 1, true)
    sigs[#sigs + 1] = line:sub(1, tab - 1)
    bodies[#bodies + 1] = line:sub(tab + 1)
  end
  nthreads = tonumber(args[2]) or 1
  n = #bodies
  i = tid or 0
end

function request()
  local k = (i % n) + 1
  i = i + nthreads
  if i >= n and not wrapped then
    wrapped = true
    io.stderr:write("bodies wrapped\n")
  end
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["X-Hub-Signature-256"] = sigs[k],
  }, bodies[k])
end
"""


@dataclass(frozen=True)
class LoadResult:
    tool: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx responses plus socket errors
    wrapped: bool

    def line(self) -> str:
        flag = " WRAPPED (bodies reused: duplicates sent)" if self.wrapped else ""
        return (
            f"{self.rps:8.0f} req/s  p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:7.2f} ms  "
            f"({self.requests} requests in {self.seconds:.1f}s, errors {self.errors}, "
            f"{self.tool}){flag}"
        )


def write_bodies(path: Path, items: Iterable[tuple[str, bytes]]) -> int:
    """``signature<TAB>body`` per line; bodies are compact JSON (no raw newlines or tabs)."""
    count = 0
    with path.open("wb") as out:
        for signature, body in items:
            if b"\n" in body or b"\t" in body:
                raise ValueError("a body must be one line")
            out.write(signature.encode() + b"\t" + body + b"\n")
            count += 1
    return count


def read_bodies(path: Path) -> list[tuple[str, bytes]]:
    items = []
    with path.open("rb") as src:
        for line in src:
            signature, _, body = line.rstrip(b"\n").partition(b"\t")
            items.append((signature.decode(), body))
    return items


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def duration_ms(text: str) -> float:
    """``2.87ms`` / ``950.00us`` / ``1.20s`` / ``1.00m`` → milliseconds."""
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str, *, wrapped: bool = False) -> LoadResult:
    """The figures of ``wrk --latency`` output."""
    requests = re.search(r"(\d+) requests in ([0-9.]+)(us|ms|s|m)", output)
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if not (requests and rps and p50 and p99):
        raise ValueError(f"unexpected wrk output:\n{output}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return LoadResult(
        tool="wrk",
        requests=int(requests.group(1)),
        seconds=duration_ms(requests.group(2) + requests.group(3)) / 1000,
        rps=float(rps.group(1)),
        p50_ms=duration_ms(p50.group(1)),
        p99_ms=duration_ms(p99.group(1)),
        errors=errors,
        wrapped=wrapped,
    )


def wrk_path() -> str | None:
    return shutil.which("wrk")


def ensure_wrk() -> str | None:
    """wrk from the Debian package, installed with apt-get when missing and running as root."""
    found = wrk_path()
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    print("loadgen: installing wrk (apt-get install -y wrk)", flush=True)
    result = subprocess.run(
        ["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, check=False)
    return wrk_path()


def run_wrk(
    url: str, bodies: Path, *, seconds: float, connections: int, script: Path, threads: int = 1
) -> LoadResult:
    script.write_text(LUA)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url,
        "--",
        str(bodies),
        str(threads),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}\n{done.stdout}")
    return parse_wrk(done.stdout, wrapped="bodies wrapped" in done.stderr)


def run_python(
    url: str, bodies: Path, *, seconds: float, connections: int, cpu: int | None = None
) -> LoadResult:
    """The fallback generator: ``connections`` asyncio senders on one pinned core."""
    import httpx

    items = read_bodies(bodies)
    previous = os.sched_getaffinity(0)
    target = {cpu if cpu is not None else max(previous)}
    os.sched_setaffinity(0, target)
    try:
        latencies: list[float] = []
        errors = 0
        next_index = 0
        wrapped = False

        async def sender(client: httpx.AsyncClient, deadline: float) -> None:
            nonlocal errors, next_index, wrapped
            while time.monotonic() < deadline:
                signature, body = items[next_index % len(items)]
                next_index += 1
                wrapped = wrapped or next_index > len(items)
                started = time.perf_counter()
                try:
                    response = await client.post(
                        url,
                        content=body,
                        headers={
                            "Content-Type": "application/json",
                            "X-Hub-Signature-256": signature,
                        },
                    )
                    if response.status_code >= 300:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                latencies.append((time.perf_counter() - started) * 1000)

        async def main() -> float:
            limits = httpx.Limits(
                max_connections=connections, max_keepalive_connections=connections
            )
            async with httpx.AsyncClient(limits=limits, timeout=10) as client:
                started = time.monotonic()
                deadline = started + seconds
                await asyncio.gather(*(sender(client, deadline) for _ in range(connections)))
                return time.monotonic() - started

        elapsed = asyncio.run(main())
    finally:
        os.sched_setaffinity(0, previous)
    return summarize_python(latencies, elapsed, errors, wrapped, cpu=min(target))


def summarize_python(
    latencies: Sequence[float], elapsed: float, errors: int, wrapped: bool, *, cpu: int
) -> LoadResult:
    return LoadResult(
        tool=f"asyncio/httpx generator pinned to cpu {cpu}",
        requests=len(latencies),
        seconds=elapsed,
        rps=len(latencies) / elapsed if elapsed > 0 else 0.0,
        p50_ms=percentile(latencies, 50) if latencies else 0.0,
        p99_ms=percentile(latencies, 99) if latencies else 0.0,
        errors=errors,
        wrapped=wrapped,
    )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its waited-for children (from /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    # After the command name: state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """(command name, user + system CPU seconds) of every process now running (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return out


def cpu_groups(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], server_pid: int
) -> dict[str, float]:
    """CPU seconds spent between two ``cpu_by_process`` readings, by part of the machine.

    Processes that started and ended between the readings are not seen; the ``machine`` total
    from ``machine_busy_seconds`` still counts them.
    """
    groups = {"server": 0.0, "postgres": 0.0, "redis": 0.0, "load": 0.0, "other": 0.0}
    for pid, (name, seconds) in after.items():
        spent = seconds - before.get(pid, (name, 0.0))[1]
        if pid == server_pid:
            group = "server"
        elif name.startswith("postgres"):
            group = "postgres"
        elif name.startswith("redis"):
            group = "redis"
        elif name.startswith("wrk") or name.startswith("loadgen"):
            group = "load"
        else:
            group = "other"
        groups[group] += max(0.0, spent)
    return groups


def machine_busy_seconds() -> float:
    """CPU seconds spent busy on all cores since boot (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
