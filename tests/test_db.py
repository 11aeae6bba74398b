"""db.Store on real SQLite files: saving, idempotence, counts, deletion, migrations, concurrency and crashes."""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from datetime import datetime, timedelta, timezone
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import db
from conftest import ROOT
from db import NewPrediction, Store


def prediction(seed: str, predicted: str = "cat", final: str | None = None, source: str | None = None) -> NewPrediction:
    data = f"image bytes {seed}".encode()
    return NewPrediction(content_hash=hashlib.sha256(data).hexdigest(), data=data, extension="png",
                         source=source or f"{seed}.png", predicted_label=predicted, confidence=0.75,
                         final_label=final or predicted, model_version="test@1")


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "feedback.db", tmp_path / "images")


def test_save_stores_rows_and_files_named_by_hash(store):
    batch = [prediction("a"), prediction("b", final="dog"), prediction("c", source="../../etc/passwd\x00<b>.png")]
    result = store.save_predictions(batch)
    assert (result.saved, result.already_saved) == (3, 0)
    rows = {row.content_hash: row for row in store.list_predictions()}
    assert set(rows) == {item.content_hash for item in batch}
    for item in batch:
        row = rows[item.content_hash]
        assert row.image_file == f"{item.content_hash}.png"
        assert store.image_path(row.image_file).read_bytes() == item.data
        assert row.source == item.source and row.model_version == "test@1"
        assert row.is_correct == (item.final_label == item.predicted_label)
    assert sorted(path.name for path in store.image_dir.iterdir()) == sorted(f"{i.content_hash}.png" for i in batch)


def test_saving_twice_does_not_duplicate(store):
    batch = [prediction("a"), prediction("b")]
    store.save_predictions(batch)
    again = store.save_predictions(batch + [prediction("c")])
    assert (again.saved, again.already_saved) == (1, 2)
    assert len(store.list_predictions()) == 3


def test_counts_for_the_charts(store):
    assert store.class_counts() == {} and store.accuracy_counts() == (0, 0)
    store.save_predictions([prediction("a", "cat"), prediction("b", "cat", final="dog"), prediction("c", "ship")])
    assert store.class_counts() == {"dog": 1, "cat": 1, "ship": 1}
    assert store.accuracy_counts() == (2, 1)


def test_find_saved(store):
    first = prediction("a", final="dog")
    store.save_predictions([first])
    found = store.find_saved([first.content_hash, prediction("z").content_hash])
    assert list(found) == [first.content_hash] and found[first.content_hash].final_label == "dog"


def test_delete_one_record_removes_its_file_and_undo_brings_both_back(store):
    store.save_predictions([prediction("a"), prediction("b", final="dog")])
    victim = store.list_predictions()[0]
    [deleted] = store.delete_predictions([victim.id])
    assert not store.image_path(victim.image_file).exists()
    assert len(store.list_predictions()) == 1 and store.delete_predictions([victim.id]) == []
    assert store.restore_predictions([deleted]) == 1
    assert victim in store.list_predictions() and store.image_path(victim.image_file).read_bytes() == deleted.data
    assert store.restore_predictions([deleted]) == 0  # never duplicated


def test_undo_a_save_by_its_ids(store):
    store.save_predictions([prediction("old")])
    result = store.save_predictions([prediction("a"), prediction("b")])
    assert len(result.ids) == 2
    store.delete_predictions(result.ids)
    assert [row.source for row in store.list_predictions()] == ["old.png"]
    assert len(list(store.image_dir.iterdir())) == 1


def test_confusion_counts(store):
    store.save_predictions([prediction("a", "cat"), prediction("b", "cat", final="dog"), prediction("c", "cat", final="dog")])
    matrix = store.confusion_counts()
    assert matrix[3][3] == 1 and matrix[5][3] == 2 and sum(map(sum, matrix)) == 3


def test_clear_removes_rows_and_files_but_keeps_gitkeep(store):
    (store.image_dir / ".gitkeep").touch()
    store.save_predictions([prediction("a"), prediction("b")])
    assert store.clear() == 2
    assert store.list_predictions() == [] and [p.name for p in store.image_dir.iterdir()] == [".gitkeep"]


def test_clear_failing_half_way_leaves_no_row_pointing_at_a_missing_file(store, monkeypatch):
    """A disk error after the first file is deleted: rows are already gone, the rest are orphans to clean."""
    store.save_predictions([prediction("a"), prediction("b"), prediction("c")])
    real_unlink, calls = type(store.image_dir).unlink, []

    def failing_unlink(path, missing_ok=False):
        calls.append(path)
        if len(calls) > 1:
            raise OSError("disk went away")
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(type(store.image_dir), "unlink", failing_unlink)
    with pytest.raises(OSError):
        store.clear()
    monkeypatch.undo()
    for row in store.list_predictions():
        assert store.image_path(row.image_file).exists()
    assert store.list_predictions() == [] and store.remove_orphan_files() == 2


def test_pragmas_and_schema_version(store):
    connection = sqlite3.connect(store.db_path)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION


def test_migrates_a_version_1_database(tmp_path):
    path = tmp_path / "old.db"
    connection = sqlite3.connect(path)
    connection.executescript(db.MIGRATIONS[0])
    connection.execute("INSERT INTO predictions (content_hash, image_file, source, predicted_label, confidence,"
                       " final_label, is_correct, created_at) VALUES ('h', 'h.png', 'old.png', 'cat', 0.5, 'dog', 0, 't')")
    connection.execute("PRAGMA user_version = 1")
    connection.commit()
    connection.close()
    store = Store(path, tmp_path / "images")
    [row] = store.list_predictions()
    assert row.source == "old.png" and row.model_version == "unknown"
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION


def test_refuses_a_database_from_a_newer_app(tmp_path):
    path = tmp_path / "new.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {db.SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        Store(path, tmp_path / "images")


def _save_batch(args: tuple[str, str, int]) -> int:
    db_path, image_dir, worker = args
    store = Store(db_path, image_dir)
    total = 0
    for batch in range(5):
        total += store.save_predictions([prediction(f"{worker}-{batch}-{i}") for i in range(10)]).saved
    return total


def test_concurrent_processes_lose_nothing_and_never_see_locked(tmp_path):
    db_path, image_dir = str(tmp_path / "shared.db"), str(tmp_path / "images")
    Store(db_path, image_dir)
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        saved = pool.map(_save_batch, [(db_path, image_dir, worker) for worker in range(6)])
    assert saved == [50] * 6
    store = Store(db_path, image_dir)
    assert len(store.list_predictions()) == 300 and len(list(store.image_dir.iterdir())) == 300


def test_concurrent_threads_lose_nothing(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    db_path, image_dir = str(tmp_path / "shared.db"), str(tmp_path / "images")
    with ThreadPoolExecutor(8) as pool:
        saved = list(pool.map(_save_batch, [(db_path, image_dir, worker) for worker in range(8)]))
    assert saved == [50] * 8 and len(Store(db_path, image_dir).list_predictions()) == 400


CRASH_SCRIPT = r"""
import hashlib, os, sys, time
sys.path.insert(0, sys.argv[3])
import db

original = db._write_file_atomically
def slow_write(path, data):
    original(path, data)
    print("wrote", flush=True)
    time.sleep(0.2)
db._write_file_atomically = slow_write
store = db.Store(sys.argv[1], sys.argv[2])
batch = [db.NewPrediction(hashlib.sha256(str(i).encode()).hexdigest(), str(i).encode(), "png", f"{i}.png",
                          "cat", 0.9, "cat", "v") for i in range(50)]
store.save_predictions(batch)
print("committed", flush=True)
"""


def test_killed_mid_save_leaves_all_or_nothing_and_no_orphans(tmp_path):
    db_path, image_dir = tmp_path / "crash.db", tmp_path / "images"
    Store(db_path, image_dir).save_predictions([prediction("kept")])
    process = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(db_path), str(image_dir), str(ROOT)],
                               stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        assert process.stdout.readline().strip() == "wrote"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    connection = sqlite3.connect(db_path)
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert connection.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 1  # none of the killed batch
    connection.close()
    assert len(list(image_dir.iterdir())) > 1  # the killed save had written files...
    store = Store(db_path, image_dir)
    assert store.remove_orphan_files() >= 3  # ...which the next start removes
    assert [p.name for p in image_dir.iterdir()] == [store.list_predictions()[0].image_file]


def test_filters(store):
    store.save_predictions([prediction("a", "cat"), prediction("b", "cat", final="dog"), prediction("c", "ship")])
    assert {r.source for r in store.list_predictions(labels=["dog", "ship"])} == {"b.png", "c.png"}
    assert [r.source for r in store.list_predictions(corrected_only=True)] == ["b.png"]
    today = datetime.now(timezone.utc).date()
    assert len(store.list_predictions(since=today, until=today)) == 3
    assert store.list_predictions(since=today + timedelta(days=1)) == []
    assert store.list_predictions(until=today - timedelta(days=1)) == []


def test_export_csv_and_imagefolder_zip(store):
    batch = [prediction("a", "cat"), prediction("b", "cat", final="dog")]
    store.save_predictions(batch)
    lines = list(csv.reader(io.StringIO(store.export_csv())))
    assert lines[0][:5] == ["id", "source", "predicted_label", "confidence", "final_label"] and len(lines) == 3
    with zipfile.ZipFile(io.BytesIO(store.export_zip())) as archive:
        names = set(archive.namelist())
        assert names == {"labels.csv", f"cat/{batch[0].content_hash}.png", f"dog/{batch[1].content_hash}.png"}
        assert archive.read(f"dog/{batch[1].content_hash}.png") == batch[1].data
        manifest = list(csv.DictReader(io.StringIO(archive.read("labels.csv").decode())))
        assert {row["file"]: row["final_label"] for row in manifest} == {
            f"cat/{batch[0].content_hash}.png": "cat", f"dog/{batch[1].content_hash}.png": "dog"}
