"""A real headless Chromium driven by Selenium, for the status page's tests: Debian's
`chromium` and `chromium-driver` (`.ci/run` installs them). Tests that need it are skipped,
with the reason, only where they are not installed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no headless Chromium here: apt-get install chromium chromium-driver",
)
DESKTOP = (1280, 900)
PHONE = (390, 844)
FLAGS = [
    "--headless",
    "--no-sandbox",  # root, in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
]


@contextmanager
def chromium(profile: Path) -> Iterator[WebDriver]:
    """A Chrome WebDriver on a fresh profile under `profile`; quit at the end."""
    assert CHROMIUM and CHROMEDRIVER
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def phone_width(driver: WebDriver, on: bool) -> None:
    """Emulate a phone's screen (or stop emulating it), without a reload."""
    if on:
        metrics = {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 1, "mobile": True}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    else:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
