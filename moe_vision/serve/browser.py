"""The serve page in a real browser: a server on a free local port in a background thread, Debian's
headless Chromium driven by Selenium, and a screenshot of the page's answers for one image
(``tools/serve_screenshot.py``; ``make test-browser`` uses the same pieces).

Needs the serve and browser extras (``pip install -e '.[serve,browser]'``) and
``apt-get install chromium chromium-driver``.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import MissingExtra

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app, timeout_s: float = 10.0) -> Iterator[str]:
    """Run ``app`` (``create_app``'s) on 127.0.0.1 at a free port; yields its URL."""
    import uvicorn
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout_s
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError(f"the page's server did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def chromium(profile_dir: Path, width: int = 1400, height: int = 1300):
    """A headless Chromium (the system's, not a downloaded build) driven by Selenium."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            raise MissingExtra(f"{path} is missing: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise MissingExtra("selenium is missing: pip install -e '.[browser]'") from None
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--window-size={width},{height}", f"--user-data-dir={profile_dir}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout: float = 120, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(condition, message=f"timed out waiting for {what}")


def drawn_answers(driver) -> list:
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, ".task-card canvas.answer[data-drawn]")


def upload_and_wait(driver, url: str, image: Path, n_tasks: int, min_score: float | None = None,
                    timeout: float = 120) -> None:
    """Open the page, upload ``image`` and wait until every task's answer is drawn (redrawn at
    ``min_score`` for detection when given)."""
    from selenium.webdriver.common.by import By
    driver.get(url)
    wait_for(driver, lambda d: "tasks:" in d.find_element(By.ID, "model-name").text, timeout, "/info")
    driver.find_element(By.ID, "file-input").send_keys(str(Path(image).resolve()))
    wait_for(driver, lambda d: len(drawn_answers(d)) == n_tasks, timeout, "the answers")
    if min_score is not None:
        driver.execute_script("const s = document.getElementById('score-slider'); s.value = arguments[0];"
                              "s.dispatchEvent(new Event('input'));", str(min_score))
        wait_for(driver, lambda d: len(drawn_answers(d)) == n_tasks, timeout, "the redrawn answers")


def screenshot(source: str | Path, image: str | Path, out: str | Path, min_score: float | None = None,
               width: int = 1400, height: int = 1300) -> Path:
    """Serve ``source`` (a run or a bundle), upload ``image`` and save the page as a PNG at ``out``
    (written to a temporary name first)."""
    import tempfile

    from ..io_utils import atomic_path
    from .app import create_app
    from .source import load_source
    image = Path(image)
    if not image.is_file():
        raise FileNotFoundError(f"{image}: no such image")
    served = load_source(source)
    with tempfile.TemporaryDirectory() as profile, serving(create_app(served)) as url, \
            chromium(Path(profile), width, height) as driver:
        upload_and_wait(driver, url, image, len(served.tasks), min_score)
        shot = Path(profile) / "page.png"
        if not driver.save_screenshot(str(shot)):
            raise RuntimeError("Chromium returned no screenshot")
        with atomic_path(Path(out)) as tmp:
            shutil.copyfile(shot, tmp)
    return Path(out)
