from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    RunningGateway,
    UpstreamProcess,
    base_config,
    run_gateway,
    write_config,
)


@pytest.fixture(scope="session")
def upstream_process() -> Iterator[UpstreamProcess]:
    up = UpstreamProcess()
    yield up
    up.close()


@pytest.fixture
def upstream(upstream_process: UpstreamProcess) -> UpstreamProcess:
    upstream_process.reset()
    return upstream_process


@pytest.fixture
def gw_config(tmp_path: Path, upstream: UpstreamProcess) -> dict[str, Any]:
    """The default test config, as a dict a test may change before starting the gateway."""
    return base_config(upstream.url, tmp_path)


@pytest.fixture
def start_gateway(tmp_path: Path, gw_config: dict[str, Any]) -> Iterator[Callable[..., RunningGateway]]:
    with ExitStack() as stack:
        def start(policies: list[dict[str, Any]] | None = None, **settings: Any) -> RunningGateway:
            path = write_config(tmp_path, gw_config, policies)
            return stack.enter_context(run_gateway(path, **settings))

        yield start


@pytest.fixture
def gateway(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return start_gateway()
