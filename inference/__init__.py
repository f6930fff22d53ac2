"""Client for a pool of OpenAI-compatible chat servers (vLLM in production, llama.cpp locally).

Requests carry OpenAI-style ``messages``; the server applies the model's chat template. The
launcher for the local CPU server is ``inference.local``.

Routing keeps a conversation on one server (rendezvous hashing on the conversation key, so
vLLM's prefix cache serves its history), spills to the next server in the same order when
that one is over its in-flight cap or reports a long waiting queue, and ejects a failing
server with a per-endpoint circuit breaker; ``PoolConfig`` holds the knobs and
``InferenceClient.stats()`` the per-endpoint counters and timings (``EndpointStats``), which
``InferenceCollector`` exports to Prometheus as ``parley_inference_*`` metrics. An endpoint
written ``dns+http://NAME:PORT`` stands for every address the name resolves to (a Kubernetes
headless service), re-resolved periodically.

Requests are streamed (``stream: true``, unless the endpoint says ``stream=false``), so the
time to first token is measured and a request the caller abandons is closed: an exception
raised in the calling thread while ``chat()`` runs (Celery's ``SoftTimeLimitExceeded``,
``KeyboardInterrupt``) closes the connection, so the server aborts the generation, and
propagates unchanged; it is not wrapped in an ``InferenceError``. Log lines about a request
carry its ``request_id`` and ``endpoint``, never prompt or reply content.

Errors
------
Every error is an ``InferenceError`` carrying ``endpoint`` (the base URL involved, or ``None``
when no server was tried) and a message that never holds prompt or reply content::

    InferenceError
    ├── Unavailable      connection refused, DNS failure, HTTP 5xx or 429, or no endpoint
    │                    has the requested role. Retry later (back off) or wait for a server.
    ├── Timeout          connect timeout, the call's ``timeout`` passed (the request was
    │                    then closed), or HTTP 408. The request may have run: retry,
    │                    accepting that the server may have done the work twice.
    ├── BadRequest       any other HTTP 4xx. The same request fails again: do not retry.
    │   └── ContextTooLong
    │                    the server said the prompt exceeds the context window. Shorten the
    │                    prompt (or lower ``max_tokens``) and retry.
    └── BadResponse      2xx with a body that is not a chat completion (not JSON, no
                         choices, a stream cut short without an end). Retry once, then fail.

Within one ``chat()`` call the client already moved on to the next endpoint of the role when
a server could not be reached at all, so an ``Unavailable`` or ``Timeout`` from a connection
failure means every endpoint of the role failed (every one not ejected by its breaker; when
all are ejected, all are tried). Once a request may have reached a server it is never sent
again by this package. A server that fails after its stream began (an error event, a dropped
connection) raises ``Unavailable``, or ``BadRequest`` when the event names a 4xx.
Programming errors (a ``request_id`` that is not a UUID, an empty
``cache_salt``, a ``timeout`` that is not positive, out-of-range ``GenerationParams`` or
``PoolConfig``, a malformed endpoint spec) raise ``ValueError``.
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
from ._metrics import InferenceCollector
from ._pool import EndpointStats, PoolConfig, Timing
from ._tokenize import Tokenizer as Tokenizer

__all__ = [
    "BadRequest",
    "BadResponse",
    "ChatResult",
    "ContextTooLong",
    "Endpoint",
    "EndpointStats",
    "GenerationParams",
    "InferenceClient",
    "InferenceCollector",
    "InferenceError",
    "PoolConfig",
    "Role",
    "Timeout",
    "Timing",
    "Unavailable",
    "parse_endpoints",
]
