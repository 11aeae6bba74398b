"""db.Store on both backends (SQLite + a folder, PostgreSQL + SeaweedFS S3, real servers): saving, relabelling,
undo, deletion, paging, consistency under concurrency and crashes, and the defects the storage issue listed."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import pytest

import db
import settings
import sql
import store as store_module
from archives import iter_csv
from conftest import ROOT, use_store
from database_sqlite import SQLiteDatabase
from db import NewPrediction, RecordFilter, Store, StoreError
from images_folder import FolderImages
from records import ClearResult


def prediction(seed: str, predicted: str = "cat", final: str | None = None, source: str | None = None,
               size: int = 0) -> NewPrediction:
    data = f"image bytes {seed}".encode() + os.urandom(size)
    return NewPrediction(content_hash=hashlib.sha256(data).hexdigest(), data=data, extension="png",
                         source=source or f"{seed}.png", predicted_label=predicted, confidence=0.75,
                         final_label=final or predicted, model_version="test@1")


@pytest.fixture
def store(backend):
    return backend.store()


def labels(store: Store) -> dict[str, str]:
    return {record.source: record.final_label for record in store.list_predictions()}


def assert_every_row_has_its_image(store: Store) -> None:
    names = {name for name, _ in store.images.stored()}
    for record in store.list_predictions():
        assert record.image_file in names, f"{record.source}: row without its image"


# ---------------------------------------------------------------- saving

def test_save_stores_rows_and_images_named_by_hash(store, backend):
    batch = [prediction("a"), prediction("b", final="dog"), prediction("c", source="../../etc/passwd\x00<b>.png")]
    result = store.save_predictions(batch)
    assert (result.saved, result.updated, result.unchanged) == (3, 0, 0)
    rows = {row.content_hash: row for row in store.list_predictions()}
    assert set(rows) == {item.content_hash for item in batch}
    for item in batch:
        row = rows[item.content_hash]
        assert row.image_file == f"{item.content_hash}.png" and store.image_bytes(row) == item.data
        assert row.source == item.source.replace("\x00", "\ufffd") and row.model_version == "test@1"
        assert row.is_correct == (item.final_label == item.predicted_label)
    assert backend.image_names() == {f"{item.content_hash}.png" for item in batch}


def test_saving_the_same_labels_twice_does_not_duplicate(store):
    batch = [prediction("a"), prediction("b")]
    store.save_predictions(batch)
    revision = store.revision()
    again = store.save_predictions(batch + [prediction("c")])
    assert (again.saved, again.updated, again.unchanged) == (1, 0, 2)
    assert store.count() == 3 and store.revision() == revision + 1
    assert store.save_predictions(batch).change is None and store.revision() == revision + 1  # nothing changed


def test_relabelling_a_saved_image_updates_it_and_undo_restores_the_old_label(store):
    """Defect 4: a correction of an image saved before used to be dropped as 'already saved'."""
    store.save_predictions([prediction("a", "cat"), prediction("b", "cat")])
    result = store.save_predictions([prediction("a", "cat", final="dog"), prediction("b", "cat")])
    assert (result.saved, result.updated, result.unchanged) == (0, 1, 1)
    [record] = store.list_predictions(RecordFilter(labels=("dog",)))
    assert record.source == "a.png" and not record.is_correct and record.edits == 1
    assert store.summary().incorrect == 1
    message = store.undo(result.change)
    assert "1 given back its old label" in message
    assert labels(store) == {"a.png": "cat", "b.png": "cat"} and store.summary().incorrect == 0


def test_a_correction_is_dated_when_it_is_made_and_undo_gives_the_old_date_back(store):
    """Issue 27.6: a correction that kept the old labelled_at passed every test (the clock steps in seconds)."""
    store.save_predictions([prediction("a", "cat")], by="ana@example.com")
    long_ago = "2020-01-02T03:04:05+00:00"
    with store.database.transaction(write=True) as cursor:
        cursor.execute("UPDATE predictions SET labelled_at = ?", (long_ago,))
    before = datetime.now(timezone.utc).replace(microsecond=0)
    result = store.save_predictions([prediction("a", "cat", final="dog")], by="bo@example.com")
    [record] = store.list_predictions()
    assert (record.final_label, record.labelled_by) == ("dog", "bo@example.com")
    assert before <= datetime.fromisoformat(record.labelled_at) <= datetime.now(timezone.utc)
    store.undo(result.change)
    [record] = store.list_predictions()
    assert (record.final_label, record.labelled_by, record.labelled_at) == ("cat", "ana@example.com", long_ago)


def test_one_picture_twice_in_a_batch_keeps_the_last_label(store):
    """save_predictions' promise, kept whether the picture is new or saved before; it is one picture in the counts."""
    result = store.save_predictions([prediction("a", "cat", final="dog", source="first.png"),
                                     prediction("a", "cat", final="ship", source="last.png")])
    assert (result.saved, result.updated, result.unchanged) == (1, 0, 0)
    [record] = store.list_predictions()
    assert (record.source, record.final_label, record.edits) == ("last.png", "ship", 0)
    result = store.save_predictions([prediction("a", "cat", final="truck"), prediction("a", "cat", final="ship")])
    assert (result.saved, result.updated, result.unchanged, result.change) == (0, 0, 1, None)
    result = store.save_predictions([prediction("a", "cat", final="ship"), prediction("a", "cat", final="horse")])
    assert (result.saved, result.updated, result.unchanged) == (0, 1, 0)
    [record] = store.list_predictions()
    assert (record.final_label, record.edits) == ("horse", 1) and store.count() == 1


def test_summary_for_the_sidebar(store):
    empty = store.summary()
    assert empty.total == 0 and empty.class_counts == {}
    store.save_predictions([prediction("a", "cat"), prediction("b", "cat", final="dog"),
                            prediction("c", "cat", final="dog"), prediction("d", "ship")])
    summary = store.summary()
    assert summary.class_counts == {"cat": 1, "dog": 2, "ship": 1}
    assert (summary.correct, summary.incorrect) == (2, 2)
    assert summary.confusion[3][3] == 1 and summary.confusion[5][3] == 2 and summary.confusion[8][8] == 1


def test_find_saved(store):
    first = prediction("a", final="dog")
    store.save_predictions([first])
    found = store.find_saved([first.content_hash, prediction("z").content_hash])
    assert list(found) == [first.content_hash] and found[first.content_hash].final_label == "dog"


# ---------------------------------------------------------------- deleting and undoing

def test_delete_one_record_removes_its_image_and_undo_brings_both_back(store, backend):
    store.save_predictions([prediction("a"), prediction("b", final="dog")])
    victim = store.list_predictions()[0]
    change = store.delete_predictions([victim.id])
    assert victim.image_file not in backend.image_names() and store.count() == 1
    assert store.delete_predictions([victim.id]) is None
    assert "1 restored" in store.undo(change)
    assert victim in store.list_predictions() and store.image_bytes(victim) == change.deleted[0].data
    assert "saved again since" in store.undo(change) and store.count() == 2  # never duplicated


def test_undo_a_save_removes_exactly_its_records(store, backend):
    store.save_predictions([prediction("old")])
    result = store.save_predictions([prediction("a"), prediction("b")])
    assert "2 removed" in store.undo(result.change)
    assert list(labels(store)) == ["old.png"] and len(backend.image_names()) == 1


def test_a_stale_undo_never_touches_a_record_made_after_a_clear(store):
    """Defect 3: ids were reused, so an old 'Undo' deleted someone else's new record."""
    first = store.save_predictions([prediction("mine")])
    store.clear()
    store.save_predictions([prediction("theirs")])
    assert store.list_predictions()[0].id not in [record_id for record_id, _ in first.change.created]
    assert "already gone" in store.undo(first.change)
    assert list(labels(store)) == ["theirs.png"]


def test_undo_leaves_records_someone_changed_since(store):
    result = store.save_predictions([prediction("a", "cat")])
    store.save_predictions([prediction("a", "cat", final="ship")])  # another person relabels it
    assert "changed by someone else since" in store.undo(result.change)
    assert labels(store) == {"a.png": "ship"}


def test_undo_of_a_relabel_leaves_a_label_someone_changed_again_since(store):
    store.save_predictions([prediction("a", "cat"), prediction("b", "cat")])
    mine = store.save_predictions([prediction("a", "cat", final="dog"), prediction("b", "cat", final="dog")])
    store.save_predictions([prediction("a", "cat", final="ship")])  # another person relabels one of them again
    message = store.undo(mine.change)
    assert "1 given back its old label" in message and "1 changed by someone else since" in message
    assert labels(store) == {"a.png": "ship", "b.png": "cat"}
    [theirs] = store.list_predictions(RecordFilter(labels=("ship",)))
    assert theirs.edits == 2 and not theirs.is_correct


def test_undoing_a_save_reads_no_images(store, monkeypatch):
    """Defect 5: undoing a save read every saved image into memory."""
    result = store.save_predictions([prediction(str(i)) for i in range(5)])

    def refuse(name):
        raise AssertionError(f"undo read {name}")

    monkeypatch.setattr(store.images, "get", refuse)
    assert "5 removed" in store.undo(result.change) and store.count() == 0


def test_clear_removes_rows_and_images(store, backend):
    store.save_predictions([prediction("a"), prediction("b")])
    assert store.clear() == ClearResult(deleted=2, removal_note="")
    assert store.count() == 0 and backend.image_names() == set()


@pytest.mark.parametrize("action", ["clear", "delete"])
def test_a_save_of_the_same_picture_racing_a_removal_keeps_its_image(store, backend, action):
    """Defect 2: files were removed after COMMIT, outside the lock, so a save of the same picture in between
    kept its row and lost its image. Here a second server saves that picture while the removal is under way."""
    picture = prediction("shared")
    store.save_predictions([picture])
    other_server = backend.store()
    saved = []
    real_delete = store.images.delete_many

    def delete_while_another_server_saves(names):
        racer = threading.Thread(target=lambda: saved.append(other_server.save_predictions([picture])))
        racer.start()
        racer.join(timeout=1.0)  # it must wait for the lock; without one it saves right now
        real_delete(names)
        racer_threads.append(racer)

    racer_threads: list[threading.Thread] = []
    store.images.delete_many = delete_while_another_server_saves
    if action == "clear":
        store.clear()
    else:
        store.delete_predictions([store.list_predictions()[0].id])
    for racer in racer_threads:
        racer.join(timeout=30)
    assert saved and saved[0].saved == 1
    assert labels(store) == {"shared.png": "cat"}
    assert_every_row_has_its_image(store)
    assert store.image_bytes(store.list_predictions()[0]) == picture.data


# ---------------------------------------------------------------- reading: pages, filters, dates

def test_history_pages_filters_and_dates_in_sql(store):
    batch = [prediction(f"{i:03d}", "cat", final="dog" if i % 3 == 0 else "cat") for i in range(120)]
    for start in range(0, 120, 40):
        store.save_predictions(batch[start:start + 40])
    assert store.count() == 120 and store.count(RecordFilter(corrected_only=True)) == 40
    pages = [store.list_predictions(limit=50, offset=offset) for offset in (0, 50, 100)]
    assert [len(page) for page in pages] == [50, 50, 20]
    ids = [record.id for page in pages for record in page]
    assert len(set(ids)) == 120 and ids == sorted(ids, reverse=True)  # newest first, none twice
    dogs = store.list_predictions(RecordFilter(labels=("dog",)), limit=10, offset=30)
    assert len(dogs) == 10 and {record.final_label for record in dogs} == {"dog"}
    today = datetime.now(timezone.utc).date()
    assert store.date_range() == (today, today)
    assert store.count(RecordFilter(since=today, until=today)) == 120
    assert store.count(RecordFilter(since=today + timedelta(days=1))) == 0
    assert store.count(RecordFilter(until=today - timedelta(days=1))) == 0


def test_an_empty_store_has_no_date_range(store):
    assert store.date_range() is None and store.list_predictions(limit=50) == []


# ---------------------------------------------------------------- leftovers and foreign files

def test_leftover_clean_up_touches_only_old_images_this_store_wrote(store, backend):
    """Defect 1: the clean-up deleted any file no record named, a person's own photos included."""
    kept = prediction("kept")
    store.save_predictions([kept])
    orphan = f"{'ab' * 32}.jpg"
    store.images.put_many([(orphan, b"left by a killed save")])
    if backend.name == "sqlite":
        folder = store.images.folder
        for name in ("holiday.jpg", "notes.txt", f"{'cd' * 32}.jpg.bak"):
            (folder / name).write_bytes(b"mine")
    assert store.remove_leftovers() == 0  # young: another server may still be inside that save
    assert orphan in backend.image_names()
    assert store.remove_leftovers(grace_s=0) == 1
    assert backend.image_names() == {kept.content_hash + ".png"}
    if backend.name == "sqlite":
        assert {"holiday.jpg", "notes.txt", f"{'cd' * 32}.jpg.bak"} <= {p.name for p in folder.iterdir()}


def test_a_second_database_on_the_same_images_never_deletes_them(backend, tmp_path, monkeypatch):
    """Defect 1: a server started elsewhere opened a new, empty database and deleted the real one's images."""
    real = backend.store()
    real.save_predictions([prediction("precious")])
    if backend.name == "sqlite":
        monkeypatch.setenv("CIFAR10_DB_PATH", str(tmp_path / "elsewhere" / "new.db"))
    else:
        url = backend.env["CIFAR10_DATABASE_URL"]
        monkeypatch.setenv("CIFAR10_DATABASE_URL", url.rsplit("/", 1)[0] + "/postgres")
    stray = Store.from_env()
    try:
        assert stray.count() == 0 and stray.store_id != real.store_id
        stray.remove_leftovers(grace_s=0)
        stray.clear()
    finally:
        stray.close()
    assert_every_row_has_its_image(real)
    assert real.count() == 1


def test_the_default_database_sits_next_to_app_py_whatever_the_working_directory(tmp_path):
    run = subprocess.run([sys.executable, "-c", "import settings; print(settings.DEFAULT_DB_PATH, settings.DEFAULT_IMAGE_DIR)"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert run.stdout.split() == [str(ROOT / "image_classification.db"), str(ROOT / "temp_images")]


# ---------------------------------------------------------------- migrations

def sqlite_file_at_version(path, version: int, *statements: str):
    """An SQLite file as a release at schema `version` left it: its migrations run, then `statements` (its rows)."""
    connection = sqlite3.connect(path)
    for migration in sql.MIGRATIONS[:version]:
        connection.executescript(migration)
    for statement in statements:
        connection.execute(statement)
    connection.execute(f"PRAGMA user_version = {version}")
    connection.commit()
    connection.close()
    return path


def test_migrates_a_version_1_sqlite_database_and_never_reuses_its_ids(tmp_path):
    path = sqlite_file_at_version(
        tmp_path / "old.db", 1,
        "INSERT INTO predictions (id, content_hash, image_file, source, predicted_label, confidence, final_label, "
        "is_correct, created_at) VALUES (7, 'h', 'h.png', 'old.png', 'cat', 0.5, 'dog', 0, '2026-01-02T03:04:05+00:00')")
    store = Store(SQLiteDatabase(path), FolderImages(tmp_path / "images"))
    [row] = store.list_predictions()
    assert row.source == "old.png" and row.model_version == "unknown" and row.edits == 0
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == sql.SCHEMA_VERSION
    store.delete_predictions([7])
    [new_id] = [record_id for record_id, _ in store.save_predictions([prediction("new")]).change.created]
    assert new_id == 8


def test_refuses_a_database_from_a_newer_app(tmp_path):
    path = tmp_path / "new.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        Store(SQLiteDatabase(path), FolderImages(tmp_path / "images"))


def test_a_server_starting_while_another_writes_to_a_new_sqlite_file_waits_for_it(tmp_path):
    """Switching a new file to WAL needs the write lock, and SQLite answers "locked" at once instead of waiting
    when another connection holds it (how several servers starting together failed in CI)."""
    path = tmp_path / "new.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE other_writer (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other_writer VALUES (1)")
    threading.Timer(0.5, lambda: writer.execute("COMMIT")).start()
    store = Store(SQLiteDatabase(path), FolderImages(tmp_path / "images"))
    assert store.count() == 0
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_an_owner_mark_being_written_is_never_read_half_written(tmp_path):
    """A server starting reads the marks while another writes its own: a mark read empty would count as another
    database's, and the starting server would take a second id for the same database (as CI once saw)."""
    images = FolderImages(tmp_path / "images")
    fingerprint = "sqlite:/data/feedback.db:" + "1234567" * 20
    seen: set[str] = set()
    stop = threading.Event()

    def read_marks() -> None:
        while not stop.is_set():
            seen.update(images.owners().values())

    reader = threading.Thread(target=read_marks)
    reader.start()
    try:
        for _ in range(500):
            images.add_owner("store", fingerprint)
    finally:
        stop.set()
        reader.join()
    assert seen == {fingerprint}


def _open_store_in_a_new_process(_: int) -> str:
    store = Store.from_env()
    store.close()
    return store.store_id


def test_several_servers_starting_at_once_migrate_once(backend):
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        store_ids = pool.map(_open_store_in_a_new_process, range(6))
    assert len(set(store_ids)) == 1
    if backend.name == "postgres":
        import psycopg

        with psycopg.connect(backend.env["CIFAR10_DATABASE_URL"]) as connection:
            assert connection.execute("SELECT version FROM schema_version").fetchall() == [(sql.SCHEMA_VERSION,)]


# ---------------------------------------------------------------- concurrency and crashes

def _save_batches(worker: int) -> int:
    store = Store.from_env()
    total = 0
    for batch in range(5):
        total += store.save_predictions([prediction(f"{worker}-{batch}-{i}") for i in range(10)]).saved
    store.close()
    return total


def test_several_processes_saving_at_once_lose_nothing(backend):
    backend.store()
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        saved = pool.map(_save_batches, range(6))
    assert saved == [50] * 6
    store = backend.store()
    assert store.count() == 300 and len(backend.image_names()) == 300
    assert len({record.id for record in store.list_predictions()}) == 300


def test_threads_saving_overlapping_batches_keep_one_record_per_picture(store):
    from concurrent.futures import ThreadPoolExecutor

    batch = [prediction(str(i)) for i in range(20)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: store.save_predictions(batch), range(6)))
    assert sum(result.saved for result in results) == 20 and store.count() == 20


CRASH_SCRIPT = r"""
import hashlib, sys, time
sys.path.insert(0, sys.argv[1])
import db

store = db.Store.from_env()
real_put = store.images.put_many
def slow_put(items):
    for item in items:
        real_put([item])
        print("wrote", flush=True)
        time.sleep(0.2)
store.images.put_many = slow_put
batch = [db.NewPrediction(hashlib.sha256(str(i).encode()).hexdigest(), str(i).encode(), "png", f"{i}.png",
                          "cat", 0.9, "cat", "v") for i in range(50)]
store.save_predictions(batch)
print("committed", flush=True)
"""


def test_a_save_killed_half_way_keeps_all_or_nothing_and_no_row_without_its_image(backend):
    store = backend.store()
    store.save_predictions([prediction("kept")])
    process = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(ROOT)], stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        assert process.stdout.readline().strip() == "wrote"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(0.5)  # PostgreSQL notices the dropped connection and rolls its transaction back
    assert labels(store) == {"kept.png": "cat"}  # none of the killed batch
    assert_every_row_has_its_image(store)
    assert len(backend.image_names()) >= 4  # the killed save had written images...
    assert store.remove_leftovers(grace_s=0) >= 3  # ...which the clean-up removes
    assert backend.image_names() == {store.list_predictions()[0].image_file}
    assert store.save_predictions([prediction("after")]).saved == 1


def test_sqlite_is_intact_after_the_kill(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_DB_PATH", str(tmp_path / "crash.db"))
    monkeypatch.setenv("CIFAR10_IMAGE_DIR", str(tmp_path / "images"))
    Store.from_env()
    process = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "wrote"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    connection = sqlite3.connect(tmp_path / "crash.db")
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert connection.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 0


# ---------------------------------------------------------------- failures of the servers

def test_object_store_stopped_during_a_save_then_restarted(request, monkeypatch):
    """A save that cannot store its images saves nothing and says which store failed; after a restart the same
    save works and nothing saved before is lost. (Its own S3 server: this test stops it.)"""
    from servers import SeaweedServer

    s3 = SeaweedServer()
    try:
        postgres = request.getfixturevalue("postgres_server")
        env = {"CIFAR10_DATABASE_URL": postgres.database("stopped_s3"), "CIFAR10_IMAGE_STORE": "s3://cifar10-stop/x",
               **s3.env()}
        use_store(monkeypatch, env)
        store = Store.from_env()
        store.save_predictions([prediction("before")])
        s3.stop()
        with pytest.raises(StoreError, match="object store s3://cifar10-stop/x") as caught:
            store.save_predictions([prediction("during", size=100_000), prediction("during-2")])
        assert "AWS_ENDPOINT_URL" in str(caught.value)
        assert store.count() == 1  # the database kept nothing of it
        s3.start()
        assert store.save_predictions([prediction("during", size=0), prediction("during-2")]).saved == 2
        assert set(labels(store)) == {"before.png", "during.png", "during-2.png"}
        assert_every_row_has_its_image(store)
        store.close()
    finally:
        s3.close()


def test_database_stopped_then_restarted(request, monkeypatch):
    from servers import PostgresServer

    postgres = PostgresServer()
    try:
        s3 = request.getfixturevalue("s3_server")
        use_store(monkeypatch, {"CIFAR10_DATABASE_URL": postgres.database("restart"),
                                "CIFAR10_IMAGE_STORE": "s3://cifar10-tests/restart", **s3.env()})
        store = Store.from_env()
        store.save_predictions([prediction("before")])
        postgres.stop()
        with pytest.raises(StoreError, match="PostgreSQL database at 127.0.0.1") as caught:
            store.save_predictions([prediction("during")])
        assert "CIFAR10_DATABASE_URL" in str(caught.value)
        postgres.start()
        assert store.save_predictions([prediction("during")]).saved == 1
        assert set(labels(store)) == {"before.png", "during.png"}
        store.close()
    finally:
        postgres.close()


def test_wrong_credentials_and_unreachable_servers_say_which_and_what_to_check(postgres_server, s3_server,
                                                                               monkeypatch, tmp_path):
    def opening(**env) -> str:
        use_store(monkeypatch, env)
        with pytest.raises(StoreError) as caught:
            Store.from_env().close()
        return str(caught.value)

    database = postgres_server.database("credentials")
    sqlite_env = {"CIFAR10_DB_PATH": str(tmp_path / "ok.db")}
    wrong_password = opening(CIFAR10_DATABASE_URL=postgres_server.url("credentials", password="Wr0ng-Passw0rd"),
                             CIFAR10_IMAGE_DIR=str(tmp_path / "images"))
    assert "PostgreSQL" in wrong_password and "password authentication failed" in wrong_password
    assert "Wr0ng-Passw0rd" not in wrong_password
    closed = opening(CIFAR10_DATABASE_URL="postgresql://postgres:x@127.0.0.1:9/none",
                     CIFAR10_IMAGE_DIR=str(tmp_path / "images"))
    assert "127.0.0.1:9" in closed and "CIFAR10_DATABASE_URL" in closed
    bad_key = opening(**sqlite_env, CIFAR10_IMAGE_STORE="s3://cifar10-tests/creds",
                      **{**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert "object store" in bad_key and "AWS_SECRET_ACCESS_KEY" in bad_key
    no_bucket = opening(**sqlite_env, CIFAR10_IMAGE_STORE="s3://x_/creds", **s3_server.env())
    assert "could not be created" in no_bucket
    unreachable = opening(**sqlite_env, CIFAR10_IMAGE_STORE="s3://cifar10-tests/creds",
                          **{**s3_server.env(), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert "could not be reached" in unreachable and "127.0.0.1:9" in unreachable
    # The right URL and keys open, on the same servers: the refusals above were the credentials and addresses.
    use_store(monkeypatch, {"CIFAR10_DATABASE_URL": database, "CIFAR10_IMAGE_STORE": "s3://cifar10-tests/creds",
                            **s3_server.env()})
    good = Store.from_env()
    try:
        assert good.save_predictions([prediction("works")]).saved == 1 and good.count() == 1
    finally:
        good.close()


# ---------------------------------------------------------------- admin password

def test_admin_password(monkeypatch, tmp_path):
    monkeypatch.delenv("CIFAR10_ADMIN_PASSWORD", raising=False)
    monkeypatch.setattr(settings, "SECRETS_FILES", (tmp_path / ".streamlit" / "secrets.toml",))
    assert db.configured_admin_password() is None and db.admin_password_ok("")
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "secrets.toml").write_text('CIFAR10_ADMIN_PASSWORD = "from-secrets"\n')
    assert db.configured_admin_password() == "from-secrets"
    assert db.admin_password_ok("from-secrets") and not db.admin_password_ok("")
    monkeypatch.setenv("CIFAR10_ADMIN_PASSWORD", "from-env")
    assert db.admin_password_ok("from-env") and not db.admin_password_ok("from-secrets")


# ---------------------------------------------------------------- round 2: copies, outages, read-only, small

def _copy_database(backend, tmp_path, monkeypatch) -> None:
    """Point the environment at a copy of the backend's database (same images): a staging file for SQLite, a
    pg_dump restored into another database for PostgreSQL."""
    if backend.name == "sqlite":
        original = sqlite3.connect(backend.env["CIFAR10_DB_PATH"])
        copy = sqlite3.connect(tmp_path / "staging.db")
        original.backup(copy)
        copy.close()
        original.close()
        monkeypatch.setenv("CIFAR10_DB_PATH", str(tmp_path / "staging.db"))
        return
    from servers import _find_postgres_bin

    url = backend.env["CIFAR10_DATABASE_URL"]
    copy_url = url.rsplit("/", 1)[0] + "/" + url.rsplit("/", 1)[1] + "_copy"
    import psycopg

    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{copy_url.rsplit("/", 1)[1]}"')
    dump = subprocess.run([_find_postgres_bin("pg_dump"), "--dbname", url], capture_output=True, check=True)
    subprocess.run([_find_postgres_bin("psql"), "-q", "-v", "ON_ERROR_STOP=1", "--dbname", copy_url],
                   input=dump.stdout, capture_output=True, check=True)
    monkeypatch.setenv("CIFAR10_DATABASE_URL", copy_url)


def test_a_copy_of_the_database_never_deletes_the_images_the_original_names(backend, tmp_path, monkeypatch):
    """Round 2, 1: the mark protecting a shared image store travelled with a copy, whose Clear database then
    deleted the original's images."""
    original = backend.store()
    original.save_predictions([prediction("a"), prediction("b"), prediction("c")])
    names = backend.image_names()
    _copy_database(backend, tmp_path, monkeypatch)
    copy = Store.from_env()
    try:
        assert copy.count() == 3 and copy.store_id != original.store_id
        first = copy.list_predictions()[0]
        copy.undo(copy.delete_predictions([first.id]))
        copy.delete_predictions([first.id])
        saved = copy.save_predictions([prediction("d")])
        copy.undo(saved.change)
        copy.remove_leftovers(grace_s=0)
        copy.clear()
        assert copy.count() == 0
    finally:
        copy.close()
    assert names <= backend.image_names()
    assert_every_row_has_its_image(original)
    reopened = Store.from_env()  # the copy opened again is still a copy: it still may not delete
    reopened.clear()
    reopened.close()
    assert names <= backend.image_names() and original.count() == 3


def test_a_mark_left_by_an_older_version_is_never_taken_so_a_copy_made_before_the_upgrade_deletes_nothing(
        backend, tmp_path, monkeypatch):
    """Older versions left an empty mark, which cannot tell the original from a copy made before the upgrade:
    whichever opens first, each takes an id of its own and neither removes an image; Clear says so."""
    original = backend.store()
    original.save_predictions([prediction("a"), prediction("b")])
    original.images.add_owner(original.store_id, "")  # the mark as older versions wrote it
    names = backend.image_names()
    _copy_database(backend, tmp_path, monkeypatch)
    copy = Store.from_env()  # the copy opens first after the upgrade
    use_store(monkeypatch, backend.env)
    reopened = Store.from_env()
    assert len({original.store_id, copy.store_id, reopened.store_id}) == 3
    cleared = copy.clear()
    assert cleared.deleted == 2 and "2 images stay in" in cleared.removal_note
    assert "another database uses it too" in cleared.removal_note
    copy.close()
    reopened.undo(reopened.delete_predictions([reopened.list_predictions()[0].id]))
    reopened.close()
    assert names <= backend.image_names()
    assert_every_row_has_its_image(original) and original.count() == 2


def test_a_copy_put_where_the_original_was_is_another_database(tmp_path, monkeypatch):
    """The same path is not enough (a copy at the same path on another machine, sharing a bucket): a copy is
    another file."""
    use_store(monkeypatch, {"CIFAR10_DB_PATH": str(tmp_path / "f.db"), "CIFAR10_IMAGE_DIR": str(tmp_path / "images")})
    original = Store.from_env()
    original.save_predictions([prediction("a")])
    names = {name for name, _ in original.images.stored()}
    shutil.move(tmp_path / "f.db", tmp_path / "elsewhere.db")
    copy = sqlite3.connect(tmp_path / "f.db")
    sqlite3.connect(tmp_path / "elsewhere.db").backup(copy)
    copy.close()
    same_path = Store.from_env()
    assert same_path.store_id != original.store_id and same_path.count() == 1
    same_path.clear()
    assert {name for name, _ in original.images.stored()} == names


def test_one_image_folder_reached_through_a_link_keeps_one_set_of_marks(tmp_path, monkeypatch):
    """A second database on the same folder through a symbolic link saw no other mark, and cleared the folder."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    use_store(monkeypatch, {"CIFAR10_DB_PATH": str(tmp_path / "a.db"), "CIFAR10_IMAGE_DIR": str(tmp_path / "real")})
    first = Store.from_env()
    first.save_predictions([prediction("a")])
    use_store(monkeypatch, {"CIFAR10_DB_PATH": str(tmp_path / "b.db"), "CIFAR10_IMAGE_DIR": str(tmp_path / "link")})
    second = Store.from_env()
    second.remove_leftovers(grace_s=0)
    second.clear()
    assert_every_row_has_its_image(first)


def test_a_record_dated_on_the_last_day_there_is_can_be_filtered(store):
    """An imported record of 31 December 9999 broke History's date filter (the day after it does not exist)."""
    store.save_predictions([prediction("a")])
    assert store.count(RecordFilter(since=date(2000, 1, 1), until=date.max)) == 1


def _freeze_folder(folder, frozen: bool) -> None:
    """chattr +i: files stay readable, nothing in the folder can be created or removed, even by root."""
    subprocess.run(["chattr", "+i" if frozen else "-i", str(folder)], check=True)


def _wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_removals_that_fail_say_what_committed_keep_the_undo_and_finish_once_the_images_can_be_removed(
        tmp_path, monkeypatch):
    """Round 2, 3 (folder): Delete, Undo and Clear committed their rows, then said nothing happened (and Delete
    lost its undo) when the image clean-up failed; the images are removed later, without a restart."""
    monkeypatch.setattr(store_module, "CLEANUP_RETRY_S", 0.2)
    monkeypatch.setattr(store_module, "CLEANUP_RETRY_MAX_S", 0.4)  # no long backoff while the test waits
    folder = tmp_path / "images"
    use_store(monkeypatch, {"CIFAR10_DB_PATH": str(tmp_path / "f.db"), "CIFAR10_IMAGE_DIR": str(folder)})
    store = Store.from_env()
    store.save_predictions([prediction("a"), prediction("b")])
    later = store.save_predictions([prediction("c")])
    victim = store.list_predictions(RecordFilter(labels=("cat",)))[-1]
    _freeze_folder(folder, True)
    try:
        change = store.delete_predictions([victim.id])
        assert change is not None and "1 image will be removed" in change.removal_note and store.count() == 2
        undone = store.undo(later.change)
        assert undone.startswith("Undid the save of 1 image: 1 removed") and "1 image will be removed" in undone
        cleared = store.clear()
        assert cleared.deleted == 1 and "1 image will be removed" in cleared.removal_note and store.count() == 0
        assert len({name for name, _ in store.images.stored()}) == 3  # nothing could go yet
    finally:
        _freeze_folder(folder, False)
    assert _wait_for(lambda: not any(folder.iterdir()))
    assert "1 restored" in store.undo(change)  # the delete's undo still works: it kept the bytes
    assert_every_row_has_its_image(store)
    store.close()


def test_an_object_store_down_during_undo_and_clear(request, monkeypatch):
    """Round 2, 3 (S3, stopped): the rows go, the page is told so, the images go once the store is back."""
    from servers import SeaweedServer

    monkeypatch.setattr(store_module, "CLEANUP_RETRY_S", 0.2)
    monkeypatch.setattr(store_module, "CLEANUP_RETRY_MAX_S", 0.4)  # no long backoff while the test waits
    s3 = SeaweedServer()
    try:
        postgres = request.getfixturevalue("postgres_server")
        use_store(monkeypatch, {"CIFAR10_DATABASE_URL": postgres.database("cleanup_later"),
                                "CIFAR10_IMAGE_STORE": "s3://cifar10-later/x", **s3.env()})
        store = Store.from_env()
        store.save_predictions([prediction("a"), prediction("b")])
        later = store.save_predictions([prediction("c")])
        s3.stop()
        with pytest.raises(StoreError):  # a delete must read the image first (its undo needs the bytes)
            store.delete_predictions([store.list_predictions()[0].id])
        assert store.count() == 3
        assert "1 image will be removed" in store.undo(later.change) and store.count() == 2
        cleared = store.clear()
        assert cleared.deleted == 2 and "2 images will be removed" in cleared.removal_note and store.count() == 0
        s3.start()
        assert _wait_for(lambda: not {name for name, _ in store.images.stored()})
        store.close()
    finally:
        s3.close()


def _make_read_only(url: str, read_only: bool) -> None:
    """What a failover to a standby or a maintenance window does: new transactions are read-only."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
        connection.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if read_only else "off"}')
        connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                           "AND pid <> pg_backend_pid()", (name,))


def test_a_read_only_postgres_refuses_writes_clearly_and_still_opens_for_reading(request, tmp_path, monkeypatch):
    """Round 2, 7: Save and Delete crashed the page, and a server started then could not open the store."""
    from conftest import make_backend

    backend = make_backend("postgres", request, tmp_path, monkeypatch)
    url = backend.env["CIFAR10_DATABASE_URL"]
    store = backend.store()
    store.save_predictions([prediction("a")])
    _make_read_only(url, True)
    try:
        for write in (lambda s: s.save_predictions([prediction("b")]),
                      lambda s: s.delete_predictions([s.list_predictions()[0].id]), lambda s: s.clear()):
            with pytest.raises(StoreError, match="read-only") as caught:
                write(store)
            assert "nothing was" in str(caught.value).lower()
        started_now = Store.from_env()
        assert started_now.count() == 1 and started_now.summary().total == 1
        assert started_now.list_predictions()[0].source == "a.png"
        assert b"".join(iter_csv(started_now)).count(b"\n") == 2
        with pytest.raises(StoreError, match="read-only"):
            started_now.save_predictions([prediction("b")])
        started_now.close()
    finally:
        _make_read_only(url, False)
    assert store.save_predictions([prediction("b")]).saved == 1
    backend.close()


def test_undo_of_a_delete_brings_back_the_stored_thumbnail(store):
    """Round 2, 10."""
    item = replace(prediction("a"), thumbnail=b"small jpeg")
    store.save_predictions([item])
    [record] = store.list_predictions()
    store.undo(store.delete_predictions([record.id]))
    assert store.thumbnails(store.list_predictions()) == {record.id: b"small jpeg"}


def test_export_names_the_records_it_could_not_write(backend, tmp_path):
    """Round 2, 10: records whose image is missing were dropped from `python db.py export` without a word."""
    store = backend.store()
    store.save_predictions([prediction("kept"), prediction("lost", source="lost-photo.png")])
    lost = store.list_predictions(RecordFilter())[0]
    assert lost.source == "lost-photo.png"
    store.images.delete_many([lost.image_file])
    run = subprocess.run([sys.executable, str(ROOT / "db.py"), "export", str(tmp_path / "out.zip")],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "wrote 1 record" in run.stderr and "lost-photo.png" in run.stderr and "Traceback" not in run.stderr


SHIPPED_MIGRATION_3 = """
    CREATE TABLE store_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        store_id TEXT NOT NULL,
        revision BIGINT NOT NULL,
        last_id BIGINT NOT NULL
    );
    INSERT INTO store_meta (id, store_id, revision, last_id) SELECT 1, '', 0, COALESCE(MAX(id), 0) FROM predictions;
    ALTER TABLE predictions ADD COLUMN edits INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX predictions_created_at ON predictions (created_at, id);
    """  # as released in e8744e3


@pytest.mark.parametrize("version", [3, 5])
def test_migration_3_is_as_shipped_and_every_database_gets_the_indexes_added_later(tmp_path, version):
    """Round 2, 10: migration 3 was edited after it shipped, so a database it had migrated never got the new
    indexes. The released text is kept, and a later migration adds them to every database."""
    assert sql.MIGRATIONS[2] == SHIPPED_MIGRATION_3
    path = sqlite_file_at_version(tmp_path / "old.db", version)
    Store(SQLiteDatabase(path), FolderImages(tmp_path / "images")).close()
    indexes = {row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"predictions_labels", "predictions_created_at"} <= indexes and "predictions_final_label" not in indexes


def test_multi_picture_jpegs_saved_by_older_versions_are_removed_like_any_image(store, backend):
    """Round 2, 9: older versions stored MPO pictures as <hash>.mpo, which clean-up and Clear never removed."""
    store.save_predictions([replace(prediction("camera"), extension="mpo"), prediction("plain")])
    assert any(name.endswith(".mpo") for name in backend.image_names())
    store.clear()
    assert backend.image_names() == set()


def test_the_csv_download_is_whole_past_its_internal_buffer(tmp_path):
    """iter_csv hands over its buffer every sql.BATCH rows and rewinds it: more than two buffers' worth must come out
    exactly once each (1,200 records gave 2,702 rows when the rewind was lost)."""
    import csv
    import io

    store = Store(SQLiteDatabase(tmp_path / "many.db"), FolderImages(tmp_path / "images"))
    count = 2 * sql.BATCH + 200
    store.save_predictions([NewPrediction(hashlib.sha256(b"%d" % i).hexdigest(), b"%d" % i, "png", f"{i}.png", "cat",
                                          0.5, "cat", "t") for i in range(count)])
    text = b"".join(iter_csv(store)).decode()
    assert text.count("\n") == count + 1
    table = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(table) == count and len({row["id"] for row in table}) == count
    assert {row["source"] for row in table} == {f"{i}.png" for i in range(count)}
    store.close()


HANG_IN_TRANSACTION_SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import db
import sql

store = db.Store.from_env()
real_insert = sql.insert_rows
def insert_then_hang(cursor, rows):
    ids = real_insert(cursor, rows)
    print("inserted", flush=True)  # every image written and every row inserted, not committed
    time.sleep(120)
    return ids
sql.insert_rows = insert_then_hang
store.save_predictions([db.NewPrediction(f"{i:064x}", b"%d" % i, "png", f"{i}.png", "cat", 0.9, "cat", "v")
                        for i in range(50)])
print("committed", flush=True)
"""


def _write_lock_is_held(backend) -> bool:
    """Whether another connection is holding the store's write lock now (asked without waiting for it)."""
    if backend.name == "sqlite":
        connection = sqlite3.connect(backend.env["CIFAR10_DB_PATH"], timeout=0, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            connection.close()
    import psycopg

    with psycopg.connect(backend.env["CIFAR10_DATABASE_URL"]) as connection:
        try:
            connection.execute("SELECT id FROM store_meta WHERE id = 1 FOR UPDATE NOWAIT")
            return False
        except psycopg.errors.LockNotAvailable:
            return True


def test_a_save_killed_inside_its_transaction_keeps_all_or_nothing_and_no_row_without_its_image(backend):
    """The other kill test kills while images are written, before any row is: this one kills after every row of
    the batch is inserted, while the save holds the write lock, just before COMMIT."""
    store = backend.store()
    store.save_predictions([prediction("kept")])
    process = subprocess.Popen([sys.executable, "-c", HANG_IN_TRANSACTION_SCRIPT, str(ROOT)], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "inserted"
        assert _wait_for(lambda: _write_lock_is_held(backend), timeout=10)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert _wait_for(lambda: not _write_lock_is_held(backend))  # PostgreSQL notices the dropped connection
    assert labels(store) == {"kept.png": "cat"} and store.count() == 1  # none of the killed batch
    assert_every_row_has_its_image(store)
    assert len(backend.image_names()) == 51  # the killed save had written its images...
    assert store.remove_leftovers(grace_s=0) == 50  # ...which the clean-up removes
    assert backend.image_names() == {store.list_predictions()[0].image_file}
    assert store.save_predictions([prediction("after")]).saved == 1
    if backend.name == "sqlite":
        with sqlite3.connect(backend.env["CIFAR10_DB_PATH"]) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
