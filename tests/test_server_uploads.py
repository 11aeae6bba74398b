"""What reaches a real server's upload route, sent the way anyone who reaches the server can send it: Streamlit's own
websocket protocol opens a session and learns its id, a plain HTTP client PUTs the files (tests/streamlit_protocol.py).
What a signed-out browser gets, what sessions that upload and leave leave behind, what another session sees while a
big upload is written, and the app mounted in another ASGI app."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import ROOT, STORE_VARIABLES, files_held_open
from servers import free_port
from streamlit_protocol import CHUNK, ProtocolSession
from team_servers import OidcProvider, _Server
from test_browser import StreamlitServer, app_run, new_page, open_app, pictures, streamlit_servers
from test_team_browser import sign_in

ALICE = "alice@example.com"


def store_env(folder: Path) -> dict[str, str]:
    """A SQLite store, and TMPDIR (where uploads and originals wait) of its own to look into."""
    spools = folder / "spools"
    spools.mkdir()
    return {"CIFAR10_DB_PATH": str(folder / "feedback.db"), "CIFAR10_IMAGE_DIR": str(folder / "images"),
            "TMPDIR": str(spools)}


def chunks(count: int, watch: Callable[[], None] | None = None) -> Iterator[bytes]:
    """`count` megabytes, calling `watch` before each."""
    for _ in range(count):
        if watch is not None:
            watch()
        yield bytes(CHUNK)


def wait_until_nothing_held(pid: int, folder: Path, seconds: float) -> list[int]:
    """The sizes of the files process `pid` holds in `folder`, once it holds none or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while (held := files_held_open(pid, folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return held


def test_a_browser_not_signed_in_stores_nothing(browser, tmp_path):
    provider = OidcProvider()  # any port of 127.0.0.1 may be the app's
    try:
        home = tmp_path / "home"
        (home / ".streamlit").mkdir(parents=True)
        (home / ".streamlit" / "secrets.toml").write_text(
            provider.auth_toml("http://127.0.0.1:{port}/oauth2callback"))
        env = store_env(tmp_path) | {"HOME": str(home)}
        spools = Path(env["TMPDIR"])
        with streamlit_servers(env, [tmp_path / "server.log"]) as [server]:
            origin = server.url
            held_while_sent = []

            def watch() -> None:
                held_while_sent.append(sum(files_held_open(server.process.pid, spools)))

            # A session opened through Streamlit's own protocol, signed out: its page is "Sign in", and it knows
            # its id. Its uploads, with or without an identity cookie Streamlit did not sign, are refused before a
            # byte of them is written anywhere.
            unsigned = {"_streamlit_user": json.dumps({"email": ALICE, "email_verified": True, "origin": origin,
                                                       "is_logged_in": True})}
            for cookies in ({}, unsigned):
                nobody = ProtocolSession(server.url, cookies=cookies)
                assert nobody.session_id
                answer = nobody.upload(chunks(4, watch), 4 * CHUNK)
                assert answer.status_code == 401 and "Sign in first" in answer.text, answer.text
                assert not any(held_while_sent) and not files_held_open(server.process.pid, spools)
                nobody.close()

            # Someone signed in at the provider uploads through the page as ever.
            page = new_page(browser)
            sign_in(page, server.url, ALICE)
            with app_run(page):
                page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
                    pictures(tmp_path, ("red.png", (220, 20, 20))))
                page.get_by_text("1 image classified").wait_for(timeout=60_000)
    finally:
        provider.close()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory) -> Iterator[tuple[StreamlitServer, Path]]:
    """One server without sign-in for the module, and the folder it keeps uploads in. A session whose browser left
    is kept 1 s for it to come back (Streamlit's default is 2 minutes), so the sweep runs every second."""
    folder = tmp_path_factory.mktemp("open-server")
    env = store_env(folder) | {"STREAMLIT_SERVER_DISCONNECTED_SESSION_TTL": "1"}
    with streamlit_servers(env, [folder / "server.log"]) as [server]:
        yield server, Path(env["TMPDIR"])


def test_what_sessions_upload_and_leave_goes_with_them_though_nobody_opened_a_page(open_server):
    """The sweep of gone sessions runs from the server's start: these sessions open the History page, never the
    page that reads uploads."""
    server, spools = open_server
    assert not wait_until_nothing_held(server.process.pid, spools, 10)
    sessions = [ProtocolSession(server.url, page="History") for _ in range(3)]
    for session in sessions:
        for _ in range(2):
            assert session.upload(chunks(1), CHUNK).status_code == 204
    assert sum(files_held_open(server.process.pid, spools)) == 6 * CHUNK
    for session in sessions:
        session.close()
    assert not wait_until_nothing_held(server.process.pid, spools, 20)


def test_other_sessions_are_answered_while_a_big_upload_is_written(open_server):
    """The page of every session waits on the server's event loop: a big upload written to disk there would hold
    them all. While one is written (the server's file of it growing), another session's heartbeat, which the loop
    answers itself, is asked and answered; a loop busy writing would answer only once the file is whole. The upload
    itself is answered once it is whole on disk."""
    server, spools = open_server
    size = 256  # megabytes
    assert not wait_until_nothing_held(server.process.pid, spools, 10)
    other, uploader = ProtocolSession(server.url, page="History"), ProtocolSession(server.url, page="History")
    answered = []

    def send() -> None:
        answer = uploader.upload(chunks(size), size * CHUNK)
        answered.append((answer.status_code, sum(files_held_open(server.process.pid, spools))))

    sending = threading.Thread(target=send)
    sending.start()
    answered_while_written = 0
    while sending.is_alive():
        before = being_written(server, spools, size * CHUNK)
        other.heartbeat()
        answered_while_written += before and being_written(server, spools, size * CHUNK)
    assert answered == [(204, size * CHUNK)]
    assert answered_while_written
    other.close()
    uploader.close()


def being_written(server: StreamlitServer, folder: Path, size: int) -> bool:
    """Whether the server is writing an upload of `size` bytes to a file of its own in `folder`: one whose size grows
    by writes at given places, its offset left at 0 (the upload's body, as it arrives, is appended to a file of the
    web framework's, whose offset follows its end; read back, its size is already whole)."""
    for descriptor in Path(f"/proc/{server.process.pid}/fd").iterdir():
        try:
            if not os.readlink(descriptor).startswith(str(folder)):
                continue
            written = descriptor.stat().st_size
            offset = int(Path(f"/proc/{server.process.pid}/fdinfo/{descriptor.name}").read_text().split()[1])
        except (FileNotFoundError, ProcessLookupError):  # closed while looked at
            continue
        if offset == 0 and written < size:
            return True
    return False


OUTER_APP = """
import sys

from starlette.applications import Starlette
from starlette.routing import Mount

sys.path.insert(0, {root!r})
import app as cifar10

outer = Starlette(routes=[Mount("/", app=cifar10.app)])
"""
FALLBACK_WARNING = "uploads wait in the server's memory"


class MountedApp(_Server):
    """The app mounted in another ASGI app as Streamlit documents it (which starts Streamlit at the first request and
    skips the app's lifespan), served by uvicorn on a free port, with these variables; its log is `folder/log`."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.process = folder, None
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        (folder / "outer.py").write_text(OUTER_APP.format(root=str(ROOT)))
        env = {key: value for key, value in os.environ.items() if key not in STORE_VARIABLES} | env
        self._launch([sys.executable, "-m", "uvicorn", "outer:outer", "--host", "127.0.0.1", "--port", str(port)],
                     "uvicorn", 90, cwd=folder, env=env)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False


def test_mounted_in_another_asgi_app_the_page_classifies_with_uploads_kept_by_streamlit(browser, tmp_path):
    # Without `streamlit run`, Streamlit reads no options from the environment: the person's own config file says
    # that a session whose browser left is kept 1 s.
    home = tmp_path / "home"
    (home / ".streamlit").mkdir(parents=True)
    (home / ".streamlit" / "config.toml").write_text("[server]\ndisconnectedSessionTTL = 1\n")
    env = store_env(tmp_path) | {"HOME": str(home)}
    spools = Path(env["TMPDIR"])
    server = MountedApp(tmp_path, env)
    try:
        page = new_page(browser)
        open_app(page, server.url)
        for count, (name, color) in enumerate([("red.png", (220, 20, 20)), ("sky.png", (40, 120, 230))], 1):
            with app_run(page):
                page.locator('[data-testid="stFileUploader"] input[type="file"]').first.set_input_files(
                    pictures(tmp_path, (name, color)))
                page.get_by_text(f"{count} image{'s' * (count > 1)} classified").wait_for(timeout=60_000)
        assert files_held_open(server.process.pid, spools)  # the page's originals
        page.close()  # and the sweep of gone sessions takes them
        assert not wait_until_nothing_held(server.process.pid, spools, 20)
        log = server.log()
        assert log.count(FALLBACK_WARNING) == 1, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop()
