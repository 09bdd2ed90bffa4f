"""The FinOps dashboard in a real headless Chromium: login, chart, numbers vs the ledger, CSV."""
from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.audit import read_audit
from gateway.cli import main
from gateway.dashboard import new_session, valid_session
from gateway.dashboard_view import usd
from tests.gateway.test_e2e_openai import wait_for
from tests.gateway.test_finops import ledger_rows, seeded  # noqa: F401 - `seeded` is a fixture
from tests.harness import ADMIN_KEY, TENANT_KEY, RunningGateway, UpstreamProcess

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1400,2000"]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("GATEWAY_REQUIRE_SERVICES") == "1":
            pytest.fail("chromium / chromedriver missing (`.ci/run` installs them)")
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver, downloads
    finally:
        driver.quit()


def _login(driver: Any, gw: RunningGateway, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    driver.get(f"{gw.url}/dashboard")
    form = driver.find_element(By.ID, "login-form")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "login-submit").click()
    # The login page and the dashboard share one URL: wait for the answer page to replace the form.
    WebDriverWait(driver, 15).until(expected_conditions.staleness_of(form))


def _wait_file(folder: Path, timeout: float = 15) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in folder.iterdir() if p.suffix == ".csv"]
        if done and not any(p.suffix == ".crdownload" for p in folder.iterdir()):
            return done[0]
        time.sleep(0.1)
    raise AssertionError("the CSV download did not finish")


def _nearest_rank_p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def _expected_request_stats(db: Path) -> tuple[float, dict[str, float]]:
    """Error rate and p95 latency per served model, from the audit records themselves."""
    records = read_audit(db, limit=100_000)
    failed = [r for r in records if r["status"] >= 400 or r["outcome"] != "ok"]
    latencies: dict[str, list[float]] = {}
    for r in records:
        if r not in failed:
            latencies.setdefault(r["model_served"], []).append(r["latency_ms"])
    return round(len(failed) / len(records), 4), {m: round(_nearest_rank_p95(v), 1) for m, v in latencies.items()}


def test_dashboard_in_chromium(seeded: RunningGateway, browser: tuple[Any, Path],  # noqa: F811
                               upstream: UpstreamProcess, capsys: pytest.CaptureFixture[str]) -> None:
    from selenium.webdriver.common.by import By

    driver, downloads = browser
    gw = seeded
    upstream.script({"status": 400})  # one failed request among the seeded ones
    client = openai.OpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "this one fails"}])
    wait_for(lambda: any(r["status"] == 400 for r in read_audit(gw.runtime.db_path)))
    error_rate, p95 = _expected_request_stats(gw.runtime.db_path)
    assert 0 < error_rate < 1 and set(p95) == {"mock-a", "mock-b"}
    _login(driver, gw, TENANT_KEY)  # a tenant key never opens the dashboard
    assert "not the admin key" in driver.find_element(By.ID, "login-error").text
    _login(driver, gw, ADMIN_KEY)
    assert driver.current_url == f"{gw.url}/dashboard" and ADMIN_KEY not in driver.current_url
    cookie = driver.get_cookie("gw_dashboard")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and ADMIN_KEY not in cookie["value"]

    chart = driver.find_element(By.ID, "spend-chart")
    bars = chart.find_elements(By.CSS_SELECTOR, "rect.bar")
    ledger = ledger_rows(gw.runtime.db_path)
    assert chart.is_displayed() and chart.size["width"] > 600
    assert len(bars) == len({(r[0], r[2]) for r in ledger})  # one bar segment per tenant and day with spend
    assert all(b.size["height"] > 0 for b in bars)
    for tenant, day in {(r[0], r[2]) for r in ledger}:
        bar = chart.find_element(By.CSS_SELECTOR, f"rect.bar[data-tenant='{tenant}'][data-day='{day}']")
        assert Decimal(bar.get_attribute("data-usd")) == sum(r[6] for r in ledger if (r[0], r[2]) == (tenant, day))

    total = sum((r[6] for r in ledger), Decimal(0))
    total_el = driver.find_element(By.ID, "total-cost")
    assert Decimal(total_el.get_attribute("data-usd")) == total and total_el.text == usd(total)
    assert driver.find_element(By.ID, "total-requests").text == str(len(ledger))
    for tenant in ("team", "narrow"):
        row = driver.find_element(By.CSS_SELECTOR, f"#spend-by-tenant tr[data-tenant='{tenant}']")
        assert Decimal(row.get_attribute("data-usd")) == sum(r[6] for r in ledger if r[0] == tenant)
    models = driver.find_elements(By.CSS_SELECTOR, "#top-models tbody tr")
    costs = [Decimal(m.get_attribute("data-usd")) for m in models]
    assert costs == sorted(costs, reverse=True) and len(models) == 2
    burn = driver.find_element(By.CSS_SELECTOR, "#budget-burn .burn[data-tenant='team'][data-window='day']")
    today = datetime.now(UTC).date().isoformat()
    assert Decimal(burn.get_attribute("data-spent")) == sum(r[6] for r in ledger if r[0] == "team" and r[2] == today)
    shown_rate = driver.find_element(By.ID, "error-rate")
    assert float(shown_rate.get_attribute("data-rate")) == error_rate
    assert shown_rate.text.startswith(f"{error_rate * 100:.1f}%")
    latency_rows = driver.find_elements(By.CSS_SELECTOR, "#latency-table tr[data-model]")
    shown_p95 = {row.get_attribute("data-model"): float(row.get_attribute("data-p95")) for row in latency_rows}
    assert shown_p95 == p95
    for row in latency_rows:
        assert row.is_displayed() and f"{p95[row.get_attribute('data-model')]:,.1f} ms" in row.text
    assert driver.find_elements(By.CSS_SELECTOR, "#requests-chart rect.req")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000

    link = driver.find_element(By.ID, "csv-download")
    assert ADMIN_KEY not in link.get_attribute("href")
    link.click()
    downloaded = _wait_file(downloads).read_text()
    until = datetime.now(UTC).date()
    since = until - timedelta(days=13)
    assert main(["spend", "--config", str(gw.config_path), "--format", "csv",
                 "--since", since.isoformat(), "--until", until.isoformat()]) == 0
    assert downloaded == capsys.readouterr().out
    assert sum(Decimal(line.split(",")[5]) for line in downloaded.splitlines()[1:]) == total


def test_dashboard_access_rules(seeded: RunningGateway) -> None:  # noqa: F811
    gw = seeded
    page = httpx.get(f"{gw.url}/dashboard")
    assert page.status_code == 401 and 'id="login-form"' in page.text and "total-cost" not in page.text
    for path in ("/dashboard/spend.csv", "/dashboard/data.json"):
        assert httpx.get(f"{gw.url}{path}").status_code == 401
        assert httpx.get(f"{gw.url}{path}", headers={"authorization": f"Bearer {TENANT_KEY}"}).status_code == 401
        assert httpx.get(f"{gw.url}{path}", headers={"authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    login = httpx.post(f"{gw.url}/dashboard/login", data={"key": ADMIN_KEY})
    assert login.status_code == 303 and "gw_dashboard" in login.headers["set-cookie"]
    assert "httponly" in login.headers["set-cookie"].lower() and ADMIN_KEY not in login.headers["set-cookie"]
    cookies = {"gw_dashboard": login.cookies["gw_dashboard"]}
    data = httpx.get(f"{gw.url}/dashboard/data.json", cookies=cookies).json()
    assert Decimal(data["total_cost_usd"]) == sum(r[6] for r in ledger_rows(gw.runtime.db_path))
    forged = cookies["gw_dashboard"][:-4] + "0000"
    assert httpx.get(f"{gw.url}/dashboard", cookies={"gw_dashboard": forged}).status_code == 401
    assert httpx.get(f"{gw.url}/dashboard", params={"since": "bad"}, cookies=cookies).status_code == 400


def test_session_tokens() -> None:
    token = new_session("k1", now=1000.0)
    assert valid_session("k1", token, now=1001.0)
    assert not valid_session("k2", token, now=1001.0)  # rotating the admin key ends sessions
    assert not valid_session("k1", token, now=1000.0 + 13 * 3600)  # expired
    assert not valid_session("k1", token.replace(".", "x", 1), now=1001.0)
    assert not valid_session(None, token) and not valid_session("k1", None)
