"""The minimal webhook endpoint Parley's ingest is compared with, in the same server layout.

uvicorn, one worker, a sync route behind an async body reader (like Parley's), a sync psycopg 3
pool of 8. Per request: HMAC-SHA256 over the raw body, JSON parse, one
``INSERT … ON CONFLICT (ext_id) DO NOTHING`` committed, one Redis ``LPUSH``. Nothing else.

``python -m bench._baseline_app --port P --dsn DSN --redis-url URL --key KEY``
(the app secret comes from ``BENCH_BASELINE_SECRET``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
  id              bigserial   PRIMARY KEY,
  conversation_id bigint      NOT NULL,
  ext_id          text        NOT NULL UNIQUE,
  direction       smallint    NOT NULL,
  body            text        NOT NULL,
  created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS messages_conv_time ON messages (conversation_id, created_at DESC);
"""

INSERT = (
    "INSERT INTO messages (conversation_id, ext_id, direction, body) VALUES (%s, %s, 0, %s) "
    "ON CONFLICT (ext_id) DO NOTHING"
)


def verify(secret: bytes, body: bytes, header: str | None) -> bool:
    """Meta's ``X-Hub-Signature-256``: ``sha256=`` + hex HMAC of the raw body."""
    if not header or not header.startswith("sha256="):
        return False
    mac = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, header[7:])


def extract(body: bytes) -> tuple[int, str, str] | None:
    """(conversation key, provider message id, text) of a WhatsApp text webhook, or None."""
    try:
        message = json.loads(body)["entry"][0]["changes"][0]["value"]["messages"][0]
        return int(message["from"]) % 10000, str(message["id"]), str(message["text"]["body"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


async def read_body(request: Request) -> bytes:
    return await request.body()


def create_app(
    *, secret: bytes, dsn: str | None, redis_url: str | None, key: str, pool_size: int = 8
) -> FastAPI:
    """With ``dsn``/``redis_url`` None the app only checks signatures and parses (for tests)."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if dsn is not None:
            from psycopg_pool import ConnectionPool

            pool = ConnectionPool(dsn, min_size=pool_size, max_size=pool_size, open=False)
            pool.open(wait=True)
            state["pool"] = pool
        if redis_url is not None:
            import redis

            state["redis"] = redis.Redis.from_url(redis_url)
        try:
            yield
        finally:
            if "pool" in state:
                state["pool"].close()
            if "redis" in state:
                state["redis"].close()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/webhooks/whatsapp")
    def receive(request: Request, body: Annotated[bytes, Depends(read_body)]) -> Response:
        if not verify(secret, body, request.headers.get("x-hub-signature-256")):
            return Response(status_code=401)
        found = extract(body)
        if found is None:
            return Response(status_code=400)
        conversation, ext_id, text = found
        if "pool" in state:
            with state["pool"].connection() as conn:  # commits when the block ends
                conn.execute(INSERT, (conversation, ext_id, text))
        if "redis" in state:
            state["redis"].lpush(key, ext_id)
        return Response(status_code=200)

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--pool", type=int, default=8)
    args = parser.parse_args()
    secret = os.environ["BENCH_BASELINE_SECRET"].encode()
    app = create_app(
        secret=secret, dsn=args.dsn, redis_url=args.redis_url, key=args.key, pool_size=args.pool
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
