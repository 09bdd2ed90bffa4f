"""The routing policy file format: validated and compiled once, at load.

See CONTRACT section 4. A policy is a list of routes; the first whose `when` matches a
request decides the candidates, the filters they must pass, and how they are ranked.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .model import CAPABILITIES, DATA_CLASSES, Facts
from .yamlsource import Loc, SourceError, YamlDoc, error_at, parse_yaml, validate

__all__ = [
    "REQUESTED",
    "CompiledPolicy",
    "PolicyFile",
    "PolicyTest",
    "Require",
    "Route",
    "RouteMatcher",
    "Shadow",
    "SplitEntry",
    "Weights",
    "When",
    "check_references",
    "compile_policy",
    "load_policies",
    "load_policy",
    "parse_policy",
]

REQUESTED = "$requested"
_ERROR_EXPECTATIONS = ("error:model_not_allowed", "error:model_not_found")

DataClass = Literal["public", "internal", "confidential", "restricted"]
Capability = Literal["chat", "embeddings", "tools", "json", "vision"]
NonEmptyStr = Annotated[str, Field(min_length=1)]
# How a model with no latency data yet is treated: `allow` (passes latency ceilings, ranks
# after observed models), `reject` (excluded where the route uses latency), or a number of
# milliseconds to assume as its p95.
UnknownLatency = Literal["allow", "reject"] | Annotated[float, Field(gt=0)]
GlobList = Annotated[list[NonEmptyStr], Field(min_length=1)]
# The Literals exist for pydantic's messages; model.py holds the canonical tuples.
assert get_args(DataClass) == DATA_CLASSES and get_args(Capability) == CAPABILITIES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class When(_Strict):
    """Conditions on the request; an unset condition matches everything."""

    model: NonEmptyStr | GlobList | None = None
    data_class: Annotated[list[DataClass], Field(min_length=1)] | None = None
    tenant: NonEmptyStr | GlobList | None = None


class Require(_Strict):
    min_quality: int | None = None
    max_p95_latency_ms: Annotated[float, Field(gt=0)] | None = None
    capabilities: list[Capability] = []
    max_usd_per_request: Annotated[Decimal, Field(ge=0)] | None = None


class SplitEntry(_Strict):
    model: NonEmptyStr
    weight: Annotated[int, Field(ge=0)]


class Shadow(_Strict):
    model: NonEmptyStr
    sample: Annotated[float, Field(ge=0.0, le=1.0)]
    # The internal ledger account shadow traffic is booked to (never the tenant's budget).
    account: NonEmptyStr = "shadow"


class Weights(_Strict):
    cost: Annotated[float, Field(ge=0.0)] = 0.5
    latency: Annotated[float, Field(ge=0.0)] = 0.5

    @model_validator(mode="after")
    def _not_all_zero(self) -> Weights:
        if self.cost == 0 and self.latency == 0:
            raise ValueError("weights cost and latency cannot both be 0")
        return self


class Timeouts(_Strict):
    """Per-attempt upstream timeouts overriding the providers' (seconds; unset keeps the provider's)."""

    connect_s: Annotated[float, Field(gt=0)] | None = None
    first_byte_s: Annotated[float, Field(gt=0)] | None = None
    idle_s: Annotated[float, Field(gt=0)] | None = None
    total_s: Annotated[float, Field(gt=0)] | None = None

    def as_tuple(self) -> tuple[float | None, float | None, float | None, float | None]:
        return (self.connect_s, self.first_byte_s, self.idle_s, self.total_s)


class Route(_Strict):
    name: NonEmptyStr
    when: When = When()
    candidates: Annotated[list[NonEmptyStr], Field(min_length=1)]
    objective: Literal["cheapest", "fastest", "ordered", "weighted"] = "ordered"
    require: Require = Require()
    split: Annotated[list[SplitEntry], Field(min_length=1)] | None = None
    sticky: Literal["key", "user"] = "key"  # what keeps a split arm: the API key, or the `user` field
    shadow: Shadow | None = None
    weights: Weights | None = None
    max_attempts: Annotated[int, Field(ge=1)] = 3
    timeouts: Timeouts | None = None  # per-attempt overrides of the providers' timeouts
    unknown_latency: UnknownLatency | None = None  # None: the policy's `unknown_latency`

    def uses_latency(self) -> bool:
        """Whether observed latency matters on this route (a ceiling or a latency objective)."""
        return self.require.max_p95_latency_ms is not None or self.objective in ("fastest", "weighted")

    @model_validator(mode="after")
    def _consistent(self) -> Route:
        duplicates = _duplicates(self.candidates)
        if duplicates:
            raise ValueError(f"duplicate candidate {', '.join(map(repr, duplicates))}")
        if self.split is not None:
            names = [entry.model for entry in self.split]
            if _duplicates(names):
                raise ValueError(f"split lists {', '.join(map(repr, _duplicates(names)))} twice")
            missing = [name for name in names if name not in self.candidates]
            if missing:
                raise ValueError(f"split model {', '.join(map(repr, missing))} is not in candidates")
            if sum(entry.weight for entry in self.split) == 0:
                raise ValueError("split weights must not all be 0")
        if self.weights is not None and self.objective != "weighted":
            raise ValueError("weights only apply to objective: weighted")
        return self


class PolicyTest(_Strict):
    tenant: NonEmptyStr
    model: NonEmptyStr
    expect: NonEmptyStr
    data_class: DataClass | None = None
    input_tokens: Annotated[int, Field(ge=0)] = 100
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    capabilities: list[Capability] = ["chat"]
    # Observed p95 latencies to assume for this case (model -> ms), for latency-aware routes.
    p95_latency_ms: dict[NonEmptyStr, Annotated[float, Field(gt=0)]] = {}
    remaining_budget_usd: Annotated[Decimal, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _known_error(self) -> PolicyTest:
        if self.expect.startswith("error:") and self.expect not in _ERROR_EXPECTATIONS:
            raise ValueError(f"expect must be a model name or one of {', '.join(_ERROR_EXPECTATIONS)}")
        return self


class PolicyFile(_Strict):
    name: NonEmptyStr
    routes: Annotated[list[Route], Field(min_length=1)]
    tests: list[PolicyTest] = []
    description: str | None = None
    unknown_latency: UnknownLatency = "allow"

    @field_validator("routes")
    @classmethod
    def _unique_routes(cls, routes: list[Route]) -> list[Route]:
        duplicates = _duplicates([route.name for route in routes])
        if duplicates:
            raise ValueError(f"duplicate route name {', '.join(map(repr, duplicates))}")
        return routes


@dataclass(frozen=True)
class RouteMatcher:
    """A route's `when`, with globs compiled (case-sensitive, like model names)."""

    models: re.Pattern[str] | None
    data_classes: frozenset[str] | None
    tenants: re.Pattern[str] | None

    @classmethod
    def from_when(cls, when: When) -> RouteMatcher:
        classes = frozenset(when.data_class) if when.data_class is not None else None
        return cls(_compile_globs(when.model), classes, _compile_globs(when.tenant))

    def matches(self, facts: Facts) -> bool:
        if self.models is not None and not self.models.fullmatch(facts.requested_model):
            return False
        if self.data_classes is not None and facts.data_class not in self.data_classes:
            return False
        return self.tenants is None or bool(self.tenants.fullmatch(facts.tenant))


@dataclass(frozen=True)
class CompiledPolicy:
    name: str
    version: str
    source_path: str
    file: PolicyFile
    matchers: tuple[RouteMatcher, ...]
    doc: YamlDoc | None = None

    @property
    def routes(self) -> list[Route]:
        return self.file.routes


def compile_policy(
    file: PolicyFile, *, source_path: str = "<memory>", version: str = "", doc: YamlDoc | None = None
) -> CompiledPolicy:
    """Precompile an already validated policy (tests and callers without a file use this)."""
    file = _resolve_defaults(file)
    matchers = tuple(RouteMatcher.from_when(route.when) for route in file.routes)
    return CompiledPolicy(file.name, version or "000000", source_path, file, matchers, doc)


def parse_policy(text: str, path: str) -> CompiledPolicy:
    """Validate and compile policy YAML; errors are a `SourceError` with file:line."""
    doc = parse_yaml(text, path)
    file = validate(doc, PolicyFile)
    return compile_policy(file, source_path=path, version=_version(text.encode("utf-8")), doc=doc)


def load_policy(path: str | Path) -> CompiledPolicy:
    name = str(path)
    try:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SourceError([f"{name}:1: cannot read: {reason}"]) from exc
    doc = parse_yaml(text, name)
    file = validate(doc, PolicyFile)
    return compile_policy(file, source_path=name, version=_version(raw), doc=doc)


def load_policies(directory: str | Path) -> dict[str, CompiledPolicy]:
    """Load every `*.yaml`/`*.yml` in `directory`, reporting all errors at once."""
    root = Path(directory)
    if not root.is_dir():
        raise SourceError([f"{directory}:1: cannot read: not a directory"])
    paths = sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    policies: dict[str, CompiledPolicy] = {}
    errors: list[str] = []
    for path in paths:
        try:
            policy = load_policy(path)
        except SourceError as exc:
            errors.extend(exc.errors)
            continue
        first = policies.get(policy.name)
        if first is not None:
            message = f"duplicate policy name '{policy.name}' (also in {first.source_path})"
            errors.append(_at(policy, ("name",), message))
            continue
        policies[policy.name] = policy
    if errors:
        raise SourceError(errors)
    return policies


def check_references(policy: CompiledPolicy, doc: YamlDoc | None, known_models: set[str]) -> list[str]:
    """Every model a policy names must exist; returns `file:line: message` errors."""
    source = doc if doc is not None else policy.doc
    errors: list[str] = []

    def check(name: str, loc: Loc, what: str, requested_ok: bool = True) -> None:
        if not (requested_ok and name == REQUESTED) and name not in known_models:
            errors.append(_at(policy, loc, f"{what}: unknown model '{name}'", source))

    for r, route in enumerate(policy.file.routes):
        for c, name in enumerate(route.candidates):
            check(name, ("routes", r, "candidates", c), f"route {route.name}")
        for s, entry in enumerate(route.split or []):
            check(entry.model, ("routes", r, "split", s, "model"), f"route {route.name} split")
        if route.shadow is not None:
            check(route.shadow.model, ("routes", r, "shadow", "model"), f"route {route.name} shadow")
    for t, test in enumerate(policy.file.tests):
        if test.expect not in _ERROR_EXPECTATIONS:
            check(test.expect, ("tests", t, "expect"), f"test {t + 1} expect", requested_ok=False)
        for name in test.p95_latency_ms:
            check(name, ("tests", t, "p95_latency_ms", name), f"test {t + 1} p95_latency_ms", requested_ok=False)
    return errors


def _at(policy: CompiledPolicy, loc: Loc, message: str, doc: YamlDoc | None = None) -> str:
    source = doc if doc is not None else policy.doc
    if source is None:
        return f"{policy.source_path}:1: {message}"
    return error_at(source, loc, message)


def _resolve_defaults(file: PolicyFile) -> PolicyFile:
    """Routes inherit the policy-wide `unknown_latency`, so filters need only the route."""
    if all(route.unknown_latency is not None for route in file.routes):
        return file
    routes = [
        route if route.unknown_latency is not None
        else route.model_copy(update={"unknown_latency": file.unknown_latency})
        for route in file.routes
    ]
    return file.model_copy(update={"routes": routes})


def _compile_globs(patterns: str | Sequence[str] | None) -> re.Pattern[str] | None:
    if patterns is None:
        return None
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in items))


def _duplicates(names: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    repeated: list[str] = []
    for name in names:
        if name in seen and name not in repeated:
            repeated.append(name)
        seen.add(name)
    return repeated


def _version(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:6]
