"""What a running ``parley run`` publishes for the other commands of the same machine.

``parley run`` starts embedded services on sockets and ports it chooses, and writes their URLs to
``$PARLEY_DATA_DIR/runtime.json``. ``parley chat``, ``parley bots apply`` and ``parley migrate``
started in another terminal read it, so they reach the same Postgres, Redis and API.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.config import Settings, get_settings, reset_settings

ENV_KEYS = ("DATABASE_URL", "REDIS_URL", "PARLEY_INFERENCE_ENDPOINTS", "PARLEY_GRAPH_API_URL")


def runtime_file(settings: Settings) -> Path:
    return settings.data_dir / "runtime.json"


def write_runtime(settings: Settings, values: dict[str, Any]) -> None:
    path = runtime_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), **values}, indent=2))


def clear_runtime(settings: Settings) -> None:
    runtime_file(settings).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def read_runtime(settings: Settings) -> dict[str, Any] | None:
    path = runtime_file(settings)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data.get("pid"), int) and _alive(data["pid"]) else None


def adopt_running_platform() -> Settings:
    """Fill unset connection settings from a live ``parley run`` (development only)."""
    settings = get_settings()
    if settings.is_production:
        return settings
    data = read_runtime(settings)
    if data is None:
        return settings
    for key in ENV_KEYS:
        if not os.environ.get(key) and data.get(key):
            os.environ[key] = str(data[key])
    reset_settings()
    return get_settings()
