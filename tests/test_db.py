"""db.Store on both backends (SQLite + a folder, PostgreSQL + SeaweedFS S3, real servers): saving, relabelling,
undo, deletion, paging, consistency under concurrency and crashes, and the defects the storage issue listed."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

import db
from conftest import ROOT, use_store
from db import NewPrediction, RecordFilter, Store, StoreError


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


def test_undoing_a_save_reads_no_images(store, monkeypatch):
    """Defect 5: undoing a save read every saved image into memory."""
    result = store.save_predictions([prediction(str(i)) for i in range(5)])

    def refuse(name):
        raise AssertionError(f"undo read {name}")

    monkeypatch.setattr(store.images, "get", refuse)
    assert "5 removed" in store.undo(result.change) and store.count() == 0


def test_clear_removes_rows_and_images(store, backend):
    store.save_predictions([prediction("a"), prediction("b")])
    assert store.clear() == 2
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
    run = subprocess.run([sys.executable, "-c", "import db; print(db.DEFAULT_DB_PATH, db.DEFAULT_IMAGE_DIR)"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert run.stdout.split() == [str(ROOT / "image_classification.db"), str(ROOT / "temp_images")]


# ---------------------------------------------------------------- migrations

def test_migrates_a_version_1_sqlite_database_and_never_reuses_its_ids(tmp_path):
    path = tmp_path / "old.db"
    connection = sqlite3.connect(path)
    connection.executescript(db.MIGRATIONS[0])
    connection.execute("INSERT INTO predictions (id, content_hash, image_file, source, predicted_label, confidence,"
                       " final_label, is_correct, created_at) VALUES (7, 'h', 'h.png', 'old.png', 'cat', 0.5, 'dog', 0,"
                       " '2026-01-02T03:04:05+00:00')")
    connection.execute("PRAGMA user_version = 1")
    connection.commit()
    connection.close()
    store = Store(db.SQLiteDatabase(path), db.FolderImages(tmp_path / "images"))
    [row] = store.list_predictions()
    assert row.source == "old.png" and row.model_version == "unknown" and row.edits == 0
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    store.delete_predictions([7])
    [new_id] = [record_id for record_id, _ in store.save_predictions([prediction("new")]).change.created]
    assert new_id == 8


def test_refuses_a_database_from_a_newer_app(tmp_path):
    path = tmp_path / "new.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {db.SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        Store(db.SQLiteDatabase(path), db.FolderImages(tmp_path / "images"))


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
            assert connection.execute("SELECT version FROM schema_version").fetchall() == [(db.SCHEMA_VERSION,)]


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
    assert database  # the good URL works: the refusals above were the credentials and addresses


# ---------------------------------------------------------------- admin password

def test_admin_password(monkeypatch, tmp_path):
    monkeypatch.delenv("CIFAR10_ADMIN_PASSWORD", raising=False)
    monkeypatch.setattr(db, "ROOT", tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert db.configured_admin_password() is None and db.admin_password_ok("")
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "secrets.toml").write_text('CIFAR10_ADMIN_PASSWORD = "from-secrets"\n')
    assert db.configured_admin_password() == "from-secrets"
    assert db.admin_password_ok("from-secrets") and not db.admin_password_ok("")
    monkeypatch.setenv("CIFAR10_ADMIN_PASSWORD", "from-env")
    assert db.admin_password_ok("from-env") and not db.admin_password_ok("from-secrets")
