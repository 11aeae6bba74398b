"""The one data layer: saved predictions (records) and their images, for both pages and the command line.

    python db.py export FILE.zip   # every record and image: ImageFolder by final label + labels.csv, streamed
    python db.py import FILE.zip   # restore such an archive (or a plain ImageFolder ZIP) into the configured store

Records live in SQLite (CIFAR10_DB_PATH) or, when CIFAR10_DATABASE_URL is set, PostgreSQL; images, named by
content hash, in a folder (CIFAR10_IMAGE_DIR) or, when CIFAR10_IMAGE_STORE=s3://bucket/prefix is set, any
S3-compatible object store. One set of SQL statements serves both databases; `SQLiteDatabase` and
`PostgresDatabase` hold every difference between them.

What keeps rows and images consistent, whatever is killed when and however many servers share the store:
- every write runs under one store-wide write lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: the store_meta row);
- an image is written before the row naming it commits, under that lock;
- an image is removed only under that lock, after the deletion of its row committed, and only if no row names
  it then: a concurrent save of the same picture either finished first (its row keeps the image) or starts after
  (and writes the image again);
- the leftovers of a killed save are removed only among names this store writes, older than a grace period;
- nothing is removed from an image store that another database also uses (each database leaves a marker).
"""

from __future__ import annotations

import csv
import functools
import hmac
import io
import lzma
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, Sequence
from urllib.parse import SplitResult, unquote, urlsplit

if TYPE_CHECKING:  # for annotations only: inputs imports Pillow, which the command line loads only to import
    from inputs import ImageInput

ROOT = Path(__file__).resolve().parent
DB_PATH_ENV = "CIFAR10_DB_PATH"
DATABASE_URL_ENV = "CIFAR10_DATABASE_URL"
IMAGE_DIR_ENV = "CIFAR10_IMAGE_DIR"
IMAGE_STORE_ENV = "CIFAR10_IMAGE_STORE"
ADMIN_PASSWORD_ENV = "CIFAR10_ADMIN_PASSWORD"
# Both next to app.py, whatever the working directory: a server started elsewhere finds the same store.
DEFAULT_DB_PATH = ROOT / "image_classification.db"
DEFAULT_IMAGE_DIR = ROOT / "temp_images"
# The secrets files the admin password is read from when it is not in the environment, first one wins; None:
# those Streamlit reads by default (secrets_files()). Tests set their own.
SECRETS_FILES: tuple[Path, ...] | None = None

# A save takes seconds; an image without a row that is older than this was left by a save that died.
LEFTOVER_GRACE_S = 15 * 60
# Images whose removal failed (image store down) are removed again in the background: first after this many
# seconds, then twice as long each time, up to the maximum, until it works.
CLEANUP_RETRY_S = 5.0
CLEANUP_RETRY_MAX_S = 300.0
# Rows per statement and images per lock: bounded memory and SQLite's variable limit, few round trips.
BATCH = 500
# Image uploads and downloads in flight at once (object stores answer many requests in parallel).
IMAGE_THREADS = 8
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
# An exported labels.csv row is a few hundred characters (csv's own limit is 128 KiB a field): a longer one is
# refused before it is read whole, so reading labels.csv takes memory that does not grow with it.
MAX_MANIFEST_ROW_CHARS = 256 * 1024
# What zipfile can inflate; the names of other methods met in the wild, for the error that refuses them.
READABLE_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
COMPRESSION_NAMES = {6: "Implode", 9: "Deflate64", 93: "Zstandard", 95: "XZ", 98: "PPMd"}
# Images are stored compressed; a member that inflates more than this is not an image but a bomb.
MAX_COMPRESSION_RATIO = 100

# .mpo: what older versions named multi-picture JPEGs; they are removed like any other image.
IMAGE_NAME = re.compile(r"^[0-9a-f]{64}\.(jpg|png|gif|webp|mpo)$")
PARTIAL_PREFIX = ".partial-"
OWNERS_SUFFIX = ".owners"  # which databases use an image store: .<folder>.owners/<id>, <prefix>.owners/<id> on S3
COLUMNS = ("id", "content_hash", "image_file", "source", "predicted_label", "confidence", "final_label",
           "is_correct", "created_at", "model_version", "edits", "is_ood", "ood_score")
EXPORT_COLUMNS = ("id", "source", "predicted_label", "confidence", "final_label", "is_correct", "created_at",
                  "model_version", "content_hash", "edits", "is_ood", "ood_score")

# Each entry upgrades the schema by one version, in one transaction with the version number, under a lock.
# Written once for both databases (SQLite reads DOUBLE PRECISION as REAL and BIGINT as INTEGER).
MIGRATIONS = (
    """
    CREATE TABLE predictions (
        id INTEGER PRIMARY KEY,
        content_hash TEXT NOT NULL UNIQUE,
        image_file TEXT NOT NULL,
        source TEXT NOT NULL,
        predicted_label TEXT NOT NULL,
        confidence DOUBLE PRECISION NOT NULL CHECK (confidence BETWEEN 0 AND 1),
        final_label TEXT NOT NULL,
        is_correct INTEGER NOT NULL CHECK (is_correct IN (0, 1)),
        created_at TEXT NOT NULL
    );
    CREATE INDEX predictions_final_label ON predictions (final_label);
    """,
    """
    ALTER TABLE predictions ADD COLUMN model_version TEXT NOT NULL DEFAULT 'unknown';
    """,
    # store_meta: the id of this database (its marker in the image store), a revision every write bumps (what
    # caches key on) and the last id handed out, so ids are never reused; its row is also PostgreSQL's write lock.
    """
    CREATE TABLE store_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        store_id TEXT NOT NULL,
        revision BIGINT NOT NULL,
        last_id BIGINT NOT NULL
    );
    INSERT INTO store_meta (id, store_id, revision, last_id) SELECT 1, '', 0, COALESCE(MAX(id), 0) FROM predictions;
    ALTER TABLE predictions ADD COLUMN edits INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX predictions_created_at ON predictions (created_at, id);
    """,
    # The model's "maybe none of the ten" flag and score as they were when saved (no score for older records).
    """
    ALTER TABLE predictions ADD COLUMN is_ood INTEGER NOT NULL DEFAULT 0 CHECK (is_ood IN (0, 1));
    ALTER TABLE predictions ADD COLUMN ood_score DOUBLE PRECISION;
    """,
    # A small JPEG of each image, so History shows a page of them from one query, whatever the image store
    # (BYTEA: PostgreSQL's bytes; SQLite stores bytes as they are under any type name). Older records have none.
    """
    ALTER TABLE predictions ADD COLUMN thumbnail BYTEA;
    """,
    # The indexes for the sidebar summary and the date range. They were first added to migration 3 after it had
    # shipped, so databases migrated before that lacked them: a released migration is never edited, this one adds.
    """
    DROP INDEX IF EXISTS predictions_final_label;
    CREATE INDEX IF NOT EXISTS predictions_created_at ON predictions (created_at, id);
    CREATE INDEX IF NOT EXISTS predictions_labels ON predictions (final_label, predicted_label, is_correct);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The database or the image store failed; the message names which one and what to check."""


class SettingsError(StoreError):
    """A setting cannot be used as written (malformed, or where it is not read). The message names the setting or
    file and what is wrong, never a password; a StoreError, so every page and the command line show it."""


class ImageMissing(StoreError):
    """A record's image is not in the image store (a row left by an older version's bug)."""


class ArchiveError(ValueError):
    """An archive cannot be imported; the message names the member (or line) and what is wrong with it."""


# ---------------------------------------------------------------- records and changes

@dataclass(frozen=True)
class NewPrediction:
    """What the app hands over to be saved for one image."""

    content_hash: str
    data: bytes
    extension: str
    source: str
    predicted_label: str
    confidence: float
    final_label: str
    model_version: str
    is_ood: bool = False
    ood_score: float | None = None
    thumbnail: bytes | None = None    # display.THUMBNAIL_SIZE JPEG; History makes one from the image when absent


@dataclass(frozen=True)
class SavedPrediction:
    id: int
    content_hash: str
    image_file: str
    source: str
    predicted_label: str
    confidence: float
    final_label: str
    is_correct: bool
    created_at: str
    model_version: str
    edits: int = 0
    is_ood: bool = False
    ood_score: float | None = None


@dataclass(frozen=True)
class DeletedPrediction:
    """A deleted record with its image bytes and stored thumbnail, kept so that one deletion can be undone."""

    record: SavedPrediction
    data: bytes
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class Change:
    """One save or delete, exactly: which records it created, relabelled or removed, as they were left.

    Undo touches a record only if it is still as this change left it (same id, same edit count)."""

    description: str
    created: tuple[tuple[int, int], ...] = ()                # (id, edits)
    relabelled: tuple[tuple[int, int, str], ...] = ()        # (id, edits after the change, previous final label)
    deleted: tuple[DeletedPrediction, ...] = ()
    removal_note: str = ""   # why images of deleted records are still in the image store (failing or shared)


@dataclass(frozen=True)
class ClearResult:
    deleted: int          # records
    removal_note: str     # why their images are still in the image store (failing, or shared), or ""


@dataclass
class ExportTally:
    """What an export wrote, and the records it left out because their image is missing from the image store."""

    written: int = 0
    missing: list[SavedPrediction] = field(default_factory=list)


@dataclass(frozen=True)
class SaveResult:
    saved: int
    updated: int
    unchanged: int
    change: Change | None


@dataclass(frozen=True)
class RecordFilter:
    """Which records History shows: some final labels, only corrections, a range of days (UTC)."""

    labels: tuple[str, ...] = ()
    corrected_only: bool = False
    flagged_only: bool = False        # only those the model said were maybe none of the ten
    since: date | None = None
    until: date | None = None


@dataclass(frozen=True)
class Summary:
    """What the sidebar draws: counts per final label, confirmed vs corrected, and the confusion matrix."""

    class_counts: dict[str, int]
    correct: int
    incorrect: int
    confusion: list[list[int]]

    @property
    def total(self) -> int:
        return self.correct + self.incorrect


def image_name(content_hash: str, extension: str) -> str:
    return f"{content_hash}.{extension}"


def secrets_files() -> tuple[Path, ...]:
    """SECRETS_FILES, else the secrets.toml files Streamlit reads by default, the one that wins first: the app's
    folder's (Streamlit's script-level file), the working directory's, the user's (~/.streamlit). Computed on
    each call, as the working directory can change; Streamlit is not imported (the data layer runs without it)."""
    if SECRETS_FILES is not None:
        return SECRETS_FILES
    folders = [ROOT]
    for where in (Path.cwd, Path.home):
        try:
            folders.append(where())
        except (OSError, RuntimeError):  # a working directory since deleted; no home directory
            continue
    return tuple(dict.fromkeys(Path(os.path.abspath(folder / ".streamlit" / "secrets.toml")) for folder in folders))


def configured_admin_password() -> str | None:
    """CIFAR10_ADMIN_PASSWORD from the environment (empty: unset), else from the top level of a secrets file
    (secrets_files()); None when none sets it. Files are read on every check, so a fixed one counts without a
    restart.

    Fails closed: a secrets file that cannot be read or parsed, that sets the password under a [section] (where
    it is not read), or to anything but a non-empty text (0, false, "", []), raises SettingsError; taken as "no
    password", a wrong one would delete everything."""
    if os.environ.get(ADMIN_PASSWORD_ENV):
        return os.environ[ADMIN_PASSWORD_ENV]
    import tomllib

    found = None
    for secrets in secrets_files():
        try:
            settings = tomllib.loads(secrets.read_bytes().decode())
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, ValueError) as error:  # unreadable, not UTF-8, not TOML (tomllib quotes at most a key or one character)
            reason = error.strerror if isinstance(error, OSError) else str(error)
            raise SettingsError(f"The secrets file {secrets} cannot be read ({reason}), so the admin password is "
                                "unknown: deleting and importing are refused until it is fixed (a text value "
                                f'needs quotes: {ADMIN_PASSWORD_ENV} = "...").') from error
        section = _section_setting(settings, ADMIN_PASSWORD_ENV)
        if section:
            raise SettingsError(f"The secrets file {secrets} sets {ADMIN_PASSWORD_ENV} under [{section}], where it "
                                "is not read: deleting and importing are refused until it is moved to the top of "
                                "the file, above every [section].")
        if ADMIN_PASSWORD_ENV in settings:
            value = settings[ADMIN_PASSWORD_ENV]
            if not isinstance(value, str) or not value:
                raise SettingsError(f"The secrets file {secrets} sets {ADMIN_PASSWORD_ENV} to something other than "
                                    "a password: it must be a quoted non-empty text "
                                    f'({ADMIN_PASSWORD_ENV} = "..."). Deleting and importing are refused until it '
                                    "is fixed (remove the line for no password).")
            found = found or value
    return found


def _section_setting(table: dict, key: str, within: str = "") -> str | None:
    """The [section] (dotted, at any depth) of a parsed TOML file under which `key` is set, if any."""
    for name, value in table.items():
        section = f"{within}.{name}" if within else name
        for nested in value if isinstance(value, list) else [value]:  # [[name]] is a list of sections
            if isinstance(nested, dict):
                if key in nested:
                    return section
                deeper = _section_setting(nested, key, section)
                if deeper:
                    return deeper
    return None


def _split_url(setting: str, url: str, schemes: tuple[str, ...], form: str) -> SplitResult:
    """The URL set in `setting`, in parts; SettingsError saying what is wrong when it is not of `form` (a user
    and password belong in it only when `form` shows one, user:password@). The message never repeats the URL: it
    may hold a password, which a malformed URL leaves anywhere."""
    credentials = "@" in form
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (reading it raises ValueError unless it is a number from 0 to 65535)
    except ValueError:
        problem = "its host or port cannot be read"
    else:
        if parts.scheme not in schemes or not url.startswith(f"{parts.scheme}://"):
            problem = f"it does not start with {schemes[0]}://"
        elif "@" in url[len(f"{parts.scheme}://{parts.netloc}"):]:  # the host ended early, inside a password
            problem = "an @ comes after the host"
        elif parts.netloc.count("@") > 1:  # Python ends the password at the last @, libpq at the first
            problem = "it has more than one @ before the host"
        elif "@" in parts.netloc and not credentials:
            problem = "it holds a user or password (before an @), which does not belong there"
        else:
            return parts
    if credentials:
        hint = (" A user or password containing / ? # or @ must be percent-encoded (%2F, %3F, %23, %40)."
                if "@" in url else "")
    else:
        hint = " Credentials go in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY." if "@" in url else ""
    raise SettingsError(f"{setting} is not of the form {form}: {problem}.{hint}")


def admin_password_ok(given: str) -> bool:
    """No password configured: a personal install, everything allowed. Otherwise a constant-time compare.
    Raises SettingsError while the configured password cannot be known."""
    configured = configured_admin_password()
    if not configured:
        return True
    return hmac.compare_digest(given.encode(), configured.encode())


# ---------------------------------------------------------------- the two databases

class SQLiteDatabase:
    """One SQLite file in WAL mode; every call opens its own connection (safe across Streamlit's threads)."""

    placeholder = "?"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.description = f"the SQLite database {self.path}"

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        connection.execute("PRAGMA busy_timeout=30000")
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
            connection = self._connect()
            try:
                connection.execute("PRAGMA journal_mode=WAL")  # persistent, and only settable outside a transaction
            finally:
                connection.close()
        with self.transaction(write=True) as cursor:
            version = cursor.one("PRAGMA user_version")[0]
            reached = run(cursor, version)
            if reached != version:
                cursor.execute(f"PRAGMA user_version = {int(reached)}")
        return reached

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as error:
            if isinstance(error, sqlite3.IntegrityError):
                raise
            raise StoreError(f"{self.description} failed ({error}). Check that it and its folder are writable, "
                             f"the disk is not full, and {DB_PATH_ENV} points at the right file.") from error

    def close(self) -> None:
        pass


class PostgresDatabase:
    """A PostgreSQL database through a psycopg 3 connection pool shared by every session of this process."""

    placeholder = "%s"
    MIGRATION_LOCK = 0x0C1FA410  # the advisory lock every server takes to migrate, so only one does

    def __init__(self, url: str) -> None:
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        parts = _split_url(DATABASE_URL_ENV, url, ("postgresql", "postgres"),
                           "postgresql://user:password@host:port/database")
        self.url = url
        self._passwords = _passwords_in(parts)
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"
        self.description = f"the PostgreSQL database at {where}"
        self._down = False
        self._probe()  # at once, in the server's own words, rather than after the pool's timeout
        self.pool = ConnectionPool(url, min_size=1, max_size=10, timeout=5, open=True, check=ConnectionPool.check_connection,
                                   kwargs={"connect_timeout": 3, "row_factory": dict_row})

    @contextmanager
    def transaction(self, write: bool) -> Iterator[Cursor]:
        """A write first locks the store_meta row: writers queue there, as BEGIN IMMEDIATE makes them on SQLite."""
        if self._down:
            self._probe()  # while it is still down, fail now instead of waiting out the pool's timeout
        with self._errors(), self.pool.connection() as connection:
            cursor = Cursor(connection, self.placeholder)
            if write:
                cursor.execute("SELECT id FROM store_meta WHERE id = 1 FOR UPDATE")
            yield cursor

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
        with self._errors(), self.pool.connection() as connection:
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


def _passwords_in(parts: SplitResult) -> set[str]:
    """A database URL's password (user:password@ or ?password=) in each form an error may quote: as written and
    decoded."""
    pairs = (pair.partition("=") for pair in parts.query.split("&"))
    written = [parts.password or "", *(value for key, _, value in pairs if unquote(key) == "password")]
    return {form for password in written for form in (password, unquote(password)) if form}


class Cursor:
    """The few calls the store makes, the same on both databases; SQL is written with ? placeholders."""

    def __init__(self, connection, placeholder: str) -> None:
        self.connection = connection
        self.placeholder = placeholder

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def execute(self, sql: str, parameters: Sequence = ()):
        return self.connection.execute(self._sql(sql), tuple(parameters))

    def rows(self, sql: str, parameters: Sequence = ()) -> list:
        return self.execute(sql, parameters).fetchall()

    def one(self, sql: str, parameters: Sequence = ()):
        return self.execute(sql, parameters).fetchone()

    def execute_many(self, sql: str, rows: Sequence[Sequence]) -> None:
        if rows:
            self.connection.cursor().executemany(self._sql(sql), [tuple(row) for row in rows])


def placeholders(count: int) -> str:
    return ", ".join("?" * count)


# ---------------------------------------------------------------- the two image stores

class ImageStore(Protocol):
    description: str

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None: ...
    def get(self, name: str) -> bytes: ...
    def delete_many(self, names: Sequence[str]) -> None: ...
    def stored(self) -> Iterator[tuple[str, float]]: ...
    def remove_partials(self, older_than: float) -> int: ...
    owners_location: str  # where the marks are, for messages
    def owners(self) -> dict[str, str]: ...
    def add_owner(self, store_id: str, fingerprint: str) -> None: ...


class FolderImages:
    """Images as files in one folder, each written to a temporary name, synced, then renamed into place."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.description = f"the image folder {self.folder}"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            raise StoreError(f"{self.description} failed ({error}). Check that it exists, is writable and "
                             f"the disk is not full ({IMAGE_DIR_ENV}).") from error

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        with self._errors():
            self.folder.mkdir(parents=True, exist_ok=True)
            with ThreadPoolExecutor(IMAGE_THREADS) as pool:
                list(pool.map(lambda item: self._write(*item), items))
            if items:  # the renames themselves survive a power cut only once the folder is synced
                descriptor = os.open(self.folder, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)

    def _write(self, name: str, data: bytes) -> None:
        path = self.folder / name
        if path.exists():  # named by content: an existing file already holds these bytes
            return
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=PARTIAL_PREFIX)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, name: str) -> bytes:
        with self._errors():
            try:
                return (self.folder / name).read_bytes()
            except FileNotFoundError as error:
                raise ImageMissing(f"{self.description} has no {name}.") from error

    def delete_many(self, names: Sequence[str]) -> None:
        with self._errors():
            for name in names:
                (self.folder / name).unlink(missing_ok=True)

    def stored(self) -> Iterator[tuple[str, float]]:
        """(name, modification time) of every image this store wrote; nothing else in the folder."""
        with self._errors():
            if not self.folder.is_dir():
                return
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    if IMAGE_NAME.match(entry.name) and entry.is_file():
                        yield entry.name, entry.stat().st_mtime

    def remove_partials(self, older_than: float) -> int:
        """Temporary files of writes that died half-way (only the object store's own puts are atomic)."""
        removed = 0
        with self._errors():
            for path in self.folder.glob(PARTIAL_PREFIX + "*") if self.folder.is_dir() else ():
                if path.is_file() and path.stat().st_mtime < older_than:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    @property
    def _owners_folder(self) -> Path:
        """Beside the image folder, not in it: the folder holds the images and nothing else. Beside its real path,
        so that databases reaching one folder through a link share one set of marks."""
        folder = self.folder.resolve()
        return folder.parent / f".{folder.name}{OWNERS_SUFFIX}"

    @property
    def owners_location(self) -> str:
        return str(self._owners_folder)

    def owners(self) -> dict[str, str]:
        with self._errors():
            if not self._owners_folder.is_dir():
                return {}
            return {path.name: path.read_text() for path in self._owners_folder.iterdir()}

    def add_owner(self, store_id: str, fingerprint: str) -> None:
        with self._errors():
            self._owners_folder.mkdir(parents=True, exist_ok=True)
            (self._owners_folder / store_id).write_text(fingerprint)


class S3Images:
    """Images as objects under s3://bucket/prefix, on AWS or any S3-compatible store (AWS_ENDPOINT_URL)."""

    def __init__(self, url: str) -> None:
        import boto3
        from botocore.config import Config

        parts = _split_url(IMAGE_STORE_ENV, url, ("s3",), "s3://bucket/prefix")
        if not re.fullmatch(r"[a-zA-Z0-9.\-_]{1,255}", parts.netloc):  # the bucket names botocore accepts
            raise SettingsError(f"{IMAGE_STORE_ENV} is not of the form s3://bucket/prefix: it names no bucket (of "
                                "letters, digits, '.', '-' and '_'; credentials go in AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY).")
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
        if self.endpoint and not _split_url("AWS_ENDPOINT_URL", self.endpoint, ("http", "https"),
                                            "http://host:port").hostname:
            raise SettingsError("AWS_ENDPOINT_URL is not of the form http://host:port: it names no host.")
        self.description = f"the object store {url}" + (f" at {self.endpoint}" if self.endpoint else "")
        config = Config(s3={"addressing_style": "path" if self.endpoint else "auto"}, connect_timeout=3,
                        read_timeout=20, retries={"max_attempts": 2, "mode": "standard"},
                        max_pool_connections=2 * IMAGE_THREADS)
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=config)
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @contextmanager
    def _errors(self) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            yield
        except NoCredentialsError as error:
            raise StoreError(f"{self.description}: no credentials. Set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY.") from error
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
                hint = "Check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and that they may use this bucket."
            else:
                hint = f"Check {IMAGE_STORE_ENV} and AWS_ENDPOINT_URL."
            raise StoreError(f"{self.description} refused the request ({code or error}). {hint}") from error
        except BotoCoreError as error:
            raise StoreError(f"{self.description} could not be reached ({error}). Check that it is running and "
                             "that AWS_ENDPOINT_URL is right.") from error

    def _ensure_bucket(self) -> None:
        """Create the bucket when it is missing, once per process."""
        from botocore.exceptions import ClientError

        if self._bucket_ready:
            return
        with self._bucket_lock, self._errors():
            if self._bucket_ready:
                return
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                region = self.client.meta.region_name
                try:
                    self.client.create_bucket(Bucket=self.bucket, **(
                        {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}))
                except ClientError as create_error:
                    code = create_error.response.get("Error", {}).get("Code", "")
                    if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise StoreError(f"{self.description}: the bucket {self.bucket!r} does not exist and could not "
                                         f"be created ({code or create_error}). Create it, or use credentials allowed "
                                         "to.") from create_error
            self._bucket_ready = True

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        self._ensure_bucket()
        with self._errors(), ThreadPoolExecutor(IMAGE_THREADS) as pool:
            list(pool.map(lambda item: self.client.put_object(Bucket=self.bucket, Key=self._key(item[0]), Body=item[1]),
                          items))

    def get(self, name: str) -> bytes:
        self._ensure_bucket()
        with self._errors():
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
            except self.client.exceptions.NoSuchKey as error:
                raise ImageMissing(f"{self.description} has no {name}.") from error

    def delete_many(self, names: Sequence[str]) -> None:
        self._ensure_bucket()
        with self._errors():
            for start in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
                keys = [{"Key": self._key(name)} for name in names[start:start + 1000]]
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                if response.get("Errors"):
                    first = response["Errors"][0]
                    raise StoreError(f"{self.description} could not delete {first.get('Key')} ({first.get('Code')}).")

    def _list(self, prefix: str) -> Iterator[dict]:
        self._ensure_bucket()
        with self._errors():
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])

    def stored(self) -> Iterator[tuple[str, float]]:
        start = len(self._key(""))
        for item in self._list(self._key("")):
            name = item["Key"][start:]
            if IMAGE_NAME.match(name):
                yield name, item["LastModified"].timestamp()

    def remove_partials(self, older_than: float) -> int:
        return 0  # a PUT is atomic: an object is either whole or absent

    @property
    def owners_location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}{OWNERS_SUFFIX}/"

    def owners(self) -> dict[str, str]:
        folder = f"{self.prefix}{OWNERS_SUFFIX}/"
        keys = [item["Key"] for item in self._list(folder)]
        with self._errors():
            return {key[len(folder):]: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode()
                    for key in keys}

    def add_owner(self, store_id: str, fingerprint: str) -> None:
        self._ensure_bucket()
        with self._errors():
            self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}{OWNERS_SUFFIX}/{store_id}",
                                   Body=fingerprint.encode())


# ---------------------------------------------------------------- the store

class Store:
    """Records and their images behind one interface; safe to share between threads and between servers."""

    def __init__(self, database: SQLiteDatabase | PostgresDatabase, images: ImageStore) -> None:
        self.database = database
        self.images = images
        self._migrate()
        self.store_id, self.fingerprint = self._claim_owner_mark()
        # Images whose removal failed, removed again by a background thread (see _remove_or_defer).
        self._pending: set[str] = set()
        self._pending_sweep = False
        self._pending_lock = threading.Lock()
        self._retry: threading.Thread | None = None
        self._closed = threading.Event()

    @classmethod
    def from_env(cls) -> "Store":
        url = os.environ.get(DATABASE_URL_ENV, "").strip()
        database = PostgresDatabase(url) if url else SQLiteDatabase(os.environ.get(DB_PATH_ENV) or DEFAULT_DB_PATH)
        image_store = os.environ.get(IMAGE_STORE_ENV, "").strip()
        try:  # a malformed image store setting closes the database's pool too
            images = S3Images(image_store) if image_store else FolderImages(os.environ.get(IMAGE_DIR_ENV) or DEFAULT_IMAGE_DIR)
            return cls(database, images)
        except BaseException:
            database.close()
            raise

    def describe(self) -> str:
        return f"{self.database.description} and {self.images.description}"

    def close(self) -> None:
        self._closed.set()
        self.database.close()

    def _migrate(self) -> None:
        def run(cursor: Cursor, version: int) -> int:
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.database.description} has schema version {version}, newer than this app's "
                                 f"{SCHEMA_VERSION}: update the app.")
            for migration in MIGRATIONS[version:]:
                for statement in migration.split(";"):
                    if statement.strip():
                        cursor.execute(statement)
            cursor.execute("UPDATE store_meta SET store_id = ? WHERE store_id = ''", (uuid.uuid4().hex,))
            return SCHEMA_VERSION

        version = self.database.schema_version()
        if version != SCHEMA_VERSION:  # a current schema is opened without writing: a read-only database opens
            self.database.migrate(run)

    def _claim_owner_mark(self) -> tuple[str, str]:
        """This database's id in the image store's owner marks, and its fingerprint.

        Each mark holds the fingerprint of the database that took the id. A copy of a database (a staging copy, a
        restored backup) carries the original's id: finding the id held by another fingerprint, it takes an id of
        its own, so that each sees the other as a second owner and neither removes an image. A mark left empty by
        an older version cannot tell the original from a copy, so it counts as held by another database too."""
        with self.database.transaction(write=False) as cursor:
            store_id = cursor.one("SELECT store_id FROM store_meta")["store_id"]
            fingerprint = self.database.fingerprint(cursor)
        holder = self.images.owners().get(store_id)
        if holder == fingerprint:
            return store_id, fingerprint
        if holder is not None:
            try:
                with self.database.transaction(write=True) as cursor:
                    cursor.execute("UPDATE store_meta SET store_id = ? WHERE store_id = ?",
                                   (uuid.uuid4().hex, store_id))
                    store_id = cursor.one("SELECT store_id FROM store_meta")["store_id"]  # or another server's
            except StoreError:  # read-only: it keeps an id whose mark it does not hold, so it removes nothing
                return store_id, fingerprint
        self.images.add_owner(store_id, fingerprint)
        return store_id, fingerprint

    # ------------------------------------------------------------ reading

    def revision(self) -> int:
        """Bumped by every change to the records: what caches of charts and pages key on."""
        with self.database.transaction(write=False) as cursor:
            return cursor.one("SELECT revision FROM store_meta")["revision"]

    def find_saved(self, content_hashes: Sequence[str]) -> dict[str, SavedPrediction]:
        """The saved records among these hashes, so the page can say an image was seen before."""
        if not content_hashes:
            return {}
        with self.database.transaction(write=False) as cursor:
            return {record.content_hash: record for record in _by_hash(cursor, content_hashes)}

    def summary(self) -> Summary:
        """Everything the sidebar shows, from one grouped query."""
        from classifier import CLASSES

        with self.database.transaction(write=False) as cursor:
            groups = cursor.rows("SELECT final_label, predicted_label, COUNT(*) AS n FROM predictions "
                                 "GROUP BY final_label, predicted_label")
        counts: dict[str, int] = {}
        matrix = [[0] * len(CLASSES) for _ in CLASSES]
        correct = incorrect = 0
        for row in groups:
            final, predicted, count = row["final_label"], row["predicted_label"], row["n"]
            counts[final] = counts.get(final, 0) + count
            correct += count if final == predicted else 0
            incorrect += 0 if final == predicted else count
            if final in CLASSES and predicted in CLASSES:
                matrix[CLASSES.index(final)][CLASSES.index(predicted)] = count
        return Summary(counts, correct, incorrect, matrix)

    def count(self, record_filter: RecordFilter = RecordFilter()) -> int:
        where, parameters = _where(record_filter)
        with self.database.transaction(write=False) as cursor:
            return cursor.one(f"SELECT COUNT(*) AS n FROM predictions{where}", parameters)["n"]

    def list_predictions(self, record_filter: RecordFilter = RecordFilter(), limit: int | None = None,
                         offset: int = 0) -> list[SavedPrediction]:
        """Saved records, newest first, one page of them when limit is given."""
        where, parameters = _where(record_filter)
        page = "" if limit is None else f" LIMIT {max(0, int(limit))} OFFSET {max(0, int(offset))}"
        with self.database.transaction(write=False) as cursor:
            rows = cursor.rows(f"SELECT {', '.join(COLUMNS)} FROM predictions{where} "
                               f"ORDER BY created_at DESC, id DESC{page}", parameters)
        return [_record(row) for row in rows]

    def date_range(self) -> tuple[date, date] | None:
        """The UTC days of the first and the last saved record, or None when nothing is saved."""
        with self.database.transaction(write=False) as cursor:
            # Two subqueries, so that each reads one end of the created_at index instead of every row.
            row = cursor.one("SELECT (SELECT MIN(created_at) FROM predictions) AS first, "
                             "(SELECT MAX(created_at) FROM predictions) AS last")
        if row["first"] is None:
            return None
        return datetime.fromisoformat(row["first"]).date(), datetime.fromisoformat(row["last"]).date()

    def image_bytes(self, record: SavedPrediction) -> bytes:
        return self.images.get(record.image_file)

    def thumbnails(self, records: Sequence[SavedPrediction]) -> dict[int, bytes]:
        """The stored small JPEGs of these records (one query; records saved before there were none are absent)."""
        if not records:
            return {}
        with self.database.transaction(write=False) as cursor:
            return _thumbnails(cursor, [record.id for record in records])

    def _image_or_nothing(self, record: SavedPrediction) -> bytes:
        try:
            return self.images.get(record.image_file)
        except ImageMissing:
            return b""

    def iter_records(self) -> Iterator[SavedPrediction]:
        """Every record in id order, a batch per query: bounded memory at any size."""
        last = 0
        while True:
            with self.database.transaction(write=False) as cursor:
                rows = cursor.rows(f"SELECT {', '.join(COLUMNS)} FROM predictions WHERE id > ? ORDER BY id LIMIT {BATCH}",
                                   (last,))
            if not rows:
                return
            for row in rows:
                yield _record(row)
            last = rows[-1]["id"]

    # ------------------------------------------------------------ saving

    def save_predictions(self, predictions: Sequence[NewPrediction]) -> SaveResult:
        """Save a batch in one transaction: new images are stored, saved ones whose label changed are relabelled,
        the rest left as they are. Images go to the image store before the rows commit."""
        latest = {prediction.content_hash: prediction for prediction in predictions}  # the same picture twice: last wins
        with self.database.transaction(write=True) as cursor:
            saved = {record.content_hash: record for record in _by_hash(cursor, list(latest))}
            new = [prediction for digest, prediction in latest.items() if digest not in saved]
            self.images.put_many([(image_name(p.content_hash, p.extension), p.data) for p in new])
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            rows = [_row(prediction, now) for prediction in new]
            created: list[tuple[int, int]] = [(record_id, 0) for record_id in _insert(cursor, rows)]
            changes = [(saved[digest], prediction.final_label) for digest, prediction in latest.items()
                       if digest in saved and saved[digest].final_label != prediction.final_label]
            _relabel(cursor, changes)
            relabelled: list[tuple[int, int, str]] = [(record.id, record.edits + 1, record.final_label)
                                                      for record, _ in changes]
            if created or relabelled:
                _bump_revision(cursor)
        changed = len(created) + len(relabelled)
        change = Change(f"save of {changed} image{'s' * (changed != 1)}", tuple(created), tuple(relabelled)) \
            if changed else None
        return SaveResult(saved=len(created), updated=len(relabelled),
                          unchanged=len(predictions) - changed, change=change)

    # ------------------------------------------------------------ deleting and undoing

    def delete_predictions(self, prediction_ids: Sequence[int]) -> Change | None:
        """Delete a few records (History's Delete); their images go once the deletion has committed. The change
        returned holds their bytes, so the deletion can be undone."""
        with self.database.transaction(write=True) as cursor:
            records = _by_ids(cursor, prediction_ids)
            thumbnails = _thumbnails(cursor, [record.id for record in records])
            deleted = tuple(DeletedPrediction(record, self._image_or_nothing(record), thumbnails.get(record.id))
                            for record in records)
            _delete_ids(cursor, [record.id for record in records])
            if records:
                _bump_revision(cursor)
        if not records:
            return None
        note = self._remove_or_defer([record.image_file for record in records])
        name = records[0].source if len(records) == 1 else f"{len(records)} images"
        return Change(f"delete of {name}", deleted=deleted, removal_note=note)

    def undo(self, change: Change) -> str:
        """Take a change back, touching only the records it made, relabelled or removed, as it left them."""
        removed, relabelled, gone, changed_since = [], 0, 0, 0
        with self.database.transaction(write=True) as cursor:
            for record_id, edits in change.created:
                row = cursor.one("DELETE FROM predictions WHERE id = ? AND edits = ? RETURNING image_file",
                                 (record_id, edits))
                if row is not None:
                    removed.append(row["image_file"])
                elif _by_ids(cursor, [record_id]):
                    changed_since += 1
                else:
                    gone += 1
            for record_id, edits, previous in change.relabelled:
                now = _by_ids(cursor, [record_id])
                if not now:
                    gone += 1
                elif now[0].edits != edits:
                    changed_since += 1
                else:
                    _relabel(cursor, [(now[0], previous)])
                    relabelled += 1
            back = [item for item in change.deleted if item.data and not _by_hash(cursor, [item.record.content_hash])]
            self.images.put_many([(item.record.image_file, item.data) for item in back])
            _insert(cursor, [{column: getattr(item.record, column) for column in COLUMNS} | {"thumbnail": item.thumbnail}
                             for item in back])
            if removed or relabelled or back:
                _bump_revision(cursor)
        note = self._remove_or_defer(removed)
        imageless = sum(not item.data for item in change.deleted)
        saved_again = len(change.deleted) - len(back) - imageless
        done = [f"{count} {what}" for count, what in
                ((len(removed), "removed"), (relabelled, "given back its old label"), (len(back), "restored")) if count]
        left = [f"{count} {what}" for count, what in
                ((gone, "already gone"), (changed_since, "changed by someone else since"),
                 (saved_again, "saved again since"), (imageless, "had lost its image before")) if count]
        message = f"Undid the {change.description}: {', '.join(done) or 'nothing left to take back'}"
        return message + (f"; left alone: {', '.join(left)}." if left else ".") + note

    def clear(self) -> ClearResult:
        """Delete every record, then every image no record names any more (later, if the image store fails)."""
        with self.database.transaction(write=True) as cursor:
            names = [row["image_file"] for row in cursor.rows("SELECT image_file FROM predictions")]
            cursor.execute("DELETE FROM predictions")
            _bump_revision(cursor)
        return ClearResult(len(names), self._remove_or_defer(names, sweep=True))

    def remove_leftovers(self, grace_s: float = LEFTOVER_GRACE_S) -> int:
        """Remove images (and half-written files) of saves that died before COMMIT, older than the grace period,
        which another server may still be inside. Returns how many went."""
        older_than = time.time() - grace_s
        removed = self.images.remove_partials(older_than)
        old = (name for name, modified in self.images.stored() if modified < older_than)
        return removed + self._remove_unreferenced_among(old)

    def _remove_unreferenced_among(self, names: Iterable[str]) -> int:
        removed, batch = 0, []
        for name in names:
            batch.append(name)
            if len(batch) == BATCH:
                removed += self._remove_unreferenced(batch)
                batch = []
        return removed + self._remove_unreferenced(batch)

    def _remove_or_defer(self, names: Sequence[str], sweep: bool = False) -> str:
        """Remove those of these images that no row names (and, with sweep, every such image in the store). When the
        image store fails, they are removed later by a background thread. Returns what the page adds to its message
        when images stay: failing (removed later) or shared with another database (kept); else ""."""
        count = len(set(names))
        images = f"{count} image{'s' * (count != 1)}"
        try:
            if count and self._other_owners():
                return (f" {images} stay in {self.images.description}: another database uses it too (its mark is in "
                        f"{self.images.owners_location}), so nothing is removed from it (README: A copy is another "
                        "store).")
            self._remove_unreferenced_among(names)
            if sweep:
                self._remove_unreferenced_among(name for name, _ in self.images.stored())
            return ""
        except StoreError as error:
            print(f"removing {images} failed, trying again later: {error}", file=sys.stderr)
        with self._pending_lock:
            self._pending.update(names)
            self._pending_sweep |= sweep
            if self._retry is None:
                self._retry = threading.Thread(target=self._retry_removals, daemon=True)
                self._retry.start()
        return f" {images} will be removed from {self.images.description} as soon as it works again." if count else ""

    def _other_owners(self) -> list[str]:
        """The marks in the image store of databases other than this one (or of this one's id, held by another)."""
        return [store_id for store_id, fingerprint in self.images.owners().items()
                if (store_id, fingerprint) != (self.store_id, self.fingerprint)]

    def _retry_removals(self) -> None:
        wait = CLEANUP_RETRY_S
        while not self._closed.wait(wait):
            with self._pending_lock:
                names, sweep = sorted(self._pending), self._pending_sweep
            try:
                self._remove_unreferenced_among(names)
                if sweep:
                    self._remove_unreferenced_among(name for name, _ in self.images.stored())
            except StoreError:
                wait = min(2 * wait, CLEANUP_RETRY_MAX_S)
                continue
            with self._pending_lock:
                self._pending.difference_update(names)
                self._pending_sweep &= not sweep
                if not self._pending and not self._pending_sweep:
                    self._retry = None
                    return

    def _remove_unreferenced(self, names: Sequence[str]) -> int:
        """Delete those of these images that no row names, under the write lock (see the module docstring)."""
        if not names or self._other_owners():
            return 0  # another database uses this image store too (or this one is a copy): its rows may name them
        with self.database.transaction(write=True) as cursor:
            referenced = {row["image_file"] for row in cursor.rows(
                f"SELECT image_file FROM predictions WHERE image_file IN ({placeholders(len(names))})", names)}
            unreferenced = [name for name in dict.fromkeys(names) if name not in referenced]
            self.images.delete_many(unreferenced)
        return len(unreferenced)

    # ------------------------------------------------------------ export and import

    def iter_csv(self) -> Iterator[bytes]:
        """Every record as CSV, for spreadsheets (no cell starts a formula), a batch at a time."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(EXPORT_COLUMNS)
        for number, record in enumerate(self.iter_records(), start=1):
            writer.writerow([_spreadsheet_cell(value) for value in _export_row(record)])
            if number % BATCH == 0:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue().encode()

    def iter_archive(self, tally: ExportTally | None = None) -> Iterator[bytes]:
        """The images in ImageFolder layout by final label (airplane/<hash>.jpg ...) and a labels.csv manifest
        with every column, as ZIP bytes produced one image at a time: memory stays at about one image. The tally,
        when given, counts what was written and lists the records left out for want of their image."""
        tally = tally if tally is not None else ExportTally()
        sink = _Sink()
        with tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+", newline="") as manifest:
            writer = csv.writer(manifest)
            writer.writerow(("file",) + EXPORT_COLUMNS)
            with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive:
                for record in self.iter_records():
                    data = self._image_or_nothing(record)
                    if not data:
                        tally.missing.append(record)  # a row an older version left without its image
                        continue
                    name = f"{record.final_label}/{record.image_file}"
                    archive.writestr(name, data)
                    writer.writerow((name,) + _export_row(record))
                    tally.written += 1
                    yield sink.take()
                manifest.seek(0)
                listing = zipfile.ZipInfo("labels.csv", datetime.now().timetuple()[:6])
                with archive.open(listing, "w") as member:
                    for block in iter(lambda: manifest.read(1 << 20), ""):
                        member.write(block.encode())
                        yield sink.take()
            yield sink.take()

    def import_archive(self, path: str | Path, predict: Predict | None = None,
                       progress: Callable[[int, int], None] | None = None) -> ImportResult:
        """Restore an export (or a plain ImageFolder ZIP: folder name = final label, `predict` supplies the rest).
        The whole archive is checked before anything is written; then it is saved in batches, each under the
        write lock. Pictures already saved are left as they are, so importing twice changes nothing; a picture
        the archive holds twice is imported once. A batch that fails takes its images back with it."""
        from display import thumbnail

        entries, duplicates = read_archive(path, predict)
        created = done = 0
        with zipfile.ZipFile(path) as archive:
            for batch in _batches(entries):
                written: list[str] = []
                try:
                    with self.database.transaction(write=True) as cursor:
                        hashes = [entry.prediction.content_hash for entry in batch]
                        saved = {record.content_hash for record in _by_hash(cursor, hashes)}
                        new = [entry for entry in batch if entry.prediction.content_hash not in saved]
                        blobs = [archive.read(entry.member) for entry in new]
                        written = [image_name(entry.prediction.content_hash, entry.prediction.extension)
                                   for entry in new]
                        self.images.put_many(list(zip(written, blobs)))
                        with ThreadPoolExecutor(IMAGE_THREADS) as pool:
                            thumbnails = list(pool.map(thumbnail, blobs, [entry.member for entry in new]))
                        created += len(_insert(cursor, [_row(replace(entry.prediction, thumbnail=thumbnail),
                                                             entry.created_at)
                                                        for entry, thumbnail in zip(new, thumbnails)]))
                        if new:
                            _bump_revision(cursor)
                except BaseException:
                    # Its rows rolled back: its images go too (later, should the image store be failing now), or
                    # every retry would leave them again.
                    self._remove_or_defer(written)
                    raise
                done += len(batch)
                if progress is not None:
                    progress(done, len(entries))
        return ImportResult(saved=created, unchanged=len(entries) - created, duplicates=tuple(duplicates))


_open_stores: dict[tuple[str, str], Store] = {}
_open_stores_lock = threading.Lock()


def open_store() -> Store:
    """This process's store for the configuration in the environment, opened once and shared by every session,
    page and download; the leftovers of killed saves are cleaned in the background. Raises StoreError, and
    tries again on the next call, while the database or the image store is unreachable."""
    key = (os.environ.get(DATABASE_URL_ENV) or os.environ.get(DB_PATH_ENV) or str(DEFAULT_DB_PATH),
           os.environ.get(IMAGE_STORE_ENV) or os.environ.get(IMAGE_DIR_ENV) or str(DEFAULT_IMAGE_DIR))
    with _open_stores_lock:
        if key not in _open_stores:
            store = Store.from_env()
            threading.Thread(target=_remove_leftovers_quietly, args=(store,), daemon=True).start()
            _open_stores[key] = store
        return _open_stores[key]


def _remove_leftovers_quietly(store: Store) -> None:
    try:
        store.remove_leftovers()
    except StoreError as error:  # the next server start tries again; saving does not depend on it
        print(f"cleaning leftovers of killed saves failed: {error}", file=sys.stderr)


# ---------------------------------------------------------------- SQL, in one place

def _record(row) -> SavedPrediction:
    return SavedPrediction(**{column: row[column] for column in COLUMNS} | {
        "is_correct": bool(row["is_correct"]), "is_ood": bool(row["is_ood"])})


def _by_hash(cursor: Cursor, content_hashes: Sequence[str]) -> list[SavedPrediction]:
    records = []
    for start in range(0, len(content_hashes), BATCH):
        chunk = list(content_hashes[start:start + BATCH])
        records += [_record(row) for row in cursor.rows(
            f"SELECT {', '.join(COLUMNS)} FROM predictions WHERE content_hash IN ({placeholders(len(chunk))})", chunk)]
    return records


def _by_ids(cursor: Cursor, ids: Sequence[int]) -> list[SavedPrediction]:
    if not ids:
        return []
    return [_record(row) for row in cursor.rows(
        f"SELECT {', '.join(COLUMNS)} FROM predictions WHERE id IN ({placeholders(len(ids))}) ORDER BY id", list(ids))]


def _thumbnails(cursor: Cursor, ids: Sequence[int]) -> dict[int, bytes]:
    if not ids:
        return {}
    rows = cursor.rows(f"SELECT id, thumbnail FROM predictions WHERE id IN ({placeholders(len(ids))}) "
                       "AND thumbnail IS NOT NULL", list(ids))
    return {row["id"]: bytes(row["thumbnail"]) for row in rows}


def _delete_ids(cursor: Cursor, ids: Sequence[int]) -> None:
    if ids:
        cursor.execute(f"DELETE FROM predictions WHERE id IN ({placeholders(len(ids))})", list(ids))


def _row(prediction: NewPrediction, created_at: str) -> dict:
    return {
        "content_hash": prediction.content_hash,
        "image_file": image_name(prediction.content_hash, prediction.extension),
        # PostgreSQL text cannot hold NUL: a crafted name keeps a visible stand-in on both databases.
        "source": prediction.source.replace("\x00", "\ufffd"), "predicted_label": prediction.predicted_label,
        "confidence": min(1.0, max(0.0, float(prediction.confidence))), "final_label": prediction.final_label,
        "is_correct": int(prediction.final_label == prediction.predicted_label), "created_at": created_at,
        "model_version": prediction.model_version, "edits": 0, "is_ood": int(prediction.is_ood),
        "ood_score": None if prediction.ood_score is None else float(prediction.ood_score),
        "thumbnail": prediction.thumbnail,
    }


def _insert(cursor: Cursor, rows: Sequence[dict]) -> list[int]:
    """Insert rows in multi-row statements; rows without an id get new ones, never used before. Returns the ids."""
    if not rows:
        return []
    missing = sum("id" not in row for row in rows)
    last = cursor.one("UPDATE store_meta SET last_id = last_id + ? WHERE id = 1 RETURNING last_id",
                      (missing,))["last_id"] if missing else 0
    new_ids = iter(range(last - missing + 1, last + 1))
    rows = [row if "id" in row else {"id": next(new_ids), **row} for row in rows]
    columns = (*COLUMNS, "thumbnail")
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        values = ", ".join(f"({placeholders(len(columns))})" for _ in chunk)
        cursor.execute(f"INSERT INTO predictions ({', '.join(columns)}) VALUES {values}",
                       [int(value) if isinstance(value, bool) else value
                        for row in chunk for value in (row.get(column) for column in columns)])
    return [row["id"] for row in rows]


def _relabel(cursor: Cursor, changes: Sequence[tuple[SavedPrediction, str]]) -> None:
    """Give records new final labels, in one batch (one round trip on PostgreSQL's pipeline)."""
    cursor.execute_many("UPDATE predictions SET final_label = ?, is_correct = ?, edits = edits + 1 WHERE id = ?",
                        [(label, int(label == record.predicted_label), record.id) for record, label in changes])


def _bump_revision(cursor: Cursor) -> None:
    cursor.execute("UPDATE store_meta SET revision = revision + 1 WHERE id = 1")


def _where(record_filter: RecordFilter) -> tuple[str, list]:
    clauses, parameters = [], []
    if record_filter.labels:
        clauses.append(f"final_label IN ({placeholders(len(record_filter.labels))})")
        parameters += list(record_filter.labels)
    if record_filter.corrected_only:
        clauses.append("is_correct = 0")
    if record_filter.flagged_only:
        clauses.append("is_ood = 1")
    if record_filter.since is not None:
        clauses.append("created_at >= ?")
        parameters.append(record_filter.since.isoformat())
    if record_filter.until is not None and record_filter.until < date.max:  # no day after the last one
        clauses.append("created_at < ?")
        parameters.append((record_filter.until + timedelta(days=1)).isoformat())
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), parameters


def _export_row(record: SavedPrediction) -> tuple:
    return tuple(int(value) if isinstance(value, bool) else value
                 for value in (getattr(record, column) for column in EXPORT_COLUMNS))


def _spreadsheet_cell(value: object) -> object:
    """Text a spreadsheet would run as a formula (a source or model version from anyone) gets a leading quote, as
    OWASP advises against CSV injection; numbers stay numbers. labels.csv in the ZIP keeps exact values instead."""
    return "'" + value if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")) else value


class _Sink(io.RawIOBase):
    """A write-only stream that hands over what was written since the last take(): zipfile streams into it."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        data, self._buffer = bytes(self._buffer), bytearray()
        return data


# ---------------------------------------------------------------- reading archives

@dataclass(frozen=True)
class ArchiveEntry:
    """One checked image of an archive: where it is, how big, when it was saved, and the record it becomes
    (its bytes are read from the archive again when it is saved)."""

    member: str
    size: int
    created_at: str
    prediction: NewPrediction


@dataclass(frozen=True)
class Duplicate:
    """A member skipped because the archive holds the same picture under an earlier name, imported instead."""

    member: str
    kept: str
    label: str  # the final label the picture was imported with: the kept member's


@dataclass(frozen=True)
class ImportResult:
    saved: int
    unchanged: int  # already saved before, left as they are
    duplicates: tuple[Duplicate, ...]


def _batches(entries: Sequence[ArchiveEntry], max_bytes: int = 64 << 20) -> Iterator[list[ArchiveEntry]]:
    """Runs of at most BATCH entries and max_bytes of image data: one lock and one round trip per run."""
    batch, size = [], 0
    for entry in entries:
        if batch and (len(batch) == BATCH or size + entry.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry.size
    if batch:
        yield batch


Predict = Callable[[list], tuple[list, str]]  # images -> (predictions, model version)


def read_archive(path: str | Path, predict: Predict | None = None) -> tuple[list[ArchiveEntry], list[Duplicate]]:
    """Check every member of an export or ImageFolder ZIP and say what to import, or raise ArchiveError naming
    the first bad member: unsafe path, bomb, unknown label, not an image, unreadable, or a corrupt labels.csv.
    Each picture is imported once, under its first name (in labels.csv's order, or the archive's); the other
    names are returned as duplicates. Images are decoded one at a time (a few dozen at once when the model must
    predict them) and labels.csv is checked row by row as it is read, so memory stays bounded."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise ArchiveError(f"{path} is not a readable ZIP archive ({error}).") from error
    with archive:
        members = _image_members(path, archive)
        listed = "labels.csv" in archive.NameToInfo
        if not listed and predict is None:
            raise ArchiveError(f"{path} has no labels.csv, and no model was given to predict its images.")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entries: list[ArchiveEntry] = []
        duplicates: list[Duplicate] = []
        kept: dict[str, tuple[str, str]] = {}  # content hash -> the member imported for it, and its final label
        waiting: list = []  # (member, ImageInput) for the model, when there is no manifest

        def first_time(name: str, content_hash: str, label: str) -> bool:
            """Whether this member is the first to hold its picture; a later one is noted as a duplicate."""
            if content_hash in kept:
                duplicates.append(Duplicate(name, *kept[content_hash]))
                return False
            kept[content_hash] = (name, label)
            return True

        def predict_waiting() -> None:
            predictions, version = predict([item.image for _, item in waiting])
            entries.extend(ArchiveEntry(name, members[name].file_size, now, NewPrediction(
                item.content_hash, b"", item.extension, name, prediction.label, prediction.confidence,
                _label_of(name), version, prediction.is_ood, prediction.ood_score))
                for (name, item), prediction in zip(waiting, predictions))
            waiting.clear()

        if listed:
            for line, row in _manifest_rows(path, archive, members):
                name = row["file"]
                item = _read_image(path, archive, members[name])
                if row.get("content_hash") and row["content_hash"] != item.content_hash:
                    raise ArchiveError(f"{path}: labels.csv line {line}: content_hash does not match {name!r}.")
                if first_time(name, item.content_hash, row["final_label"]):
                    entries.append(ArchiveEntry(name, members[name].file_size, row.get("created_at") or now,
                                                NewPrediction(item.content_hash, b"", item.extension,
                                                              row.get("source") or name, row["predicted_label"],
                                                              row["confidence"], row["final_label"],
                                                              row.get("model_version") or "unknown", row["is_ood"],
                                                              row["ood_score"])))
            return entries, duplicates
        for name, info in members.items():
            item = _read_image(path, archive, info)
            if first_time(name, item.content_hash, _label_of(name)):
                waiting.append((name, item))
                if len(waiting) == 64:
                    predict_waiting()
        if waiting:
            predict_waiting()
        return entries, duplicates


# What reading or inflating a damaged member raises (zipfile, zlib, bz2 and lzma each have their own), so that
# the error names the member: a traceback or a bare "LZMAError: Corrupt input data" names none.
MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, NotImplementedError, EOFError, OSError, ValueError)


def _read_image(path: str | Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> ImageInput:
    """One image member, decoded and fingerprinted, or ArchiveError naming it."""
    from inputs import InvalidImageError, read_image_input

    try:
        with archive.open(info) as member:
            return read_image_input(member.read(MAX_IMAGE_BYTES + 1), info.filename)
    except InvalidImageError as error:
        raise ArchiveError(f"{path}: member {error}") from error
    except MEMBER_ERRORS as error:
        raise ArchiveError(f"{path}: member {info.filename!r} cannot be read "
                           f"({error or type(error).__name__}).") from error


def _label_of(member: str) -> str:
    return member.partition("/")[0]


def _image_members(path: str | Path, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Every image member, checked for a safe path, a plausible size and a class folder; every member that
    will be read (labels.csv too), for being readable at all."""
    from classifier import CLASSES

    images = {}
    for info in archive.infolist():
        name = info.filename
        if name.startswith(("/", "\\")) or "\\" in name or ".." in name.split("/") or re.match(r"^[A-Za-z]:", name):
            raise ArchiveError(f"{path}: member {name!r} has an unsafe path (absolute, or with '..').")
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{path}: member {name!r} is encrypted; make the archive again without a password.")
        if info.flag_bits & 0x20:  # general purpose bit 5, which zipfile cannot read
            raise ArchiveError(f"{path}: member {name!r} is compressed patched data (ZIP flag bit 5), which cannot "
                               "be read; make the archive again with Deflate.")
        if info.compress_type not in READABLE_COMPRESSION:
            method = COMPRESSION_NAMES.get(info.compress_type, "an unknown method")
            raise ArchiveError(f"{path}: member {name!r} is compressed with {method} (ZIP method "
                               f"{info.compress_type}), which cannot be read; make the archive again with Deflate.")
        limit = MAX_MANIFEST_BYTES if name == "labels.csv" else MAX_IMAGE_BYTES
        if info.file_size > limit or (
                info.file_size > 1 << 20 and info.file_size > MAX_COMPRESSION_RATIO * max(1, info.compress_size)):
            raise ArchiveError(f"{path}: member {name!r} inflates to {info.file_size / 2**20:.1f} MB from "
                               f"{info.compress_size / 2**20:.2f} MB: refused as a ZIP bomb or an oversized file.")
        if name == "labels.csv":
            continue
        label, _, file_name = name.partition("/")
        if not file_name or "/" in file_name:
            raise ArchiveError(f"{path}: member {name!r} is not in a <label>/<file> folder.")
        if label not in CLASSES:
            raise ArchiveError(f"{path}: member {name!r} is in the folder {label!r}, which is not one of the ten "
                               f"classes ({', '.join(CLASSES)}).")
        images[name] = info
    if not images:
        raise ArchiveError(f"{path} holds no images in <label>/<file> folders.")
    return images


def _manifest_records(path: str | Path, archive: zipfile.ZipFile) -> Iterator[tuple[int, list[str]]]:
    """labels.csv's non-empty CSV records with the line each starts on, read as they are asked for: a record
    longer than MAX_MANIFEST_ROW_CHARS is refused before it is read whole."""
    line, used = 1, 0  # the line the record being read starts on, and its characters so far

    def lines(stream: io.TextIOWrapper) -> Iterator[str]:
        nonlocal used
        for text in iter(lambda: stream.readline(MAX_MANIFEST_ROW_CHARS + 1), ""):
            used += len(text)
            if used > MAX_MANIFEST_ROW_CHARS:
                raise ArchiveError(f"{path}: labels.csv line {line} is longer than {MAX_MANIFEST_ROW_CHARS // 1024} "
                                   "KiB, far more than any export writes.")
            yield text

    try:
        with archive.open("labels.csv") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as stream:
            reader = csv.reader(lines(stream))
            for fields in reader:
                if fields:
                    yield line, fields
                line, used = reader.line_num + 1, 0
    except ArchiveError:  # a ValueError too: already says what is wrong
        raise
    except (UnicodeDecodeError, csv.Error) as error:
        raise ArchiveError(f"{path}: labels.csv line {line} cannot be read as UTF-8 CSV ({error}).") from error
    except MEMBER_ERRORS as error:
        raise ArchiveError(f"{path}: member 'labels.csv' cannot be read at line {line} "
                           f"({error or type(error).__name__}).") from error


def _manifest_rows(path: str | Path, archive: zipfile.ZipFile, images: dict) -> Iterator[tuple[int, dict]]:
    """labels.csv checked against the archive row by row, as it is read: each image listed exactly once, labels,
    numbers and dates valid. Yields (line number, row with its values converted)."""
    from classifier import CLASSES

    records = _manifest_records(path, archive)
    _, header = next(records, (1, []))
    missing = {"file", "final_label", "predicted_label", "confidence"} - set(header)
    if missing:
        raise ArchiveError(f"{path}: labels.csv lacks the column(s) {', '.join(sorted(missing))}.")
    listed: set[str] = set()
    for line, fields in records:
        where = f"{path}: labels.csv line {line}"
        if len(fields) != len(header):
            raise ArchiveError(f"{where} has the wrong number of fields.")
        row = dict(zip(header, fields))
        name = row["file"]
        if name not in images:
            raise ArchiveError(f"{where} names {name!r}, which is not an image in the archive.")
        if name in listed:
            raise ArchiveError(f"{where} lists {name!r} a second time.")
        if row["final_label"] != _label_of(name):
            raise ArchiveError(f"{where}: final_label {row['final_label']!r} differs from the folder of {name!r}.")
        if row["predicted_label"] not in CLASSES:
            raise ArchiveError(f"{where}: predicted_label {row['predicted_label']!r} is not one of the ten classes.")
        try:
            confidence = float(row["confidence"])
        except ValueError as error:
            raise ArchiveError(f"{where}: confidence {row['confidence']!r} is not a number.") from error
        if not 0.0 <= confidence <= 1.0:
            raise ArchiveError(f"{where}: confidence {row['confidence']!r} is not between 0 and 1.")
        if row.get("created_at"):
            try:
                created = datetime.fromisoformat(row["created_at"])
                created = created if created.tzinfo else created.replace(tzinfo=timezone.utc)
                row["created_at"] = created.astimezone(timezone.utc).isoformat(timespec="seconds")
            except (ValueError, OverflowError) as error:  # OverflowError: before year 1 or after 9999 in UTC
                raise ArchiveError(f"{where}: created_at {row['created_at']!r} is not an ISO date and time in the "
                                   f"years 1 to 9999 UTC ({error}).") from error
        flag, score = row.get("is_ood") or "0", row.get("ood_score") or ""
        if flag not in ("0", "1"):
            raise ArchiveError(f"{where}: is_ood {flag!r} is not 0 or 1.")
        try:
            ood_score = float(score) if score else None
        except ValueError as error:
            raise ArchiveError(f"{where}: ood_score {score!r} is not a number.") from error
        listed.add(name)
        yield line, {**row, "confidence": confidence, "is_ood": flag == "1", "ood_score": ood_score}
    unlisted = sorted(images.keys() - listed)
    if unlisted:
        more = f" and {len(unlisted) - 1} other image(s)" if len(unlisted) > 1 else ""
        raise ArchiveError(f"{path}: labels.csv does not list {unlisted[0]!r}{more}.")


# ---------------------------------------------------------------- command line

def _progress(done: int, total: int) -> None:
    filled = int(30 * done / max(1, total))
    end = "\n" if done >= total or not sys.stderr.isatty() else ""
    print(f"\rimporting [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=1)
def _shipped_classifier():
    from classifier import load_classifier

    return load_classifier()


def _predict_with_shipped_model(images: list) -> tuple[list, str]:
    classifier = _shipped_classifier()
    return classifier.predict(images), classifier.version


def _failed(error: Exception) -> int:
    """Say on one line what failed, never with a traceback: a foreseen failure in its own words, anything else
    (a server's refusal, a bug) with its kind. Returns the exit status."""
    reason = " ".join(str(error).split()) or "no details"
    foreseen = isinstance(error, (StoreError, ArchiveError, OSError))
    print(f"error: {reason if foreseen else f'{type(error).__name__}: {reason}'}", file=sys.stderr)
    return 1


def main(argv: Sequence[str]) -> int:
    import argparse
    import getpass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["export", "import"])
    parser.add_argument("archive", type=Path)
    args = parser.parse_args(argv)
    try:
        store = Store.from_env()
    except Exception as error:
        return _failed(error)
    try:
        print(f"store: {store.describe()}", file=sys.stderr)
        if args.command == "export":
            args.archive.parent.mkdir(parents=True, exist_ok=True)
            partial = args.archive.with_name(args.archive.name + ".partial")
            tally = ExportTally()
            with open(partial, "wb") as stream:
                for chunk in store.iter_archive(tally):
                    stream.write(chunk)
            os.replace(partial, args.archive)
            print(f"wrote {tally.written} record{'s' * (tally.written != 1)} to {args.archive}", file=sys.stderr)
            if tally.missing:
                print(f"left out {len(tally.missing)} record(s) whose image is missing from {store.images.description}:",
                      file=sys.stderr)
                for record in tally.missing:
                    print(f"  id {record.id}: {record.source!r} ({record.image_file})", file=sys.stderr)
            return 0
        if configured_admin_password() and not admin_password_ok(getpass.getpass("Admin password: ")):
            print(f"error: wrong admin password ({ADMIN_PASSWORD_ENV} is set): nothing imported.", file=sys.stderr)
            return 1
        result = store.import_archive(args.archive, _predict_with_shipped_model, _progress)
        skipped = len(result.duplicates)
        print(f"imported {result.saved} records; {result.unchanged} were already saved; {skipped} "
              f"duplicate{'s' * (skipped != 1)} skipped", file=sys.stderr)
        for duplicate in result.duplicates:
            print(f"  skipped {duplicate.member!r}: the same picture as {duplicate.kept!r}, imported with the label "
                  f"{duplicate.label}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
    except Exception as error:
        return _failed(error)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
