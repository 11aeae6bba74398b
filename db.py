"""A thin sqlite3 layer: saved predictions, their stored images, and the counts the charts need.

Images are files named by content hash under the image folder, not BLOBs: the database stays small
and fast to query, the files can be browsed and exported as they are, and the hash makes saving
idempotent. Files are written inside the write transaction, so an orphan file can only come from a
save that died before COMMIT; `remove_orphan_files` deletes those while holding the write lock.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sqlite3
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Sequence

DB_PATH_ENV = "CIFAR10_DB_PATH"
IMAGE_DIR_ENV = "CIFAR10_IMAGE_DIR"
DEFAULT_DB_PATH = "image_classification.db"
DEFAULT_IMAGE_DIR = Path(__file__).resolve().parent / "temp_images"

# Each entry upgrades the schema by one version; PRAGMA user_version records how many have run.
MIGRATIONS = (
    """
    CREATE TABLE predictions (
        id INTEGER PRIMARY KEY,
        content_hash TEXT NOT NULL UNIQUE,
        image_file TEXT NOT NULL,
        source TEXT NOT NULL,
        predicted_label TEXT NOT NULL,
        confidence REAL NOT NULL CHECK (confidence BETWEEN 0 AND 1),
        final_label TEXT NOT NULL,
        is_correct INTEGER NOT NULL CHECK (is_correct IN (0, 1)),
        created_at TEXT NOT NULL
    );
    CREATE INDEX predictions_final_label ON predictions (final_label);
    """,
    """
    ALTER TABLE predictions ADD COLUMN model_version TEXT NOT NULL DEFAULT 'unknown';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
EXPORT_COLUMNS = ("id", "source", "predicted_label", "confidence", "final_label", "is_correct", "created_at",
                  "model_version", "content_hash")


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


@dataclass(frozen=True)
class SaveResult:
    saved: int
    already_saved: int
    ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class DeletedPrediction:
    """A deleted record with its image bytes, kept so the deletion can be undone."""

    record: SavedPrediction
    data: bytes


@dataclass(frozen=True)
class Undo:
    """The last save or delete of a session, and how to take it back."""

    description: str
    saved_ids: tuple[int, ...] = ()
    deleted: tuple[DeletedPrediction, ...] = ()

    def apply(self, store: "Store") -> str:
        """Take the change back; returns what to tell the person."""
        changed = len(store.delete_predictions(self.saved_ids)) + store.restore_predictions(self.deleted)
        return f"Undid the {self.description} ({changed} record{'s' * (changed != 1)})."


class Store:
    """One database file and its image folder. Every call opens its own connection: safe across Streamlit's threads."""

    def __init__(self, db_path: str | Path, image_dir: str | Path) -> None:
        self.db_path = Path(db_path)
        self.image_dir = Path(image_dir)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        if self.db_path.parent != Path(""):
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            migrate(connection)

    @classmethod
    def from_env(cls) -> "Store":
        return cls(os.environ.get(DB_PATH_ENV, DEFAULT_DB_PATH), os.environ.get(IMAGE_DIR_ENV, DEFAULT_IMAGE_DIR))

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA busy_timeout=30000")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.row_factory = sqlite3.Row
            yield connection
        finally:
            connection.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE takes the write lock up front, so writers queue on busy_timeout instead of failing."""
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def image_path(self, image_file: str) -> Path:
        return self.image_dir / image_file

    def save_predictions(self, predictions: Sequence[NewPrediction]) -> SaveResult:
        """Save a batch in one transaction; images whose hash is already saved are skipped, not duplicated."""
        ids = []
        with self._write() as connection:
            for prediction in predictions:
                exists = connection.execute(
                    "SELECT 1 FROM predictions WHERE content_hash = ?", (prediction.content_hash,)).fetchone()
                if exists:
                    continue
                image_file = f"{prediction.content_hash}.{prediction.extension}"
                _write_file_atomically(self.image_path(image_file), prediction.data)
                ids.append(_insert(
                    connection, content_hash=prediction.content_hash, image_file=image_file,
                    source=prediction.source, predicted_label=prediction.predicted_label,
                    confidence=float(prediction.confidence), final_label=prediction.final_label,
                    is_correct=int(prediction.final_label == prediction.predicted_label),
                    created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    model_version=prediction.model_version,
                ))
        return SaveResult(saved=len(ids), already_saved=len(predictions) - len(ids), ids=tuple(ids))

    def find_saved(self, content_hashes: Sequence[str]) -> dict[str, SavedPrediction]:
        """The saved records among these hashes, so the page can say an image was seen before."""
        if not content_hashes:
            return {}
        placeholders = ", ".join("?" * len(content_hashes))
        with self._connect() as connection:
            rows = connection.execute(
                f"SELECT * FROM predictions WHERE content_hash IN ({placeholders})", list(content_hashes)).fetchall()
        return {row["content_hash"]: _saved(row) for row in rows}

    def list_predictions(self, labels: Sequence[str] = (), corrected_only: bool = False,
                         since: date | None = None, until: date | None = None) -> list[SavedPrediction]:
        """Saved records, newest first, optionally only some final labels, only corrections, or a date range (UTC)."""
        where, parameters = [], []
        if labels:
            where.append(f"final_label IN ({', '.join('?' * len(labels))})")
            parameters += list(labels)
        if corrected_only:
            where.append("is_correct = 0")
        if since is not None:
            where.append("created_at >= ?")
            parameters.append(since.isoformat())
        if until is not None:
            where.append("created_at < ?")
            parameters.append((until + timedelta(days=1)).isoformat())
        query = "SELECT * FROM predictions" + (" WHERE " + " AND ".join(where) if where else "")
        with self._connect() as connection:
            rows = connection.execute(query + " ORDER BY created_at DESC, id DESC", parameters).fetchall()
        return [_saved(row) for row in rows]

    def export_csv(self) -> str:
        """Every record as CSV, for spreadsheets."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(EXPORT_COLUMNS)
        for record in self.list_predictions():
            writer.writerow([getattr(record, column) for column in EXPORT_COLUMNS])
        return buffer.getvalue()

    def export_zip(self) -> bytes:
        """Images in ImageFolder layout by final label (airplane/<hash>.jpg ...) plus a labels.csv manifest."""
        buffer = io.BytesIO()
        manifest = io.StringIO()
        writer = csv.writer(manifest)
        writer.writerow(["file"] + list(EXPORT_COLUMNS))
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for record in self.list_predictions():
                path = self.image_path(record.image_file)
                if not path.exists():
                    continue
                name = f"{record.final_label}/{record.image_file}"
                archive.write(path, name)
                writer.writerow([name] + [getattr(record, column) for column in EXPORT_COLUMNS])
            archive.writestr("labels.csv", manifest.getvalue())
        return buffer.getvalue()

    def class_counts(self) -> dict[str, int]:
        """Saved images per final label."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT final_label, COUNT(*) FROM predictions GROUP BY final_label").fetchall()
        return {label: count for label, count in rows}

    def accuracy_counts(self) -> tuple[int, int]:
        """(correct, incorrect) predictions among saved images."""
        with self._connect() as connection:
            correct, total = connection.execute(
                "SELECT COALESCE(SUM(is_correct), 0), COUNT(*) FROM predictions").fetchone()
        return correct, total - correct

    def delete_predictions(self, prediction_ids: Sequence[int]) -> list[DeletedPrediction]:
        """Delete records, then their files: a failure in between leaves orphan files, never a dangling row."""
        deleted = []
        with self._write() as connection:
            for prediction_id in prediction_ids:
                row = connection.execute("SELECT * FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
                if row is None:
                    continue
                record = _saved(row)
                path = self.image_path(record.image_file)
                deleted.append(DeletedPrediction(record, path.read_bytes() if path.exists() else b""))
                connection.execute("DELETE FROM predictions WHERE id = ?", (prediction_id,))
        for item in deleted:
            self.image_path(item.record.image_file).unlink(missing_ok=True)
        return deleted

    def restore_predictions(self, deleted: Sequence[DeletedPrediction]) -> int:
        """Undo a deletion: the same rows (same ids and times) and files come back, unless saved again meanwhile."""
        restored = 0
        with self._write() as connection:
            for item in deleted:
                record = item.record
                if connection.execute("SELECT 1 FROM predictions WHERE content_hash = ? OR id = ?",
                                      (record.content_hash, record.id)).fetchone():
                    continue
                _write_file_atomically(self.image_path(record.image_file), item.data)
                _insert(connection, **{**dataclasses.asdict(record), "is_correct": int(record.is_correct)})
                restored += 1
        return restored

    def confusion_counts(self) -> list[list[int]]:
        """Saved feedback as a matrix: rows are final (true) labels, columns predicted labels, in CLASSES order."""
        from classifier import CLASSES

        matrix = [[0] * len(CLASSES) for _ in CLASSES]
        with self._connect() as connection:
            for final, predicted, count in connection.execute(
                    "SELECT final_label, predicted_label, COUNT(*) FROM predictions GROUP BY 1, 2"):
                if final in CLASSES and predicted in CLASSES:
                    matrix[CLASSES.index(final)][CLASSES.index(predicted)] = count
        return matrix

    def clear(self) -> int:
        """Delete every record, then every stored image; returns how many records went."""
        with self._write() as connection:
            deleted = connection.execute("DELETE FROM predictions").rowcount
        for path in self._stored_files():
            path.unlink(missing_ok=True)
        return deleted

    def remove_orphan_files(self) -> int:
        """Delete stored files that no record points to (left by a save that was killed before COMMIT)."""
        removed = 0
        with self._write() as connection:
            referenced = {row[0] for row in connection.execute("SELECT image_file FROM predictions")}
            for path in self._stored_files():
                if path.name not in referenced:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def _stored_files(self) -> list[Path]:
        """Every file the store owns in the image folder, half-written ones included (not .gitkeep)."""
        return [path for path in self.image_dir.iterdir() if path.is_file() and path.name != ".gitkeep"]


def migrate(connection: sqlite3.Connection) -> int:
    """Bring the schema up to SCHEMA_VERSION, one migration per transaction; returns the version reached."""
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"The database has schema version {version}, newer than this app's {SCHEMA_VERSION}.")
    for number in range(version, SCHEMA_VERSION):
        connection.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the lock: another process may have migrated meanwhile.
            if connection.execute("PRAGMA user_version").fetchone()[0] > number:
                connection.execute("ROLLBACK")
                continue
            for statement in MIGRATIONS[number].split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number + 1}")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
    return SCHEMA_VERSION


def _insert(connection: sqlite3.Connection, **columns) -> int:
    """One row into predictions, columns named by keyword; returns its id."""
    names = ", ".join(columns)
    placeholders = ", ".join("?" * len(columns))
    return connection.execute(f"INSERT INTO predictions ({names}) VALUES ({placeholders})",
                              list(columns.values())).lastrowid


def _write_file_atomically(path: Path, data: bytes) -> None:
    if path.exists():
        return
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _saved(row: sqlite3.Row) -> SavedPrediction:
    return SavedPrediction(
        id=row["id"], content_hash=row["content_hash"], image_file=row["image_file"], source=row["source"],
        predicted_label=row["predicted_label"], confidence=row["confidence"], final_label=row["final_label"],
        is_correct=bool(row["is_correct"]), created_at=row["created_at"], model_version=row["model_version"],
    )
