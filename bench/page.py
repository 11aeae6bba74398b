"""Benchmark: how long each click takes on the server, with 20 photos on the page and 20 or 20,000 records saved.

    python bench/page.py [--records 20000] [--repeat 3] [--no-browser]

Two SQLite stores: one with 20 records, one with --records restored by `python db.py import` from an export
(the backup path a team uses). On each, through streamlit.testing's AppTest (server time of one rerun, median
of --repeat): open the page, upload 20 photos (the uploads of bench/inference.py), correct one label, save the
20, open History, go to its next page. "Correct one" is timed as the browser runs it: a rerun of the review
fragment alone (AppTest itself always reruns the whole script, which is timed too). Then the same interactions
in Chromium against `streamlit run app.py`: the time from the click to the page being idle again.
Prints numbers and the ratio of the big store to the small one; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from inference import make_uploads  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CACHE = ROOT / "bench" / "uploads"


def backup_archive(records: int) -> Path:
    """An export-format ZIP (ImageFolder + labels.csv) of `records` small distinct pictures, made once."""
    path = CACHE / f"backup-{records}.zip"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["file,source,predicted_label,confidence,final_label,created_at"]
    with zipfile.ZipFile(path.with_suffix(".partial"), "w", zipfile.ZIP_STORED) as archive:
        for index in range(records):
            pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).resize((48, 48), Image.Resampling.BILINEAR).save(buffer, "PNG")
            data = buffer.getvalue()
            final, predicted = CLASSES[index % 10], CLASSES[(index // 3) % 10]
            name = f"{final}/{hashlib.sha256(data).hexdigest()}.png"
            archive.writestr(name, data)
            day = f"2026-{1 + index % 11:02d}-{1 + index % 28:02d}T{index % 24:02d}:{index % 60:02d}:00+00:00"
            rows.append(f"{name},photo-{index}.png,{predicted},{0.5 + (index % 50) / 100},{final},{day}")
        archive.writestr("labels.csv", "\n".join(rows) + "\n")
    path.with_suffix(".partial").rename(path)
    return path


def store_env(folder: Path) -> dict[str, str]:
    return {"CIFAR10_DB_PATH": str(folder / "feedback.db"), "CIFAR10_IMAGE_DIR": str(folder / "images")}


def make_store(folder: Path, records: int) -> dict[str, str]:
    env = store_env(folder)
    started = time.perf_counter()
    run = subprocess.run([sys.executable, str(ROOT / "db.py"), "import", str(backup_archive(records))],
                         env={**os.environ, **env}, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(run.stderr)
    print(f"  {records:,} records restored with `python db.py import` in {time.perf_counter() - started:.1f} s",
          flush=True)
    return env


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def fragment_rerun(app) -> float:
    """Rerun only the review fragment, as the server does when a label inside it changes."""
    from streamlit.runtime.scriptrunner_utils.script_requests import RerunData
    from streamlit.testing.v1 import local_script_runner

    fragment_ids = list(app._fragment_storage._fragments)
    original = local_script_runner.RerunData

    def with_fragment(*args, **kwargs):
        return original(*args, **kwargs, fragment_id_queue=fragment_ids)

    local_script_runner.RerunData = with_fragment
    try:
        return timed(app.run)
    finally:
        local_script_runner.RerunData = original
        assert RerunData is original


def apptest_interactions(env: dict[str, str], uploads: list[tuple[str, bytes, str]]) -> dict[str, float]:
    from streamlit.testing.v1 import AppTest

    os.environ.update(env)
    times = {}
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    times["open the page"] = timed(app.run)
    app.file_uploader[0].set_value(uploads)
    times["upload 20 photos"] = timed(app.run)
    box = app.selectbox[0]
    box.set_value("ship" if box.value != "ship" else "frog")
    times["correct one (whole script)"] = timed(app.run)
    box = app.selectbox[1]
    box.set_value("ship" if box.value != "ship" else "frog")
    app._tree  # the widget change goes with the next run, which reruns the fragment only
    times["correct one (fragment)"] = fragment_rerun(app)
    app.run()  # untimed: AppTest's element tree after a fragment run holds the fragment alone
    [save] = [button for button in app.button if button.label.startswith("Save")]
    save.click()
    times["save 20"] = timed(app.run)
    assert "Saved 20 images" in app.success[0].value or "already saved" in app.success[0].value, app.success
    history = AppTest.from_file(str(ROOT / "pages" / "1_History.py"), default_timeout=300)
    times["open History"] = timed(history.run)
    [next_page] = [button for button in history.button if button.label == "Next page"]
    if not next_page.disabled:  # 20 records (40 after the save) fit on one page: there is no next one
        next_page.click()
        times["History next page"] = timed(history.run)
    [undo] = [button for button in app.button if button.label == "Undo last change"]
    undo.click()
    app.run()  # untimed: the store is as it was for the next round
    return times


def browser_interactions(env: dict[str, str], paths: list[Path], folder: Path) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    from test_browser import CHROMIUM, IDLE, streamlit_server

    def idle(page) -> None:
        page.wait_for_timeout(50)
        page.wait_for_selector(IDLE, timeout=120_000)

    def clicked(page, action) -> float:
        started = time.perf_counter()
        action()
        idle(page)
        return time.perf_counter() - started

    times = {}
    with streamlit_server(env, folder / "server.log") as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        idle(page)  # the model loads once per server: not part of any click
        times["open the page"] = clicked(page, lambda: page.goto(url))
        uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]')
        times["upload 20 photos"] = clicked(page, lambda: (uploader.set_input_files([str(p) for p in paths]),
                                                          page.get_by_text("20 images classified").wait_for(timeout=120_000)))
        box = page.get_by_role("combobox").first
        choice = "ship" if box.input_value() != "ship" else "frog"
        box.click()
        box.fill(choice)
        times["correct one"] = clicked(page, lambda: page.get_by_role("option", name=choice, exact=True).click())
        times["save 20"] = clicked(page, lambda: (page.get_by_role("button", name="Save 20 images").click(),
                                                 page.get_by_text("Saved 20 images").wait_for(timeout=60_000)))
        times["open History"] = clicked(page, lambda: (page.get_by_role("link", name="History").click(),
                                                      page.get_by_text("saved images match").wait_for(timeout=60_000)))
        next_page = page.get_by_role("button", name="Next page")
        if next_page.is_enabled():
            times["History next page"] = clicked(page, next_page.click)
        browser.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    paths = make_uploads(20)
    uploads = [(path.name, path.read_bytes(), "image/jpeg" if path.suffix == ".jpeg" else "image/png") for path in paths]
    print(f"20 photos, {sum(len(data) for _, data, _ in uploads) / 1e6:.0f} MB; stores:", flush=True)
    folders = {size: Path(tempfile.mkdtemp(prefix=f"cifar10-page-{size}-")) for size in (20, args.records)}
    envs = {size: make_store(folder, size) for size, folder in folders.items()}

    from streamlit.testing.v1 import AppTest

    results: dict[int, dict[str, list[float]]] = {size: {} for size in envs}
    for size, env in envs.items():
        os.environ.update(env)
        # Untimed: the model loads and the store opens once per server process, not per click.
        AppTest.from_file(str(ROOT / "app.py"), default_timeout=300).run()
        for _ in range(args.repeat):
            for name, seconds in apptest_interactions(env, uploads).items():
                results[size].setdefault(name, []).append(seconds)
    print(f"\nAppTest, server seconds per interaction (median of {args.repeat}): 20 records / {args.records:,} records")
    report(results[20], results[args.records], statistics.median)

    if not args.no_browser:
        browser = {size: browser_interactions(envs[size], paths, folders[size]) for size in envs}
        print(f"\nChromium, seconds from click to idle page: 20 records / {args.records:,} records")
        report(browser[20], browser[args.records], lambda seconds: seconds)


def report(small: dict, big: dict, summary) -> None:
    for name in big:
        if name in small:
            a, b = summary(small[name]), summary(big[name])
            print(f"  {name:<28} {a:6.3f} / {b:6.3f}   ({b / a:4.2f}x)")
        else:
            print(f"  {name:<28}    n/a / {summary(big[name]):6.3f}   (one page of History at 20 records)")


if __name__ == "__main__":
    main()
