"""The SQL, in one place: the schema and its migrations, and every statement the store runs, the same text for
SQLite and PostgreSQL (written with ? placeholders; `Cursor` turns them into each driver's). The two databases'
other differences (connecting, locking, errors) live in database_sqlite.py and database_postgres.py."""

from __future__ import annotations

import json
from datetime import date, timedelta
from typing import Callable, ContextManager, Protocol, Sequence

from records import COLUMNS, ModelJob, ModelVersion, NewPrediction, RecordFilter, SavedPrediction, image_name

# Rows per statement: bounded memory, SQLite's variable limit, few round trips.
BATCH = 500

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
    # Who did what, once people sign in: who saved each record (e-mail), who gave it its final label last, and when.
    # Empty for the records saved before; without sign-in the names stay empty and labelled_at is kept. created_at
    # is when a record was saved. The indexes serve a person's own count and accuracy (the sidebar) and History's
    # filter by person.
    """
    ALTER TABLE predictions ADD COLUMN saved_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE predictions ADD COLUMN labelled_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE predictions ADD COLUMN labelled_at TEXT NOT NULL DEFAULT '';
    CREATE INDEX predictions_saved_by ON predictions (saved_by, is_correct);
    CREATE INDEX predictions_labelled_by ON predictions (labelled_by);
    """,
    # Model versions, kept in the store so that every server serves the same one: each version's files (weights,
    # model card, novelty bank) are in the image store under their content hash, its card (what the Model page
    # shows) here too; store_meta names the active one. model_jobs: the fine-tuning jobs, one running at a time
    # across every server, each with its progress and a heartbeat (a job whose process died stops beating).
    """
    CREATE TABLE model_versions (
        id INTEGER PRIMARY KEY,
        weights_file TEXT NOT NULL,
        card_file TEXT NOT NULL,
        bank_file TEXT NOT NULL,
        card TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('shipped', 'promoted', 'rejected')),
        made_from INTEGER,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        records_seen BIGINT NOT NULL
    );
    ALTER TABLE store_meta ADD COLUMN active_model INTEGER;
    CREATE TABLE model_jobs (
        id INTEGER PRIMARY KEY,
        started_by TEXT NOT NULL,
        started_at TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed', 'cancelled')),
        beat_at DOUBLE PRECISION NOT NULL,
        progress DOUBLE PRECISION NOT NULL,
        seconds_left DOUBLE PRECISION,
        message TEXT NOT NULL,
        cancel INTEGER NOT NULL CHECK (cancel IN (0, 1)),
        version_id INTEGER
    );
    CREATE INDEX model_predictions ON predictions (model_version);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class Database(Protocol):
    """What the store needs of a database; SQLiteDatabase and PostgresDatabase each hold one's differences."""

    description: str

    def transaction(self, write: bool) -> ContextManager[Cursor]:
        """One transaction; a write one holds the store-wide write lock from its start."""
    def schema_version(self) -> int:
        """The schema's version, read without writing (a read-only database opens)."""
    def migrate(self, run: Callable[[Cursor, int], int]) -> int:
        """run(cursor, version) under the migration lock, in one transaction; records the version it returns."""
    def fingerprint(self, cursor: Cursor) -> str:
        """Which database this is, whatever its content: a copy has another."""
    def close(self) -> None: ...


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


def run_migrations(cursor: Cursor, version: int, new_store_id: str) -> int:
    """Upgrade the schema from `version` to SCHEMA_VERSION; a database new to store_meta gets its id."""
    for migration in MIGRATIONS[version:]:
        for statement in migration.split(";"):
            if statement.strip():
                cursor.execute(statement)
    cursor.execute("UPDATE store_meta SET store_id = ? WHERE store_id = ''", (new_store_id,))
    return SCHEMA_VERSION


# ---------------------------------------------------------------- store_meta: id, revision, last id

def store_id(cursor: Cursor) -> str:
    return cursor.one("SELECT store_id FROM store_meta")["store_id"]


def replace_store_id(cursor: Cursor, old: str, new: str) -> str:
    """Take a new id unless another server already did; returns the id the database has now."""
    cursor.execute("UPDATE store_meta SET store_id = ? WHERE store_id = ?", (new, old))
    return store_id(cursor)


def revision(cursor: Cursor) -> int:
    return cursor.one("SELECT revision FROM store_meta")["revision"]


def bump_revision(cursor: Cursor) -> None:
    cursor.execute("UPDATE store_meta SET revision = revision + 1 WHERE id = 1")


# ---------------------------------------------------------------- reading records

def record_from_row(row) -> SavedPrediction:
    return SavedPrediction(**{column: row[column] for column in COLUMNS} | {
        "is_correct": bool(row["is_correct"]), "is_ood": bool(row["is_ood"])})


def records_by_hash(cursor: Cursor, content_hashes: Sequence[str]) -> list[SavedPrediction]:
    records = []
    for start in range(0, len(content_hashes), BATCH):
        chunk = list(content_hashes[start:start + BATCH])
        records += [record_from_row(row) for row in cursor.rows(
            f"SELECT {', '.join(COLUMNS)} FROM predictions WHERE content_hash IN ({placeholders(len(chunk))})", chunk)]
    return records


def records_by_ids(cursor: Cursor, ids: Sequence[int]) -> list[SavedPrediction]:
    if not ids:
        return []
    return [record_from_row(row) for row in cursor.rows(
        f"SELECT {', '.join(COLUMNS)} FROM predictions WHERE id IN ({placeholders(len(ids))}) ORDER BY id", list(ids))]


def records_after(cursor: Cursor, last_id: int) -> list[SavedPrediction]:
    """The next BATCH records in id order after last_id: paging that stays fast at any size."""
    return [record_from_row(row) for row in cursor.rows(
        f"SELECT {', '.join(COLUMNS)} FROM predictions WHERE id > ? ORDER BY id LIMIT {BATCH}", (last_id,))]


def thumbnails_by_id(cursor: Cursor, ids: Sequence[int]) -> dict[int, bytes]:
    if not ids:
        return {}
    rows = cursor.rows(f"SELECT id, thumbnail FROM predictions WHERE id IN ({placeholders(len(ids))}) "
                       "AND thumbnail IS NOT NULL", list(ids))
    return {row["id"]: bytes(row["thumbnail"]) for row in rows}


def label_pairs(cursor: Cursor) -> list[tuple[str, str, int]]:
    """(final label, predicted label, how many records): all the sidebar needs, from one grouped query."""
    return [(row["final_label"], row["predicted_label"], row["n"]) for row in cursor.rows(
        "SELECT final_label, predicted_label, COUNT(*) AS n FROM predictions GROUP BY final_label, predicted_label")]


def saved_by(cursor: Cursor, person: str) -> tuple[int, int]:
    """(records this person saved, how many of them the model had right): the sidebar's own figures."""
    row = cursor.one("SELECT COUNT(*) AS n, COALESCE(SUM(is_correct), 0) AS correct FROM predictions "
                     "WHERE saved_by = ?", (person,))
    return row["n"], row["correct"]


def people(cursor: Cursor) -> list[str]:
    """Everyone who saved or labelled a record, in order (each from its index)."""
    return sorted({row["person"] for row in cursor.rows(
        "SELECT DISTINCT saved_by AS person FROM predictions WHERE saved_by <> '' UNION "
        "SELECT DISTINCT labelled_by AS person FROM predictions WHERE labelled_by <> ''")})


def model_names(cursor: Cursor) -> list[str]:
    """Every model version that predicted a saved record, in order (from its index)."""
    return sorted(row["model_version"] for row in cursor.rows("SELECT DISTINCT model_version FROM predictions"))


def count(cursor: Cursor, record_filter: RecordFilter) -> int:
    where, parameters = where_clause(record_filter)
    return cursor.one(f"SELECT COUNT(*) AS n FROM predictions{where}", parameters)["n"]


def newest_first(cursor: Cursor, record_filter: RecordFilter, limit: int | None, offset: int) -> list[SavedPrediction]:
    where, parameters = where_clause(record_filter)
    page = "" if limit is None else f" LIMIT {max(0, int(limit))} OFFSET {max(0, int(offset))}"
    return [record_from_row(row) for row in cursor.rows(
        f"SELECT {', '.join(COLUMNS)} FROM predictions{where} ORDER BY created_at DESC, id DESC{page}", parameters)]


def first_and_last_saved(cursor: Cursor) -> tuple[str | None, str | None]:
    # Two subqueries, so that each reads one end of the created_at index instead of every row.
    row = cursor.one("SELECT (SELECT MIN(created_at) FROM predictions) AS first, "
                     "(SELECT MAX(created_at) FROM predictions) AS last")
    return row["first"], row["last"]


def image_files(cursor: Cursor) -> list[str]:
    return [row["image_file"] for row in cursor.rows("SELECT image_file FROM predictions")]


def referenced_images(cursor: Cursor, names: Sequence[str]) -> set[str]:
    """Those of these image names that a row names."""
    return {row["image_file"] for row in cursor.rows(
        f"SELECT image_file FROM predictions WHERE image_file IN ({placeholders(len(names))})", list(names))}


def where_clause(record_filter: RecordFilter) -> tuple[str, list]:
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
    if record_filter.people:
        listed = placeholders(len(record_filter.people))
        clauses.append(f"(saved_by IN ({listed}) OR labelled_by IN ({listed}))")
        parameters += [*record_filter.people, *record_filter.people]
    if record_filter.models:
        clauses.append(f"model_version IN ({placeholders(len(record_filter.models))})")
        parameters += list(record_filter.models)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), parameters


# ---------------------------------------------------------------- writing records

def new_row(prediction: NewPrediction, created_at: str) -> dict:
    """The row of a new record; who saved and labelled it, and when it was labelled, are the prediction's."""
    return {
        "content_hash": prediction.content_hash,
        "image_file": image_name(prediction.content_hash, prediction.extension),
        # PostgreSQL text cannot hold NUL: a crafted name keeps a visible stand-in on both databases.
        "source": prediction.source.replace("\x00", "\ufffd"), "predicted_label": prediction.predicted_label,
        "confidence": min(1.0, max(0.0, float(prediction.confidence))), "final_label": prediction.final_label,
        "is_correct": int(prediction.final_label == prediction.predicted_label), "created_at": created_at,
        "model_version": prediction.model_version, "edits": 0, "is_ood": int(prediction.is_ood),
        "ood_score": None if prediction.ood_score is None else float(prediction.ood_score),
        "thumbnail": prediction.thumbnail, "saved_by": prediction.saved_by.replace("\x00", "\ufffd"),
        "labelled_by": prediction.labelled_by.replace("\x00", "\ufffd"), "labelled_at": prediction.labelled_at,
    }


def insert_rows(cursor: Cursor, rows: Sequence[dict]) -> list[int]:
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


def relabel(cursor: Cursor, changes: Sequence[tuple[SavedPrediction, str, str, str]]) -> None:
    """Give records new final labels, each with who gave it and when (record, label, by, at), in one batch (one
    round trip on PostgreSQL's pipeline)."""
    cursor.execute_many("UPDATE predictions SET final_label = ?, is_correct = ?, labelled_by = ?, labelled_at = ?, "
                        "edits = edits + 1 WHERE id = ?",
                        [(label, int(label == record.predicted_label), by.replace("\x00", "\ufffd"), at, record.id)
                         for record, label, by, at in changes])


def delete_ids(cursor: Cursor, ids: Sequence[int]) -> None:
    if ids:
        cursor.execute(f"DELETE FROM predictions WHERE id IN ({placeholders(len(ids))})", list(ids))


def delete_if_unchanged(cursor: Cursor, record_id: int, edits: int) -> str | None:
    """Delete the record if nobody changed it since (same edit count); returns its image's name, or None."""
    row = cursor.one("DELETE FROM predictions WHERE id = ? AND edits = ? RETURNING image_file", (record_id, edits))
    return None if row is None else row["image_file"]


def delete_all(cursor: Cursor) -> None:
    cursor.execute("DELETE FROM predictions")


# ---------------------------------------------------------------- model versions and fine-tuning jobs

VERSION_COLUMNS = ("id", "weights_file", "card_file", "bank_file", "card", "status", "made_from", "created_at",
                   "created_by", "records_seen")
JOB_COLUMNS = ("id", "started_by", "started_at", "state", "beat_at", "progress", "seconds_left", "message", "cancel",
               "version_id")


def version_from_row(row) -> ModelVersion:
    return ModelVersion(**{column: row[column] for column in VERSION_COLUMNS} | {"card": json.loads(row["card"])})


def model_versions(cursor: Cursor) -> list[ModelVersion]:
    return [version_from_row(row) for row in cursor.rows(
        f"SELECT {', '.join(VERSION_COLUMNS)} FROM model_versions ORDER BY id")]


def model_version(cursor: Cursor, version_id: int) -> ModelVersion | None:
    row = cursor.one(f"SELECT {', '.join(VERSION_COLUMNS)} FROM model_versions WHERE id = ?", (version_id,))
    return None if row is None else version_from_row(row)


def active_model(cursor: Cursor) -> int | None:
    return cursor.one("SELECT active_model FROM store_meta")["active_model"]


def set_active_model(cursor: Cursor, version_id: int) -> None:
    cursor.execute("UPDATE store_meta SET active_model = ? WHERE id = 1", (version_id,))


def insert_version(cursor: Cursor, version: dict) -> int:
    """A new version (its fields but the id); returns its id, one more than any before."""
    version_id = cursor.one("SELECT COALESCE(MAX(id), 0) + 1 AS next FROM model_versions")["next"]
    row = version | {"id": version_id, "card": json.dumps(version["card"])}
    cursor.execute(f"INSERT INTO model_versions ({', '.join(VERSION_COLUMNS)}) "
                   f"VALUES ({placeholders(len(VERSION_COLUMNS))})", [row[column] for column in VERSION_COLUMNS])
    return version_id


def model_files(cursor: Cursor) -> set[str]:
    """Every file a version names."""
    return {row[column] for row in cursor.rows("SELECT weights_file, card_file, bank_file FROM model_versions")
            for column in ("weights_file", "card_file", "bank_file")}


def record_count(cursor: Cursor) -> int:
    return cursor.one("SELECT COUNT(*) AS n FROM predictions")["n"]


def job_from_row(row) -> ModelJob:
    return ModelJob(**{column: row[column] for column in JOB_COLUMNS} | {"cancel": bool(row["cancel"])})


def latest_job(cursor: Cursor) -> ModelJob | None:
    row = cursor.one(f"SELECT {', '.join(JOB_COLUMNS)} FROM model_jobs ORDER BY id DESC LIMIT 1")
    return None if row is None else job_from_row(row)


def job(cursor: Cursor, job_id: int) -> ModelJob | None:
    row = cursor.one(f"SELECT {', '.join(JOB_COLUMNS)} FROM model_jobs WHERE id = ?", (job_id,))
    return None if row is None else job_from_row(row)


def insert_job(cursor: Cursor, started_by: str, started_at: str, beat_at: float) -> int:
    job_id = cursor.one("SELECT COALESCE(MAX(id), 0) + 1 AS next FROM model_jobs")["next"]
    cursor.execute("INSERT INTO model_jobs (id, started_by, started_at, state, beat_at, progress, seconds_left, "
                   "message, cancel, version_id) VALUES (?, ?, ?, 'running', ?, 0, NULL, 'starting', 0, NULL)",
                   (job_id, started_by.replace("\x00", "\ufffd"), started_at, beat_at))
    return job_id


def beat_job(cursor: Cursor, job_id: int, beat_at: float, progress: float, seconds_left: float | None,
             message: str) -> None:
    cursor.execute("UPDATE model_jobs SET beat_at = ?, progress = ?, seconds_left = ?, message = ? "
                   "WHERE id = ? AND state = 'running'", (beat_at, progress, seconds_left, message, job_id))


def end_job(cursor: Cursor, job_id: int, state: str, message: str, version_id: int | None = None) -> None:
    cursor.execute("UPDATE model_jobs SET state = ?, message = ?, version_id = ?, seconds_left = NULL "
                   "WHERE id = ? AND state = 'running'", (state, message, version_id, job_id))


def cancel_job(cursor: Cursor, job_id: int) -> None:
    cursor.execute("UPDATE model_jobs SET cancel = 1 WHERE id = ? AND state = 'running'", (job_id,))
