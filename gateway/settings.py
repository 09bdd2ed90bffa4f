"""Process settings: one typed object, read once from the environment (prefix GATEWAY_)."""
from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Knobs that belong to the process rather than to the config file."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 10 * 1024 * 1024
    log_level: str = "INFO"
    log_json: bool = True
    drain_timeout_s: float = 30.0
    keys_refresh_s: float = 2.0
    flush_interval_s: float = 0.05
    upstream_pool_size: int = 512
    # Shared ledgers: a reservation lives this long past its holder's last renewal (every
    # third of it), so only a stopped process's reservations ever expire (docs/replicas.md).
    reservation_ttl_s: float = 300.0
    store_timeout_s: float = 2.0  # a Redis/PostgreSQL call slower than this fails closed (503)
    admin_api_key: SecretStr | None = None
    # Overload shedding (gateway/shedding.py): requests in progress per replica, and waiting.
    max_active_requests: int = 512
    max_queued_requests: int = 256
    queue_timeout_s: float = 5.0
    # Circuit breakers per model (gateway/breaker.py).
    breaker_failure_threshold: int = 5
    breaker_error_ratio: float = 0.5
    breaker_window_s: float = 30.0
    breaker_min_requests: int = 20
    breaker_cooldown_s: float = 5.0
    breaker_max_cooldown_s: float = 300.0
    breaker_key_cooldown_s: float = 60.0
    breaker_sync_s: float = 0.5  # with state.redis_url: how often replicas share breaker state
    # SIGTERM: /readyz answers 503 this long before the listener closes (load balancer catch-up).
    drain_readiness_delay_s: float = 0.0
