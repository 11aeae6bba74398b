"""Shared fixtures: images built with Pillow, temp stores, a real HTTP server on 127.0.0.1, and the model's one pass
over the CIFAR-10 test split."""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest
from PIL import Image

if TYPE_CHECKING:  # torch is imported where it is used: tests that do not need it start faster
    import torch

    from classifier import Prediction

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MAIN = sys.modules["__main__"]


@pytest.fixture(autouse=True)
def restore_main_module() -> Iterator[None]:
    """Streamlit's script runner (AppTest's too) makes the script it runs `__main__` and leaves it so; a process
    spawned after that would re-run the script (torch, the app) before its own work. Each test starts and ends
    with pytest's `__main__`."""
    sys.modules["__main__"] = MAIN
    yield
    sys.modules["__main__"] = MAIN


def image_bytes(image_format: str = "PNG", size: tuple[int, int] = (64, 48), color=(200, 30, 30),
                mode: str = "RGB", **save_args) -> bytes:
    """A small picture in any format: left half `color`, right half its inverse, so orientation is visible."""
    image = Image.new("RGB", size, color)
    inverse = tuple(255 - channel for channel in color)
    image.paste(inverse, (size[0] // 2, 0, size[0], size[1]))
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, image_format, **save_args)
    return buffer.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    """A deflated ZIP of these members (a name ending in / is a folder entry)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            if name.endswith("/"):
                archive.mkdir(name)
            else:
                archive.writestr(name, data)
    return buffer.getvalue()


# What display.escape_markdown writes: code spans (for words Streamlit would link) and backslash-escaped characters.
CODE_SPAN_OR_ESCAPE = re.compile(r"(`+) (.*?) \1|\\(.)")


def files_held_open(pid: int | str, folder: Path) -> list[int]:
    """The size of each file in `folder` that process `pid` ("self": this one) holds open: a spool is a deleted
    file, its descriptor all there is of it."""
    sizes = []
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(descriptor).startswith(str(folder)):
                sizes.append(descriptor.stat().st_size)
        except FileNotFoundError:  # closed while listed
            pass
    return sizes


def shown(markdown: str) -> str:
    """What a reader sees of escaped user text: code spans' content, and escaped characters as themselves."""
    return CODE_SPAN_OR_ESCAPE.sub(lambda match: match.group(2) if match.group(1) else match.group(3), markdown)


def without_code_spans(markdown: str) -> str:
    """The markdown outside code spans, its escapes as written."""
    return CODE_SPAN_OR_ESCAPE.sub(lambda match: " " if match.group(1) else match.group(0), markdown)


STORE_VARIABLES = ("CIFAR10_DB_PATH", "CIFAR10_IMAGE_DIR", "CIFAR10_DATABASE_URL", "CIFAR10_IMAGE_STORE",
                   "CIFAR10_ADMIN_PASSWORD", "CIFAR10_ADMINS", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def cannot_run(reason: str) -> None:
    """Outside CI a test that needs what is missing here is skipped; in CI (CI=true) it fails."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"cannot run in CI: {reason}")
    pytest.skip(reason)


def _serve(kind):
    from servers import ServerUnavailable

    try:
        server = kind()
    except ServerUnavailable as error:
        cannot_run(str(error))
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL on 127.0.0.1 for the whole session (each test makes its own database)."""
    from servers import PostgresServer

    yield from _serve(PostgresServer)


@pytest.fixture(scope="session")
def s3_server():
    """A real SeaweedFS S3 gateway on 127.0.0.1 for the whole session (each test uses its own prefix)."""
    from servers import SeaweedServer

    yield from _serve(SeaweedServer)


def use_store(monkeypatch, env: dict[str, str]) -> None:
    """Point the app at exactly this store: these variables set, every other store variable unset."""
    for variable in STORE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)


class Backend:
    """The environment of one fresh store, and ways to look at it from outside the app."""

    def __init__(self, name: str, env: dict[str, str], monkeypatch) -> None:
        self.name, self.env = name, env
        use_store(monkeypatch, env)
        self._stores = []

    def store(self):
        """A new Store on this environment, as a server process would open it."""
        from db import Store

        store = Store.from_env()
        self._stores.append(store)
        return store

    def image_names(self) -> set[str]:
        return {name for name, _ in self.store().images.stored()}

    def close(self) -> None:
        for store in self._stores:
            store.close()


def make_backend(name: str, request, tmp_path, monkeypatch) -> Backend:
    import uuid

    if name == "sqlite":
        env = {"CIFAR10_DB_PATH": str(tmp_path / "feedback.db"), "CIFAR10_IMAGE_DIR": str(tmp_path / "images")}
    else:
        postgres, s3 = request.getfixturevalue("postgres_server"), request.getfixturevalue("s3_server")
        database = f"t{uuid.uuid4().hex[:16]}"
        env = {"CIFAR10_DATABASE_URL": postgres.database(database),
               "CIFAR10_IMAGE_STORE": f"s3://cifar10-tests/{database}", **s3.env()}
    return Backend(name, env, monkeypatch)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path, monkeypatch):
    """A fresh store on each backend in turn: SQLite + a folder, PostgreSQL + S3 (real servers)."""
    made = make_backend(request.param, request, tmp_path, monkeypatch)
    yield made
    made.close()


@pytest.fixture
def store_env(tmp_path, monkeypatch):
    """Point the app at a fresh SQLite database and image folder."""
    made = make_backend("sqlite", None, tmp_path, monkeypatch)
    yield tmp_path / "feedback.db", tmp_path / "images"
    made.close()


class Route:
    """What the test server answers on one path."""

    def __init__(self, status: int = 200, body: bytes = b"", headers: dict | None = None,
                 drip_delay: float = 0.0, content_length: int | None = -1, header_delay: float = 0.0) -> None:
        self.status, self.body, self.headers = status, body, headers or {}
        self.drip_delay, self.content_length, self.header_delay = drip_delay, content_length, header_delay


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 whose routes the test sets; it counts the requests it got."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                route = server.routes.get(self.path, Route(404, b"not found"))
                time.sleep(route.header_delay)
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.content_length == -1:
                    self.send_header("Content-Length", str(len(route.body)))
                elif route.content_length is not None:
                    self.send_header("Content-Length", str(route.content_length))
                self.end_headers()
                try:
                    if route.drip_delay:
                        for offset in range(len(route.body)):
                            self.wfile.write(route.body[offset:offset + 1])
                            self.wfile.flush()
                            time.sleep(route.drip_delay)
                    else:
                        self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if route.content_length is None:
                    self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def local_server():
    server = LocalServer()
    yield server
    server.close()


@pytest.fixture
def allow_loopback_urls(monkeypatch):
    """Only tests that serve images on 127.0.0.1 switch the private-address guard off."""
    monkeypatch.setenv("CIFAR10_ALLOW_PRIVATE_URLS", "1")


@pytest.fixture(scope="session")
def classifier():
    from classifier import load_classifier

    return load_classifier()


@dataclass(frozen=True)
class SplitPass:
    """What the shipped Classifier made of the CIFAR-10 test split's images, in the split's order."""

    labels: torch.Tensor
    logits: torch.Tensor              # flip-averaged, uncalibrated: Classifier.outputs
    features: torch.Tensor            # penultimate, flip-averaged: what the novelty score compares
    predictions: list[Prediction]     # what Classifier.predict says of each image

    def sample(self, chosen: torch.Tensor) -> SplitPass:
        return SplitPass(self.labels[chosen], self.logits[chosen], self.features[chosen],
                         [self.predictions[index] for index in chosen.tolist()])


SPLIT_PASS_FOLDER = "CIFAR10_TESTS_SPLIT_PASS"  # where this run's pass writes: set by the main process, read by workers


def pytest_configure(config) -> None:
    if hasattr(config, "workerinput"):
        # Two workers and the pass share two cores: PyTorch's default of one thread per core in each of them
        # (and in the servers and commands they start) would make its spinning threads wait on each other.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    else:  # the main process (xdist's controller, or a run without workers)
        import split_pass

        folder = Path(tempfile.mkdtemp(prefix="cifar10-split-pass-"))
        os.environ[SPLIT_PASS_FOLDER] = str(folder)
        config.add_cleanup(lambda: split_pass.stop(folder))


@pytest.fixture(scope="session", autouse=True)
def scan_for_components_once() -> Iterator[None]:
    """Every AppTest scans all installed packages for Streamlit components (a tenth of a second each time, for the
    same answer within a run): scan once per run, as a server does once per start."""
    import functools

    from streamlit.components.v2 import manifest_scanner

    scan = manifest_scanner.scan_component_manifests
    manifest_scanner.scan_component_manifests = functools.cache(scan)
    yield
    manifest_scanner.scan_component_manifests = scan


# Modules whose tests mostly wait (on deadlines, on servers stopped and started again): run early, while the model's
# pass is there to use the CPU they leave.
WAITING_MODULES = ("test_fetch.py", "test_db.py")
READERS = 3  # the place of the tests that read the model's pass: last


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what will not run
def pytest_collection_modifyitems(session, config, items) -> None:
    """Order the run so that two workers and the model's pass over the test split keep both cores busy, and start
    that pass in its own process as soon as a test to run reads it. The browser tests, the longest, go first (each
    worker gets some and both finish together); then the tests that mostly wait; the pass's readers go last."""
    import split_pass

    def place(item) -> int:
        fixtures = getattr(item, "fixturenames", ())
        if "test_split" in fixtures:
            return READERS
        if "browser" in fixtures:
            return 0
        return 1 if item.path.name in WAITING_MODULES else 2

    items.sort(key=place)  # stable: each group keeps its order
    if any(place(item) == READERS for item in items):
        split_pass.start_once(Path(os.environ[SPLIT_PASS_FOLDER]))


@pytest.fixture(scope="session")
def test_split(classifier) -> SplitPass:
    """The 10,000 test images through the shipped model once per run (tests/split_pass.py), shared by the
    accuracy, calibration and "none of the ten" tests; only the test split is decoded (and cached), never the
    50,000 training images."""
    import torch

    import split_pass

    try:
        outputs = torch.load(split_pass.wait_for(Path(os.environ[SPLIT_PASS_FOLDER])))
    except split_pass.PassFailed as error:
        if str(error).startswith("FileNotFoundError: CIFAR-10 archive not found"):
            cannot_run(str(error))
        pytest.fail(f"the model's pass over the test split failed: {error}")
    logits, features = outputs["logits"], outputs["features"]
    return SplitPass(outputs["labels"], logits, features, classifier.predictions(logits, features))


def run_coroutine(coroutine):
    """asyncio.run in a thread of its own: while a worker's Chromium is open, Playwright's sync API keeps an event
    loop running in the main thread, where asyncio.run refuses to start another."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def export(name: str, cookies: dict[str, str] | None = None) -> tuple[int, bytes]:
    """The status and whole body of what the server's /export/<name> route (app.export_download) answers a browser
    sending these cookies."""
    from starlette.requests import Request

    import app as server

    header = "; ".join(f"{key}={value}" for key, value in (cookies or {}).items()).encode("latin-1")
    response = server.export_download(Request({"type": "http", "method": "GET", "path": f"/export/{name}",
                                               "headers": [(b"cookie", header)] if cookies else [],
                                               "path_params": {"name": name}}))

    async def body() -> bytes:
        if hasattr(response, "body_iterator"):  # a streamed answer; a refusal is a plain one
            return b"".join([chunk async for chunk in response.body_iterator])
        return response.body

    return response.status_code, run_coroutine(body())


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium through Playwright, started once per worker."""
    if not Path(CHROMIUM).exists():
        cannot_run(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        yield launched
        launched.close()


@pytest.fixture
def browser(chromium):
    """The worker's Chromium for one test: its pages (a context each, so no cookie or storage crosses from one to
    another) are closed when the test ends, so none goes on reconnecting to a server that has stopped."""
    yield chromium
    for context in chromium.contexts:
        context.close()


ImageFactory = Callable[..., bytes]
