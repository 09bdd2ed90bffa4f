"""The config file (CONTRACT section 3): pydantic models, loading, cross-reference checks.

Everything is validated and compiled once at load; every error carries `file:line`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.state_env import urls_from_env
from routing_policies import (
    CompiledPolicy,
    SourceError,
    YamlDoc,
    load_policies,
    load_yaml,
    validate,
)
from routing_policies.yamlsource import error_at

Capability = Literal["chat", "embeddings", "tools", "json", "vision"]
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StateConfig(_Strict):
    database_url: str = "sqlite:///.gateway/state.db"
    redis_url: str | None = None
    # Several deployments may share one Redis: each uses its own key prefix.
    redis_key_prefix: str = Field(default="gw", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Ledger/audit writes a store could not take wait here (default: beside the SQLite
    # database, or .gateway/spool); see docs/replicas.md.
    spool_dir: str | None = None
    # Or name env vars holding the URLs (they carry passwords: keep them in a secret).
    database_url_env: str | None = None
    redis_url_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _urls_from_env(cls, data: Any) -> Any:
        return urls_from_env(data)  # gateway/state_env.py

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("database_url must start with sqlite:/// or postgresql://")
        return value


class AuditConfig(_Strict):
    log_bodies: bool = False
    retention_days: int = Field(default=30, ge=1)
    jsonl_path: str | None = None  # default: audit.jsonl beside the SQLite database


class ServerConfig(_Strict):
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)


class ProviderConfig(_Strict):
    name: str
    type: Literal["openai", "anthropic", "openai_compatible"]
    base_url: str
    api_key_env: str | None = None
    locality: Literal["hosted", "local"] = "hosted"
    timeout_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Per attempt (adapters/http.py Timeouts); unset: timeout_s. Policy routes may override them.
    first_byte_timeout_s: float | None = Field(default=None, gt=0)  # headers (streams: first content)
    idle_timeout_s: float | None = Field(default=None, gt=0)  # between stream chunks: a stall ends here
    total_timeout_s: float | None = Field(default=None, gt=0)  # the whole attempt; unset: no cap on streams
    # Active health check (gateway/health.py): GET health_check_url (default {base_url}/models)
    # every interval; off when unset. Meant for local servers (llama.cpp, vLLM, Ollama).
    health_check_interval_s: float | None = Field(default=None, gt=0)
    health_check_timeout_s: float = Field(default=3.0, gt=0)
    health_check_url: str | None = None

    def api_key(self) -> str | None:
        """The provider key, read from its env var at call time (never stored in config)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def unavailable_reason(self) -> str | None:
        """Why the config alone makes this provider unusable (its key env var is unset), if it does."""
        return f"{self.api_key_env} not set" if self.api_key_env and not self.api_key() else None


class ModelConfig(_Strict):
    name: str
    provider: str
    upstream_model: str
    input_usd_per_mtok: Decimal | None = None
    output_usd_per_mtok: Decimal | None = None
    cached_input_usd_per_mtok: Decimal | None = None  # cache reads; default: the input price
    cache_write_usd_per_mtok: Decimal | None = None  # cache writes (Anthropic); default: the input price
    context_window: int = Field(default=8192, ge=1)
    max_output_tokens: int = Field(default=4096, ge=1)
    quality: int = 1
    data_boundary: Literal["local", "vendor_zero_retention", "vendor"] = "vendor"
    capabilities: list[Capability] = Field(default_factory=lambda: list[Capability](["chat"]))

    @property
    def priced(self) -> bool:
        return self.input_usd_per_mtok is not None or self.output_usd_per_mtok is not None


class BudgetConfig(_Strict):
    window: Literal["minute", "hour", "day", "month", "total"]
    max_tokens: int | None = Field(default=None, ge=0)
    max_usd: Decimal | None = Field(default=None, ge=0)
    # Soft alerts: fractions of a cap whose crossing is logged and counted once per window.
    alert_at: list[Decimal] = Field(default_factory=list)

    @field_validator("alert_at")
    @classmethod
    def _fractions(cls, values: list[Decimal]) -> list[Decimal]:
        if any(not (0 < v <= 10) for v in values):
            raise ValueError("alert_at fractions must be in (0, 10], e.g. [0.5, 0.8, 1.0]")
        return sorted(set(values))


class AlertsConfig(_Strict):
    webhook_url: str | None = None  # POSTed a JSON event per budget alert, when set
    timeout_s: float = Field(default=5.0, gt=0)


class RateLimitConfig(_Strict):
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class TenantConfig(_Strict):
    id: str
    api_keys_sha256: list[str] = Field(default_factory=list)
    policy: str = "default"
    allowed_models: list[str] = Field(default_factory=lambda: ["*"])
    data_class: Literal["public", "internal", "confidential", "restricted"] = "internal"
    budgets: list[BudgetConfig] = Field(default_factory=list)
    rate_limits: RateLimitConfig = RateLimitConfig()

    @field_validator("api_keys_sha256")
    @classmethod
    def _hex_digests(cls, values: list[str]) -> list[str]:
        for value in values:
            if not _HEX64.match(value):
                raise ValueError("api_keys_sha256 entries must be 64 lowercase hex characters")
        return values


class GatewayConfig(_Strict):
    state: StateConfig = StateConfig()
    audit: AuditConfig = AuditConfig()
    server: ServerConfig = ServerConfig()
    providers: list[ProviderConfig] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)
    tenants: list[TenantConfig] = Field(default_factory=list)
    alerts: AlertsConfig = AlertsConfig()
    policies_dir: str = "policies/"
    admin_api_key_env: str = "GATEWAY_ADMIN_KEY"

    @model_validator(mode="after")
    def _unique_names(self) -> GatewayConfig:
        for kind, names in (
            ("provider", [p.name for p in self.providers]),
            ("model", [m.name for m in self.models]),
            ("tenant", [t.id for t in self.tenants]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {kind} name(s): {', '.join(dupes)}")
        return self


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with its policies and the paths everything resolves to."""

    path: Path
    config: GatewayConfig
    policies: dict[str, CompiledPolicy]
    warnings: tuple[str, ...] = ()
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    tenants: dict[str, TenantConfig] = field(default_factory=dict)

    @property
    def policies_dir(self) -> Path:
        return (self.path.parent / self.config.policies_dir).resolve()

    @property
    def sqlite_path(self) -> Path | None:
        url = self.config.state.database_url
        if not url.startswith("sqlite:///"):
            return None
        return Path(url[len("sqlite:///"):])

    @property
    def database(self) -> Path | str:
        """Where the durable state lives: the SQLite file, or the PostgreSQL URL."""
        return self.sqlite_path or self.config.state.database_url

    @property
    def spool_dir(self) -> Path:
        if self.config.state.spool_dir:
            return Path(self.config.state.spool_dir)
        return (self.sqlite_path.parent if self.sqlite_path else Path(".gateway")) / "spool"

    @property
    def audit_jsonl_path(self) -> Path:
        if self.config.audit.jsonl_path:
            return Path(self.config.audit.jsonl_path)
        base = self.sqlite_path.parent if self.sqlite_path else Path(".gateway")
        return base / "audit.jsonl"

    def admin_key(self) -> str | None:
        return os.environ.get(self.config.admin_api_key_env) or None


def load_config(path: str | Path) -> LoadedConfig:
    """Load, validate and cross-check a config file and every policy it references.

    Raises SourceError with every problem found, each as `file:line: message`.
    """
    doc = load_yaml(path)
    config = validate(doc, GatewayConfig)
    loaded_path = Path(path).resolve()
    policies_dir = (loaded_path.parent / config.policies_dir).resolve()
    errors: list[str] = []
    policies: dict[str, CompiledPolicy] = {}
    if not policies_dir.is_dir():
        errors.append(error_at(doc, ("policies_dir",), f"policies_dir {config.policies_dir!r} is not a directory"))
    else:
        try:
            policies = load_policies(policies_dir)
        except SourceError as exc:
            errors.extend(exc.errors)
    errors.extend(_reference_errors(doc, config, policies))
    if errors:
        raise SourceError(errors)
    return LoadedConfig(
        path=loaded_path,
        config=config,
        policies=policies,
        warnings=tuple(_warnings(config)),
        providers={p.name: p for p in config.providers},
        models={m.name: m for m in config.models},
        tenants={t.id: t for t in config.tenants},
    )


def _reference_errors(doc: YamlDoc, config: GatewayConfig, policies: dict[str, CompiledPolicy]) -> list[str]:
    from routing_policies.policy import check_references

    errors: list[str] = []
    providers = {p.name for p in config.providers}
    for i, model in enumerate(config.models):
        if model.provider not in providers:
            errors.append(error_at(doc, ("models", i, "provider"), f"model {model.name!r} names unknown provider {model.provider!r}"))
    for i, tenant in enumerate(config.tenants):
        if tenant.policy not in policies:
            errors.append(error_at(doc, ("tenants", i, "policy"), f"tenant {tenant.id!r} names unknown policy {tenant.policy!r}"))
    known = {m.name for m in config.models}
    for policy in policies.values():
        errors.extend(check_references(policy, policy.doc, known))
    return errors


def alias_candidates(policy: CompiledPolicy) -> dict[str, list[str]]:
    """The aliases a policy's routes name (`when: {model: smart}`), each with the models those
    routes may choose, in order (`$requested` left out)."""
    out: dict[str, list[str]] = {}
    for route in policy.file.routes:
        names = route.when.model
        for alias in [names] if isinstance(names, str) else (names or []):
            if not any(ch in alias for ch in "*?["):
                picks = out.setdefault(alias, [])
                picks.extend(c for c in route.candidates if c != "$requested" and c not in picks)
    return out


def alias_unavailable_reason(picks: list[str], unavailable: dict[str, str]) -> str | None:
    """An alias is available while any of its candidates is; else why none is."""
    if not picks or any(p not in unavailable for p in picks):
        return None
    return "no candidate is available: " + "; ".join(f"{p}: {unavailable[p]}" for p in picks)


def availability_notes(loaded: LoadedConfig) -> list[str]:
    """`gateway check`: the models and aliases the config alone leaves unusable (keys unset)."""
    unavailable = {m.name: why for m in loaded.models.values()
                   if (why := loaded.providers[m.provider].unavailable_reason()) is not None}
    notes = [f"unavailable: model {name!r}: {why}" for name, why in unavailable.items()]
    for policy_name, policy in sorted(loaded.policies.items()):
        for alias, picks in alias_candidates(policy).items():
            if (why := alias_unavailable_reason(picks, unavailable)) is not None:
                notes.append(f"unavailable: alias {alias!r} (policy {policy_name}): {why}")
            elif down := [p for p in picks if p in unavailable]:
                up = ", ".join(p for p in picks if p not in unavailable)
                notes.append(f"available: alias {alias!r} (policy {policy_name}) through {up}; "
                             f"{', '.join(down)} unavailable")
    return notes


def _warnings(config: GatewayConfig) -> list[str]:
    notes: list[str] = []
    for model in config.models:
        if not model.priced:
            notes.append(f"model {model.name!r} has no price: it costs $0 in the ledger")
    for provider in config.providers:
        if provider.api_key_env and not os.environ.get(provider.api_key_env):
            notes.append(f"provider {provider.name!r}: ${provider.api_key_env} is not set (unavailable until it is)")
    notes.extend(_per_process_limits(config))
    return notes


def _per_process_limits(config: GatewayConfig) -> list[str]:
    """PostgreSQL without Redis: budgets are shared by replicas, rate limits are not (in memory)."""
    state = config.state
    if state.redis_url or not state.database_url.startswith(("postgresql://", "postgres://")):
        return []
    limited = [t.id for t in config.tenants
               if t.rate_limits.requests_per_minute is not None or t.rate_limits.tokens_per_minute is not None]
    if not limited:
        return []
    names = ", ".join(repr(name) for name in limited)
    return [(f"state.redis_url is not set: rate limits of tenant{'s' if len(limited) > 1 else ''} {names} are "
             "counted per gateway process, so N replicas on this PostgreSQL admit up to N x the limit; "
             "set state.redis_url to share them")]
