"""The Store: saved records and their images behind one interface, safe to share between threads and between
servers. What keeps rows and images consistent is in db.py's docstring; the SQL is in sql.py, each database's
and each image store's differences in their own module."""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from dataclasses import replace
from datetime import date, datetime, timezone
from typing import Callable, Iterable, Iterator, Sequence

import sql
from classes import CLASSES
from database_postgres import PostgresDatabase
from database_sqlite import SQLiteDatabase
from image_store import ImageStore
from images_folder import FolderImages
from images_s3 import S3Images
from records import (COLUMNS, Change, ClearResult, DeletedPrediction, ImageMissing, NewPrediction, RecordFilter,
                     SavedPrediction, SaveResult, StoreError, Summary, image_name)
from settings import DATABASE_URL_ENV, DB_PATH_ENV, DEFAULT_DB_PATH, DEFAULT_IMAGE_DIR, IMAGE_DIR_ENV, IMAGE_STORE_ENV
from sql import BATCH, SCHEMA_VERSION, Cursor, Database

# A save takes seconds; an image without a row that is older than this was left by a save that died.
LEFTOVER_GRACE_S = 15 * 60
# Images whose removal failed (image store down) are removed again in the background: first after this many
# seconds, then twice as long each time, up to the maximum, until it works.
CLEANUP_RETRY_S = 5.0
CLEANUP_RETRY_MAX_S = 300.0
# Originals a save holds in memory at once: it writes the new images in groups of about this many bytes, all inside
# its one transaction.
SAVE_GROUP_BYTES = 64 << 20


class Store:
    """Records and their images behind one interface; safe to share between threads and between servers."""

    def __init__(self, database: Database, images: ImageStore) -> None:
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
            return sql.run_migrations(cursor, version, uuid.uuid4().hex)

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
            store_id = sql.store_id(cursor)
            fingerprint = self.database.fingerprint(cursor)
        holder = self.images.owners().get(store_id)
        if holder == fingerprint:
            return store_id, fingerprint
        if holder is not None:
            try:
                with self.database.transaction(write=True) as cursor:
                    store_id = sql.replace_store_id(cursor, store_id, uuid.uuid4().hex)  # or another server's
            except StoreError:  # read-only: it keeps an id whose mark it does not hold, so it removes nothing
                return store_id, fingerprint
        self.images.add_owner(store_id, fingerprint)
        return store_id, fingerprint

    # ------------------------------------------------------------ reading

    def revision(self) -> int:
        """Bumped by every change to the records: what caches of charts and pages key on."""
        with self.database.transaction(write=False) as cursor:
            return sql.revision(cursor)

    def find_saved(self, content_hashes: Sequence[str]) -> dict[str, SavedPrediction]:
        """The saved records among these hashes, so the page can say an image was seen before."""
        if not content_hashes:
            return {}
        with self.database.transaction(write=False) as cursor:
            return {record.content_hash: record for record in sql.records_by_hash(cursor, content_hashes)}

    def summary(self) -> Summary:
        """Everything the sidebar shows, from one grouped query."""
        with self.database.transaction(write=False) as cursor:
            groups = sql.label_pairs(cursor)
        counts: dict[str, int] = {}
        matrix = [[0] * len(CLASSES) for _ in CLASSES]
        correct = incorrect = 0
        for final, predicted, count in groups:
            counts[final] = counts.get(final, 0) + count
            correct += count if final == predicted else 0
            incorrect += 0 if final == predicted else count
            if final in CLASSES and predicted in CLASSES:
                matrix[CLASSES.index(final)][CLASSES.index(predicted)] = count
        return Summary(counts, correct, incorrect, matrix)

    def saved_by(self, person: str) -> tuple[int, int]:
        """(how many records this person saved, how many of them the model had right), from one indexed query."""
        with self.database.transaction(write=False) as cursor:
            return sql.saved_by(cursor, person)

    def people(self) -> list[str]:
        """Everyone who saved or labelled a record (History's filter by person)."""
        with self.database.transaction(write=False) as cursor:
            return sql.people(cursor)

    def model_names(self) -> list[str]:
        """Every model version that predicted a saved record (History's filter by version)."""
        with self.database.transaction(write=False) as cursor:
            return sql.model_names(cursor)

    def count(self, record_filter: RecordFilter = RecordFilter()) -> int:
        with self.database.transaction(write=False) as cursor:
            return sql.count(cursor, record_filter)

    def list_predictions(self, record_filter: RecordFilter = RecordFilter(), limit: int | None = None,
                         offset: int = 0) -> list[SavedPrediction]:
        """Saved records, newest first, one page of them when limit is given."""
        with self.database.transaction(write=False) as cursor:
            return sql.newest_first(cursor, record_filter, limit, offset)

    def date_range(self) -> tuple[date, date] | None:
        """The UTC days of the first and the last saved record, or None when nothing is saved."""
        with self.database.transaction(write=False) as cursor:
            first, last = sql.first_and_last_saved(cursor)
        if first is None:
            return None
        return datetime.fromisoformat(first).date(), datetime.fromisoformat(last).date()

    def image_bytes(self, record: SavedPrediction) -> bytes:
        return self.images.get(record.image_file)

    def thumbnails(self, records: Sequence[SavedPrediction]) -> dict[int, bytes]:
        """The stored small JPEGs of these records (one query; records saved before there were none are absent)."""
        if not records:
            return {}
        with self.database.transaction(write=False) as cursor:
            return sql.thumbnails_by_id(cursor, [record.id for record in records])

    def image_or_nothing(self, record: SavedPrediction) -> bytes:
        """The record's image, or b"" when it is missing (a row an older version left without its image)."""
        try:
            return self.images.get(record.image_file)
        except ImageMissing:
            return b""

    def iter_records(self) -> Iterator[SavedPrediction]:
        """Every record in id order, a batch per query: bounded memory at any size."""
        last = 0
        while True:
            with self.database.transaction(write=False) as cursor:
                records = sql.records_after(cursor, last)
            if not records:
                return
            yield from records
            last = records[-1].id

    # ------------------------------------------------------------ saving

    def save_predictions(self, predictions: Sequence[NewPrediction],
                         original: Callable[[NewPrediction], bytes] | None = None, by: str = "") -> SaveResult:
        """Save them in one transaction: new pictures are stored, saved ones whose label changed are relabelled, the
        rest left as they are; `by` (the signed-in person's e-mail, or "") is who saved the new ones and who gave
        every label it sets, now. The new images go to the image store before the rows commit, SAVE_GROUP_BYTES of
        them at a time: `original` gives a new picture's bytes when the prediction does not carry them (the page's
        originals wait on disk), so a Save of a thousand photos never holds them all in memory. A save that fails
        commits nothing and takes back the images it wrote (later, should the image store be failing)."""
        latest = {prediction.content_hash: prediction for prediction in predictions}  # the same picture twice: last wins
        written: list[str] = []
        try:
            with self.database.transaction(write=True) as cursor:
                saved = {record.content_hash: record for record in sql.records_by_hash(cursor, list(latest))}
                new = [prediction for digest, prediction in latest.items() if digest not in saved]
                self._put_in_groups(new, original or (lambda prediction: prediction.data), written)
                now = datetime.now(timezone.utc).isoformat(timespec="seconds")
                created: list[tuple[int, int]] = [(record_id, 0) for record_id in sql.insert_rows(cursor, [
                    sql.new_row(replace(p, saved_by=by, labelled_by=by, labelled_at=now), now) for p in new])]
                changes = [(saved[digest], prediction.final_label, by, now) for digest, prediction in latest.items()
                           if digest in saved and saved[digest].final_label != prediction.final_label]
                sql.relabel(cursor, changes)
                relabelled: list[tuple[int, int, str, str, str]] = [
                    (record.id, record.edits + 1, record.final_label, record.labelled_by, record.labelled_at)
                    for record, *_ in changes]
                if created or relabelled:
                    sql.bump_revision(cursor)
        except BaseException:
            self._remove_or_defer(written)
            raise
        changed = len(created) + len(relabelled)
        change = Change(f"save of {changed} image{'s' * (changed != 1)}", tuple(created), tuple(relabelled)) \
            if changed else None
        return SaveResult(saved=len(created), updated=len(relabelled),
                          unchanged=len(latest) - changed, change=change)  # pictures: one sent twice is one

    def _put_in_groups(self, new: Sequence[NewPrediction], original: Callable[[NewPrediction], bytes],
                       written: list[str]) -> None:
        """Write the images of these new pictures, about SAVE_GROUP_BYTES of originals in memory at a time (at least
        one picture). Each group is added to `written` before it is written: a put that fails half-way leaves some."""
        group: list[tuple[str, bytes]] = []
        size = 0
        for index, prediction in enumerate(new):
            data = original(prediction)
            group.append((image_name(prediction.content_hash, prediction.extension), data))
            size += len(data)
            if size >= SAVE_GROUP_BYTES or index == len(new) - 1:
                written += [name for name, _ in group]
                self.images.put_many(group)
                group, size = [], 0

    def save_imported(self, items: Sequence[tuple[NewPrediction, str]]) -> int:
        """Save a batch of an imported archive, (prediction with its bytes and thumbnail, created_at) each, in one
        transaction; pictures already saved are left as they are. Returns how many records it created. A batch
        that fails takes its images back with it (later, should the image store be failing), or every retry
        would leave them again."""
        written: list[str] = []
        try:
            with self.database.transaction(write=True) as cursor:
                saved = {record.content_hash for record in sql.records_by_hash(
                    cursor, [prediction.content_hash for prediction, _ in items])}
                new = [(prediction, created_at) for prediction, created_at in items if prediction.content_hash not in saved]
                written = [image_name(prediction.content_hash, prediction.extension) for prediction, _ in new]
                self.images.put_many([(name, prediction.data) for name, (prediction, _) in zip(written, new)])
                created = sql.insert_rows(cursor, [sql.new_row(prediction, created_at) for prediction, created_at in new])
                if created:
                    sql.bump_revision(cursor)
        except BaseException:
            self._remove_or_defer(written)
            raise
        return len(created)

    # ------------------------------------------------------------ deleting and undoing

    def delete_predictions(self, prediction_ids: Sequence[int], saved_by: str | None = None) -> Change | None:
        """Delete a few records (History's Delete), only those `saved_by` this person when given; their images go
        once the deletion has committed. The change returned holds their bytes, so the deletion can be undone."""
        with self.database.transaction(write=True) as cursor:
            records = [record for record in sql.records_by_ids(cursor, prediction_ids)
                       if saved_by is None or record.saved_by == saved_by]
            thumbnails = sql.thumbnails_by_id(cursor, [record.id for record in records])
            deleted = tuple(DeletedPrediction(record, self.image_or_nothing(record), thumbnails.get(record.id))
                            for record in records)
            sql.delete_ids(cursor, [record.id for record in records])
            if records:
                sql.bump_revision(cursor)
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
                image_file = sql.delete_if_unchanged(cursor, record_id, edits)
                if image_file is not None:
                    removed.append(image_file)
                elif sql.records_by_ids(cursor, [record_id]):
                    changed_since += 1
                else:
                    gone += 1
            for record_id, edits, previous, previous_by, previous_at in change.relabelled:
                now = sql.records_by_ids(cursor, [record_id])
                if not now:
                    gone += 1
                elif now[0].edits != edits:
                    changed_since += 1
                else:
                    sql.relabel(cursor, [(now[0], previous, previous_by, previous_at)])
                    relabelled += 1
            back = [item for item in change.deleted if item.data and not sql.records_by_hash(cursor, [item.record.content_hash])]
            self.images.put_many([(item.record.image_file, item.data) for item in back])
            sql.insert_rows(cursor, [{column: getattr(item.record, column) for column in COLUMNS}
                                     | {"thumbnail": item.thumbnail} for item in back])
            if removed or relabelled or back:
                sql.bump_revision(cursor)
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
            names = sql.image_files(cursor)
            sql.delete_all(cursor)
            sql.bump_revision(cursor)
        return ClearResult(len(names), self._remove_or_defer(names, sweep=True))

    def remove_leftovers(self, grace_s: float = LEFTOVER_GRACE_S) -> int:
        """Remove images (and half-written files) of saves that died before COMMIT, and model files of jobs that
        died before theirs, older than the grace period, which another server may still be inside. Returns how
        many went."""
        older_than = time.time() - grace_s
        removed = self.images.remove_partials(older_than)
        old = (name for name, modified in self.images.stored() if modified < older_than)
        return removed + self._remove_unreferenced_among(old) + self._remove_unnamed_models(older_than)

    def _remove_unnamed_models(self, older_than: float) -> int:
        """Model files no version names, older than the grace period: those of a job killed while it kept its
        version (its files go to the image store before its row commits)."""
        return self.remove_unnamed_models([name for name, modified in self.images.stored_models()
                                           if modified < older_than])

    def remove_unnamed_models(self, names: Sequence[str]) -> int:
        """Remove those of these model files that no version names, under the write lock, as for images; none
        where another database uses this image store too. Returns how many went."""
        if not names or self._other_owners():
            return 0
        with self.database.transaction(write=True) as cursor:
            unnamed = [name for name in names if name not in sql.model_files(cursor)]
            self.images.delete_many(unnamed)
        return len(unnamed)

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
            referenced = sql.referenced_images(cursor, names)
            unreferenced = [name for name in dict.fromkeys(names) if name not in referenced]
            self.images.delete_many(unreferenced)
        return len(unreferenced)


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
