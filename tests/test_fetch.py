"""fetch_image against a real HTTP server on 127.0.0.1: limits, errors, redirects and the private-address guard."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
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


@pytest.mark.parametrize("address", ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                                     "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::", "fe80::1",
                                     "fd00::1", "ff02::1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a00:1"])
def test_address_check_refuses_private_and_special_ranges(address):
    """The check itself, as a pure function: numeric hosts resolve without any network traffic."""
    from requests_hardened.ip_filter import InvalidIPAddress, get_ip_address

    with pytest.raises(InvalidIPAddress):
        get_ip_address(address, 80, allow_loopback=False)


def test_loopback_policy_allows_only_loopback(monkeypatch):
    from requests_hardened.ip_filter import InvalidIPAddress, get_ip_address

    assert str(get_ip_address("127.0.0.1", 80, allow_loopback=True)[0]) == "127.0.0.1"
    with pytest.raises(InvalidIPAddress):
        get_ip_address("169.254.169.254", 80, allow_loopback=True)
    monkeypatch.setenv("CIFAR10_ALLOW_PRIVATE_URLS", "loopback")
    assert inputs.private_url_policy() == "loopback"
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


def test_declared_size_over_the_cap_is_refused_before_reading(local_server, allow_loopback_urls):
    local_server.routes["/big.png"] = Route(body=PNG)
    assert "limit" in refused(local_server.url("/big.png"), max_bytes=len(PNG) - 1)


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

NAMESPACE_SCRIPT = r"""
import json, os, subprocess, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True).stdout.strip():
    sys.exit("refusing to run: this namespace has a default route")
for command in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "10.0.0.1/32", "dev", "lo"],
                ["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"], ["ip", "-6", "addr", "add", "fd00::1/128", "dev", "lo"]):
    subprocess.run(command, check=True)

png = bytes.fromhex(sys.argv[1])
hits = []

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        hits.append(self.server.server_address[0] + self.path)
        if self.path == "/hop":
            self.send_response(302); self.send_header("Location", "http://169.254.169.254:8080/latest/meta-data"); self.end_headers()
            return
        self.send_response(200); self.send_header("Content-Length", str(len(png))); self.end_headers(); self.wfile.write(png)
    def log_message(self, *args): pass

class Server6(ThreadingHTTPServer):
    import socket
    address_family = socket.AF_INET6

servers = [ThreadingHTTPServer((host, 8080), Handler) for host in ("127.0.0.1", "10.0.0.1", "169.254.169.254")]
servers.append(Server6(("fd00::1", 8080), Handler))
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()

sys.path.insert(0, sys.argv[2])
import inputs

def attempt(url):
    try:
        return "ok" if inputs.fetch_image(url) == png else "wrong body"
    except inputs.FetchError as error:
        return str(error)

urls = ["http://10.0.0.1:8080/x.png", "http://169.254.169.254:8080/latest/meta-data", "http://[fd00::1]:8080/x.png",
        "http://[::ffff:a00:1]:8080/x.png", "http://167772161:8080/x.png"]
results = {"default": {url: attempt(url) for url in urls}, "hits_default": list(hits)}
os.environ["CIFAR10_ALLOW_PRIVATE_URLS"] = "loopback"
results["hop"] = attempt("http://127.0.0.1:8080/hop")
results["hits_hop"] = list(hits)
os.environ["CIFAR10_ALLOW_PRIVATE_URLS"] = "1"
results["allowed"] = {url: attempt(url) for url in urls}
print(json.dumps(results))
"""


def test_private_link_local_and_metadata_addresses_are_refused_in_a_private_namespace(tmp_path):
    if not shutil.which("unshare") or not shutil.which("ip"):
        cannot_run("needs unshare and ip (util-linux, iproute2) to build a private network namespace")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        cannot_run(f"cannot create a network namespace here: {probe.stderr.decode().strip()}")
    env = {key: value for key, value in os.environ.items() if key != "CIFAR10_ALLOW_PRIVATE_URLS"}
    run = subprocess.run(["unshare", "-n", sys.executable, "-c", NAMESPACE_SCRIPT, PNG.hex(), str(ROOT)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for url, outcome in results["default"].items():
        assert "private or local address" in outcome, (url, outcome)
    assert results["hits_default"] == []
    # Loopback allowed: the first hop goes through, the redirect to the metadata address does not.
    assert "private or local address" in results["hop"]
    assert results["hits_hop"] == ["127.0.0.1/hop"]
    # The same servers are reachable once private addresses are allowed: the refusals above were the guard.
    assert all(outcome == "ok" for outcome in results["allowed"].values()), results["allowed"]
