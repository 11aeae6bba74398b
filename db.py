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
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent
DB_PATH_ENV = "CIFAR10_DB_PATH"
DATABASE_URL_ENV = "CIFAR10_DATABASE_URL"
IMAGE_DIR_ENV = "CIFAR10_IMAGE_DIR"
IMAGE_STORE_ENV = "CIFAR10_IMAGE_STORE"
ADMIN_PASSWORD_ENV = "CIFAR10_ADMIN_PASSWORD"
# Both next to app.py, whatever the working directory: a server started elsewhere finds the same store.
DEFAULT_DB_PATH = ROOT / "image_classification.db"
DEFAULT_IMAGE_DIR = ROOT / "temp_images"

# A save takes seconds; an image without a row that is older than this was left by a save that died.
LEFTOVER_GRACE_S = 15 * 60
# Rows per statement and images per lock: bounded memory and SQLite's variable limit, few round trips.
BATCH = 500
# Image uploads and downloads in flight at once (object stores answer many requests in parallel).
IMAGE_THREADS = 8
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
# Images are stored compressed; a member that inflates more than this is not an image but a bomb.
MAX_COMPRESSION_RATIO = 100

IMAGE_NAME = re.compile(r"^[0-9a-f]{64}\.(jpg|png|gif|webp)$")
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
    DROP INDEX predictions_final_label;
    CREATE INDEX predictions_labels ON predictions (final_label, predicted_label, is_correct);
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
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The database or the image store failed; the message names which one and what to check."""


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
    """A deleted record with its image bytes, kept so that one deletion can be undone."""

    record: SavedPrediction
    data: bytes


@dataclass(frozen=True)
class Change:
    """One save or delete, exactly: which records it created, relabelled or removed, as they were left.

    Undo touches a record only if it is still as this change left it (same id, same edit count)."""

    description: str
    created: tuple[tuple[int, int], ...] = ()                # (id, edits)
    relabelled: tuple[tuple[int, int, str], ...] = ()        # (id, edits after the change, previous final label)
    deleted: tuple[DeletedPrediction, ...] = ()


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


def configured_admin_password() -> str | None:
    """CIFAR10_ADMIN_PASSWORD from the environment, else from Streamlit's secrets files (the project's
    .streamlit/secrets.toml, then the user's ~/.streamlit/secrets.toml); None when neither sets it."""
    if os.environ.get(ADMIN_PASSWORD_ENV):
        return os.environ[ADMIN_PASSWORD_ENV]
    import tomllib

    for secrets in (ROOT / ".streamlit" / "secrets.toml", Path.home() / ".streamlit" / "secrets.toml"):
        try:
            value = tomllib.loads(secrets.read_text()).get(ADMIN_PASSWORD_ENV)
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if value:
            return str(value)
    return None


def admin_password_ok(given: str) -> bool:
    """No password configured: a personal install, everything allowed. Otherwise a constant-time compare."""
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

        parts = urlsplit(url)
        self.url = url
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
        reason = " ".join(str(error).split()) or error.__class__.__name__
        return StoreError(f"{self.description} could not be used ({reason}). Check that it is running and that "
                          f"{DATABASE_URL_ENV} has the right host, port, user and password.")

    def close(self) -> None:
        self.pool.close()


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
    def owners(self) -> set[str]: ...
    def add_owner(self, store_id: str) -> None: ...


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
        """Beside the image folder, not in it: the folder holds the images and nothing else."""
        return self.folder.parent / f".{self.folder.name}{OWNERS_SUFFIX}"

    def owners(self) -> set[str]:
        with self._errors():
            return {path.name for path in self._owners_folder.iterdir()} if self._owners_folder.is_dir() else set()

    def add_owner(self, store_id: str) -> None:
        with self._errors():
            self._owners_folder.mkdir(parents=True, exist_ok=True)
            (self._owners_folder / store_id).touch()


class S3Images:
    """Images as objects under s3://bucket/prefix, on AWS or any S3-compatible store (AWS_ENDPOINT_URL)."""

    def __init__(self, url: str) -> None:
        import boto3
        from botocore.config import Config

        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreError(f"{IMAGE_STORE_ENV}={url!r} is not an s3://bucket/prefix address.")
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
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

    def owners(self) -> set[str]:
        folder = f"{self.prefix}{OWNERS_SUFFIX}/"
        return {item["Key"][len(folder):] for item in self._list(folder)}

    def add_owner(self, store_id: str) -> None:
        self._ensure_bucket()
        with self._errors():
            self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}{OWNERS_SUFFIX}/{store_id}", Body=b"")


# ---------------------------------------------------------------- the store

class Store:
    """Records and their images behind one interface; safe to share between threads and between servers."""

    def __init__(self, database: SQLiteDatabase | PostgresDatabase, images: ImageStore) -> None:
        self.database = database
        self.images = images
        self.store_id = self._migrate()
        images.add_owner(self.store_id)

    @classmethod
    def from_env(cls) -> "Store":
        url = os.environ.get(DATABASE_URL_ENV, "").strip()
        database = PostgresDatabase(url) if url else SQLiteDatabase(os.environ.get(DB_PATH_ENV) or DEFAULT_DB_PATH)
        image_store = os.environ.get(IMAGE_STORE_ENV, "").strip()
        images = S3Images(image_store) if image_store else FolderImages(os.environ.get(IMAGE_DIR_ENV) or DEFAULT_IMAGE_DIR)
        try:
            return cls(database, images)
        except BaseException:
            database.close()
            raise

    def describe(self) -> str:
        return f"{self.database.description} and {self.images.description}"

    def close(self) -> None:
        self.database.close()

    def _migrate(self) -> str:
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

        self.database.migrate(run)
        with self.database.transaction(write=False) as cursor:
            return cursor.one("SELECT store_id FROM store_meta")["store_id"]

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
            rows = cursor.rows(f"SELECT id, thumbnail FROM predictions WHERE id IN ({placeholders(len(records))}) "
                               "AND thumbnail IS NOT NULL", [record.id for record in records])
        return {row["id"]: bytes(row["thumbnail"]) for row in rows}

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
            deleted = tuple(DeletedPrediction(record, self._image_or_nothing(record)) for record in records)
            _delete_ids(cursor, [record.id for record in records])
            if records:
                _bump_revision(cursor)
        self._remove_unreferenced([record.image_file for record in records])
        if not records:
            return None
        name = records[0].source if len(records) == 1 else f"{len(records)} images"
        return Change(f"delete of {name}", deleted=deleted)

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
            _insert(cursor, [{column: getattr(item.record, column) for column in COLUMNS} for item in back])
            if removed or relabelled or back:
                _bump_revision(cursor)
        self._remove_unreferenced(removed)
        imageless = sum(not item.data for item in change.deleted)
        saved_again = len(change.deleted) - len(back) - imageless
        done = [f"{count} {what}" for count, what in
                ((len(removed), "removed"), (relabelled, "given back its old label"), (len(back), "restored")) if count]
        left = [f"{count} {what}" for count, what in
                ((gone, "already gone"), (changed_since, "changed by someone else since"),
                 (saved_again, "saved again since"), (imageless, "had lost its image before")) if count]
        message = f"Undid the {change.description}: {', '.join(done) or 'nothing left to take back'}"
        return message + (f"; left alone: {', '.join(left)}." if left else ".")

    def clear(self) -> int:
        """Delete every record, then every image no record names any more; returns how many records went."""
        with self.database.transaction(write=True) as cursor:
            deleted = cursor.one("SELECT COUNT(*) AS n FROM predictions")["n"]
            cursor.execute("DELETE FROM predictions")
            _bump_revision(cursor)
        self._remove_unreferenced_among(name for name, _ in self.images.stored())
        return deleted

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

    def _remove_unreferenced(self, names: Sequence[str]) -> int:
        """Delete those of these images that no row names, under the write lock (see the module docstring)."""
        if not names or self.images.owners() - {self.store_id}:
            return 0  # another database uses this image store too: its rows may name these images
        with self.database.transaction(write=True) as cursor:
            referenced = {row["image_file"] for row in cursor.rows(
                f"SELECT image_file FROM predictions WHERE image_file IN ({placeholders(len(names))})", names)}
            unreferenced = [name for name in dict.fromkeys(names) if name not in referenced]
            self.images.delete_many(unreferenced)
        return len(unreferenced)

    # ------------------------------------------------------------ export and import

    def iter_csv(self) -> Iterator[bytes]:
        """Every record as CSV, for spreadsheets, a batch at a time."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(EXPORT_COLUMNS)
        for number, record in enumerate(self.iter_records(), start=1):
            writer.writerow(_export_row(record))
            if number % BATCH == 0:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue().encode()

    def iter_archive(self) -> Iterator[bytes]:
        """The images in ImageFolder layout by final label (airplane/<hash>.jpg ...) and a labels.csv manifest
        with every column, as ZIP bytes produced one image at a time: memory stays at about one image."""
        sink = _Sink()
        with tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+", newline="") as manifest:
            writer = csv.writer(manifest)
            writer.writerow(("file",) + EXPORT_COLUMNS)
            with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive:
                for record in self.iter_records():
                    data = self._image_or_nothing(record)
                    if not data:
                        continue  # a row an older version left without its image: nothing to export
                    name = f"{record.final_label}/{record.image_file}"
                    archive.writestr(name, data)
                    writer.writerow((name,) + _export_row(record))
                    yield sink.take()
                manifest.seek(0)
                listing = zipfile.ZipInfo("labels.csv", datetime.now().timetuple()[:6])
                with archive.open(listing, "w") as member:
                    for block in iter(lambda: manifest.read(1 << 20), ""):
                        member.write(block.encode())
                        yield sink.take()
            yield sink.take()

    def import_archive(self, path: str | Path, predict: Predict | None = None,
                       progress: Callable[[int, int], None] | None = None) -> SaveResult:
        """Restore an export (or a plain ImageFolder ZIP: folder name = final label, `predict` supplies the rest).
        The whole archive is checked before anything is written; then it is saved in batches, each under the
        write lock. Pictures already saved are left as they are, so importing twice changes nothing."""
        from display import thumbnail

        entries = read_archive(path, predict)
        created = done = 0
        with zipfile.ZipFile(path) as archive:
            for batch in _batches(entries):
                with self.database.transaction(write=True) as cursor:
                    hashes = [entry.prediction.content_hash for entry in batch]
                    saved = {record.content_hash for record in _by_hash(cursor, hashes)}
                    new = [entry for entry in batch if entry.prediction.content_hash not in saved]
                    blobs = [archive.read(entry.member) for entry in new]
                    self.images.put_many([(image_name(entry.prediction.content_hash, entry.prediction.extension), data)
                                          for entry, data in zip(new, blobs)])
                    with ThreadPoolExecutor(IMAGE_THREADS) as pool:
                        thumbnails = list(pool.map(thumbnail, blobs, [entry.member for entry in new]))
                    created += len(_insert(cursor, [_row(replace(entry.prediction, thumbnail=thumbnail),
                                                         entry.created_at)
                                                    for entry, thumbnail in zip(new, thumbnails)]))
                    if new:
                        _bump_revision(cursor)
                done += len(batch)
                if progress is not None:
                    progress(done, len(entries))
        return SaveResult(saved=created, updated=0, unchanged=len(entries) - created, change=None)


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
    if record_filter.until is not None:
        clauses.append("created_at < ?")
        parameters.append((record_filter.until + timedelta(days=1)).isoformat())
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), parameters


def _export_row(record: SavedPrediction) -> tuple:
    return tuple(int(value) if isinstance(value, bool) else value
                 for value in (getattr(record, column) for column in EXPORT_COLUMNS))


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


def read_archive(path: str | Path, predict: Predict | None = None) -> list[ArchiveEntry]:
    """Check every member of an export or ImageFolder ZIP and say what to import, or raise ArchiveError naming
    the first bad member: unsafe path, bomb, unknown label, not an image, or a corrupt labels.csv. Images are
    decoded one at a time (a few dozen at once when the model must predict them), so memory stays bounded."""
    from inputs import InvalidImageError, read_image_input

    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise ArchiveError(f"{path} is not a readable ZIP archive ({error}).") from error
    with archive:
        members = _image_members(path, archive)
        manifest = _read_manifest(path, archive, members) if "labels.csv" in archive.namelist() else None
        if manifest is None and predict is None:
            raise ArchiveError(f"{path} has no labels.csv, and no model was given to predict its images.")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entries: list[ArchiveEntry] = []
        waiting: list = []  # (member, ImageInput) for the model, when there is no manifest

        def predict_waiting() -> None:
            predictions, version = predict([item.image for _, item in waiting])
            entries.extend(ArchiveEntry(name, members[name].file_size, now, NewPrediction(
                item.content_hash, b"", item.extension, name, prediction.label, prediction.confidence,
                _label_of(name), version, prediction.is_ood, prediction.ood_score))
                for (name, item), prediction in zip(waiting, predictions))
            waiting.clear()

        for name, info in members.items():
            try:
                with archive.open(info) as member:
                    item = read_image_input(member.read(MAX_IMAGE_BYTES + 1), name)
            except InvalidImageError as error:
                raise ArchiveError(f"{path}: member {error}") from error
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                raise ArchiveError(f"{path}: member {name!r} cannot be read ({error}).") from error
            if manifest is None:
                waiting.append((name, item))
                if len(waiting) == 64:
                    predict_waiting()
                continue
            line, row = manifest[name]
            if row.get("content_hash") and row["content_hash"] != item.content_hash:
                raise ArchiveError(f"{path}: labels.csv line {line}: content_hash does not match {name!r}.")
            entries.append(ArchiveEntry(name, info.file_size, row.get("created_at") or now, NewPrediction(
                item.content_hash, b"", item.extension, row.get("source") or name, row["predicted_label"],
                row["confidence"], row["final_label"], row.get("model_version") or "unknown", row["is_ood"],
                row["ood_score"])))
        if waiting:
            predict_waiting()
        return entries


def _label_of(member: str) -> str:
    return member.partition("/")[0]


def _image_members(path: str | Path, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Every image member, checked for a safe path, a plausible size and a class folder."""
    from classifier import CLASSES

    images = {}
    for info in archive.infolist():
        name = info.filename
        if name.startswith(("/", "\\")) or "\\" in name or ".." in name.split("/") or re.match(r"^[A-Za-z]:", name):
            raise ArchiveError(f"{path}: member {name!r} has an unsafe path (absolute, or with '..').")
        if info.is_dir():
            continue
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


def _read_manifest(path: str | Path, archive: zipfile.ZipFile, images: dict) -> dict[str, tuple[int, dict]]:
    """labels.csv checked against the archive: each image listed exactly once, labels and numbers valid.
    Returns member -> (line number, row)."""
    from classifier import CLASSES

    try:
        reader = csv.DictReader(io.StringIO(archive.read("labels.csv").decode("utf-8-sig")))
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error, zipfile.BadZipFile, OSError) as error:
        raise ArchiveError(f"{path}: labels.csv cannot be read as UTF-8 CSV ({error}).") from error
    missing = {"file", "final_label", "predicted_label", "confidence"} - set(reader.fieldnames or ())
    if missing:
        raise ArchiveError(f"{path}: labels.csv lacks the column(s) {', '.join(sorted(missing))}.")
    checked: dict[str, tuple[int, dict]] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{path}: labels.csv line {line}"
        if None in row or None in row.values():
            raise ArchiveError(f"{where} has the wrong number of fields.")
        name = row["file"]
        if name not in images:
            raise ArchiveError(f"{where} names {name!r}, which is not an image in the archive.")
        if name in checked:
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
            except ValueError as error:
                raise ArchiveError(f"{where}: created_at {row['created_at']!r} is not an ISO date and time.") from error
            created = created if created.tzinfo else created.replace(tzinfo=timezone.utc)
            row["created_at"] = created.astimezone(timezone.utc).isoformat(timespec="seconds")
        flag, score = row.get("is_ood") or "0", row.get("ood_score") or ""
        if flag not in ("0", "1"):
            raise ArchiveError(f"{where}: is_ood {flag!r} is not 0 or 1.")
        try:
            ood_score = float(score) if score else None
        except ValueError as error:
            raise ArchiveError(f"{where}: ood_score {score!r} is not a number.") from error
        checked[name] = (line, {**row, "confidence": confidence, "is_ood": flag == "1", "ood_score": ood_score})
    unlisted = sorted(set(images) - set(checked))
    if unlisted:
        more = f" and {len(unlisted) - 1} other image(s)" if len(unlisted) > 1 else ""
        raise ArchiveError(f"{path}: labels.csv does not list {unlisted[0]!r}{more}.")
    return checked


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


def main(argv: Sequence[str]) -> int:
    import argparse
    import getpass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["export", "import"])
    parser.add_argument("archive", type=Path)
    args = parser.parse_args(argv)
    try:
        store = Store.from_env()
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        print(f"store: {store.describe()}", file=sys.stderr)
        if args.command == "export":
            args.archive.parent.mkdir(parents=True, exist_ok=True)
            partial = args.archive.with_name(args.archive.name + ".partial")
            with open(partial, "wb") as stream:
                for chunk in store.iter_archive():
                    stream.write(chunk)
            os.replace(partial, args.archive)
            print(f"wrote {args.archive}: {store.count()} records", file=sys.stderr)
            return 0
        if configured_admin_password() and not admin_password_ok(getpass.getpass("Admin password: ")):
            print(f"error: wrong admin password ({ADMIN_PASSWORD_ENV} is set): nothing imported.", file=sys.stderr)
            return 1
        result = store.import_archive(args.archive, _predict_with_shipped_model, _progress)
        print(f"imported {result.saved} records; {result.unchanged} were already saved", file=sys.stderr)
        return 0
    except (StoreError, ArchiveError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
