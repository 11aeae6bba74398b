"""A real OpenID Connect provider and a real HAProxy on 127.0.0.1, started for the team (sign-in) tests.

Like `servers.py`: each lives in a temporary folder on free ports and is stopped (and its folder removed) on
close. The provider is `oidc-provider` from npm (the version pinned in `tests/oidc/package.json`, installed
with `npm ci --prefix tests/oidc`) run by Node.js 20 through `tests/oidc/provider.mjs`; HAProxy is Debian's
`haproxy` package, run as a plain foreground process on the shipped `deploy/haproxy.cfg`, its addresses
given through the environment variables that file reads.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from servers import ServerUnavailable, free_port

ROOT = Path(__file__).resolve().parent.parent
OIDC_DIR = Path(__file__).resolve().parent / "oidc"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
STICKY_COOKIE = "CIFAR10_SERVER"

# The two people of the tests: e-mail -> password.
USERS = {"alice@example.com": "alice-password", "bob@example.com": "bob-password"}


def _node() -> str:
    node = shutil.which("node")
    if not node:
        raise ServerUnavailable("node not found: install Node.js 20 (Debian: apt-get install nodejs)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    match = re.match(r"v(\d+)\.", version)
    if not match or int(match.group(1)) < 20:
        raise ServerUnavailable(f"node {version or '(unknown version)'} is too old: install Node.js 20 or later")
    if not (OIDC_DIR / "node_modules" / "oidc-provider" / "package.json").exists():
        raise ServerUnavailable(f"oidc-provider is not installed: run npm ci --prefix {OIDC_DIR}")
    return node


class _Server:
    """A program run in its own session, logging to `folder/log`; subclasses set `folder` and `process`."""

    folder: Path
    process: subprocess.Popen | None

    def _launch(self, command: list[str], what: str, timeout: float, **popen) -> None:
        """Start `command` and poll `self._ready()` until it is true; raise with the log's tail when the program
        exits or time is up."""
        log_path = self.folder / "log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            **popen)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{what} exited ({self.process.returncode}): {self.log()[-3000:]}")
            if self._ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{what} did not start in {timeout:.0f} s: {self.log()[-3000:]}")

    def _ready(self) -> bool:
        raise NotImplementedError

    def log(self) -> str:
        return (self.folder / "log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class OidcProvider(_Server):
    """`oidc-provider` with the people in `users` (e-mail -> password) and one client, the app.

    `redirect_uris` are the app's callback URLs (`http://127.0.0.1:<port>/oauth2callback`, one per address a
    browser opens: each server, or the balancer); left empty, any port of 127.0.0.1 is accepted for
    `/oauth2callback` (handy when the servers' ports are chosen later). They are also the URLs allowed after
    sign-out (st.logout sends the person to the provider's end_session_endpoint and back to redirect_uri).
    The sign-in page has the fields `email` and `password` and the button "Sign in".
    """

    users: dict[str, str] = field(default_factory=lambda: dict(USERS))
    redirect_uris: list[str] = field(default_factory=list)
    client_id: str = "cifar10"
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cifar10-oidc-")))
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.process: subprocess.Popen | None = None
        try:
            self.node = _node()
            self._write_config()
            self.start()
        except BaseException:
            self.close()
            raise

    def _write_config(self) -> None:
        self.config = self.folder / "config.json"
        self.config.write_text(json.dumps({
            "port": self.port,
            "issuer": self.issuer,
            "users": [{"email": email, "password": password, "name": email.split("@")[0].capitalize()}
                      for email, password in self.users.items()],
            "clients": [{"client_id": self.client_id, "client_secret": self.client_secret,
                         "redirect_uris": self.redirect_uris or ["http://127.0.0.1/oauth2callback"]}],
            "any_loopback_port": not self.redirect_uris,
        }))

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metadata_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def auth_settings(self, redirect_uri: str, cookie_secret: str | None = None) -> dict[str, str]:
        """The `[auth]` section of `.streamlit/secrets.toml` for an app that this provider signs in.

        `redirect_uri` is on the address the browser opens (the balancer's, behind HAProxy: Streamlit checks
        that the websocket's origin is redirect_uri's); Streamlit replaces `{port}` in it with server.port.
        Every server behind one balancer needs the same `cookie_secret`.
        """
        return {"redirect_uri": redirect_uri, "cookie_secret": cookie_secret or secrets.token_hex(32),
                "client_id": self.client_id, "client_secret": self.client_secret,
                "server_metadata_url": self.metadata_url}

    def auth_toml(self, redirect_uri: str, cookie_secret: str | None = None) -> str:
        """`auth_settings` as TOML text, to write into (or append to) a secrets.toml."""
        lines = [f"{key} = {json.dumps(value)}" for key, value in self.auth_settings(redirect_uri, cookie_secret).items()]
        return "[auth]\n" + "\n".join(lines) + "\n"

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.metadata_url, timeout=1) as response:
                return json.load(response).get("issuer") == self.issuer
        except (OSError, ValueError):
            return False

    def start(self) -> None:
        self._launch([self.node, str(OIDC_DIR / "provider.mjs"), str(self.config)], "oidc-provider", 60, cwd=OIDC_DIR)


def _haproxy() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                             if os.access(p, os.X_OK)), None)
    if not found:
        raise ServerUnavailable("haproxy not found: install Debian's haproxy package")
    return found


@dataclass
class HAProxy(_Server):
    """HAProxy on `deploy/haproxy.cfg` in front of `servers` ("127.0.0.1:port", in the order s1, s2, ...).

    The shipped file names two servers; for another number a copy with one `server` line per address is used.
    `url` is what browsers open; `states()` reads the status page (server name -> "UP", "DOWN", ...);
    `cookie(n)` is the sticky cookie that sends a browser to server n (1-based), for Playwright's add_cookies.
    """

    servers: list[str]
    port: int = field(default_factory=free_port)
    stats_port: int = field(default_factory=free_port)
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cifar10-haproxy-")))
    config: Path = HAPROXY_CFG

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("HAProxy needs at least one server")
        self.process: subprocess.Popen | None = None
        try:
            self.haproxy = _haproxy()
            if len(self.servers) != 2:
                self.config = self._config_for(len(self.servers))
            self.start()
        except BaseException:
            self.close()
            raise

    def _config_for(self, count: int) -> Path:
        text = self.config.read_text()
        lines = text.splitlines()
        server_lines = [i for i, line in enumerate(lines) if re.match(r"\s+server s\d+ ", line)]
        template = lines[server_lines[0]]
        new = [re.sub(r"\bs1\b", f"s{n}", template).replace("CIFAR10_SERVER_1", f"CIFAR10_SERVER_{n}")
               for n in range(1, count + 1)]
        lines[server_lines[0]:server_lines[-1] + 1] = new
        path = self.folder / "haproxy.cfg"
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.stats_port}/stats"

    def env(self) -> dict[str, str]:
        """The variables deploy/haproxy.cfg reads."""
        variables = {"CIFAR10_LISTEN": f"127.0.0.1:{self.port}", "CIFAR10_STATS": f"127.0.0.1:{self.stats_port}"}
        variables.update({f"CIFAR10_SERVER_{n}": address for n, address in enumerate(self.servers, 1)})
        return variables

    def cookie(self, server: int) -> dict[str, str]:
        return {"name": STICKY_COOKIE, "value": f"s{server}", "url": self.url}

    def states(self) -> dict[str, str]:
        """Each server's state on the status page: {"s1": "UP", "s2": "DOWN", ...}; none while the page answers
        something without its table's header (seen once in the suite, under load): wait_for asks again."""
        with urllib.request.urlopen(self.stats_url + ";csv", timeout=5) as response:
            rows = csv.DictReader(io.StringIO(response.read().decode().lstrip("# ")))
            return {row["svname"]: row["status"] for row in rows
                    if row.get("pxname") == "streamlit" and row.get("svname") not in ("FRONTEND", "BACKEND")}

    def wait_for(self, state: str = "UP", servers: list[str] | None = None, timeout: float = 60) -> None:
        """Waits until the health checks see `servers` (names, all by default) in `state` ("UP" or "DOWN")."""
        names = servers or [f"s{n}" for n in range(1, len(self.servers) + 1)]
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            if all(states.get(name) == state for name in names):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy servers are {states}, not all {state}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            self.states()
            return True
        except (OSError, ValueError):
            return False

    def start(self) -> None:
        check = subprocess.run([self.haproxy, "-c", "-q", "-f", str(self.config)], capture_output=True, text=True,
                               env={**os.environ, **self.env()}, timeout=60)
        if check.returncode != 0:
            raise RuntimeError(f"{self.config} is not valid: {check.stdout}{check.stderr}")
        # Its log has one line per request: the server it went to, `--VN` where the sticky cookie was honoured.
        self._launch([self.haproxy, "-f", str(self.config), "-db"], "haproxy", 30, env={**os.environ, **self.env()})
