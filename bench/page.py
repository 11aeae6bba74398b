"""Benchmark: how long each click and each key takes, with 20 or 120 photos on the page and 20 or 20,000 records
saved; and a thousand 12-megapixel photos uploaded at once: how long, and the server's memory.

    python bench/page.py [--records 20000] [--repeat 3] [--keys 20] [--no-browser] [--photos 1000] [--only keys|photos]

Two SQLite stores: one with 20 records, one with --records restored by `python db.py import` from an export
(the backup path a team uses). On each, through streamlit.testing's AppTest (server time of one rerun, median
of --repeat): open the page, upload 20 photos (the uploads of bench/inference.py), correct one label, save the
20, open History, go to its next page. "Correct one" is timed as the browser runs it: a rerun of the review
fragment alone (AppTest itself always reruns the whole script, which is timed too). Then the same interactions
in Chromium against `streamlit run app.py`: the time from the click to the page being idle again.

Keys: 120 photos on the page, the one-at-a-time view; the server time of each key (a rerun of the review fragment,
as the browser runs it; median of --keys presses of digits, Enter, X and Backspace), then in Chromium the time from
the key press to the next picture drawn (its position line shown and its image loaded).

Photos: --photos distinct 4000x3000 JPEGs (one photo-like picture, each copy with its own JPEG comment, so each has
its own hash and costs a full decode) uploaded at once in Chromium to `streamlit run app.py`: the time until every
one is classified, when the first ones can be reviewed, and the server process's memory (resident set, sampled every
0.1 s) before, at its peak and after.

Prints numbers and the ratio of the big store to the small one; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
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


@contextlib.contextmanager
def streamlit_server(env: dict[str, str], log: Path):
    """`streamlit run app.py` on a free port with this store; yields its address and its process."""
    from servers import free_port
    from test_browser import StreamlitServer, wait_until_up

    port = free_port()
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
             "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(StreamlitServer(url, server), log, time.monotonic() + 120)
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def chromium_page():
    from playwright.sync_api import sync_playwright

    from conftest import CHROMIUM

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


def browser_interactions(env: dict[str, str], paths: list[Path], folder: Path) -> dict[str, float]:
    from test_browser import IDLE

    def idle(page) -> None:
        page.wait_for_timeout(50)
        page.wait_for_selector(IDLE, timeout=120_000)

    def clicked(page, action) -> float:
        started = time.perf_counter()
        action()
        idle(page)
        return time.perf_counter() - started

    times = {}
    with streamlit_server(env, folder / "server.log") as (url, _), chromium_page() as page:
        page.goto(url)
        idle(page)  # the model loads once per server: not part of any click
        times["open the page"] = clicked(page, lambda: page.goto(url))
        uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]')
        classified = page.get_by_text("20 images classified").first
        times["upload 20 photos"] = clicked(page, lambda: (uploader.set_input_files([str(p) for p in paths]),
                                                          classified.wait_for(timeout=120_000)))
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
    return times


# ---------------------------------------------------------------- keys, and a thousand photos

KEY_PRESSES = ("3", "enter", "x", "backspace", "7", "enter", "1", "0")  # digits, Enter, X, Backspace, in turn
PICTURE = ".st-key-one-picture"


def photo_copies(count: int, size: tuple[int, int], name: str) -> list[Path]:
    """`count` distinct JPEG files of one photo-like picture (smooth colour fields plus sensor-like noise, quality
    90), each with a comment segment of its own: each has its own hash and costs what any photo of that size costs
    to decode; made in seconds instead of one picture at a time. Kept in the git-ignored bench/uploads/."""
    folder = CACHE / f"{name}-{size[0]}x{size[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.jpeg"
    if not base.exists():
        rng = np.random.default_rng(2)
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
        pixels += rng.normal(0, 6, pixels.shape).astype(np.float32)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(base, "JPEG", quality=90)
    data = base.read_bytes()
    paths = []
    for index in range(count):
        path = folder / f"photo-{index:04d}.jpg"
        if not path.exists():
            comment = f"copy {index}".encode()
            path.write_bytes(data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:])
        paths.append(path)
    return paths


def press_in_apptest(app, key: str) -> float:
    """The button with this shortcut clicked; the server time of the review fragment's rerun, as the browser has it."""
    [button] = [b for b in app.button if b.proto.shortcut == key and not b.disabled]
    button.click()
    app._tree  # the click goes with the next run, which reruns the fragment only
    seconds = fragment_rerun(app)
    app.run()  # untimed: AppTest's element tree after a fragment run holds the fragment alone
    return seconds


def apptest_keys(env: dict[str, str], uploads: list[tuple[str, bytes, str]], presses: int) -> list[float]:
    from streamlit.testing.v1 import AppTest

    os.environ.update(env)
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    app.run()
    app.file_uploader[0].set_value(uploads)
    app.run()
    app.segmented_control[0].set_value("One at a time")
    app.run()
    return [press_in_apptest(app, KEY_PRESSES[number % len(KEY_PRESSES)]) for number in range(presses)]


def shown_number(page) -> int:
    return int(page.locator(PICTURE).inner_text().split(" of ")[0])


def browser_keys(env: dict[str, str], paths: list[Path], folder: Path, presses: int) -> list[float]:
    """Seconds from a key press to the next picture drawn: its "n of 120" line shown and its image loaded."""
    from test_browser import IDLE

    drawn = """([selector, number]) => {
        const box = document.querySelector(selector);
        const image = box && box.querySelector("img");
        return box && box.innerText.startsWith(number + " of ") && image && image.complete && image.naturalWidth > 0;
    }"""
    times = []
    with streamlit_server(env, folder / "keys.log") as (url, _), chromium_page() as page:
        page.goto(url)
        page.wait_for_selector(IDLE, timeout=120_000)
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files([str(p) for p in paths])
        page.get_by_text(f"{len(paths)} images classified").first.wait_for(timeout=300_000)
        page.wait_for_selector(IDLE, timeout=300_000)
        page.locator('[data-testid="stButtonGroup"] button').filter(has_text="One at a time").click()
        page.locator(PICTURE).wait_for(timeout=60_000)
        for number in range(presses):
            page.wait_for_selector(IDLE, timeout=60_000)
            page.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
            key = KEY_PRESSES[number % len(KEY_PRESSES)]
            at = shown_number(page)
            started = time.perf_counter()
            page.keyboard.press({"enter": "Enter", "backspace": "Backspace"}.get(key, key))
            page.wait_for_function(drawn, arg=[PICTURE, at - 1 if key == "backspace" else at + 1], timeout=60_000)
            times.append(time.perf_counter() - started)
    return times


class MemorySampler(threading.Thread):
    """The resident set of a process, every 0.1 s, while it runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.running = pid, [], True
        self.start()

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    def run(self) -> None:
        while self.running:
            self.samples.append((time.monotonic(), self.rss()))
            time.sleep(0.1)

    def stop(self) -> None:
        self.running = False
        self.join()


def browser_photos(count: int, folder: Path) -> dict[str, float]:
    """`count` 12-megapixel JPEGs uploaded at once: seconds until every one is classified and until the first ones
    can be reviewed, and the server's resident memory before, at its peak, and once they are all read."""
    from test_browser import IDLE

    paths = photo_copies(count, (4000, 3000), "twelve-megapixels")
    total = sum(path.stat().st_size for path in paths)
    print(f"  {count:,} photos of 4000x3000, {total / 2**30:.2f} GiB in all", flush=True)
    env = store_env(folder / "photos")
    (folder / "photos").mkdir(exist_ok=True)
    with streamlit_server(env, folder / "photos.log") as (url, server), chromium_page() as page:
        page.goto(url)
        page.wait_for_selector(IDLE, timeout=120_000)
        memory = MemorySampler(server.pid)
        before = memory.rss()
        started = time.monotonic()
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files([str(p) for p in paths])
        page.get_by_text("images classified").first.wait_for(timeout=1_800_000)
        first = time.monotonic() - started
        page.get_by_text(f"{count} images classified").first.wait_for(timeout=1_800_000)
        page.wait_for_selector(IDLE, timeout=600_000)
        done = time.monotonic() - started
        time.sleep(2)
        memory.stop()
        after = memory.rss()
        peak_at, peak = max(memory.samples, key=lambda sample: sample[1])
        cards = page.locator('[data-testid="stSelectbox"]').count()
    return {"GiB uploaded": total / 2**30, "seconds until all classified": done,
            "seconds until the first can be reviewed": first, "MB before": before / 2**20, "MB peak": peak / 2**20,
            "seconds into the upload at the peak": peak_at - started, "MB after": after / 2**20,
            "cards on the first page": cards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--keys", type=int, default=20, help="key presses timed, on each store and in Chromium")
    parser.add_argument("--photos", type=int, default=1000, help="12-megapixel photos uploaded at once")
    parser.add_argument("--only", choices=("clicks", "keys", "photos"))
    args = parser.parse_args()
    if args.only == "photos":
        for name, value in browser_photos(args.photos, Path(tempfile.mkdtemp(prefix="cifar10-photos-"))).items():
            print(f"  {name:<40} {value:10.1f}")
        return
    folders = {size: Path(tempfile.mkdtemp(prefix=f"cifar10-page-{size}-")) for size in (20, args.records)}
    envs = {size: make_store(folder, size) for size, folder in folders.items()}

    from streamlit.testing.v1 import AppTest

    for env in envs.values():  # untimed: the model loads and the store opens once per server process
        os.environ.update(env)
        AppTest.from_file(str(ROOT / "app.py"), default_timeout=300).run()
    if args.only in (None, "clicks"):
        clicks(args, envs, folders)
    if args.only in (None, "keys"):
        keys(args, envs, folders)
    if args.only is None:
        print(f"\n{args.photos:,} photos uploaded at once, in Chromium:", flush=True)
        for name, value in browser_photos(args.photos, folders[20]).items():
            print(f"  {name:<40} {value:10.1f}")


def clicks(args, envs: dict[int, dict[str, str]], folders: dict[int, Path]) -> None:
    paths = make_uploads(20)
    uploads = [(path.name, path.read_bytes(), "image/jpeg" if path.suffix == ".jpeg" else "image/png")
               for path in paths]
    print(f"\n20 photos, {sum(len(data) for _, data, _ in uploads) / 1e6:.0f} MB", flush=True)
    results: dict[int, dict[str, list[float]]] = {size: {} for size in envs}
    for size, env in envs.items():
        for _ in range(args.repeat):
            for name, seconds in apptest_interactions(env, uploads).items():
                results[size].setdefault(name, []).append(seconds)
    print(f"AppTest, server seconds per interaction (median of {args.repeat}): 20 records / {args.records:,} records")
    report(results[20], results[args.records], statistics.median)
    if not args.no_browser:
        browser = {size: browser_interactions(envs[size], paths, folders[size]) for size in envs}
        print(f"\nChromium, seconds from click to idle page: 20 records / {args.records:,} records")
        report(browser[20], browser[args.records], lambda seconds: seconds)


def keys(args, envs: dict[int, dict[str, str]], folders: dict[int, Path]) -> None:
    paths = photo_copies(120, (1600, 1200), "keys")
    uploads = [(path.name, path.read_bytes(), "image/jpeg") for path in paths]
    print(f"\n120 photos of 1600x1200 on the page, one at a time, {args.keys} keys "
          f"({', '.join(KEY_PRESSES)} in turn)", flush=True)
    server = {size: apptest_keys(env, uploads, args.keys) for size, env in envs.items()}
    print(f"AppTest, server seconds per key, median (max): 20 records / {args.records:,} records")
    print(f"  {'a key (the review reruns alone)':<34} {statistics.median(server[20]):6.3f} ({max(server[20]):.3f}) / "
          f"{statistics.median(server[args.records]):6.3f} ({max(server[args.records]):.3f})")
    if not args.no_browser:
        browser = {size: browser_keys(envs[size], paths, folders[size], args.keys) for size in envs}
        print(f"Chromium, seconds from key press to the next picture drawn, median (max): 20 records / "
              f"{args.records:,} records")
        print(f"  {'a key':<34} {statistics.median(browser[20]):6.3f} ({max(browser[20]):.3f}) / "
              f"{statistics.median(browser[args.records]):6.3f} ({max(browser[args.records]):.3f})")


def report(small: dict, big: dict, summary) -> None:
    for name in big:
        if name in small:
            a, b = summary(small[name]), summary(big[name])
            print(f"  {name:<28} {a:6.3f} / {b:6.3f}   ({b / a:4.2f}x)")
        else:
            print(f"  {name:<28}    n/a / {summary(big[name]):6.3f}   (one page of History at 20 records)")


if __name__ == "__main__":
    main()
