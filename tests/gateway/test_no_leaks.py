"""A prompt holding a secret never lands in a file the gateway wrote or in a log line."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.test_e2e_openai import audit_rows, ledger_rows, wait_for
from tests.harness import TENANT_KEY, RunningGateway, UpstreamProcess

SECRET = "sk-proj-LEAKCANARY0123456789abcdefghijklmnop"


def test_secret_in_prompt_is_never_written(
    start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = start_gateway()
    c = openai.OpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    prompt = [{"role": "user", "content": f"my key is {SECRET}, keep it safe"}]
    c.chat.completions.create(model="mock-a", messages=prompt)
    list(c.chat.completions.create(model="mock-a", messages=prompt, stream=True))
    # The prompt holds a key, so the content scan makes it confidential: only the local mock-a
    # may take it (500, then a 400 echoing the secret on the retry).
    upstream.script({"status": 500, "body": {"error": {"message": f"echo {SECRET}"}}},
                    {"status": 400, "body": {"error": {"message": f"echo {SECRET}"}}})
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="fast", messages=prompt)
    assert SECRET not in info.value.response.text
    bad = httpx.post(f"{gw.v1}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                     content=f'{{"model": "mock-a", "messages": "{SECRET}"}}')
    assert bad.status_code == 400 and SECRET not in bad.text
    unknown = httpx.post(f"{gw.v1}/chat/completions", headers={"authorization": f"Bearer {SECRET}"},
                         json={"model": "mock-a", "messages": prompt})
    assert unknown.status_code == 401 and SECRET not in unknown.text
    wait_for(lambda: len(audit_rows(gw)) >= 5 and len(ledger_rows(gw)) >= 2)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "audit.jsonl" for p in written)
    for path in written:
        data = path.read_bytes()
        assert SECRET.encode() not in data, f"secret found in {path}"
        assert TENANT_KEY.encode() not in data, f"tenant key found in {path}"
        assert b"sk-upstream-secret-test" not in data, f"provider key found in {path}"
    for record in caplog.records:
        line = record.getMessage() + " " + str(record.__dict__)
        assert SECRET not in line and TENANT_KEY not in line
