"""Records in one SQLite file (a personal install): what differs from PostgreSQL is here, the SQL is in sql.py."""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from records import StoreError
from settings import DB_PATH_ENV
from sql import Cursor

BUSY_TIMEOUT_S = 30  # how long a connection waits for another's write lock before it gives up


class SQLiteDatabase:
    """One SQLite file in WAL mode; every call opens its own connection (safe across Streamlit's threads)."""

    placeholder = "?"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.description = f"the SQLite database {self.path}"

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        connection.row_factory = sqlite3.Row
        return connection

    @contextmanager
    def transaction(self, write: bool) -> Iterator[Cursor]:
        """BEGIN IMMEDIATE takes the write lock up front, so writers queue on busy_timeout instead of failing."""
        with self._errors():
            connection = self._connect()
            try:
                connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield Cursor(connection, self.placeholder)
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
            finally:
                connection.close()

    def fingerprint(self, cursor: Cursor) -> str:
        """Which database this is, whatever its content: a copy of the file is another file (another inode), and
        a copy at another path is another path, on this machine or another."""
        return f"sqlite:{os.path.realpath(self.path)}:{os.stat(self.path).st_ino}"

    def schema_version(self) -> int:
        with self.transaction(write=False) as cursor:
            return cursor.one("PRAGMA user_version")[0]

    def migrate(self, run: Callable[[Cursor, int], int]) -> int:
        with self._errors():
            self._use_wal()
        with self.transaction(write=True) as cursor:
            version = cursor.one("PRAGMA user_version")[0]
            reached = run(cursor, version)
            if reached != version:
                cursor.execute(f"PRAGMA user_version = {int(reached)}")
        return reached

    def _use_wal(self) -> None:
        """WAL is persistent and only settable outside a transaction. Switching a new file to it needs the write
        lock, and there SQLite answers "locked" at once rather than call the busy handler (it could deadlock), so
        several servers starting on one new file take turns here."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            connection = self._connect()
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
            finally:
                connection.close()
            time.sleep(0.05)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as error:  # a constraint or trigger refused a row: nothing to check here
            raise StoreError(f"{self.description} refused the change ({' '.join(str(error).split())}).") from error
        except sqlite3.DatabaseError as error:
            raise StoreError(f"{self.description} failed ({error}). Check that it and its folder are writable, "
                             f"the disk is not full, and {DB_PATH_ENV} points at the right file.") from error

    def close(self) -> None:
        pass
