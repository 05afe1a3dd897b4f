"""The live dashboard in a real headless browser (Debian's chromium, driven by selenium).

The proxy runs in-process on the real chain (reference miner -> proxy -> sidecar ->
reference pool); chromium opens ``/``, the page's script connects to ``/ws``, and
the numbers on the page must change as shares flow.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from bridge.net.proxy_service import ProxyService
from bridge.testing.chain import start_chain
from bridge.testing.miner import Miner
from bridge.testing.pool import PoolConfig

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
WAIT = 60.0

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[test]'")
if not (Path(CHROMEDRIVER).exists() and Path(CHROMIUM).exists()):
    pytest.skip(
        "no chromium/chromedriver on this machine: run `bash tests/setup-system.sh` as root to install them",
        allow_module_level=True,
    )

from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait


def open_browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--no-proxy-server",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def number(driver: webdriver.Chrome, element_id: str) -> int | None:
    text = driver.find_element("id", element_id).text.replace(",", "")
    return int(text) if text.isdigit() else None


def watch_the_page(url: str, screenshot: Path | None = None) -> dict[str, object]:
    """Open the dashboard and wait until its numbers move; what was seen (in a thread)."""
    driver = open_browser()
    try:
        driver.set_page_load_timeout(WAIT)
        driver.get(url)
        wait = WebDriverWait(driver, WAIT, poll_frequency=0.2)
        wait.until(lambda d: (number(d, "total-accepted") or 0) >= 2)
        first = number(driver, "total-accepted")
        assert first is not None
        wait.until(lambda d: (number(d, "total-accepted") or 0) >= first + 2)
        wait.until(lambda d: d.find_element("id", "total-hashrate").text not in ("–", "0.0 H/s"))
        wait.until(lambda d: "web.rig1" in d.find_element("id", "rigs").text)
        seen = {
            "first": first,
            "later": number(driver, "total-accepted"),
            "rigs": number(driver, "total-rigs"),
            "state": driver.find_element("id", "state").text,
            "role": driver.find_element("id", "role").text,
            "hashrate": driver.find_element("id", "total-hashrate").text,
            "upstreams": driver.find_element("id", "upstreams").text,
            "rtt": driver.find_element("id", "total-rtt").text,
        }
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))
        return seen
    finally:
        driver.quit()


async def test_the_dashboard_numbers_change_as_shares_flow(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        chain = await start_chain(nursery, tmp_path, accounts=("web",), pool_config=PoolConfig(difficulty=0.000002))
        service = ProxyService(chain.proxy)
        port = await nursery.start(service.web.serve, "127.0.0.1", 0)
        # ~9 shares/s, as 400 kH/s at difficulty 0.00001 gave, for a fifth of the hashing
        miner = Miner(chain.miner_url, "web.rig1", profile="cgminer", hashrate=80_000)
        nursery.start_soon(miner.run)
        seen = await trio.to_thread.run_sync(watch_the_page, f"http://127.0.0.1:{port}/")
        assert str(seen["role"]).lower() == "proxy" and seen["state"] == "ready" and seen["rigs"] == 1
        assert seen["later"] >= seen["first"] + 2  # type: ignore[operator]
        assert seen["hashrate"].endswith("H/s")  # type: ignore[union-attr]
        assert "active" in seen["upstreams"] and "up" in seen["upstreams"]  # type: ignore[operator]
        assert seen["rtt"].endswith(" ms")  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


def test_a_browser_without_operator_certificate_is_refused_and_sees_no_token_form(tmp_path: Path) -> None:
    """Chromium on two HTTPS sidecar ports: one requires operator certificates (a browser
    with none gets the refusal page), one serves enrollment without that requirement (the
    dashboard shows the enrollment section with why it cannot create tokens, and no form)."""
    import subprocess

    from processes import STRATUMRM, free_port, wait_for_port

    from bridge.testing.pki import make_test_pki

    pki = make_test_pki(tmp_path / "pki", accounts=("alice",))
    common = [
        "--no-udp",
        "--pool",
        "stratum+tcp://127.0.0.1:9",
        "--cert",
        str(pki.pool_certificate),
        "--key",
        str(pki.pool_key),
        "--ca",
        str(pki.ca_certificate),
        "--enroll-ca",
        str(pki.directory),
    ]
    guarded, open_port = free_port(), free_port()
    sidecars = [
        subprocess.Popen(
            [
                *STRATUMRM,
                "sidecar",
                "--listen",
                f"127.0.0.1:{free_port()}",
                *common,
                "--http-listen",
                f"127.0.0.1:{guarded}",
                "--http-require-operator",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                *STRATUMRM,
                "sidecar",
                "--listen",
                f"127.0.0.1:{free_port()}",
                *common,
                "--http-listen",
                f"127.0.0.1:{open_port}",
                "--http-tls",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        wait_for_port(guarded, timeout=30)
        wait_for_port(open_port, timeout=30)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-proxy-server",
            "--ignore-certificate-errors",
        ):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(WAIT)
            wait = WebDriverWait(driver, WAIT, poll_frequency=0.2)
            driver.get(f"https://127.0.0.1:{guarded}/")
            heading = driver.find_element("tag name", "h1").text
            body = driver.find_element("tag name", "body").text
            assert heading == "Operator certificate required"
            assert "your browser sent none" in body and "stratumrm pki issue-operator" in body
            driver.get(f"https://127.0.0.1:{open_port}/")
            wait.until(lambda d: d.find_element("id", "enroll").is_displayed())
            wait.until(lambda d: d.find_element("id", "enroll-reason").is_displayed())
            reason = driver.find_element("id", "enroll-reason").text
            assert "--http-require-operator" in reason and "stratumrm pki token" in reason
            assert not driver.find_element("id", "enroll-form").is_displayed()
            # The live feed works over TLS too (wss://): the page fills in from it.
            wait.until(lambda d: d.find_element("id", "role").text.lower() == "sidecar")
        finally:
            driver.quit()
    finally:
        for sidecar in sidecars:
            sidecar.terminate()
            sidecar.wait(timeout=30)
