"""The serve page in a real headless browser (Debian's Chromium, driven by Selenium): load it,
upload an image, wait for the answers, check that boxes, the label-map overlay, the depth map and
the routing maps are drawn, and keep a screenshot. Run by ``make test-browser`` (``.ci/run``'s
second step); it fails, never skips, when Chromium is missing there."""
import os
import shutil

import pytest
from PIL import Image

from moe_vision.serve.browser import chromium, serving, upload_and_wait, wait_for as _wait

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(four_task_run):
    from moe_vision.serve import create_app
    with serving(create_app(four_task_run)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium")) as driver:  # fails, never skips, without Chromium
        yield driver


def _ink(driver, element) -> int:
    """Non-transparent pixels drawn on a canvas."""
    return driver.execute_script(
        "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;", element)


def test_page_shows_every_answer_and_the_routing_maps(server, browser, synthetic_root, tmp_path):
    from selenium.webdriver.common.by import By
    image = tmp_path / "landscape.png"  # a 96x64 photo-like image: not square, to see the shape kept
    Image.open(synthetic_root / "det/val/00000.png").resize((96, 64)).save(image)
    # every detection above score 0: boxes drawn (an untrained model's scores are low)
    upload_and_wait(browser, server, image, 4, min_score=0.0)
    _wait(browser, lambda d: int(d.find_element(By.CSS_SELECTOR, ".task-card[data-task=det] canvas.answer")
                                 .get_attribute("data-drawn") or 0) > 0, what="detection boxes")
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


def test_the_screenshot_tool_writes_the_page_and_refuses_a_missing_image(four_task_run, synthetic_root, tmp_path):
    from tests.tool_run import run_tool
    out = tmp_path / "docs" / "page.png"
    r = run_tool("serve_screenshot.py", four_task_run, synthetic_root / "det/val/00000.png", "--out", out,
                 "--min-score", "0", "--size", "900", "800")
    assert r.returncode == 0, r.stderr
    with Image.open(out) as shot:
        assert shot.size[0] >= 800 and len(set(shot.convert("L").getdata())) > 20  # a page, not a blank
    assert [p.name for p in out.parent.iterdir()] == ["page.png"]  # nothing temporary left beside it
    r = run_tool("serve_screenshot.py", four_task_run, tmp_path / "none.png", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.png'}: no such image"]
    assert not (tmp_path / "x.png").exists()
