"""Shared fixtures: images built with Pillow, temp stores, and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import io
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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


@pytest.fixture
def store_env(tmp_path, monkeypatch):
    """Point the app at a fresh database and image folder."""
    db_path, image_dir = tmp_path / "feedback.db", tmp_path / "images"
    monkeypatch.setenv("CIFAR10_DB_PATH", str(db_path))
    monkeypatch.setenv("CIFAR10_IMAGE_DIR", str(image_dir))
    return db_path, image_dir


class Route:
    """What the test server answers on one path."""

    def __init__(self, status: int = 200, body: bytes = b"", headers: dict | None = None,
                 drip_delay: float = 0.0, content_length: int | None = -1) -> None:
        self.status, self.body, self.headers = status, body, headers or {}
        self.drip_delay, self.content_length = drip_delay, content_length


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


ImageFactory = Callable[..., bytes]
