"""Process helpers for bench/run.py: start/stop pinned process groups, CPU time from /proc."""
from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

HZ = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2:].split()  # the command name may contain spaces


def proc_tree(root: int) -> list[int]:
    """root and all its descendants (by parent pid), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if os.path.exists(f"/proc/{pid}"):
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def cpu_ticks(pids: Iterable[int]) -> int:
    """utime + stime (clock ticks) summed over pids that still exist."""
    total = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total


def rss_mb(pids: Iterable[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total_kb += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return round(total_kb / 1024, 1)


def machine_busy_ticks() -> int:
    """Busy clock ticks of the whole machine (all CPUs) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4]  # minus idle and iowait


def own_ticks() -> float:
    """CPU ticks of this process plus its waited-for children (wrk): the load generator's cost."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime) * HZ


def pin_prefix(cpus: str) -> list[str]:
    """["taskset", "-c", cpus] when pinning is possible and wanted, else []."""
    if cpus and NCPU >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", cpus]
    return []


def _open_log(path: Path | None) -> BinaryIO | None:
    return open(path, "ab") if path is not None else None


class Proc:
    """A child started in its own session (process group), so that stop() ends exactly its tree."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: str | None = None, log: Path | None = None, pipe_stdout: bool = False) -> None:
        self.name, self.argv, self.env, self.cwd, self.log = name, list(argv), env, cwd, log
        self.pipe_stdout = pipe_stdout
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> Proc:
        logf = _open_log(self.log)
        sink: Any = logf if logf is not None else asyncio.subprocess.DEVNULL
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if self.pipe_stdout else sink, stderr=sink, start_new_session=True)
        finally:
            if logf is not None:
                logf.close()
        return self

    async def read_ready(self, timeout: float) -> int:
        """Wait for a "READY <port>" line on stdout (pipe_stdout=True); returns the port."""
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line.startswith(b"READY "):
            raise RuntimeError(f"{self.name} did not start: {line!r} {self.log_tail()}")
        return int(line.split()[1])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self, n: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        lines = self.log.read_text(errors="replace").splitlines()[-n:]
        return f"\n--- last lines of {self.log}:\n" + "\n".join(lines)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to our process group, SIGKILL after timeout. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group (e.g. workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode
