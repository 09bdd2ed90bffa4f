"""OpenTelemetry traces with the GenAI semantic conventions, and log correlation.

Tracing is on only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set;
spans then go out by OTLP/HTTP in batches. When it is off, a request creates no span
object at all: `begin` only remembers the caller's trace id (or mints one, 16 random
bytes as W3C hex, when the caller sent no `traceparent`) for the logs and the audit record.

One span per request (`chat {model}` or `embeddings {model}`, kind SERVER) continuing the
caller's W3C `traceparent`, with a child span per stage: `gateway.ratelimit`,
`gateway.policy`, `gateway.budget`, and one CLIENT span per upstream attempt. Stage spans
are built when the request finishes, from timestamps the pipeline took as it went, so
the hot path never carries span contexts around. Attributes hold metadata only (models,
provider, token counts, status); never prompt or completion text.
"""
from __future__ import annotations

import contextvars
import logging
import os
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.base import Usage
    from gateway.errors import GatewayError
    from gateway.relay import Exchange

_random_bits = random.getrandbits
ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

# (request_id, trace_id) of the request the current task serves; read by the log filter.
_current: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar("gateway_request", default=None)


def trace_id_from_header(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed."""
    if not traceparent or len(traceparent) < 55:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1].lower()


class LogContext(logging.Filter):
    """Adds `request_id` and `trace_id` of the request being served to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current.get()
        if current is not None:
            if not hasattr(record, "request_id"):
                record.request_id = current[0]
            if current[1] and not hasattr(record, "trace_id"):
                record.trace_id = current[1]
        return True


def _operation(endpoint: str) -> str:
    return "embeddings" if "embed" in endpoint else "chat"


class Telemetry:
    """Tracing for one runtime. `tracer_provider` is injected by tests (in-memory exporter)."""

    def __init__(self, tracer_provider: Any | None = None) -> None:
        self.provider = tracer_provider
        self.enabled = tracer_provider is not None
        self._tracer = tracer_provider.get_tracer("model-gateway") if tracer_provider is not None else None
        self._propagator: Any = None
        if self.enabled:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Telemetry:
        env = os.environ if environ is None else environ
        if not any(env.get(name) for name in ENDPOINT_ENV):
            return cls(None)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "model-gateway")}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    def begin(self, ex: Exchange, headers: Mapping[str, str]) -> None:
        """Open the request span (tracing on), or (off) note the caller's trace id, or a new
        random W3C trace id when it sent none, so every log line and audit record of the
        request carries one."""
        traceparent = headers.get("traceparent")
        if self._tracer is None:
            # random.getrandbits, as OpenTelemetry's own id generator: ids need to be unique, not
            # secret, and os.urandom is a syscall that gives the GIL away on every request.
            ex.trace_id = trace_id_from_header(traceparent) or f"{_random_bits(128) or 1:032x}"
            _current.set((ex.request_id, ex.trace_id))
            return
        from opentelemetry.trace import SpanKind, format_trace_id

        carrier = {"traceparent": traceparent} if traceparent else {}
        if traceparent and headers.get("tracestate"):
            carrier["tracestate"] = headers["tracestate"]
        parent = self._propagator.extract(carrier) if carrier else None
        op = _operation(ex.endpoint)
        span = self._tracer.start_span(op, context=parent, kind=SpanKind.SERVER,
                                       start_time=time.time_ns() - int(ex.elapsed_ms() * 1e6),
                                       attributes={"gen_ai.operation.name": op, "gateway.request_id": ex.request_id})
        ex.span = span
        ex.trace_id = format_trace_id(span.get_span_context().trace_id)
        _current.set((ex.request_id, ex.trace_id))

    def finish(self, ex: Exchange, usage: Usage, status: int, outcome: str, error: GatewayError | None) -> None:
        """Child spans from the recorded stage times, GenAI attributes, then end the request span."""
        from opentelemetry.trace import (
            SpanKind,
            Status,
            StatusCode,
            set_span_in_context,
        )

        span, tracer = ex.span, self._tracer
        ex.span = None
        if tracer is None:  # tracing was swapped off mid-request: just close the span
            span.end()
            return
        context = set_span_in_context(span)
        for name, start_ns, end_ns in ex.stages:
            tracer.start_span(f"gateway.{name}", context=context, start_time=start_ns).end(end_time=end_ns)
        for attempt in ex.attempts:
            start = attempt.started_ns or time.time_ns()
            child = tracer.start_span(
                f"{_operation(ex.endpoint)} {attempt.model}", context=context, kind=SpanKind.CLIENT, start_time=start,
                attributes=self._attempt_attributes(ex, attempt))
            if attempt.outcome != "ok":
                child.set_status(Status(StatusCode.ERROR))
            child.end(end_time=start + int(attempt.latency_ms * 1e6))
        span.set_attributes(self._request_attributes(ex, usage, status))
        error_type = error.code if error is not None else (outcome if outcome != "ok" else None)
        if error_type:
            span.set_attribute("error.type", error_type)
        if status >= 500 or error_type:
            span.set_status(Status(StatusCode.ERROR))
        if ex.parsed is not None:
            span.update_name(f"{_operation(ex.endpoint)} {ex.parsed.model[:64]}")
        span.end()

    def _request_attributes(self, ex: Exchange, usage: Usage, status: int) -> dict[str, Any]:
        attrs: dict[str, Any] = {"http.response.status_code": status}
        if ex.tenant:
            attrs["gateway.tenant"] = ex.tenant
        if ex.parsed is not None:
            attrs["gen_ai.request.model"] = ex.parsed.model[:128]
            if ex.parsed.max_output_tokens is not None:
                attrs["gen_ai.request.max_tokens"] = ex.parsed.max_output_tokens
        if ex.decision is not None:
            attrs["gateway.route"] = ex.decision.route_label()
        if ex.data_class:
            attrs["gateway.data_class"] = ex.data_class
        if ex.target is not None:
            attrs["gen_ai.provider.name"] = _provider_name(ex.target.endpoint)
            attrs["gen_ai.response.model"] = ex.target.model.upstream_model
            attrs["gateway.model"] = ex.target.model.name
            attrs["gen_ai.usage.input_tokens"] = usage.input_tokens + usage.cached_input_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.output_tokens
        attrs["gateway.upstream_attempts"] = len(ex.attempts)
        return attrs

    def _attempt_attributes(self, ex: Exchange, attempt: Any) -> dict[str, Any]:
        attrs: dict[str, Any] = {"gen_ai.operation.name": _operation(ex.endpoint), "gateway.model": attempt.model,
                                 "gateway.provider": attempt.provider, "gateway.attempt.outcome": attempt.outcome}
        if ex.target is not None and ex.target.model.name == attempt.model:
            attrs["gen_ai.provider.name"] = _provider_name(ex.target.endpoint)
            attrs["gen_ai.request.model"] = ex.target.model.upstream_model
        if attempt.status is not None:
            attrs["http.response.status_code"] = attempt.status
        if attempt.error:
            attrs["error.type"] = attempt.error
        return attrs

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def _provider_name(endpoint: Any) -> str:
    """The semconv provider name: `openai`/`anthropic` for those APIs, else the configured name."""
    return str(endpoint.type if endpoint.type in ("openai", "anthropic") else endpoint.provider)


def stage_start() -> int:
    return time.time_ns()


def mark(ex: Exchange, stage: str, start_ns: int) -> None:
    """Record a finished stage for the trace (only when this request is traced)."""
    if ex.span is not None:
        ex.stages.append((stage, start_ns, time.time_ns()))
