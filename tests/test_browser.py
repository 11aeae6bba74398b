"""The real app in a real browser: `streamlit run app.py` driven by Playwright in Debian's Chromium, alone on
SQLite, and two servers sharing one PostgreSQL + SeaweedFS store."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, STORE_VARIABLES, cannot_run, image_bytes
from servers import free_port

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


@pytest.fixture(autouse=True)
def chromium_installed():
    if not Path(CHROMIUM).exists():
        cannot_run(f"{CHROMIUM} not installed (apt-get install chromium)")


@contextmanager
def streamlit_server(store_env: dict[str, str], log: Path):
    """`streamlit run app.py` on a free port with this store; its output goes to a file (a pipe nobody reads
    would fill up and stall a chatty server)."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in STORE_VARIABLES} | store_env
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"streamlit did not start: {log.read_text()[-3000:]}")
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        yield launched
        launched.close()


def new_page(browser):
    return browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)


def wait_idle(page) -> None:
    page.wait_for_timeout(300)
    page.wait_for_selector(IDLE, timeout=60_000)


def pictures(tmp_path, *specs: tuple[str, tuple[int, int, int]]) -> list[str]:
    paths = []
    for name, color in specs:
        path = tmp_path / name
        path.write_bytes(image_bytes("PNG", size=(120, 90), color=color))
        paths.append(str(path))
    return paths


def choose_label(page, card_text: str, avoid: str = "horse") -> str:
    """Pick another class in the card showing card_text; returns the class chosen."""
    box = page.locator('[data-testid="stColumn"]').filter(has_text=card_text).get_by_role("combobox")
    correction = avoid if box.input_value() != avoid else "deer"
    box.click()
    box.fill(correction)
    page.get_by_role("option", name=correction, exact=True).click()
    wait_idle(page)
    assert box.input_value() == correction
    return correction


def edit_label_cell(page, grid, row: int, label: str) -> None:
    """Pick label in the table's label cell of row, by keyboard as a person would. The canvas grid can drop
    keys that arrive before its editor opens, so the gesture is repeated until the cell shows the label; what
    the app then saves is checked by the caller."""
    cell = grid.locator(f'[data-testid="glide-cell-5-{row}"]')
    for _ in range(3):
        box = grid.bounding_box()
        page.mouse.click(box["x"] + 30, box["y"] + 50)  # the first row's first cell
        for key in ["ArrowRight"] * 5 + ["ArrowDown"] * row + ["Enter"]:  # to the label cell, and edit it
            page.keyboard.press(key)
        page.wait_for_timeout(500)
        page.keyboard.type(label)
        page.wait_for_timeout(300)
        page.keyboard.press("Enter")
        page.get_by_text("images classified").click()  # leave the grid, which commits the edit
        wait_idle(page)
        if cell.inner_text().strip() == label:
            return
    pytest.fail(f"the table's label cell of row {row} shows {cell.inner_text()!r}, not {label!r}")


def saved_count(page) -> str:
    return page.locator('[data-testid="stSidebar"] [data-testid="stMetricValue"]').first.inner_text()


def test_upload_correct_save_and_download_in_a_real_browser(browser, tmp_path):
    db_path = tmp_path / "browser.db"
    store = {"CIFAR10_DB_PATH": str(db_path), "CIFAR10_IMAGE_DIR": str(tmp_path / "images")}
    with streamlit_server(store, tmp_path / "server.log") as url:
        page = new_page(browser)
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"this is text")
        files = pictures(tmp_path, ("red.png", (220, 20, 20)), ("sky.png", (40, 120, 230))) + [str(broken)]

        page.goto(url)
        wait_idle(page)
        assert page.get_by_text("Nothing saved yet").is_visible()
        assert page.locator('[data-testid="stSidebarNav"]').inner_text().split() == [
            "image_search", "Classify", "history", "History"]
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(files)
        page.get_by_text("2 images classified").wait_for(timeout=60_000)
        wait_idle(page)
        assert "broken.jpg" in page.locator('[data-testid="stAlertContentError"]').inner_text()
        boxes = page.locator('[data-testid="stSelectbox"]')
        boxes.nth(1).wait_for(timeout=30_000)
        assert boxes.count() == 2
        correction = choose_label(page, "red.png")

        # The table view corrects the other image: its selectbox cell takes the new class.
        page.locator('[data-testid="stButtonGroup"]').get_by_text("Table", exact=True).click()
        wait_idle(page)
        grid = page.locator('[data-testid="stDataFrame"]')
        grid.wait_for(timeout=30_000)
        sky_row = 0 if grid.locator('[data-testid="glide-cell-1-0"]').inner_text().strip() == "sky.png" else 1
        sky_prediction = grid.locator(f'[data-testid="glide-cell-2-{sky_row}"]').inner_text().strip()
        table_correction = "ship" if sky_prediction != "ship" else "truck"
        edit_label_cell(page, grid, sky_row, table_correction)
        page.get_by_role("button", name="Save 2 images").click()
        page.get_by_text("Saved 2 images").wait_for(timeout=30_000)
        wait_idle(page)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-after-save.png"), full_page=True)

        with sqlite3.connect(db_path) as connection:
            saved = dict(connection.execute("SELECT source, final_label FROM predictions").fetchall())
        assert saved == {"red.png": correction, "sky.png": table_correction}
        assert saved_count(page) == "2"

        # The History page lists both; its streamed downloads carry the corrections.
        page.get_by_role("link", name="History").click()
        page.get_by_text("2 of 2 saved images match").wait_for(timeout=30_000)
        wait_idle(page)
        assert page.get_by_text("corrected from").count() == 2
        with page.expect_download(timeout=30_000) as download_info:
            page.get_by_role("link", name="Download records (CSV)").click()
        csv_text = Path(download_info.value.path()).read_text()
        assert csv_text.startswith("id,source,predicted_label") and f",{correction}," in csv_text
        with page.expect_download(timeout=30_000) as download_info:
            page.get_by_role("link", name="Download images (ZIP)").click()
        with zipfile.ZipFile(download_info.value.path()) as archive:
            assert sorted(name.split("/")[0] for name in archive.namelist() if name != "labels.csv") == sorted(
                [correction, table_correction])
        page.screenshot(path=str(ARTIFACTS / "history.png"), full_page=True)


def test_two_servers_share_one_postgresql_and_s3_store(browser, tmp_path, postgres_server, s3_server):
    """A team setup: what one server saves, the other shows, and the other's export carries it."""
    store = {"CIFAR10_DATABASE_URL": postgres_server.database("two_servers"),
             "CIFAR10_IMAGE_STORE": "s3://cifar10-tests/two-servers", **s3_server.env()}
    with streamlit_server(store, tmp_path / "first.log") as first, \
            streamlit_server(store, tmp_path / "second.log") as second:
        on_first, on_second = new_page(browser), new_page(browser)
        on_first.goto(first)
        wait_idle(on_first)
        on_first.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
            pictures(tmp_path, ("red.png", (220, 20, 20))))
        on_first.get_by_text("1 image classified").wait_for(timeout=60_000)
        wait_idle(on_first)
        correction = choose_label(on_first, "red.png")
        on_first.get_by_role("button", name="Save 1 image").click()
        on_first.get_by_text("Saved 1 image").wait_for(timeout=30_000)

        on_second.goto(second)
        wait_idle(on_second)
        assert saved_count(on_second) == "1"
        on_second.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
            pictures(tmp_path, ("sky.png", (40, 120, 230))))
        on_second.get_by_text("1 image classified").wait_for(timeout=60_000)
        wait_idle(on_second)
        on_second.get_by_role("button", name="Save 1 image").click()
        on_second.get_by_text("Saved 1 image").wait_for(timeout=30_000)
        wait_idle(on_second)
        assert saved_count(on_second) == "2"

        on_first.reload()
        wait_idle(on_first)
        assert saved_count(on_first) == "2"
        with urllib.request.urlopen(f"{second}/export/cifar10_feedback.zip", timeout=30) as response:
            names = zipfile.ZipFile(io.BytesIO(response.read())).namelist()
        assert len(names) == 3 and "labels.csv" in names  # both images, whichever server saved them
        assert any(name.startswith(f"{correction}/") for name in names)
