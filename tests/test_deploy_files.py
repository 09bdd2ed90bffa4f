"""deploy/: the Dockerfile, compose stack and Kubernetes manifests agree with the repository,
the real config loader, and the contract's ops endpoints (/healthz, /readyz on 8080)."""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import LoadedConfig, load_config
from gateway.explain import run_all_policy_tests
from tests.deployfiles import (
    CONFIG_PATH,
    DEPLOY,
    HEALTH_PATH,
    K8S,
    POLICIES_PATH,
    PORT,
    READY_PATH,
    SERVE_ARGS,
    compose,
    deploy_yaml_files,
    dockerfile_instructions,
    env_names,
    exec_form,
    final_stage,
    k8s_objects,
    pod_spec,
    write_configmap_config,
    yaml_docs,
)
from tests.harness import (
    DEFAULT_POLICY,
    ROOT,
    TENANT_KEY,
    RunningGateway,
    free_port,
    run_gateway,
    write_config,
)

STATE_DIR = "/var/lib/gateway"
K8S_ENV = {"GATEWAY_DATABASE_URL": "postgresql://gateway:pw@db.internal:5432/gateway",
           "GATEWAY_REDIS_URL": "redis://:pw@cache.internal:6379/0"}


def check_shipped_config(loaded: LoadedConfig) -> None:
    """What both shipped multi-replica configs must be: shared stores, writes under the state
    volume, every policy test passing, hosted and local models as the policies expect."""
    state = loaded.config.state
    assert state.database_url.startswith("postgresql://") and (state.redis_url or "").startswith("redis://")
    assert str(loaded.spool_dir).startswith(STATE_DIR + "/")
    assert str(loaded.audit_jsonl_path).startswith(STATE_DIR + "/")
    results = list(run_all_policy_tests(loaded))
    assert len(results) >= 10 and [r for r in results if not r[3]] == []
    assert set(loaded.policies) == {p.stem for p in (DEPLOY / "policies").glob("*.yaml")}
    assert loaded.models["llama-local"].data_boundary == "local"


def test_every_deploy_yaml_parses() -> None:
    files = deploy_yaml_files()
    names = {str(p.relative_to(DEPLOY)) for p in files}
    assert {"compose.yaml", "compose/gateway.yaml", "kubernetes/kustomization.yaml",
            "kubernetes/deployment.yaml", "kubernetes/configmap.yaml"} <= names
    for path in files:
        assert yaml_docs(path), f"{path} has no YAML document"


# --- Dockerfile -------------------------------------------------------------------------------

def test_dockerfile_builds_the_project_from_repo_paths() -> None:
    steps = dockerfile_instructions()
    assert next(arg for name, arg in steps if name == "ARG") == "PYTHON_IMAGE=python:3.11-slim"
    assert len([1 for name, _ in steps if name == "FROM"]) == 2  # build stage + runtime stage
    copies = [arg.split() for name, arg in steps if name == "COPY" and not arg.startswith("--from")]
    sources = [src.rstrip("/") for words in copies for src in words[:-1]]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()
                and any(fnmatch.fnmatch(p.name, pattern) for pattern in include)}
    assert packages == set(sources) - {"pyproject.toml", "requirements.lock"}
    runs = " ".join(arg for name, arg in steps if name == "RUN")
    assert "pip install -c requirements.lock ." in runs
    assert "[test]" not in runs and "[local]" not in runs and "llama" not in runs


def test_dockerfile_runtime_stage_contract() -> None:
    stage = final_stage(dockerfile_instructions())
    by_name: dict[str, list[str]] = {}
    for name, arg in stage:
        by_name.setdefault(name, []).append(arg)
    user = by_name["USER"][-1]
    assert re.fullmatch(r"\d+:\d+", user) and not user.startswith("0:")  # numeric: runAsNonRoot can check it
    assert by_name["EXPOSE"] == [str(PORT)]
    assert exec_form(by_name["ENTRYPOINT"][-1]) + exec_form(by_name["CMD"][-1]) == ["gateway", *SERVE_ARGS]
    healthcheck = by_name["HEALTHCHECK"][-1]
    assert f"http://127.0.0.1:{PORT}{HEALTH_PATH}" in healthcheck and "curl" not in healthcheck
    assert any(STATE_DIR in arg and "chown" in arg for arg in by_name["RUN"])  # writable by the user
    assert by_name["WORKDIR"][-1] == STATE_DIR
    deployment = pod_spec(k8s_objects()[("Deployment", "gateway")])
    assert str(deployment["securityContext"]["runAsUser"]) == user.split(":")[0]


def healthcheck_command(port: int) -> list[str]:
    stage = final_stage(dockerfile_instructions())
    arg = [a for name, a in stage if name == "HEALTHCHECK"][-1]
    command = exec_form(arg[arg.index("CMD") + 3:].strip())
    assert command[0] == "python"
    return [sys.executable, *[part.replace(f":{PORT}/", f":{port}/") for part in command[1:]]]


def test_dockerfile_healthcheck_one_liner_runs(gateway: RunningGateway) -> None:
    port = int(gateway.url.rsplit(":", 1)[1])
    assert subprocess.run(healthcheck_command(port), check=False, timeout=20).returncode == 0
    down = subprocess.run(healthcheck_command(free_port()), check=False, capture_output=True,
                          timeout=20)
    assert down.returncode != 0 and b"Connection refused" in down.stderr


def test_dockerignore_keeps_state_caches_and_secrets_out() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for required in (".git", ".venv", ".gateway", "tests/artifacts", ".mypy_cache", ".pytest_cache",
                     ".ruff_cache", "**/__pycache__", "**/.env"):
        assert required in patterns
    for src in ("pyproject.toml", "requirements.lock", "gateway", "routing_policies", "adapters", "budgets"):
        assert not any(fnmatch.fnmatch(src, p) for p in patterns), f"{src} is excluded from the context"


# --- compose ----------------------------------------------------------------------------------

def test_compose_gateway_config_passes_the_real_loader() -> None:
    loaded = load_config(DEPLOY / "compose" / "gateway.yaml")
    check_shipped_config(loaded)
    assert "@postgres:5432/" in loaded.config.state.database_url  # the compose service hostnames
    assert (loaded.config.state.redis_url or "").startswith("redis://redis:6379/")
    assert ":" not in loaded.config.state.database_url.split("//", 1)[1].split("@", 1)[0]  # no password


def test_compose_stack_wiring() -> None:
    services = compose()["services"]
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis:7")
    assert "noeviction" in services["redis"]["command"]
    gw, migrate = services["gateway"], services["migrate"]
    assert gw["deploy"]["replicas"] == 2
    for svc in (gw, migrate):
        assert (DEPLOY / svc["build"]["context"]).resolve() == ROOT
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        mounts = {m.split(":")[1]: (DEPLOY / m.split(":")[0]).resolve() for m in svc["volumes"] if m.startswith(".")}
        assert mounts[CONFIG_PATH] == DEPLOY / "compose" / "gateway.yaml"
        assert mounts[POLICIES_PATH] == DEPLOY / "policies"
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]
    assert "gateway-state:" + STATE_DIR in gw["volumes"]
    assert "command" not in gw  # the image's CMD: gateway serve ... on 8080
    assert migrate["command"] == ["migrate", "--config", CONFIG_PATH]
    migrate_help = subprocess.run([sys.executable, "-m", "gateway", "migrate", "--help"], check=False,
                                  capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert migrate_help.returncode == 0 and "--config" in migrate_help.stdout  # the subcommand exists
    assert gw["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert int(gw["stop_grace_period"].rstrip("s")) > float(gw["environment"]["GATEWAY_DRAIN_TIMEOUT_S"])


def test_compose_env_provides_what_the_config_reads() -> None:
    loaded = load_config(DEPLOY / "compose" / "gateway.yaml")
    env = compose()["services"]["gateway"]["environment"]
    needed = {loaded.config.admin_api_key_env, "PGPASSWORD",
              *(p.api_key_env for p in loaded.config.providers if p.api_key_env)}
    assert needed <= set(env)
    assert env["GATEWAY_ADMIN_KEY"].startswith("${GATEWAY_ADMIN_KEY:?")  # required, never defaulted
    assert env["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_compose_load_balancer_fronts_the_replicas_on_8080() -> None:
    lb = compose()["services"]["lb"]
    assert lb["ports"] == [f"${{GATEWAY_PORT:-{PORT}}}:{PORT}"]
    nginx = (DEPLOY / "compose" / "nginx.conf").read_text()
    assert f"listen {PORT};" in nginx and re.search(rf"server gateway:{PORT} resolve", nginx)
    assert "proxy_buffering off;" in nginx  # streams pass through chunk by chunk
    keepalive = int(re.search(r"keepalive_timeout (\d+)s;", nginx).group(1))  # type: ignore[union-attr]
    assert keepalive < 30  # under uvicorn's timeout_keep_alive (gateway/serve.py)
    assert HEALTH_PATH in " ".join(lb["healthcheck"]["test"])


# --- Kubernetes -------------------------------------------------------------------------------

def test_k8s_configmap_config_passes_the_real_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = k8s_objects()
    config = write_configmap_config(objects, tmp_path)
    for name, value in K8S_ENV.items():
        monkeypatch.setenv(name, value)
    loaded = load_config(config)
    check_shipped_config(loaded)
    assert loaded.config.state.database_url == K8S_ENV["GATEWAY_DATABASE_URL"]  # from the Secret's env
    assert loaded.config.state.redis_url == K8S_ENV["GATEWAY_REDIS_URL"]
    for path in (DEPLOY / "policies").glob("*.yaml"):  # the ConfigMap's copies have not drifted
        assert objects[("ConfigMap", "gateway-policies")]["data"][path.name] == path.read_text()


def test_k8s_deployment_probes_ports_and_shutdown() -> None:
    objects = k8s_objects()
    deployment = objects[("Deployment", "gateway")]
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert container["args"] == SERVE_ARGS
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    for probe, path in (("readinessProbe", READY_PATH), ("livenessProbe", HEALTH_PATH), ("startupProbe", HEALTH_PATH)):
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == PORT
    drain = float(env_names(container)["GATEWAY_DRAIN_TIMEOUT_S"]["value"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The pod is killed at the grace period: it must cover preStop, the drain, and the flush after it.
    assert spec["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain + 10
    assert spec["enableServiceLinks"] is False  # else GATEWAY_PORT=tcp://... breaks Settings
    service = objects[("Service", "gateway")]
    assert service["spec"]["ports"] == [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdb = objects[("PodDisruptionBudget", "gateway")]
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def mounted(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> (the mount, with the volume it mounts)."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: {**m, "volume": volumes[m["name"]]} for m in container["volumeMounts"]}


@pytest.mark.parametrize("kind,name", [("Deployment", "gateway"), ("Job", "gateway-migrate")])
def test_k8s_pods_run_non_root_read_only_with_config_mounted(kind: str, name: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    objects = k8s_objects()
    spec = pod_spec(objects[(kind, name)])
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["enableServiceLinks"] is False and spec["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = mounted(spec, container)
    assert container["args"][container["args"].index("--config") + 1] == CONFIG_PATH
    assert mounts[CONFIG_PATH]["volume"]["configMap"]["name"] == "gateway-config"
    assert mounts[CONFIG_PATH]["subPath"] == "gateway.yaml"
    assert mounts[POLICIES_PATH]["volume"]["configMap"]["name"] == "gateway-policies"
    assert "emptyDir" in mounts["/tmp"]["volume"]
    for var in K8S_ENV:  # the config names them (state.*_url_env): both must come from the Secret
        assert env_names(container)[var]["valueFrom"]["secretKeyRef"] == {"name": "gateway-secrets", "key": var}
    if kind == "Deployment":  # everything the gateway writes lands on the pod's emptyDir
        for var, value in K8S_ENV.items():
            monkeypatch.setenv(var, value)
        loaded = load_config(write_configmap_config(objects, tmp_path))
        state = mounts[STATE_DIR]
        assert "emptyDir" in state["volume"] and not state.get("readOnly")
        for path in (loaded.spool_dir, loaded.audit_jsonl_path):
            assert str(path).startswith(STATE_DIR + "/")


def test_k8s_secret_template_covers_every_env_the_config_reads(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    objects = k8s_objects()
    secret = objects[("Secret", "gateway-secrets")]["stringData"]
    for name, value in K8S_ENV.items():
        monkeypatch.setenv(name, value)
    loaded = load_config(write_configmap_config(objects, tmp_path))
    state = loaded.config.state
    assert state.database_url_env and state.redis_url_env
    needed = {loaded.config.admin_api_key_env, state.database_url_env, state.redis_url_env,
              *(p.api_key_env for p in loaded.config.providers if p.api_key_env)}
    assert needed == set(secret)
    env = env_names(pod_spec(objects[("Deployment", "gateway")])["containers"][0])
    assert {name for name, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})} == needed
    optional = {name for name in needed if env[name]["valueFrom"]["secretKeyRef"].get("optional")}
    assert optional == {p.api_key_env for p in loaded.config.providers if p.api_key_env}  # only provider keys


def test_k8s_migration_job_and_kustomization() -> None:
    objects = k8s_objects()
    job = pod_spec(objects[("Job", "gateway-migrate")])
    assert job["containers"][0]["args"] == ["migrate", "--config", CONFIG_PATH]
    assert job["restartPolicy"] == "Never"
    (kustomization,) = yaml_docs(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert "namespace" not in kustomization  # namespace-less: -n or an overlay picks it
    for obj in objects.values():
        assert "namespace" not in obj["metadata"]
    images = {c["image"] for kind in ("Deployment", "Job") for obj in objects.values() if obj["kind"] == kind
              for c in pod_spec(obj)["containers"]}
    assert images == {kustomization["images"][0]["name"]}


def test_compose_and_k8s_serve_the_same_models_and_policies(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in K8S_ENV.items():
        monkeypatch.setenv(name, value)
    k8s = load_config(write_configmap_config(k8s_objects(), tmp_path))
    local = load_config(DEPLOY / "compose" / "gateway.yaml")
    assert set(k8s.models) == set(local.models) and set(k8s.policies) == set(local.policies)
    assert k8s.config.tenants == local.config.tenants



def configmap_volume(folder: Path, files: dict[str, str], generation: int) -> None:
    """Write ``files`` the way the kubelet updates a ConfigMap volume: a new timestamped folder,
    then one atomic rename of the ``..data`` link that the visible file links point through."""
    stamp = folder / f"..2026_11_26_00_00_{generation:02d}.{generation}"
    stamp.mkdir()
    for name, text in files.items():
        (stamp / name).write_text(text)
    old = os.readlink(folder / "..data") if (folder / "..data").is_symlink() else None
    (folder / "..data_tmp").symlink_to(stamp.name)
    os.replace(folder / "..data_tmp", folder / "..data")
    for name in files:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(folder / old)


def test_policies_in_a_configmap_volume_reload_when_the_kubelet_swaps_them(
        tmp_path: Path, gw_config: dict[str, Any]) -> None:
    policy = yaml.safe_dump(DEFAULT_POLICY, sort_keys=False)
    assert "candidates:\n  - mock-a\n  - mock-b\n  objective: ordered" in policy
    config = write_config(tmp_path, gw_config)
    policies = tmp_path / "policies"
    shutil.rmtree(policies)
    policies.mkdir()
    configmap_volume(policies, {"default.yaml": policy}, 1)
    with run_gateway(config) as gw:
        def served() -> str:
            answer = httpx.post(f"{gw.v1}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                                json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
            assert answer.status_code == 200
            return answer.headers["x-gateway-model"]

        assert served() == "mock-a"
        swapped = policy.replace("candidates:\n  - mock-a\n  - mock-b", "candidates:\n  - mock-b\n  - mock-a")
        configmap_volume(policies, {"default.yaml": swapped}, 2)
        deadline = time.monotonic() + 10
        while served() != "mock-b":
            assert time.monotonic() < deadline, "the swapped ConfigMap was not reloaded"
            time.sleep(0.1)
        assert sorted(p.name for p in policies.iterdir() if not p.name.startswith("..")) == ["default.yaml"]
