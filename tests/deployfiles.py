"""Readers for the files in deploy/ (Dockerfile, compose, Kubernetes manifests), for tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.harness import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
CONFIG_PATH = "/etc/gateway/gateway.yaml"
POLICIES_PATH = "/etc/gateway/policies"
# CONTRACT section 5: ops endpoints; the port every deploy file serves on.
HEALTH_PATH, READY_PATH, PORT = "/healthz", "/readyz", 8080
SERVE_ARGS = ["serve", "--config", CONFIG_PATH, "--host", "0.0.0.0", "--port", str(PORT)]


def yaml_docs(path: Path) -> list[Any]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def deploy_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def compose() -> dict[str, Any]:
    (doc,) = yaml_docs(DEPLOY / "compose.yaml")
    return dict(doc)


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object in deploy/kubernetes/*.yaml by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_docs(path):
            if "kind" in doc and doc["kind"] != "Kustomization":
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objects, f"{key} defined twice"
                objects[key] = doc
    return objects


def write_configmap_config(objects: dict[tuple[str, str], dict[str, Any]], folder: Path) -> Path:
    """The ConfigMaps laid out as the pod sees them: gateway.yaml with policies/ beside it."""
    config = folder / "gateway.yaml"
    config.write_text(objects[("ConfigMap", "gateway-config")]["data"]["gateway.yaml"])
    (folder / "policies").mkdir(exist_ok=True)
    for name, text in objects[("ConfigMap", "gateway-policies")]["data"].items():
        (folder / "policies" / name).write_text(text)
    return config


def dockerfile_instructions(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        joined = pending + line
        pending = ""
        instruction, _, rest = joined.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last:]


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument, e.g. of ENTRYPOINT or CMD."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(obj["spec"]["template"]["spec"])


def env_names(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}
