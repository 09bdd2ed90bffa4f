"""Policy hot reload: a file edit (polled), `POST /admin/reload` or SIGHUP.

A reload loads and checks every policy file again, all or nothing; on success it swaps the
runtime's policy table in one assignment. A request reads the table once, in `decide`, and
its `Decision` carries everything later steps need (version, route label, max attempts),
so requests in flight finish on the version they started with. An invalid file is
rejected with `file:line` errors, logged and counted in `gateway_policy_reload_total`
(result `success` or `failure`), and the last good version keeps serving.

Only policies reload; models, providers and tenants come from the config file and need
a restart. Polling compares each file's mtime and size every `poll_s`: it needs no
inotify and works the same on bind mounts and in containers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.audit_admin import (
    record_config_changes,  # audit: policy.reloaded with file hashes
)
from gateway.config import LoadedConfig
from routing_policies import (
    CompiledPolicy,
    SourceError,
    check_references,
    load_policies,
)

if TYPE_CHECKING:
    from gateway.runtime import Runtime

log = logging.getLogger("gateway.reload")

__all__ = ["PolicyReloader", "ReloadResult", "load_checked_policies"]

DEFAULT_POLL_S = 1.0
_SETTLE_S = 0.05  # an editor may still be writing: reload only once the files stop changing

Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class ReloadResult:
    result: str  # success | failure | unchanged
    source: str  # file | admin | sighup
    versions: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"result": self.result, "source": self.source, "policies": self.versions, "errors": self.errors}


def load_checked_policies(loaded: LoadedConfig) -> dict[str, CompiledPolicy]:
    """Every policy in the config's policies_dir, checked against its models and tenants."""
    policies = load_policies(loaded.policies_dir)
    errors: list[str] = []
    known = set(loaded.models)
    for policy in policies.values():
        errors.extend(check_references(policy, policy.doc, known))
    for tenant in loaded.config.tenants:
        if tenant.policy not in policies:
            errors.append(f"{loaded.policies_dir}:1: no policy named {tenant.policy!r}, "
                          f"which tenant {tenant.id!r} uses")
    if errors:
        raise SourceError(errors)
    return policies


def fingerprint(directory: Path) -> Fingerprint:
    """(name, mtime_ns, size) of every policy file: any edit, add or delete changes it."""
    try:
        entries = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml"))
    except OSError:
        return ()
    out: list[tuple[str, int, int]] = []
    for path in entries:
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append((path.name, stat.st_mtime_ns, stat.st_size))
    return tuple(out)


def versions(policies: dict[str, CompiledPolicy]) -> dict[str, str]:
    return {name: policy.version for name, policy in sorted(policies.items())}


class PolicyReloader:
    def __init__(self, rt: Runtime, *, poll_s: float = DEFAULT_POLL_S) -> None:
        self._rt = rt
        self.poll_s = poll_s
        self.handle_sighup = False  # set by `gateway serve`: only a main thread may install handlers
        self._lock = asyncio.Lock()
        self._seen: Fingerprint = ()
        self._task: asyncio.Task[None] | None = None
        self._signal_tasks: set[asyncio.Future[Any]] = set()  # SIGHUP reloads, audit writes
        self.last: ReloadResult | None = None

    @property
    def directory(self) -> Path:
        return self._rt.loaded.policies_dir

    async def start(self) -> None:
        self._seen = await asyncio.to_thread(fingerprint, self.directory)
        if self.poll_s > 0:
            self._task = asyncio.create_task(self._poll(), name="policy-reload-poll")
        if self.handle_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)

    async def close(self) -> None:
        if self.handle_sighup:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._signal_tasks:
            await asyncio.gather(*self._signal_tasks, return_exceptions=True)

    async def reload(self, source: str) -> ReloadResult:
        """Load every policy again; swap them in only if all are valid."""
        async with self._lock:
            seen = await asyncio.to_thread(fingerprint, self.directory)
            try:
                policies = await asyncio.to_thread(load_checked_policies, self._rt.loaded)
            except SourceError as exc:
                self._seen = seen
                return self._finish(ReloadResult("failure", source, versions(self._rt.policies), exc.errors))
            self._seen = seen
            if versions(policies) == versions(self._rt.policies):
                return self._finish(ReloadResult("unchanged", source, versions(policies)))
            # One assignment each: a request sees the old table or the new one, never a mix.
            self._rt.policies = policies
            self._rt.loaded = replace(self._rt.loaded, policies=policies)
            return self._finish(ReloadResult("success", source, versions(policies)))

    def _finish(self, outcome: ReloadResult) -> ReloadResult:
        self.last = outcome
        if outcome.result == "failure":
            self._rt.metrics.policy_reloads.labels("failure").inc()
            log.error("policy reload rejected; the last good policies keep serving",
                      extra={"source": outcome.source, "errors": outcome.errors, "policies": outcome.versions})
        elif outcome.result == "success":
            self._rt.metrics.policy_reloads.labels("success").inc()
            log.info("policies reloaded", extra={"source": outcome.source, "policies": outcome.versions})
            audited = asyncio.ensure_future(record_config_changes(self._rt, f"reload:{outcome.source}"))
            self._signal_tasks.add(audited)  # awaited by close()
            audited.add_done_callback(self._signal_tasks.discard)
        return outcome

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            current = await asyncio.to_thread(fingerprint, self.directory)
            if current == self._seen:
                continue
            await asyncio.sleep(_SETTLE_S)
            if await asyncio.to_thread(fingerprint, self.directory) != current:
                continue  # still being written: look again next round
            try:
                await self.reload("file")
            except Exception:
                log.exception("policy reload crashed; the last good policies keep serving")

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload("sighup"), name="policy-reload-sighup")
        self._signal_tasks.add(task)
        task.add_done_callback(self._signal_tasks.discard)
