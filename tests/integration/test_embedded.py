"""The embedded Postgres and Redis: real servers, data kept across restarts, one owner per dir."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis
import sqlalchemy

from parley.embedded import DataDirLocked, start_postgres, start_redis

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data dir outside pytest's base temp: as root, Postgres runs as another user, and a
    second pytest session resets /tmp/pytest-of-root to 0700 under it."""
    path = Path(tempfile.mkdtemp(prefix="parley-embedded-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state != "Z"


@contextmanager
def _owner_process(data_dir: Path, script: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``script`` in another Python process that starts services in ``data_dir``.

    The script prints one line when it is ready and then waits; the process is killed with
    SIGKILL on the way out, as a crash would, leaving its servers behind.
    """
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from parley.embedded import start_postgres, start_redis
        data_dir = Path({str(data_dir)!r})
        """
    ) + textwrap.dedent(script)
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line, f"the owner process exited early with {child.wait()}"
        yield child, line
    finally:
        child.kill()
        child.wait()


def test_both_servers_keep_their_data_across_restarts(data_dir: Path) -> None:
    pg = start_postgres(data_dir)
    rd = start_redis(data_dir)
    try:
        assert pg.url.startswith("postgresql://postgres@/parley?host=")
        assert rd.url.startswith("unix://")
        assert rd.url.endswith("?db=0")
        # the URL the application uses: SQLAlchemy on psycopg 3, over the unix socket
        engine = sqlalchemy.create_engine(pg.url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:
            assert conn.scalar(sqlalchemy.text("SELECT current_database()")) == "parley"
            assert conn.scalar(sqlalchemy.text("SHOW server_version_num")) >= "150000"
            conn.execute(sqlalchemy.text("CREATE TABLE kept (body text)"))
            conn.execute(sqlalchemy.text("INSERT INTO kept VALUES ('é survives')"))
        engine.dispose()
        client = redis.Redis.from_url(rd.url)
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set("kept", "yes")
        client.rpush("queue", "a", "b")
        client.close()
        pg_pid, redis_pid = pg.pid, rd.pid
        assert pg_pid is not None
        assert redis_pid is not None
    finally:
        pg.stop()
        rd.stop()
    assert not _alive(pg_pid)
    assert not _alive(redis_pid)
    assert pg.pid is None
    assert rd.pid is None
    assert not pg.running
    assert not rd.running
    pg.stop()  # stopping twice is harmless
    rd.stop()

    with start_postgres(data_dir) as pg, start_redis(data_dir) as rd:
        with pytest.raises(DataDirLocked, match="already running in this process"):
            start_postgres(data_dir)
        with pytest.raises(DataDirLocked, match="already running in this process"):
            start_redis(data_dir)
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT body FROM kept").fetchall() == [("é survives",)]
        client = redis.Redis.from_url(rd.url)
        assert client.get("kept") == b"yes"
        assert client.lrange("queue", 0, -1) == [b"a", b"b"]
        client.close()
        assert pg.running
        assert rd.running
        pg_pid, redis_pid = pg.pid, rd.pid
    assert pg_pid is not None
    assert not _alive(pg_pid)
    assert redis_pid is not None
    assert not _alive(redis_pid)


def test_a_live_owner_is_refused_and_a_killed_one_is_taken_over(data_dir: Path) -> None:
    owner = """
        import psycopg, redis
        pg = start_postgres(data_dir)
        rd = start_redis(data_dir)
        with psycopg.connect(pg.url) as conn:
            conn.execute("CREATE TABLE crash (n int)")
            conn.execute("INSERT INTO crash VALUES (1)")
        redis.Redis.from_url(rd.url).set("before-crash", "1")
        print(pg.pid, rd.pid, flush=True)
        sys.stdin.read()
    """
    with _owner_process(data_dir, owner) as (child, line):
        orphan_pg, orphan_redis = (int(pid) for pid in line.split())
        with pytest.raises(DataDirLocked) as locked:
            start_postgres(data_dir)
        message = str(locked.value)
        assert f"pid {child.pid}" in message
        assert "PARLEY_DATA_DIR" in message
        assert "DATABASE_URL" in message
        with pytest.raises(DataDirLocked, match=f"pid {child.pid}.*REDIS_URL"):
            start_redis(data_dir)
    # the owner died by SIGKILL without stopping anything
    assert _alive(orphan_pg)
    assert _alive(orphan_redis)

    with start_postgres(data_dir) as pg, start_redis(data_dir) as rd:
        assert pg.pid == orphan_pg  # Postgres is adopted as it runs
        assert rd.pid != orphan_redis  # Redis is shut down cleanly and started again
        assert not _alive(orphan_redis)
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT n FROM crash").fetchall() == [(1,)]
        client = redis.Redis.from_url(rd.url)
        assert client.get("before-crash") == b"1"
        client.close()
    assert not _alive(orphan_pg)


def test_a_long_data_dir_still_gets_a_redis_socket(data_dir: Path) -> None:
    deep = data_dir.joinpath(*["a-rather-long-directory-name"] * 4)
    with start_redis(deep) as rd:
        assert redis.Redis.from_url(rd.url).ping()
        socket_dir = rd.socket_path.parent
        assert socket_dir != deep / "redis"
    assert not socket_dir.exists()


def test_stopping_from_a_forked_child_leaves_the_server_alone(data_dir: Path) -> None:
    with start_redis(data_dir) as rd:
        with warnings.catch_warnings():  # Python 3.12+ warns about fork() with threads around
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            rd.stop()
            os._exit(0)
        os.waitpid(pid, 0)
        assert rd.running
        assert redis.Redis.from_url(rd.url).ping()


def test_stop_after_the_server_died_is_quiet(data_dir: Path) -> None:
    rd = start_redis(data_dir)
    assert rd.pid is not None
    os.kill(rd.pid, signal.SIGKILL)
    rd.stop()
    assert not rd.running
    with start_redis(data_dir) as again:
        assert again.running
