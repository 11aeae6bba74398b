"""Records in PostgreSQL (a team, several servers): what differs from SQLite is here, the SQL is in sql.py."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from records import StoreError
from settings import DATABASE_URL_ENV, passwords_in, split_url
from sql import Cursor


POOL_CHECK_S = 1.0   # how long a request waits for a pooled connection before checking the server is up
BUSY_WAIT_S = 30.0   # how long it waits in all while the server is up but every connection is in use


class PostgresDatabase:
    """A PostgreSQL database through a psycopg 3 connection pool shared by every session of this process."""

    placeholder = "%s"
    MIGRATION_LOCK = 0x0C1FA410  # the advisory lock every server takes to migrate, so only one does

    def __init__(self, url: str) -> None:
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        parts = split_url(DATABASE_URL_ENV, url, ("postgresql", "postgres"),
                           "postgresql://user:password@host:port/database")
        self.url = url
        self._passwords = passwords_in(parts)
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"
        self.description = f"the PostgreSQL database at {where}"
        self._down = False
        self._probe()  # at once, in the server's own words, rather than after the pool's timeout
        self.pool = ConnectionPool(url, min_size=1, max_size=10, open=True, check=ConnectionPool.check_connection,
                                   kwargs={"connect_timeout": 3, "row_factory": dict_row})

    @contextmanager
    def transaction(self, write: bool) -> Iterator[Cursor]:
        """A write first locks the store_meta row: writers queue there, as BEGIN IMMEDIATE makes them on SQLite."""
        if self._down:
            self._probe()  # while it is still down, fail now instead of waiting out the pool's timeout
        with self._errors(), self._pooled() as connection:
            cursor = Cursor(connection, self.placeholder)
            if write:
                cursor.execute("SELECT id FROM store_meta WHERE id = 1 FOR UPDATE")
            yield cursor

    @contextmanager
    def _pooled(self) -> Iterator:
        """A connection from the pool, its transaction committed on success. The wait for one is checked every
        POOL_CHECK_S: a server that went down is said so at once, a busy one is waited for up to BUSY_WAIT_S."""
        from psycopg_pool import PoolTimeout

        waited = 0.0
        while True:
            try:
                connection = self.pool.getconn(timeout=POOL_CHECK_S)
                break
            except PoolTimeout:
                self._probe()  # raises StoreError, saying why, when the server cannot be reached
                waited += POOL_CHECK_S
                if waited >= BUSY_WAIT_S:
                    raise
        try:
            with connection:
                yield connection
        finally:
            self.pool.putconn(connection)

    def fingerprint(self, cursor: Cursor) -> str:
        """Which database this is, whatever its content: a dump restored into another database, or into another
        cluster, differs in the oids of the database and its tables, its name or the cluster's system identifier; a
        failover to a standby does not (nor does a physical copy of the cluster: give one its own image store)."""
        system = ""
        if cursor.one("SELECT has_function_privilege('pg_control_system()', 'EXECUTE') AS allowed")["allowed"]:
            system = cursor.one("SELECT system_identifier FROM pg_control_system()")["system_identifier"]
        row = cursor.one("SELECT oid, datname, 'store_meta'::regclass::oid AS meta FROM pg_database "
                         "WHERE datname = current_database()")  # a restored dump creates its tables anew
        return f"postgresql:{system}:{row['oid']}:{row['datname']}:{row['meta']}"

    def schema_version(self) -> int:
        """Read without writing anything, so a read-only database (a standby, maintenance) still opens."""
        with self.transaction(write=False) as cursor:
            if cursor.one("SELECT to_regclass('schema_version') IS NOT NULL AS present")["present"]:
                row = cursor.one("SELECT version FROM schema_version")
                return row["version"] if row else 0
            return 0

    def migrate(self, run: Callable[[Cursor, int], int]) -> int:
        with self._errors(), self._pooled() as connection:
            cursor = Cursor(connection, self.placeholder)
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (self.MIGRATION_LOCK,))
            cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = cursor.one("SELECT version FROM schema_version")
            version = row["version"] if row else 0
            reached = run(cursor, version)
            if reached != version:
                cursor.execute("DELETE FROM schema_version")
                cursor.execute("INSERT INTO schema_version (version) VALUES (%s)", (reached,))
        return reached

    @contextmanager
    def _errors(self) -> Iterator[None]:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            yield
        except psycopg.errors.ReadOnlySqlTransaction as error:
            raise StoreError(f"{self.description} is read-only (a standby after a failover, or maintenance): nothing "
                             "was written. Everything saved can still be read; write again once it accepts "
                             "writes.") from error
        except (PoolTimeout, psycopg.OperationalError) as error:
            self._down = True
            if isinstance(error, PoolTimeout):
                self._probe()  # the pool only says it timed out; a direct attempt says why
            raise self._failure(error) from error
        except psycopg.Error as error:  # a constraint or trigger refused a row: the server works
            raise StoreError(f"{self.description} refused the change ({' '.join(str(error).split())}).") from error

    def _probe(self) -> None:
        """One direct connection: raises StoreError saying why (refused, wrong password, no such database)."""
        import psycopg

        try:
            psycopg.connect(self.url, connect_timeout=3).close()
        except psycopg.Error as error:
            self._down = True
            raise self._failure(error) from error
        self._down = False

    def _failure(self, error: Exception) -> StoreError:
        """The error in psycopg's words, which quote the URL (and so its password) when they cannot parse it."""
        reason = str(error)
        for password in sorted(self._passwords, key=len, reverse=True):
            reason = reason.replace(password, "***")
        reason = " ".join(reason.split()) or error.__class__.__name__
        return StoreError(f"{self.description} could not be used ({reason}). Check that it is running and that "
                          f"{DATABASE_URL_ENV} has the right host, port, user and password.")

    def close(self) -> None:
        self.pool.close()
