"""Settings: the only place Parley reads its environment.

Every setting has the ``PARLEY_`` prefix except the conventional ``DATABASE_URL`` and
``REDIS_URL``. An empty variable counts as unset. ``.env.example`` documents each one.
"""

from __future__ import annotations

import enum
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Environment(enum.StrEnum):
    development = "development"
    production = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PARLEY_",
        env_ignore_empty=True,
        extra="ignore",
        populate_by_name=True,
    )

    env: Environment = Environment.development
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "PARLEY_DATABASE_URL")
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "PARLEY_REDIS_URL")
    )
    # Prefix for every Redis key Parley writes (queues included), so several installs or test
    # runs can share one Redis server without consuming each other's work.
    redis_prefix: str = ""
    data_dir: Path = Path(".parley")
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    log_level: str = "INFO"
    log_format: str = "json"  # json | console

    inference_endpoints: str | None = None
    inference_timeout: float = 60.0
    inference_connect_timeout: float = 3.0
    # The pool client (see inference.PoolConfig): requests one process keeps open to one
    # endpoint before spilling to the next (0: no cap), the vllm:num_requests_waiting reading
    # that also spills (0: never), consecutive failures that open an endpoint's breaker,
    # seconds before the half-open probe, and seconds between active health checks (0: none).
    inference_max_in_flight: int = Field(default=32, ge=0)
    inference_spill_waiting: int = Field(default=8, ge=0)
    inference_breaker_failures: int = Field(default=3, ge=1)
    inference_breaker_cooldown: float = Field(default=15.0, ge=0)
    inference_health_interval: float = Field(default=10.0, ge=0)
    # Seconds between resolutions of dns+http:// endpoints (Kubernetes headless services).
    inference_dns_interval: float = Field(default=30.0, gt=0)
    local_model_port: int = 8181
    local_model_threads: int = 2
    local_model_ctx: int = 4096

    graph_api_url: str = "https://graph.facebook.com"
    graph_api_version: str = "v23.0"
    graph_timeout: float = 15.0
    sandbox: bool = True
    # Sandbox Graph API behaviour (development only): fault rates as "429=0.01,500=0.02,
    # stall=0.005,drop_webhooks=0.0", how long a stalled send hangs, the delay before the
    # sandbox posts its signed status webhooks, where it posts them (empty: this API), and a
    # seed that makes the fault draws repeatable.
    sandbox_faults: str = ""
    sandbox_stall_seconds: float = 20.0
    sandbox_webhook_delay: float = 0.2
    sandbox_webhooks: bool = True
    sandbox_webhook_url: str | None = None
    sandbox_seed: int | None = None

    # Send lane. Retries: capped exponential back-off with full jitter (base, cap, seconds),
    # at most send_max_attempts Graph calls per chunk. An ambiguous send (timeout after the
    # request went out) waits send_unknown_grace seconds for a status webhook before it is
    # resent once. Deferrals while an earlier chunk of the conversation is in flight.
    send_max_attempts: int = Field(default=8, ge=1)
    send_backoff_base: float = 0.5
    send_backoff_cap: float = 60.0
    send_unknown_grace: float = 60.0
    send_order_delay: float = 0.5
    # Customer-service window: a reply whose conversation's last inbound message is older than
    # this is not sent (outcome window_expired).
    send_window_hours: float = 24.0
    # Messenger/Instagram: a person's message (kind "human") may still go out this many hours
    # after the user's last message, tagged HUMAN_AGENT; bot messages never carry the tag.
    send_human_agent_hours: float = Field(default=168.0, ge=0)
    # UNVERIFIED: Messenger reply context as a top-level `reply_to: {"mid": …}` (the parameter is
    # listed in the PageMessages reference, its shape is not confirmed): off until verified.
    messenger_reply_context: bool = False
    # Instagram sends go to this Graph API base (empty: graph_api_url). Set it to
    # https://graph.instagram.com for accounts connected through Instagram Login.
    instagram_graph_api_url: str | None = None
    # Mark-as-read and typing indicators (job webhooks.send_typing): a typing indicator is shown
    # only for an inbound message younger than this many seconds (older ones are only marked
    # read), and a failed request is retried at most once, after typing_retry_delay seconds.
    typing_max_age: float = Field(default=20.0, ge=0)
    typing_retry_delay: float = Field(default=0.5, ge=0)
    # Token buckets per channel account (messages/s; WhatsApp up to 1,000 after Meta's upgrade)
    # and per (WhatsApp number, recipient) pair: one message per interval, with a burst.
    send_rate_whatsapp: float = Field(default=80.0, gt=0, le=1000)
    send_rate_messenger: float = Field(default=300.0, gt=0)
    send_rate_instagram: float = Field(default=300.0, gt=0)
    send_pair_interval: float = Field(default=6.0, ge=0)
    send_pair_burst: int = Field(default=10, ge=1)
    # In-flight Graph calls per workspace (bulkhead), across all workers.
    send_workspace_concurrency: int = Field(default=8, ge=1)
    # Circuit breaker per channel account: opens after this many consecutive retryable
    # failures (5xx, timeouts), stays open for send_breaker_cooldown seconds, then lets one
    # probe through (half-open).
    send_breaker_failures: int = Field(default=5, ge=1)
    send_breaker_cooldown: float = 30.0
    # A paused channel account (credentials refused) is probed at most once per this interval.
    send_paused_probe_interval: float = 60.0
    # While Redis cannot be reached the limiters let sends through, each after this pause.
    send_degraded_delay: float = 0.2
    # Webhook deliveries are group-committed: every delivery waiting when a batch starts, up
    # to intake_batch_max (1 commits each delivery alone), waiting up to intake_batch_wait
    # seconds for more (0: none; under load deliveries queue up behind the running commit).
    intake_batch_max: int = Field(default=50, ge=1)
    intake_batch_wait: float = Field(default=0.0, ge=0)
    # Meta apps' secrets and channel-account routes are read from Postgres at most this often
    # (an unknown signature re-reads the apps at once); bot changes reach new conversations
    # within this many seconds.
    routing_cache_seconds: float = Field(default=5.0, ge=0)

    # Media downloads (webhooks.media). Size cap in bytes; host allow-list (comma-separated;
    # "*." matches any subdomain, another "*" part of one label; the Graph API host is always
    # added); redirects followed by hand, each re-vetted; per-request timeout and a deadline for
    # a whole download, seconds. media_sandbox_loopback lets the Graph API URL's own origin
    # resolve to loopback, for the sandbox: development with the sandbox on only, never in
    # production.
    media_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    media_allowed_hosts: str = "lookaside.fbsbx.com,*.fbcdn.net,*.cdninstagram.com"
    media_max_redirects: int = Field(default=3, ge=0)
    media_timeout: float = Field(default=15.0, gt=0)
    media_deadline: float = Field(default=60.0, gt=0)
    media_sandbox_loopback: bool = False

    encryption_keys: SecretStr | None = None

    # Celery over Redis: a task not acknowledged within the visibility timeout is redelivered, so
    # it must exceed the hard time limit (one model call and one send per task run) with margin.
    celery_visibility_timeout: int = 120
    celery_task_time_limit: int = 90
    celery_task_soft_time_limit: int = 80

    job_max_attempts: int = 5
    outbox_relay_interval: float = 5.0
    outbox_relay_after: float = 15.0
    # Conversation memory (bots/memory.py): the model's context window in tokens (None: what
    # the server reports, else local_model_ctx), tokens kept free besides the reply, the longest
    # summary, and how many token counts the tokenize cache keeps.
    memory_context_tokens: int | None = Field(default=None, ge=256)
    memory_margin_tokens: int = Field(default=32, ge=0)
    memory_summary_tokens: int = Field(default=200, ge=16)
    memory_tokenize_cache: int = Field(default=50_000, ge=0)
    # A worker answers /readyz (Redis reachable) on this port when > 0.
    worker_health_port: int = 0

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, value: str | None) -> str | None:
        """Accept plain ``postgresql://`` URLs and use psycopg 3 for them."""
        if value is None:
            return None
        for prefix in ("postgresql://", "postgres://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        return value

    @property
    def is_production(self) -> bool:
        return self.env is Environment.production

    def require_database_url(self) -> str:
        if not self.database_url:
            raise RuntimeError(
                "DATABASE_URL is not set; `parley run` starts an embedded Postgres in development"
            )
        return self.database_url

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "REDIS_URL is not set; `parley run` starts an embedded Redis in development"
            )
        return self.redis_url

    def check_production(self) -> list[str]:
        """Why this configuration may not run in production (empty when it may)."""
        problems: list[str] = []
        if not self.is_production:
            return problems
        if not self.database_url:
            problems.append("DATABASE_URL must be set (no embedded Postgres in production)")
        if not self.redis_url:
            problems.append("REDIS_URL must be set (no embedded Redis in production)")
        if not self.inference_endpoints:
            problems.append("PARLEY_INFERENCE_ENDPOINTS must be set (no local model in production)")
        if self.encryption_keys is None:
            problems.append("PARLEY_ENCRYPTION_KEYS must be set (no generated keys in production)")
        if self.sandbox:
            problems.append("PARLEY_SANDBOX must be false in production")
        return problems


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (the CLI and tests change the environment, then reload)."""
    get_settings.cache_clear()
