"""Live latency statistics per model, fed from completed requests, read by routing.

Each model keeps two sliding-window histograms (total upstream time and time to first
token) with log-spaced buckets, so a quantile is within ~4% of the true value and
recording a sample is a couple of integer increments: cheap enough for the hot path.
The window is a ring of time slices; a slice older than the window is cleared when its
turn comes again, so old traffic drops out instead of decaying forever.

Routing never reads the histograms: once a second the tracker publishes each model's
p95 into a new `Candidate` catalog (`dataclasses.replace`, never mutated in place, like
gateway/health.py), so `choose` stays pure and reads a consistent snapshot.
A model with fewer than `min_samples` in the window has no p95 (it counts as unobserved;
the policy's `unknown_latency` says how to treat it).
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from routing_policies import Candidate

if TYPE_CHECKING:
    from gateway.relay import Exchange

__all__ = ["LatencySnapshot", "LatencyTracker", "WindowedHistogram", "latency_samples", "observed_latency",
           "percentile", "quantile", "snapshot_of", "with_observed_latency"]

_GROWTH = 1.08
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = 200  # 1.08**200 ms is about 5 days: anything slower lands in the last bucket
# Each bucket is reported as its geometric midpoint: (G**(k-1) * G**k) ** 0.5.
_MIDPOINTS: list[float] = [0.5] + [float(_GROWTH ** (k - 0.5)) for k in range(1, _BUCKETS)]

DEFAULT_WINDOW_S = 300.0
DEFAULT_SLICES = 10
DEFAULT_MIN_SAMPLES = 5
DEFAULT_REFRESH_S = 1.0


def _bucket(ms: float) -> int:
    if ms <= 1.0:
        return 0
    return min(_BUCKETS - 1, int(math.log(ms) / _LOG_GROWTH) + 1)


class WindowedHistogram:
    """Log-bucketed counts of millisecond values over a sliding window of time slices."""

    __slots__ = ("_counts", "_ids", "_slice_s")

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, slices: int = DEFAULT_SLICES) -> None:
        self._slice_s = window_s / slices
        self._counts: list[list[int] | None] = [None] * slices
        self._ids = [-1] * slices

    def add(self, ms: float, now: float) -> None:
        slice_id = int(now / self._slice_s)
        i = slice_id % len(self._ids)
        counts = self._counts[i]
        if counts is None or self._ids[i] != slice_id:
            counts = self._counts[i] = [0] * _BUCKETS
            self._ids[i] = slice_id
        counts[_bucket(ms)] += 1

    def merged(self, now: float) -> list[int]:
        """Counts per bucket over the slices still inside the window."""
        current = int(now / self._slice_s)
        oldest = current - len(self._ids) + 1
        total = [0] * _BUCKETS
        for slice_id, counts in zip(self._ids, self._counts):
            if counts is not None and oldest <= slice_id <= current:
                total = [a + b for a, b in zip(total, counts)]
        return total


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of bucketed counts, as the bucket's midpoint in ms."""
    n = sum(counts)
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    seen = 0
    for k, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return round(float(_MIDPOINTS[k]), 1)
    return round(float(_MIDPOINTS[-1]), 1)


@dataclass(frozen=True)
class LatencySnapshot:
    """One model's latency over the window; quantiles are None below `min_samples`."""

    samples: int
    p50_ms: float | None
    p95_ms: float | None
    ttft_samples: int
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"samples": self.samples, "p50_ms": self.p50_ms, "p95_ms": self.p95_ms,
                "ttft_samples": self.ttft_samples, "ttft_p50_ms": self.ttft_p50_ms,
                "ttft_p95_ms": self.ttft_p95_ms}


_EMPTY = LatencySnapshot(0, None, None, 0, None, None)


class CatalogHolder(Protocol):
    catalog: dict[str, Candidate]


class LatencyTracker:
    """Per-model total and TTFT histograms; publishes p95 into the routing catalog."""

    def __init__(
        self,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        slices: int = DEFAULT_SLICES,
        min_samples: int = DEFAULT_MIN_SAMPLES,
        refresh_s: float = DEFAULT_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.min_samples = min_samples
        self._slices = slices
        self._refresh_s = refresh_s
        self._clock = clock
        self._total: dict[str, WindowedHistogram] = {}
        self._ttft: dict[str, WindowedHistogram] = {}
        self._task: asyncio.Task[None] | None = None

    # -- hot path ------------------------------------------------------------------------

    def observe(self, model: str, total_ms: float, ttft_ms: float | None = None) -> None:
        now = self._clock()
        hist = self._total.get(model)
        if hist is None:
            hist = self._total[model] = WindowedHistogram(self.window_s, self._slices)
        hist.add(total_ms, now)
        if ttft_ms is not None:
            first = self._ttft.get(model)
            if first is None:
                first = self._ttft[model] = WindowedHistogram(self.window_s, self._slices)
            first.add(ttft_ms, now)

    def observe_exchange(self, ex: Exchange) -> None:
        """Record a completed request: time on the model that answered, not on failed attempts."""
        if ex.target is None or ex.upstream_started is None or not ex.attempts:
            return
        served = ex.attempts[-1]
        if served.outcome != "ok" or served.model != ex.target.model.name:
            return
        served_start = ex.upstream_started + ex.upstream_s - served.latency_ms / 1000
        total_ms = (time.perf_counter() - served_start) * 1000
        ttft_ms = None
        if ex.ttft_ms is not None:  # measured from the edge: take off what came before the attempt
            ttft_ms = max(0.0, ex.ttft_ms - (served_start - ex.started) * 1000)
        self.observe(served.model, total_ms, ttft_ms)

    # -- readers -------------------------------------------------------------------------

    def snapshot(self, model: str) -> LatencySnapshot:
        now = self._clock()
        total = self._total.get(model)
        if total is None:
            return _EMPTY
        counts = total.merged(now)
        first = self._ttft.get(model)
        ttft_counts = first.merged(now) if first is not None else [0] * _BUCKETS
        n, t = sum(counts), sum(ttft_counts)
        enough, ttft_enough = n >= self.min_samples, t >= self.min_samples
        return LatencySnapshot(
            samples=n,
            p50_ms=quantile(counts, 0.5) if enough else None,
            p95_ms=quantile(counts, 0.95) if enough else None,
            ttft_samples=t,
            ttft_p50_ms=quantile(ttft_counts, 0.5) if ttft_enough else None,
            ttft_p95_ms=quantile(ttft_counts, 0.95) if ttft_enough else None,
        )

    def snapshots(self) -> dict[str, LatencySnapshot]:
        return {model: self.snapshot(model) for model in sorted(self._total)}

    def with_latency(self, catalog: Mapping[str, Candidate]) -> dict[str, Candidate] | None:
        """A new catalog with every model's current p95, or None when nothing changed."""
        changed: dict[str, Candidate] = {}
        for name, candidate in catalog.items():
            p95 = self.snapshot(name).p95_ms if name in self._total else None
            if p95 != candidate.p95_latency_ms:
                changed[name] = replace(candidate, p95_latency_ms=p95)
        if not changed:
            return None
        return {**catalog, **changed}

    def publish(self, holder: CatalogHolder) -> None:
        updated = self.with_latency(holder.catalog)
        if updated is not None:
            holder.catalog = updated

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, holder: CatalogHolder) -> None:
        self._task = asyncio.create_task(self._publish_loop(holder), name="latency-publish")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _publish_loop(self, holder: CatalogHolder) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            self.publish(holder)

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(_LatencyCollector(self))


class _LatencyCollector(Collector):
    """`/metrics`: the window's quantiles per model, computed at scrape time only."""

    def __init__(self, tracker: LatencyTracker) -> None:
        self._tracker = tracker

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        quantiles = GaugeMetricFamily(
            "gateway_model_latency_seconds",
            "Observed upstream latency per model over the sliding window (what routing uses)",
            labels=["model", "kind", "quantile"])
        samples = GaugeMetricFamily(
            "gateway_model_latency_samples", "Completed requests in the latency window",
            labels=["model", "kind"])
        for model, snap in self._tracker.snapshots().items():
            samples.add_metric([model, "total"], snap.samples)
            samples.add_metric([model, "ttft"], snap.ttft_samples)
            for kind, q, value in (("total", "0.5", snap.p50_ms), ("total", "0.95", snap.p95_ms),
                                   ("ttft", "0.5", snap.ttft_p50_ms), ("ttft", "0.95", snap.ttft_p95_ms)):
                if value is not None:
                    quantiles.add_metric([model, kind, q], value / 1000)
        yield quantiles
        yield samples


# -- latency observed in recorded traffic (the audit trail): offline explain and simulate ---


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def latency_samples(records: Iterable[Mapping[str, Any]]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Sorted total and TTFT latencies per served model, from every successful record
    (shadow copies included: they are real traffic to that model)."""
    totals: dict[str, list[float]] = defaultdict(list)
    ttfts: dict[str, list[float]] = defaultdict(list)
    for record in records:
        model = record.get("model_served")
        if not model or record.get("outcome") != "ok" or not isinstance(record.get("latency_ms"), (int, float)):
            continue
        totals[model].append(float(record["latency_ms"]))
        if isinstance(record.get("ttft_ms"), (int, float)):
            ttfts[model].append(float(record["ttft_ms"]))
    return ({m: sorted(v) for m, v in totals.items()}, {m: sorted(v) for m, v in ttfts.items()})


def observed_latency(records: Iterable[Mapping[str, Any]],
                     min_samples: int = DEFAULT_MIN_SAMPLES) -> dict[str, LatencySnapshot]:
    """Per-model latency quantiles observed in `records`."""
    totals, ttfts = latency_samples(records)
    return {model: snapshot_of(values, ttfts.get(model, []), min_samples) for model, values in totals.items()}


def snapshot_of(values: list[float], ttft: list[float], min_samples: int) -> LatencySnapshot:
    enough, ttft_enough = len(values) >= min_samples, len(ttft) >= min_samples
    return LatencySnapshot(
        samples=len(values),
        p50_ms=percentile(values, 0.5) if enough else None,
        p95_ms=percentile(values, 0.95) if enough else None,
        ttft_samples=len(ttft),
        ttft_p50_ms=percentile(ttft, 0.5) if ttft_enough else None,
        ttft_p95_ms=percentile(ttft, 0.95) if ttft_enough else None,
    )


def with_observed_latency(catalog: Mapping[str, Candidate],
                          latency: Mapping[str, LatencySnapshot]) -> dict[str, Candidate]:
    """`catalog` with each model's observed p95 (None where there is not enough data)."""
    return {name: replace(c, p95_latency_ms=latency[name].p95_ms) if name in latency else c
            for name, c in catalog.items()}
