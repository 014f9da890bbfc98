"""Test helpers for headless Chromium (Debian's `chromium` + `chromium-driver`) driven by selenium."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# what stops a browser here from fetching anything but the page: no updates, sync or background requests
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not (CHROMIUM and CHROMEDRIVER):
        return ("Debian's chromium and chromium-driver are not installed and could not be "
                "(make browser: apt-get install chromium chromium-driver)")
    return None


@contextmanager
def chromium(width: int = 1600, height: int = 1000, page_timeout: float = 60):
    """A headless Chromium with a fresh profile -> selenium driver; quit (browser and driver ended) on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--window-size={width},{height}", f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(page_timeout)
    driver.set_script_timeout(page_timeout)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_text(driver, *texts: str, timeout: float = 60) -> str:
    """Wait until the page's visible text holds every one of `texts` -> that text; a TimeoutException naming
    what is missing and the page otherwise."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        body = d.find_element(By.TAG_NAME, "body").text
        return body if all(t in body for t in texts) else False
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(ready)
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        gone = [t for t in texts if t not in body]
        raise TimeoutException(f"{driver.current_url}: no {gone} after {timeout:.0f} s; the page shows:\n"
                               f"{body[:3000]}") from None


def shown_images(driver, css: str = "img") -> list[str]:
    """The `src` of the images matching `css` that loaded and are displayed (natural width > 0)."""
    from selenium.webdriver.common.by import By

    return [i.get_attribute("src") for i in driver.find_elements(By.CSS_SELECTOR, css)
            if i.is_displayed() and driver.execute_script("return arguments[0].naturalWidth", i) > 0]


def screenshot(driver, folder: Path, name: str) -> Path:
    """Save the window as `folder/name`.png -> its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot of {driver.current_url}"
    return path
