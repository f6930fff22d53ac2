"""Client for a pool of OpenAI-compatible chat servers (vLLM in production, llama.cpp locally).

Requests carry OpenAI-style ``messages``; the server applies the model's chat template. The
launcher for the local CPU server is ``inference.local``.

Routing keeps a conversation on one server (rendezvous hashing on the conversation key, so
vLLM's prefix cache serves its history), spills to the next server in the same order when
that one is over its in-flight cap or reports a long waiting queue, and ejects a failing
server with a per-endpoint circuit breaker; ``PoolConfig`` holds the knobs and
``InferenceClient.stats()`` the per-endpoint counters (``EndpointStats``).

Errors
------
Every error is an ``InferenceError`` carrying ``endpoint`` (the base URL involved, or ``None``
when no server was tried) and a message that never holds prompt or reply content::

    InferenceError
    ├── Unavailable      connection refused, DNS failure, HTTP 5xx or 429, or no endpoint
    │                    has the requested role. Retry later (back off) or wait for a server.
    ├── Timeout          connect or read timeout (or HTTP 408). The request may have run:
    │                    retry, accepting that the server may have done the work twice.
    ├── BadRequest       any other HTTP 4xx. The same request fails again: do not retry.
    │   └── ContextTooLong
    │                    the server said the prompt exceeds the context window. Shorten the
    │                    prompt (or lower ``max_tokens``) and retry.
    └── BadResponse      2xx with a body that is not a chat completion (not JSON, no
                         choices). Retry once, then fail.

Within one ``chat()`` call the client already moved on to the next endpoint of the role when
a server could not be reached at all, so an ``Unavailable`` or ``Timeout`` from a connection
failure means every endpoint of the role failed (every one not ejected by its breaker; when
all are ejected, all are tried). Once a request may have reached a server it is never sent
again by this package. Programming errors (a ``request_id`` that is not a UUID, an empty
``cache_salt``, out-of-range ``GenerationParams`` or ``PoolConfig``, a malformed endpoint
spec) raise ``ValueError``.
"""

from ._client import ChatResult, GenerationParams, InferenceClient
from ._endpoints import Endpoint, Role, parse_endpoints
from ._errors import (
    BadRequest,
    BadResponse,
    ContextTooLong,
    InferenceError,
    Timeout,
    Unavailable,
)
from ._pool import EndpointStats, PoolConfig

__all__ = [
    "BadRequest",
    "BadResponse",
    "ChatResult",
    "ContextTooLong",
    "Endpoint",
    "EndpointStats",
    "GenerationParams",
    "InferenceClient",
    "InferenceError",
    "PoolConfig",
    "Role",
    "Timeout",
    "Unavailable",
    "parse_endpoints",
]
