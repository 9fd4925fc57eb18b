"""Screenshots of a Neuroglancer URL in headless Chromium (Debian `chromium` + `chromium-driver`, via selenium).

WebGL runs on SwiftShader (no GPU needed). The page is captured once `window.viewer.isReady()` (every
visible chunk and layer loaded) has held for a few polls in a row; fixed time budgets capture
half-loaded views. Selenium Manager is kept offline (SE_OFFLINE): the system chromedriver is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from vemscale.errors import UserError

__all__ = ["find_chromium", "screenshot"]

log = logging.getLogger(__name__)

CHROME_FLAGS = (
    "--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
    "--disable-background-networking", "--disable-dev-shm-usage", "--disable-extensions", "--disable-sync",
    "--disable-default-apps", "--disable-component-update", "--no-first-run", "--mute-audio", "--hide-scrollbars",
    "--disable-features=Translate,MediaRouter,OptimizationHints", "--metrics-recording-only",
)


def find_chromium() -> tuple[str, str]:
    """Paths of the chromium binary and its chromedriver; UserError saying how to install them when missing."""
    browser = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.path.exists(p)), None)
    if browser is None or driver is None:
        raise UserError("screenshots need Chromium and its driver: apt-get install chromium chromium-driver")
    return browser, driver


def screenshot(url: str, path: str | Path, size: tuple[int, int] = (1280, 960), timeout: float = 120.0,
               settle_polls: int = 3) -> dict:
    """Load `url`, wait until the viewer is ready, save a PNG at `path`; returns timing and browser errors."""
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--window-size={size[0]},{size[1]}")
    opts.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    t0 = time.perf_counter()
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        driver.set_window_size(*size)
        driver.get(url)
        ready, deadline = 0, time.monotonic() + timeout
        while ready < settle_polls:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the viewer was not ready after {timeout:.0f} s")
            try:
                ok = driver.execute_script("return !!(window.viewer && window.viewer.isReady());")
            except Exception:  # the page is still loading its scripts
                ok = False
            ready = ready + 1 if ok else 0
            time.sleep(0.5)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        from vemscale.io.atomic import write_bytes

        write_bytes(path, driver.get_screenshot_as_png())
        errors = [e.get("message", "") for e in driver.get_log("browser")]
    finally:
        driver.quit()
    seconds = time.perf_counter() - t0
    log.info("screenshot %s in %.1f s", path, seconds)
    return {"screenshot": str(path), "seconds": round(seconds, 2), "browser_errors": errors}
