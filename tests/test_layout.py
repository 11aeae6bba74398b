"""The review fits the screens people have, in Debian's Chromium against `streamlit run app.py`: a laptop's
(1366x768, and the 1366x600 its browser leaves the page) and a phone's (390x844, touch). With photos of every shape on the page and "One at a time" chosen, the
picture, what the model said, the ten classes and Save lie inside the screen, unhidden, before and after each picture
is labelled (by key on the laptop, by a tap on the phone), and the next picture is another one. The inputs fold
into one line while there are pictures. The page never scrolls sideways. Every step waits on the page's state, never
for a fixed time."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest
from streamlit.testing.v1 import AppTest

from conftest import ROOT, Route, image_bytes
from test_browser import ARTIFACTS, COUNT_RUNS, IDLE, app_run, open_app, streamlit_servers
from test_keyboard import KEYS, POSITION, PREDICTION, key, saved_labels, shown_picture

LAPTOP = {"viewport": {"width": 1366, "height": 768}}
BROWSER_WINDOW = {"width": 1366, "height": 600}  # a laptop's screen less the browser's bars and a taskbar
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 3}
# (width, height) of the photos: a camera's landscape and portrait, a square, panoramas both ways, a thumbnail.
SHAPES = ((1600, 1200), (1200, 1600), (800, 800), (2400, 800), (600, 1800), (640, 427), (427, 640), (32, 32))
PICTURE = f"{POSITION} img"
MAIN = '[data-testid="stMain"]'  # what scrolls: the page's main part
CLASS_BUTTONS = ", ".join(f'[class*="st-key-key-{label}-"] button' for label in KEYS)  # each drawn with its key
# Of these elements, those not inside the window or not on top at their centre (under the page's header, say), as
# [their first line of text, their box, why].
OUT_OF_VIEW = """elements => elements.map(element => {
  const box = element.getBoundingClientRect();
  const inside = box.width > 0 && box.height > 0 && box.left >= 0 && box.top >= 0
                 && box.right <= window.innerWidth && box.bottom <= window.innerHeight;
  const hit = inside && document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2);
  const why = !inside ? "outside the window" : hit && element.contains(hit) ? "" : "covered";
  return [element.innerText.split("\\n")[0], [box.left, box.top, box.right, box.bottom].map(Math.round), why];
}).filter(([, , why]) => why)"""


def save_button(page):
    return page.get_by_role("button", name=re.compile(r"^Save \d+ image"))


class Server(NamedTuple):
    url: str
    db_path: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("layout")
    store = {"CIFAR10_DB_PATH": str(folder / "layout.db"), "CIFAR10_IMAGE_DIR": str(folder / "images"),
             "CIFAR10_ALLOW_PRIVATE_URLS": "loopback"}
    with streamlit_servers(store, [folder / "server.log"]) as [running]:
        yield Server(running.url, folder / "layout.db")


def photos(tmp_path, blue: int) -> list[str]:
    """A photo of each shape (each test its own: none was saved before), one of them with a name longer than the
    screen is wide."""
    paths = []
    for index, size in enumerate(SHAPES):
        name = f"photo-{index}.png" if index != 1 else "IMG_20261207_183045_HDR_portrait_from_a_long_walk_home.png"
        paths.append(tmp_path / name)
        paths[-1].write_bytes(image_bytes("PNG", size=size, color=(index * 31 % 256, 200 - index * 20, blue)))
    return [str(path) for path in paths]


def open_with(browser, server, screen: dict):
    context = browser.new_context(reduced_motion="reduce", **screen)
    context.add_init_script(COUNT_RUNS)
    page = context.new_page()
    open_app(page, server.url)
    return page


def upload(page, files: list[str]) -> None:
    with app_run(page):
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(files)
        page.get_by_text(f"{len(files)} images classified").first.wait_for(timeout=120_000)
    page.wait_for_selector(IDLE, timeout=60_000)


def check_in_view(page, name: str) -> None:
    """The picture, the prediction, the ten classes and Save inside the window, none of them covered, once the page
    has brought them into view (its script runs as the picture is drawn; on a busy machine a moment later)."""
    classes = page.locator(CLASS_BUTTONS)
    assert classes.count() == 10
    deadline = time.monotonic() + 10
    while True:
        out = {what: locator.evaluate_all(OUT_OF_VIEW) for what, locator in (
            ("picture", page.locator(PICTURE)), ("prediction", page.locator(PREDICTION)), ("classes", classes),
            ("Save", save_button(page)))}
        if not any(out.values()) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(100)
    if any(out.values()):
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"layout-{name}.png"))
    assert not any(out.values()), f"{name}: {out}"


def choose_view(page, view: str, tap: bool = False) -> None:
    button = page.locator('[data-testid="stButtonGroup"] button').filter(has_text=view)
    with app_run(page):
        button.tap() if tap else button.click()
    page.wait_for_selector(IDLE, timeout=30_000)


def picture_drawn(page, number: int) -> None:
    """Wait until picture `number`'s line shows and its image has loaded, two frames on (its keys work by then)."""
    page.wait_for_function("""([selector, number]) => {
        const box = document.querySelector(selector);
        const image = box && box.querySelector("img");
        return box && box.innerText.startsWith(number + " of ") && image && image.complete && image.naturalWidth > 0;
    }""", arg=[POSITION, number], timeout=30_000)
    page.wait_for_selector(IDLE, timeout=30_000)
    page.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


def no_sideways_scrolling(page) -> None:
    widths = page.evaluate("""main => [document.documentElement.scrollWidth, window.innerWidth,
        document.querySelector(main).scrollWidth, document.querySelector(main).clientWidth]""", MAIN)
    assert widths[0] <= widths[1] and widths[2] <= widths[3], widths


def test_one_at_a_time_fits_a_laptop_screen_key_after_key(browser, server, tmp_path, local_server):
    local_server.routes["/one-more.png"] = Route(body=image_bytes("PNG", size=(300, 200), color=(250, 250, 5)),
                                                 headers={"Content-Type": "image/png"})
    files = photos(tmp_path, blue=90)
    page = open_with(browser, server, LAPTOP)
    upload(page, files)
    choose_view(page, "One at a time")  # brings the review into view
    picture_drawn(page, 1)
    seen = []
    for number in range(1, len(files) + 1):
        at, total, source = shown_picture(page)
        assert (at, total) == (number, len(files))
        check_in_view(page, f"laptop-picture-{number}")
        seen.append((source, page.locator(PICTURE).get_attribute("src")))
        if number == 3:  # scrolled to the top of the page, the next key brings the review back
            page.locator(MAIN).evaluate("main => main.scrollTo(0, 0)")
        if number == 5:  # what such a screen leaves the page under the browser's bars and a taskbar
            page.set_viewport_size(BROWSER_WINDOW)
            check_in_view(page, "laptop-window-picture-5")
        key(page, KEYS["cat"], number + 1 if number < len(files) else None)
        if number < len(files):
            picture_drawn(page, number + 1)
    assert sorted(source for source, _ in seen) == sorted(Path(path).name for path in files)  # each once
    assert len({address for _, address in seen}) == len(files)  # each its own image
    assert not save_button(page).evaluate_all(OUT_OF_VIEW)  # once all are reviewed
    # The inputs gave the room: folded into one line while there are pictures, they open with a click. A URL
    # fetched from there leaves the URL box in view, the cursor in it: the review does not pull the page away.
    uploader = page.locator('[data-testid="stFileUploader"]')
    assert not uploader.is_visible()
    page.get_by_text("Add more images").click()
    uploader.wait_for(state="visible", timeout=10_000)
    box = page.locator('[data-testid="stTextArea"] textarea')
    box.focus()
    page.keyboard.type(local_server.url("/one-more.png"))
    with app_run(page):
        page.keyboard.press("Control+Enter")
    page.get_by_text(f"{len(files) + 1} images classified").first.wait_for(timeout=30_000)
    page.wait_for_selector(IDLE, timeout=30_000)
    assert box.evaluate("box => document.activeElement === box") and not box.evaluate_all(OUT_OF_VIEW)


def test_one_at_a_time_fits_a_phone_screen_tap_after_tap(browser, server, tmp_path):
    files = photos(tmp_path, blue=160)
    page = open_with(browser, server, PHONE)
    upload(page, files)
    no_sideways_scrolling(page)  # Cards
    choose_view(page, "Table", tap=True)
    page.locator('[data-testid="stDataFrame"]').wait_for(timeout=30_000)
    no_sideways_scrolling(page)

    choose_view(page, "One at a time", tap=True)
    picture_drawn(page, 1)
    no_sideways_scrolling(page)
    classes = page.locator(CLASS_BUTTONS)
    rows = {round(box["y"]) for box in (classes.nth(index).bounding_box() for index in range(10))}
    assert len(rows) <= 5, f"the ten classes in {len(rows)} rows"  # a grid, not a column of ten
    tapped = {}
    for number in range(1, len(files) + 1):
        at, total, source = shown_picture(page)
        assert (at, total) == (number, len(files)) and source not in tapped
        check_in_view(page, f"phone-picture-{number}")
        tapped[source] = "ship" if number % 2 else "truck"
        with app_run(page):
            classes.filter(has_text=re.compile(f"^{tapped[source]}")).tap()
        if number < len(files):
            picture_drawn(page, number + 1)
    page.get_by_text("pictures reviewed").wait_for(timeout=30_000)
    assert not save_button(page).evaluate_all(OUT_OF_VIEW)
    with app_run(page):
        save_button(page).tap()
        page.get_by_text(f"Saved {len(files)} images").wait_for(timeout=60_000)
    assert saved_labels(server.db_path) == tapped
    # Back to the last picture, now with the most to say beside it: its label corrected, and saved before.
    with app_run(page):
        page.get_by_role("button", name=re.compile("^Back")).tap()
    picture_drawn(page, len(files))
    page.get_by_text("Already saved").wait_for(timeout=10_000)
    check_in_view(page, "phone-saved-picture")


def test_the_inputs_fold_while_the_review_is_one_at_a_time(store_env, local_server, monkeypatch):
    """Choosing One at a time (a rerun of the review alone) folds the inputs at once, choosing Cards opens them
    again; in Cards, where people keep dropping more, pictures from URLs leave them open; Clear all opens them."""
    monkeypatch.setenv("CIFAR10_ALLOW_PRIVATE_URLS", "loopback")
    local_server.routes["/red.png"] = Route(body=image_bytes("PNG"), headers={"Content-Type": "image/png"})
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    app.run()

    def inputs() -> tuple[str, bool]:
        [expander] = [expander for expander in app.expander if expander.label.startswith("Add")]
        return expander.label, expander.proto.expanded

    assert inputs() == ("Add images", True)
    app.text_area[0].input(local_server.url("/red.png"))
    app.run()
    assert not app.exception and len(app.selectbox) == 1 and inputs() == ("Add images", True)
    app.segmented_control[0].set_value("One at a time")
    app.run()
    assert inputs() == ("Add more images", False) and app.text_area[0].value == local_server.url("/red.png")
    app.segmented_control[0].set_value("Cards")
    app.run()
    assert inputs() == ("Add images", True)
    app.segmented_control[0].set_value("One at a time")
    app.run()
    [clear] = [button for button in app.button if button.label == "Clear all"]
    clear.click()
    app.run()
    assert inputs() == ("Add images", True) and len(app.selectbox) == 0
