"""fetch_image against a real HTTP server on 127.0.0.1: limits, errors, redirects and the private-address guard."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

import inputs
from conftest import ROOT, Route, cannot_run, image_bytes
from inputs import FetchError, fetch_image

PNG = image_bytes("PNG", size=(64, 64))


def refused(url: str, **kwargs) -> str:
    with pytest.raises(FetchError) as caught:
        fetch_image(url, **kwargs)
    message = str(caught.value)
    assert url.strip() in message, message
    return message


# ------------------------------------------------------------ URL syntax and schemes (no connection made)

@pytest.mark.parametrize("url", ["http://", "http://[::1", "https:///path-only", "http://exa mple.com:99999/x"])
def test_invalid_url_syntax(url):
    assert "not a valid URL" in refused(url)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/cat.png", "data:image/png;base64,iVBORw0KGgo=",
                                 "gopher://127.0.0.1:70/", "javascript:alert(1)", "cat.png"])
def test_only_http_and_https_are_fetched(url):
    assert "only http:// and https://" in refused(url)


# ------------------------------------------------------------ the private-address guard is on by default

@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "0177.0.0.1", "127.1",
                                  "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"])
def test_loopback_is_refused_by_default_in_every_spelling(local_server, host, monkeypatch):
    monkeypatch.delenv("CIFAR10_ALLOW_PRIVATE_URLS", raising=False)
    local_server.routes["/cat.png"] = Route(body=PNG)
    message = refused(f"http://{host}:{local_server.port}/cat.png")
    assert "private or local address" in message
    assert local_server.requests == []


def test_the_policy_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("CIFAR10_ALLOW_PRIVATE_URLS", raising=False)
    assert inputs.private_url_policy() == "none"
    monkeypatch.setenv("CIFAR10_ALLOW_PRIVATE_URLS", "loopback")
    assert inputs.private_url_policy() == "loopback"
    monkeypatch.setenv("CIFAR10_ALLOW_PRIVATE_URLS", "1")
    assert inputs.private_url_policy() == "all"
    monkeypatch.setenv("CIFAR10_ALLOW_PRIVATE_URLS", "yes please")
    assert inputs.private_url_policy() == "none"


# ------------------------------------------------------------ responses (loopback allowed explicitly)

def test_an_image_is_fetched(local_server, allow_loopback_urls):
    local_server.routes["/cat.png"] = Route(body=PNG, headers={"Content-Type": "image/png"})
    assert fetch_image(local_server.url("/cat.png")) == PNG


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors(local_server, allow_loopback_urls, status):
    local_server.routes["/x.png"] = Route(status=status, body=b"oops")
    assert f"HTTP {status}" in refused(local_server.url("/x.png"))


def test_a_body_that_is_no_image_is_refused_when_decoded_naming_the_url(local_server, allow_loopback_urls):
    from inputs import InvalidImageError, read_image_input

    url = local_server.url("/page.png")
    local_server.routes["/page.png"] = Route(body=b"<html><body>not an image</body></html>",
                                             headers={"Content-Type": "image/png"})
    with pytest.raises(InvalidImageError) as caught:
        read_image_input(fetch_image(url), url)
    assert url in str(caught.value) and "not an accepted image" in str(caught.value)


class OneSlowResponse:
    """A one-connection HTTP server on 127.0.0.1 that sends a 200 with this Content-Length, then a byte of the
    body every `drip` seconds (never a byte if drip is None) until the client hangs up, which it records."""

    def __init__(self, content_length: int, drip: float | None) -> None:
        self.content_length, self.drip = content_length, drip
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.bytes_sent = 0
        self.hung_up = threading.Event()  # the client closed the connection
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, path: str = "/slow.png") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        self.listener.settimeout(10)
        try:
            connection, _ = self.listener.accept()
        except OSError:  # no client came
            return
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                received = connection.recv(4096)
                if not received:
                    return
                request += received
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                               b"Content-Length: %d\r\n\r\n" % self.content_length)
            while not self.stop.is_set():
                readable, _, _ = select.select([connection], [], [], self.drip or 0.05)
                try:
                    if readable and not connection.recv(1):
                        break  # end of stream: the client closed its side
                    if not readable and self.drip:
                        connection.send(b"\0")
                        self.bytes_sent += 1
                except OSError:  # reset: the client closed with unread bytes
                    break
            else:
                return
        self.hung_up.set()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def slow_response():
    made = []

    def make(content_length: int, drip: float | None) -> OneSlowResponse:
        made.append(OneSlowResponse(content_length, drip))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_declared_size_over_the_cap_is_refused_before_reading(slow_response, allow_loopback_urls):
    """Only the headers come, never a byte of the body: the refusal can only come from Content-Length."""
    server = slow_response(content_length=3 * 2**20, drip=None)
    message = refused(server.url(), max_bytes=2**20, deadline_s=5.0)
    assert "is 3.0 MB; the limit is 1 MB" in message
    assert server.hung_up.wait(2.0)  # and the connection was closed, not left waiting for the body


def test_a_body_dripping_past_the_deadline_is_abandoned_not_read_on(slow_response, allow_loopback_urls):
    """After fetch_image gives up, the worker must hang up, not go on reading the drip in the background."""
    server = slow_response(content_length=100_000, drip=0.05)  # 100,000 bytes at 20 a second
    assert "took longer than 1 s in all" in refused(server.url(), deadline_s=1.0)
    assert server.bytes_sent > 0  # the body had begun to arrive
    assert server.hung_up.wait(5.0), "the connection was still being read after fetch_image gave up"


def test_size_cap_holds_without_content_length(local_server, allow_loopback_urls):
    body = image_bytes("PNG", size=(300, 300), compress_level=0)
    local_server.routes["/stream.png"] = Route(body=body, content_length=None)
    assert "sent more than" in refused(local_server.url("/stream.png"), max_bytes=20_000)


def test_size_cap_counts_what_arrives_whatever_content_length_says(local_server, allow_loopback_urls):
    """A gzip body declares 30 KB and inflates to 30 MB: the cap stops it at 20 MB of decoded data."""
    import gzip

    body = gzip.compress(b"\0" * (30 << 20))
    assert len(body) < 100_000
    local_server.routes["/liar.png"] = Route(body=body, headers={"Content-Encoding": "gzip"})
    assert "sent more than the 20 MB limit" in refused(local_server.url("/liar.png"))


def test_slow_drip_hits_the_total_deadline(local_server, allow_loopback_urls):
    local_server.routes["/drip.png"] = Route(body=PNG, drip_delay=0.05)  # each read is quick, the whole is not
    started = time.monotonic()
    assert "took longer than 1 s in all" in refused(local_server.url("/drip.png"), deadline_s=1.0)
    assert time.monotonic() - started < 1.8  # near the deadline; the whole drip takes seconds


def test_one_deadline_covers_every_redirect_hop(local_server, allow_loopback_urls):
    """Five hops that each answer after 0.4 s: 2 s in all, past a 1 s deadline although no single hop is."""
    for hop in range(5):
        local_server.routes[f"/r{hop}"] = Route(status=302, headers={"Location": f"/r{hop + 1}"}, header_delay=0.4)
    local_server.routes["/r5"] = Route(body=PNG)
    started = time.monotonic()
    assert "took longer than 1 s in all" in refused(local_server.url("/r0"), deadline_s=1.0)
    assert time.monotonic() - started < 1.8  # near the deadline; the hops alone take 2 s
    assert fetch_image(local_server.url("/r0"), deadline_s=5.0) == PNG  # with the time it needs, it arrives


def test_connect_timeout(allow_loopback_urls, monkeypatch):
    """A listener whose accept queue is full never completes the handshake: the connect must time out."""
    monkeypatch.setattr(inputs, "URL_CONNECT_TIMEOUT", 1.0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.2)
        started = time.monotonic()
        assert "did not answer in time (ConnectTimeout)" in refused(f"http://127.0.0.1:{port}/slow.png")
        assert 0.9 < time.monotonic() - started < 1.9
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_five_redirects_are_followed(local_server, allow_loopback_urls):
    for hop in range(5):
        local_server.routes[f"/r{hop}"] = Route(status=302, headers={"Location": f"/r{hop + 1}"})
    local_server.routes["/r5"] = Route(body=PNG)
    assert fetch_image(local_server.url("/r0")) == PNG


def test_more_than_five_redirects_are_refused(local_server, allow_loopback_urls):
    for hop in range(6):
        local_server.routes[f"/r{hop}"] = Route(status=302, headers={"Location": f"/r{hop + 1}"})
    local_server.routes["/r6"] = Route(body=PNG)
    assert "redirects more than 5 times" in refused(local_server.url("/r0"))


def test_redirect_loop_is_refused(local_server, allow_loopback_urls):
    local_server.routes["/loop"] = Route(status=301, headers={"Location": "/loop"})
    assert "redirects more than" in refused(local_server.url("/loop"))


@pytest.mark.parametrize("target", ["file:///etc/passwd", "gopher://127.0.0.1/"])
def test_redirect_to_another_scheme_is_refused(local_server, allow_loopback_urls, target):
    local_server.routes["/go"] = Route(status=302, headers={"Location": target})
    assert f"redirects to {target!r}, which is not an http:// or https:// URL" in refused(local_server.url("/go"))


# ------------------------------------------------------------ private addresses, in a network namespace of our own
# fetch_image itself, guard and all, is tried on every kind of private and special address. It runs in a network
# namespace made for the purpose (unshare -n): only a loopback interface, no route out, so even a broken guard
# sends nothing off this machine. The namespace owns the unicast addresses and serves on all of them, so with
# the guard off those fetches succeed: the refusals are the guard's, not an unreachable network's.

# (host in the URL, whether the namespace serves it once private addresses are allowed)
PRIVATE_ADDRESSES = [
    ("10.0.0.1", True), ("172.16.5.4", True), ("192.168.1.1", True),          # RFC 1918
    ("169.254.169.254", True),                                                # link-local: cloud metadata
    ("100.64.0.1", True),                                                     # carrier-grade NAT
    ("198.18.0.1", True),                                                     # benchmarking
    ("0.0.0.0", True), ("[::]", True),                                        # "this host"
    ("224.0.0.1", False), ("[ff02::1]", False),                               # multicast
    ("240.0.0.1", False), ("255.255.255.255", False),                         # reserved, broadcast
    ("[fe80::1]", False), ("[fd00::1]", True),                                # IPv6 link-local, unique local
    ("[::ffff:10.0.0.1]", True), ("[::ffff:a9fe:a9fe]", True),                # IPv4-mapped IPv6
    ("[64:ff9b::a00:1]", False),                                              # NAT64
    ("167772161", True), ("0xa000001", True), ("012.0.0.1", True),            # 10.0.0.1 spelt otherwise
]
NAMESPACE_OWNS = ["10.0.0.1/32", "172.16.5.4/32", "192.168.1.1/32", "169.254.169.254/32", "100.64.0.1/32",
                  "198.18.0.1/32", "fd00::1/128"]

NAMESPACE_SCRIPT = r"""
import json, os, socket, subprocess, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

for family in ("-4", "-6"):
    if subprocess.run(["ip", family, "route", "show", "default"], capture_output=True, text=True).stdout.strip():
        sys.exit("refusing to run: this namespace has a default route")
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for address in json.loads(sys.argv[3]):
    subprocess.run(["ip", "addr", "add", address, "dev", "lo"], check=True)

png = bytes.fromhex(sys.argv[1])
hits = []

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        hits.append(self.connection.getsockname()[0].removeprefix('::ffff:') + self.path)
        if self.path == "/hop":
            self.send_response(302); self.send_header("Location", "http://169.254.169.254:8080/x.png"); self.end_headers()
            return
        self.send_response(200); self.send_header("Content-Length", str(len(png))); self.end_headers(); self.wfile.write(png)
    def log_message(self, *args): pass

class EveryAddress(ThreadingHTTPServer):  # [::]:8080, IPv4 too: every address the namespace has
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

server = EveryAddress(("::", 8080), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()

sys.path.insert(0, sys.argv[2])
import inputs

def attempt(url):
    try:
        return "ok" if inputs.fetch_image(url, deadline_s=5.0) == png else "wrong body"
    except inputs.FetchError as error:
        return str(error)

urls = ["http://%s:8080/x.png" % host for host in json.loads(sys.argv[4])]
results = {}
for policy in ("", "loopback", "1"):
    os.environ["CIFAR10_ALLOW_PRIVATE_URLS"] = policy
    del hits[:]
    results[policy or "default"] = {url: attempt(url) for url in urls}
    results[(policy or "default") + " hits"] = list(hits)
os.environ["CIFAR10_ALLOW_PRIVATE_URLS"] = "loopback"
del hits[:]
results["loopback direct"] = attempt("http://127.0.0.1:8080/x.png")
results["loopback hop"] = attempt("http://127.0.0.1:8080/hop")
results["loopback hop hits"] = list(hits)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def namespace():
    """What fetch_image made of every private address, under each policy, in a network namespace of its own."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        cannot_run("needs unshare and ip (util-linux, iproute2) to build a private network namespace")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        cannot_run(f"cannot create a network namespace here: {probe.stderr.decode().strip()}")
    env = {key: value for key, value in os.environ.items() if key != "CIFAR10_ALLOW_PRIVATE_URLS"}
    run = subprocess.run(["unshare", "-n", sys.executable, "-c", NAMESPACE_SCRIPT, PNG.hex(), str(ROOT),
                          json.dumps(NAMESPACE_OWNS), json.dumps([host for host, _ in PRIVATE_ADDRESSES])],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("host, served", PRIVATE_ADDRESSES, ids=[host for host, _ in PRIVATE_ADDRESSES])
def test_fetch_image_refuses_every_private_and_special_address(namespace, host, served):
    url = f"http://{host}:8080/x.png"
    for policy in ("default", "loopback"):
        assert "private or local address" in namespace[policy][url] and url in namespace[policy][url], \
            (policy, namespace[policy][url])
    # The control: with private addresses allowed the guard says nothing, and what the namespace serves arrives.
    allowed = namespace["1"][url]
    assert "private or local address" not in allowed and (allowed == "ok") == served, allowed


def test_the_guard_refuses_before_connecting(namespace):
    assert namespace["default hits"] == [] and namespace["loopback hits"] == []
    assert len(namespace["1 hits"]) == sum(served for _, served in PRIVATE_ADDRESSES)


def test_loopback_policy_allows_loopback_but_not_a_redirect_to_a_private_address(namespace):
    assert namespace["loopback direct"] == "ok"
    assert "private or local address" in namespace["loopback hop"]
    assert namespace["loopback hop hits"] == ["127.0.0.1/x.png", "127.0.0.1/hop"]  # the redirect never connected
