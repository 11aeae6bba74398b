"""Streamlit's own protocol without a browser, as anyone who reaches a server can speak it: a browser session's
websocket (`/_stcore/stream`: protobuf BackMsgs in, ForwardMsgs out) and the upload route
(`PUT /_stcore/upload_file/<session id>/<file id>`, with the XSRF cookie and header the uploader sends). For the
tests that act as a hostile client would, and that time what another session sees."""

from __future__ import annotations

import time
import uuid
from typing import Callable, Iterable, Iterator

import requests
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from websockets.sync.client import connect

XSRF_COOKIE = "_streamlit_xsrf"
FINISHED_EARLY_FOR_RERUN = 2  # ForwardMsg.script_finished: a run that another run replaced
CHUNK = 2**20  # what an upload's body is sent in


class ProtocolSession:
    """One browser session, opened the way Streamlit's page opens it: the XSRF cookie from the server, then the
    websocket, then a first run, whose new_session message names the session. `cookies` are sent with both, as a
    browser's would be (an identity cookie, say)."""

    def __init__(self, url: str, cookies: dict[str, str] | None = None, page: str = "", timeout: float = 60) -> None:
        self.url, self.timeout = url, timeout
        self.http = requests.Session()
        self.http.cookies.update(cookies or {})
        self.http.get(f"{url}/_stcore/health", timeout=timeout).raise_for_status()  # sets the XSRF cookie
        self.xsrf = self.http.cookies.get(XSRF_COOKIE)
        cookie_header = "; ".join(f"{name}={value}" for name, value in self.http.cookies.items())
        self.socket = connect(f"ws{url.removeprefix('http')}/_stcore/stream", subprotocols=["streamlit", self.xsrf],
                              additional_headers={"Cookie": cookie_header}, origin=url, max_size=None,
                              open_timeout=timeout)
        self.session_id = ""
        self.run(page)

    def run(self, page: str = "") -> list[ForwardMsg]:
        """A rerun of the page named (its address's path; "" the default page), as a key or a click asks for one;
        returns what the server sent until the run finished."""
        message = BackMsg()
        message.rerun_script.query_string = ""
        message.rerun_script.page_name = page
        message.rerun_script.page_script_hash = ""
        self.socket.send(message.SerializeToString())
        return self.read_until(lambda forward: forward.WhichOneof("type") == "script_finished"
                               and forward.script_finished != FINISHED_EARLY_FOR_RERUN)

    def heartbeat(self) -> None:
        """The page's heartbeat, answered by the server's event loop itself (no script runs): returns once the
        answer is in."""
        message = BackMsg()
        message.app_heartbeat = True
        self.socket.send(message.SerializeToString())
        self.read_until(lambda forward: forward.WhichOneof("type") == "heartbeat_ack")

    def read_until(self, last: Callable[[ForwardMsg], bool]) -> list[ForwardMsg]:
        received = []
        deadline = time.monotonic() + self.timeout
        while True:
            forward = ForwardMsg()
            forward.ParseFromString(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            received.append(forward)
            if forward.WhichOneof("type") == "new_session":
                self.session_id = forward.new_session.initialize.session_id
            if last(forward):
                return received

    def upload(self, data: bytes | Iterable[bytes], size: int | None = None, name: str = "picture.png",
               file_id: str | None = None) -> requests.Response:
        """PUT one file to this session, as the uploader does (multipart, the XSRF token in cookie and header);
        `data` may be chunks, `size` their total length."""
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        chunks = [data] if isinstance(data, bytes) else data
        body = _Body([head, chunks, tail], len(head) + (len(data) if isinstance(data, bytes) else size) + len(tail))
        return self.http.put(f"{self.url}/_stcore/upload_file/{self.session_id}/{file_id or uuid.uuid4()}",
                             data=body, timeout=self.timeout,
                             headers={"X-Xsrftoken": self.xsrf,
                                      "Content-Type": f"multipart/form-data; boundary={boundary}"})

    def close(self) -> None:
        self.socket.close()
        self.http.close()


class _Body:
    """A body sent as it is made, with its length known: requests then sends Content-Length, as a browser does,
    rather than chunks."""

    def __init__(self, parts: list[bytes | Iterable[bytes]], length: int) -> None:
        self.parts, self.length = parts, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        for part in self.parts:
            if isinstance(part, bytes):
                yield part
            else:
                yield from part
