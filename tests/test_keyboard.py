"""Reviewing by keyboard in a real browser: `streamlit run app.py` in Debian's Chromium, 50 photos uploaded, then
nothing but keys: digits correct, Enter confirms, X skips, Backspace goes back, Ctrl+Enter saves, except in the URL
box, where it fetches the URLs. Every step waits on the page's state (the picture it shows, the run the key started
has ended), never for a fixed time."""

from __future__ import annotations

import re
import sqlite3
import urllib.request

from conftest import Route, image_bytes
from test_browser import ARTIFACTS, IDLE, app_run, new_page, open_app, streamlit_servers

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
KEYS = dict(zip(CLASSES, "1234567890"))
POSITION = ".st-key-one-picture"
PREDICTION = ".st-key-one-prediction"


def shown_picture(page) -> tuple[int, int, str]:
    """(n, total, source) of the picture on the page, from its "n of total · source" line."""
    match = re.match(r"(\d+) of (\d+) · (.+)", page.locator(POSITION).inner_text().strip())
    assert match, page.locator(POSITION).inner_text()
    return int(match[1]), int(match[2]), match[3]


def key(page, name: str, then_at: int | None) -> None:
    """Press a key and wait until the page shows picture `then_at` (None: the end) and the run has ended. The app
    draws each picture after its keys, and a key takes its shortcut once the browser has drawn it: two frames on."""
    page.keyboard.press(name)
    try:
        if then_at is None:
            page.get_by_text("pictures reviewed").wait_for(timeout=30_000)
        else:
            page.wait_for_function("([selector, text]) => document.querySelector(selector)?.innerText.startsWith(text)",
                                   arg=[POSITION, f"{then_at} of "], timeout=30_000)
        page.wait_for_selector(IDLE, timeout=30_000)
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "keyboard-lost-key.png"), full_page=True)
        raise AssertionError(f"after {name!r} the page shows {page.locator(POSITION).all_inner_texts()}, not picture "
                             f"{then_at}") from None
    page.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


def uploads_held_by_streamlit(url: str) -> int:
    """Bytes of uploads Streamlit keeps in the server's memory (its /_stcore/metrics)."""
    with urllib.request.urlopen(f"{url}/_stcore/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if "UploadedFileManager" in line and not line.startswith("#"))


def saved_labels(db_path) -> dict[str, str]:
    with sqlite3.connect(db_path) as connection:
        return dict(connection.execute("SELECT source, final_label FROM predictions"))


def test_fifty_photos_reviewed_by_keyboard_only_and_saved_with_ctrl_enter(
        browser, tmp_path, local_server):
    db_path = tmp_path / "keyboard.db"
    store = {"CIFAR10_DB_PATH": str(db_path), "CIFAR10_IMAGE_DIR": str(tmp_path / "images"),
             "CIFAR10_ALLOW_PRIVATE_URLS": "loopback"}
    picture_url = local_server.url("/one-more.png")
    local_server.routes["/one-more.png"] = Route(body=image_bytes("PNG", size=(24, 18), color=(250, 250, 5)),
                                                 headers={"Content-Type": "image/png"})
    files = []
    for index in range(50):  # tiny, each its own colour: quick to send, decode and draw
        path = tmp_path / f"photo-{index:02d}.png"
        path.write_bytes(image_bytes("PNG", size=(24, 18), color=(index * 37 % 256, index * 91 % 256,
                                                                  (index * 53 + 40) % 256)))
        files.append(str(path))
    with streamlit_servers(store, [tmp_path / "server.log"]) as [server]:
        page = new_page(browser)
        received: list[bytes] = []  # what the server sends, to see what a key redraws
        page.on("websocket", lambda socket: socket.on("framereceived", lambda frame: received.append(
            frame if isinstance(frame, bytes) else frame.encode())))
        open_app(page, server.url)
        with app_run(page):
            page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(files)
            page.get_by_text("50 images classified").first.wait_for(timeout=120_000)
        assert uploads_held_by_streamlit(server.url) == 0  # read into the page: Streamlit no longer holds them

        # From here on, keys only: the view is chosen from the keyboard too (focus, then Enter).
        page.locator('[data-testid="stButtonGroup"] button').filter(has_text="One at a time").focus()
        with app_run(page):
            page.keyboard.press("Enter")
        page.locator(POSITION).wait_for(timeout=30_000)
        assert shown_picture(page)[:2] == (1, 50)

        expected: dict[str, str] = {}
        for number in range(1, 51):
            at, total, source = shown_picture(page)
            assert (at, total) == (number, 50)
            following = number + 1 if number < 50 else None
            if number % 4 == 1:  # confirm what the model said
                expected[source] = page.locator(PREDICTION).inner_text().split()[0]
                key(page, "Enter", following)
            elif number == 10:  # left out of the save
                key(page, "x", following)
            elif number == 20:  # corrected, gone back to, and corrected again
                key(page, KEYS["cat"], following)
                key(page, "Backspace", number)
                assert shown_picture(page) == (20, 50, source)
                key(page, KEYS["frog"], following)
                expected[source] = "frog"
            else:
                label = CLASSES[number % 10]
                received.clear()
                key(page, KEYS[label], following)
                expected[source] = label
                sent = b"".join(received)  # a key redraws the review alone: not the sidebar, not the uploader
                assert (f"{following} of 50" if following else "pictures reviewed").encode() in sent
                assert b"Saved feedback" not in sent and b"Upload images" not in sent

        # In the URL box Ctrl+Enter is the box's own: it fetches the URLs, and saves nothing. (While there are
        # pictures the inputs are folded: a click opens them.)
        page.get_by_text("Add more images").click()
        box = page.locator('[data-testid="stTextArea"] textarea')
        box.wait_for(state="visible", timeout=10_000)
        box.focus()
        page.keyboard.type(picture_url)
        with app_run(page):
            page.keyboard.press("Control+Enter")
        page.get_by_text("51 images classified").first.wait_for(timeout=30_000)
        page.wait_for_selector(IDLE, timeout=30_000)
        assert saved_labels(db_path) == {} and page.get_by_text(re.compile(r"^Saved \d+ image")).count() == 0
        page.keyboard.press("Control+A")  # and out of the box again: its picture leaves the page
        page.keyboard.press("Backspace")
        with app_run(page):
            box.blur()
        page.get_by_text("50 images classified").first.wait_for(timeout=30_000)
        with app_run(page):
            page.keyboard.press("Control+Enter")
            page.get_by_text("Saved 49 images").wait_for(timeout=60_000)
        assert "1 marked skip" in page.get_by_text("Saved 49 images").inner_text()

    saved = saved_labels(db_path)
    assert saved == expected and len(saved) == 49
