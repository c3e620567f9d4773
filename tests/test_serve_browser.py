"""The serve page in a real headless browser (Debian's Chromium, driven by Selenium): load it,
upload an image, wait for the answers, check that boxes, the label-map overlay, the depth map and
the routing maps are drawn, and keep a screenshot. Run by ``make test-browser`` (``.ci/run``'s
second step); it fails, never skips, when Chromium is missing there."""
import os
import shutil
import socket
import threading
import time

import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(four_task_run):
    import uvicorn
    from moe_vision.serve import create_app
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(four_task_run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver (make test-browser does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1300", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=120, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(condition, message=f"timed out waiting for {what}")


def _ink(driver, element) -> int:
    """Non-transparent pixels drawn on a canvas."""
    return driver.execute_script(
        "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;", element)


def test_page_shows_every_answer_and_the_routing_maps(server, browser, synthetic_root, tmp_path):
    from selenium.webdriver.common.by import By
    image = tmp_path / "landscape.png"  # a 96x64 photo-like image: not square, to see the shape kept
    Image.open(synthetic_root / "det/val/00000.png").resize((96, 64)).save(image)
    browser.get(server)
    _wait(browser, lambda d: "tasks:" in d.find_element(By.ID, "model-name").text, what="/info")
    browser.find_element(By.ID, "file-input").send_keys(str(image))
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".task-card canvas.answer[data-drawn]")) == 4,
          what="the four answers")
    # every detection above score 0: boxes drawn (an untrained model's scores are low)
    browser.execute_script("const s = document.getElementById('score-slider'); s.value = 0;"
                           "s.dispatchEvent(new Event('input'));")
    _wait(browser, lambda d: int(d.find_element(By.CSS_SELECTOR, ".task-card[data-task=det] canvas.answer")
                                 .get_attribute("data-drawn") or 0) > 0, what="detection boxes")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".task-card canvas.answer[data-drawn]")) == 4,
          what="the redrawn answers")
    cards = {c.get_attribute("data-task"): c for c in browser.find_elements(By.CSS_SELECTOR, ".task-card")}
    assert set(cards) == {"cls", "det", "seg", "depth"}
    assert len(cards["cls"].find_elements(By.CSS_SELECTOR, ".top5-item")) == 5
    assert cards["seg"].find_elements(By.CSS_SELECTOR, ".legend-item")
    assert cards["depth"].find_elements(By.CSS_SELECTOR, ".colour-bar")
    for card in cards.values():
        answer = card.find_element(By.CSS_SELECTOR, "canvas.answer")
        w, h = int(answer.get_attribute("width")), int(answer.get_attribute("height"))
        assert w >= 96 and abs(w / h - 96 / 64) < 0.02  # the image's own aspect ratio
        assert _ink(browser, answer) > 0
        maps = card.find_elements(By.CSS_SELECTOR, "canvas.routing-map")
        assert [m.get_attribute("data-layer") for m in maps] == ["blocks.1.mlp", "blocks.3.mlp"]
        assert all(_ink(browser, m) > 0 for m in maps)
    browser.save_screenshot(str(tmp_path / "serve_page.png"))
    assert (tmp_path / "serve_page.png").stat().st_size > 10_000
    if os.environ.get("MOE_VISION_SCREENSHOT"):
        shutil.copy(tmp_path / "serve_page.png", os.environ["MOE_VISION_SCREENSHOT"])


def test_page_shows_a_bad_upload_as_one_message_and_keeps_working(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    browser.get(server)
    _wait(browser, lambda d: "tasks:" in d.find_element(By.ID, "model-name").text, what="/info")
    browser.find_element(By.ID, "file-input").send_keys(str(text))
    error = _wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error"),
                  what="the error message")
    assert "notes.txt is not an image" in error.text
    browser.find_element(By.CSS_SELECTOR, "#examples img").click()  # the server still answers
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".task-card canvas.answer[data-drawn]"),
          what="an example's answers")
    assert not browser.find_element(By.ID, "error").is_displayed()
