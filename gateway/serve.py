"""`gateway serve`: uvicorn (uvloop + httptools) with a graceful drain on SIGTERM/SIGINT."""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from types import FrameType

import uvicorn

from gateway import logs
from gateway.app import create_app
from gateway.config import LoadedConfig, load_config
from gateway.runtime import Runtime
from gateway.settings import Settings

_CONFIG_ENV = "GATEWAY_CONFIG_FILE"
log = logging.getLogger("gateway")


class _DrainFirst:
    """SIGTERM/SIGINT for one serving process: /readyz turns 503 at once and the grace deadline
    starts (streams still open then end with in-band errors, gateway/runtime.py); after
    `drain_readiness_delay_s` uvicorn stops accepting and waits for in-flight requests. uvicorn
    re-raises the signal after its shutdown; a completed drain exits 0 instead."""

    def __init__(self, rt: Runtime, server: uvicorn.Server) -> None:
        self.rt, self.server = rt, server

    def __call__(self, sig: int, frame: FrameType | None) -> None:
        delay = self.rt.settings.drain_readiness_delay_s
        first = not self.rt.draining
        self.rt.begin_drain()
        if first and delay > 0 and self.rt.loop is not None:
            self.rt.loop.call_soon_threadsafe(self.rt.loop.call_later, delay, self.stop_accepting, sig)
            return
        self.stop_accepting(sig)

    def stop_accepting(self, sig: int) -> None:
        uvicorn.Server.handle_exit(self.server, sig, None)
        self.server._captured_signals.clear()


class _DrainingServer(uvicorn.Server):
    """The single-process server: its signal handler drains first (`_DrainFirst`)."""

    def __init__(self, config: uvicorn.Config, rt: Runtime) -> None:
        super().__init__(config)
        self.rt = rt
        self._drain = _DrainFirst(rt, self)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._drain(sig, frame)


def _drain_worker_on_signals(rt: Runtime) -> None:
    """`--workers N`: each worker process is uvicorn's own Server, which installs its SIGTERM/SIGINT
    handler before it loads the app (this factory); put the same drain first in front of it, so a
    worker drains like the single-process server (the supervisor passes SIGTERM on to every worker)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        server = getattr(signal.getsignal(sig), "__self__", None)
        if isinstance(server, uvicorn.Server):
            signal.signal(sig, _DrainFirst(rt, server))
        else:  # not under a uvicorn Server's signal capture (another runner, or another uvicorn version)
            log.warning("worker drain: no uvicorn signal handler to wrap; SIGTERM stops at once",
                        extra={"signal": signal.Signals(sig).name})


def tune_gc() -> None:
    """Fewer, cheaper collections for a long-running server.

    Every request allocates many short-lived objects; with the default thresholds the
    collector runs full passes over the (large, immortal) import-time heap often enough to
    cost ~8% CPU and to dominate p99 latency (45 ms -> 10 ms at concurrency 16 in
    bench/run.py). Objects alive at start-up are frozen out of collection altogether.
    """
    gc.set_threshold(20_000, 50, 100)
    gc.freeze()


def app_factory():  # type: ignore[no-untyped-def]
    """Used by uvicorn's worker processes (`--workers N`)."""
    settings = Settings()
    logs.configure(settings.log_level, settings.log_json)
    rt = Runtime(load_config(os.environ[_CONFIG_ENV]), settings)
    rt.reloader.handle_sighup = True  # a SIGHUP to the process group reloads policies, never kills a worker
    app = create_app(rt)
    _drain_worker_on_signals(rt)
    tune_gc()
    return app


def serve(loaded: LoadedConfig, settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_json)
    if settings.workers > 1 and not loaded.config.state.redis_url:
        print("error: --workers > 1 needs state.redis_url so that rate limits and budget "
              "reservations are shared by the worker processes", file=sys.stderr)
        return 1
    for note in loaded.warnings:
        print(f"warning: {note}", file=sys.stderr)
    base = f"http://{settings.host}:{settings.port}"
    print(f"gateway listening on {base}  (OpenAI SDK base_url={base}/v1, Anthropic SDK base_url={base})", flush=True)
    print(f"create a tenant key: gateway keys create --config {loaded.path} --tenant <tenant-id>", flush=True)
    common = dict(  # noqa: C408 - keyword arguments for uvicorn.Config, read as such
        host=settings.host, port=settings.port, loop="uvloop", http="httptools", access_log=False,
        # uvicorn's own cut comes after ours (gateway/runtime.py cut_streams ends streams in-band first).
        log_config=None, timeout_graceful_shutdown=int(settings.drain_timeout_s + settings.drain_readiness_delay_s) + 5,
        lifespan="on",
        backlog=4096, timeout_keep_alive=30, proxy_headers=False, server_header=False,
    )
    if settings.workers > 1:
        os.environ[_CONFIG_ENV] = str(loaded.path)
        uvicorn.run("gateway.serve:app_factory", factory=True, workers=settings.workers, **common)  # type: ignore[arg-type]
    else:
        rt = Runtime(loaded, settings)
        rt.reloader.handle_sighup = True  # SIGHUP reloads the policies (multi-worker: uvicorn's rolling restart)
        server = _DrainingServer(uvicorn.Config(create_app(rt), **common), rt)  # type: ignore[arg-type]
        tune_gc()
        server.run()
    return 0
