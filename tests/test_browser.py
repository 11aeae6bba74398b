"""The real app in a real browser: `streamlit run app.py` driven by Playwright in Debian's Chromium."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, image_bytes

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def running_app(tmp_path):
    port = free_port()
    env = {**os.environ, "CIFAR10_DB_PATH": str(tmp_path / "browser.db"), "CIFAR10_IMAGE_DIR": str(tmp_path / "images")}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
    else:
        server.kill()
        pytest.fail(f"streamlit did not start: {server.stdout.read()}")
    yield url, tmp_path / "browser.db"
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


def wait_idle(page) -> None:
    page.wait_for_timeout(300)
    page.wait_for_selector(IDLE, timeout=60_000)


def test_upload_correct_save_in_a_real_browser(running_app, page, tmp_path):
    url, db_path = running_app
    files = []
    for name, color in [("red.png", (220, 20, 20)), ("sky.png", (40, 120, 230))]:
        path = tmp_path / name
        path.write_bytes(image_bytes("PNG", size=(120, 90), color=color))
        files.append(str(path))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is text")
    files.append(str(broken))

    page.goto(url)
    wait_idle(page)
    assert page.get_by_text("Nothing saved yet").is_visible()
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(files)
    page.get_by_text("2 images classified").wait_for(timeout=60_000)
    wait_idle(page)
    assert "broken.jpg" in page.locator('[data-testid="stAlertContentError"]').inner_text()

    boxes = page.locator('[data-testid="stSelectbox"]')
    boxes.nth(1).wait_for(timeout=30_000)
    assert boxes.count() == 2
    first_box = page.locator('[data-testid="stColumn"]').filter(has_text="red.png").get_by_role("combobox")
    correction = "horse" if first_box.input_value() != "horse" else "deer"
    first_box.click()
    first_box.fill(correction)
    page.get_by_role("option", name=correction, exact=True).click()
    wait_idle(page)
    assert first_box.input_value() == correction

    # The table view corrects the other image: its selectbox cell takes the new class.
    page.locator('[data-testid="stButtonGroup"]').get_by_text("Table", exact=True).click()
    wait_idle(page)
    grid = page.locator('[data-testid="stDataFrame"]')
    grid.wait_for(timeout=30_000)
    sky_row = 0 if grid.locator('[data-testid="glide-cell-1-0"]').inner_text().strip() == "sky.png" else 1
    sky_prediction = grid.locator(f'[data-testid="glide-cell-2-{sky_row}"]').inner_text().strip()
    table_correction = "ship" if sky_prediction != "ship" else "truck"
    box = grid.bounding_box()
    page.mouse.click(box["x"] + 30, box["y"] + 50)  # the first row's first cell
    for key in ["ArrowRight"] * 5 + ["ArrowDown"] * sky_row + ["Enter"]:  # to sky.png's label cell, and edit it
        page.keyboard.press(key)
    page.wait_for_timeout(300)
    page.keyboard.type(table_correction)
    page.keyboard.press("Enter")
    page.get_by_text("images classified").click()  # leave the grid, which commits the edit
    wait_idle(page)
    page.get_by_role("button", name="Save 2 images").click()
    page.get_by_text("Saved 2 images").wait_for(timeout=30_000)
    wait_idle(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app-after-save.png"), full_page=True)

    with sqlite3.connect(db_path) as connection:
        saved = dict(connection.execute("SELECT source, final_label FROM predictions").fetchall())
    assert set(saved) == {"red.png", "sky.png"} and saved["red.png"] == correction
    assert saved["sky.png"] == table_correction
    assert page.locator('[data-testid="stSidebar"] [data-testid="stMetricValue"]').first.inner_text() == "2"

    # The History page lists both, and its CSV download carries the correction.
    page.get_by_role("link", name="History").click()
    page.get_by_text("2 of 2 saved images match").wait_for(timeout=30_000)
    wait_idle(page)
    assert page.get_by_text("corrected from").count() == 2
    with page.expect_download(timeout=30_000) as download_info:
        page.get_by_role("button", name="Download records (CSV)").click()
    csv_text = Path(download_info.value.path()).read_text()
    assert csv_text.startswith("id,source,predicted_label") and f",{correction}," in csv_text
    page.screenshot(path=str(ARTIFACTS / "history.png"), full_page=True)
