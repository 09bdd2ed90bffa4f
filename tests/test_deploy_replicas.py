"""The Kubernetes ConfigMap's config, run for real: the migration Job's command, then two
replicas sharing PostgreSQL and Redis, with the store URLs and keys given only as the
environment the Secret provides (state.database_url_env / redis_url_env)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.deployfiles import (
    READY_PATH,
    env_names,
    k8s_objects,
    pod_spec,
    write_configmap_config,
)
from tests.gatewayprocs import GatewayProcess
from tests.harness import ROOT, UpstreamProcess
from tests.services import REDIS_URL, pg_schema, redis_prefix

ADMIN = "admin-deploy-test-key"


def k8s_config_here(tmp: Path, upstream_url: str, prefix: str) -> Path:
    """The ConfigMap's config with only what a test machine must change: where the pod's
    emptyDir is, a Redis key prefix of its own, and the local model (the fake upstream)."""
    path = write_configmap_config(k8s_objects(), tmp)
    config = yaml.safe_load(path.read_text())
    config["state"].update(redis_key_prefix=prefix, spool_dir=str(tmp / "state" / "spool"))
    config["audit"]["jsonl_path"] = str(tmp / "state" / "audit.jsonl")
    (local,) = [p for p in config["providers"] if p["locality"] == "local"]
    local["base_url"] = f"{upstream_url}/v1"
    assert set(config["state"]) == {"database_url_env", "redis_url_env", "redis_key_prefix", "spool_dir"}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def secret_env(pg_url: str) -> dict[str, str]:
    """What the Deployment's env gives the container (values a test machine can reach)."""
    container = pod_spec(k8s_objects()[("Deployment", "gateway")])["containers"][0]
    env = {name: e["value"] for name, e in env_names(container).items() if "value" in e}
    return {**env, "GATEWAY_DATABASE_URL": pg_url, "GATEWAY_REDIS_URL": REDIS_URL, "GATEWAY_ADMIN_KEY": ADMIN,
            "OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": ""}  # hosted providers off: nothing leaves 127.0.0.1


def gateway_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], check=False, capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, **env})


def chat(node: GatewayProcess, key: str, model: str, **headers: str) -> Any:
    client = openai.OpenAI(base_url=node.v1, api_key=key, max_retries=0, default_headers=headers)
    return client.chat.completions.with_raw_response.create(
        model=model, max_tokens=20, messages=[{"role": "user", "content": "hello from the deploy test"}])


@pytest.mark.services
def test_k8s_config_migrates_then_serves_two_replicas(tmp_path: Path, upstream: UpstreamProcess) -> None:
    with ExitStack() as stack:
        pg_url = stack.enter_context(pg_schema())
        config = k8s_config_here(tmp_path, upstream.url, stack.enter_context(redis_prefix()))
        env = secret_env(pg_url)
        job_args = pod_spec(k8s_objects()[("Job", "gateway-migrate")])["containers"][0]["args"]
        migrated = gateway_cli([*job_args[:-1], str(config)], env)
        assert migrated.returncode == 0, migrated.stderr
        assert "applied:" in migrated.stdout
        again = gateway_cli([*job_args[:-1], str(config)], env)  # re-running the Job is harmless
        assert again.returncode == 0 and again.stdout.strip() == "schema is up to date"

        nodes = [GatewayProcess(config, tmp_path / f"replica-{i}.log", env) for i in range(2)]
        for node in nodes:
            stack.callback(node.stop)
            ready = httpx.get(node.url + READY_PATH, timeout=5)
            assert ready.status_code == 200 and ready.json()["policies"] == ["cost-latency", "default"]

        created = gateway_cli(["keys", "create", "--config", str(config), "--tenant", "demo"], env)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        assert key.startswith("gw-")

        fast = chat(nodes[0], key, "fast")  # one replica created nothing: the key is in PostgreSQL
        assert fast.headers["x-gateway-model"] == "llama-local"
        assert fast.parse().choices[0].message.content
        smart = chat(nodes[1], key, "smart", **{"x-gateway-data-class": "confidential"})
        assert smart.headers["x-gateway-model"] == "llama-local"
        assert smart.headers["x-gateway-route"].endswith(":sensitive-stays-local")
        posts = [a for a in upstream.attempts() if a["method"] == "POST"]  # (GETs: health checks)
        assert [(a["path"], a["model"]) for a in posts] == [("/v1/chat/completions", "qwen2.5-1.5b")] * 2

        codes = [node.stop() for node in nodes]
        assert codes == [0, 0]  # SIGTERM: drained and flushed
        spend = gateway_cli(["spend", "--config", str(config), "--by", "tenant", "--format", "json"], env)
        assert spend.returncode == 0, spend.stderr
        rows = json.loads(spend.stdout)
        rows = rows["data"] if isinstance(rows, dict) else rows
        assert [(r["tenant"], r["requests"]) for r in rows] == [("demo", 2)]
        assert (tmp_path / "state" / "spool").is_dir()  # the spool lives on the mounted state dir


def test_k8s_config_without_the_secret_env_stops_before_serving(tmp_path: Path) -> None:
    config = write_configmap_config(k8s_objects(), tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_DATABASE_URL", "GATEWAY_REDIS_URL")}
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", "0"],
                            check=False, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 1
    assert "database_url_env: $GATEWAY_DATABASE_URL is not set" in result.stderr
    assert "redis_url_env: $GATEWAY_REDIS_URL is not set" in result.stderr
