"""Backup and restore: `python db.py export` / `import`, on both backends and from one to the other; bad archives
are refused by member with nothing imported; the export streams in bounded memory."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import replace

import pytest

import db
from conftest import ROOT, image_bytes
from db import ArchiveError, NewPrediction, Store


def picture(index: int, image_format: str = "PNG") -> NewPrediction:
    import hashlib

    data = image_bytes(image_format, size=(24 + index % 7, 20), color=(index * 37 % 256, 90, 200 - index % 150))
    return NewPrediction(hashlib.sha256(data).hexdigest(), data, "jpg" if image_format == "JPEG" else "png",
                         f"photo-{index}.{image_format.lower()}", "cat", 0.5 + index / 1000,
                         ("cat", "dog", "ship")[index % 3], "test@1")


def export(store: Store, path) -> None:
    with open(path, "wb") as stream:
        for chunk in store.iter_archive():
            stream.write(chunk)


def comparable(store: Store) -> list[tuple]:
    """Everything a restore must carry over (ids are the target's own)."""
    return sorted((r.content_hash, r.source, r.predicted_label, r.confidence, r.final_label, r.is_correct,
                   r.created_at, r.model_version, store.image_bytes(r)) for r in store.list_predictions())


def run_cli(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    # A session of its own has no terminal, so getpass reads the password from stdin.
    return subprocess.run([sys.executable, str(ROOT / "db.py"), *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, start_new_session=True)


def test_export_is_an_imagefolder_zip_with_every_column(backend, tmp_path):
    store = backend.store()
    batch = [picture(i) for i in range(6)] + [picture(9, "JPEG")]
    store.save_predictions(batch)
    archive_path = tmp_path / "export.zip"
    export(store, archive_path)
    with zipfile.ZipFile(archive_path) as archive:
        expected = {f"{p.final_label}/{p.content_hash}.{p.extension}" for p in batch}
        assert set(archive.namelist()) == expected | {"labels.csv"}
        assert archive.read(f"dog/{batch[1].content_hash}.png") == batch[1].data
        rows = list(csv.DictReader(io.StringIO(archive.read("labels.csv").decode())))
    assert list(rows[0]) == ["file", *db.EXPORT_COLUMNS]
    assert {row["file"]: row["final_label"] for row in rows} == {name: name.split("/")[0] for name in expected}


def test_export_from_sqlite_then_import_into_postgres_and_s3_gives_the_same_records(request, tmp_path, monkeypatch):
    from conftest import make_backend

    source = make_backend("sqlite", request, tmp_path / "sqlite", monkeypatch).store()
    source.save_predictions([picture(i) for i in range(12)])
    source.save_predictions([replace(picture(1), final_label="frog")])  # a relabelled record travels too
    archive_path = tmp_path / "backup.zip"
    assert run_cli("export", str(archive_path)).returncode == 0
    expected = comparable(source)

    target = make_backend("postgres", request, tmp_path, monkeypatch)
    imported = run_cli("import", str(archive_path))
    assert imported.returncode == 0, imported.stderr
    assert "imported 12 records" in imported.stderr and "12/12" in imported.stderr
    assert comparable(target.store()) == expected
    again = run_cli("import", str(archive_path))  # idempotent: nothing new the second time
    assert "imported 0 records; 12 were already saved" in again.stderr
    assert target.store().count() == 12


def test_a_plain_imagefolder_zip_is_labelled_by_folder_and_predicted_by_the_model(backend, tmp_path):
    archive_path = tmp_path / "folders.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("airplane/", b"")
        archive.writestr("airplane/sky.png", image_bytes("PNG", size=(64, 64), color=(120, 160, 230)))
        archive.writestr("frog/pond.jpg", image_bytes("JPEG", size=(50, 40), color=(40, 160, 60)))
    store = backend.store()
    result = store.import_archive(archive_path, db._predict_with_shipped_model)
    assert result.saved == 2
    records = {record.source: record for record in store.list_predictions()}
    assert {name: record.final_label for name, record in records.items()} == {
        "airplane/sky.png": "airplane", "frog/pond.jpg": "frog"}
    for record in records.values():
        assert record.model_version.startswith("resnet18_cifar10@") and 0 < record.confidence <= 1
        assert record.is_correct == (record.predicted_label == record.final_label)


def good_members(count: int) -> dict[str, bytes]:
    return {f"{p.final_label}/{p.content_hash}.png": p.data for p in (picture(i) for i in range(count))}


def manifest_for(members: dict[str, bytes], **overrides) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "source", "predicted_label", "confidence", "final_label", "created_at"])
    for name in members:
        row = {"file": name, "source": name, "predicted_label": "cat", "confidence": "0.5",
               "final_label": name.split("/")[0], "created_at": "2026-01-02T03:04:05+00:00"}
        row.update(overrides.get(name, {}))
        writer.writerow(row.values())
    return buffer.getvalue().encode()


def make_zip(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


BAD_ARCHIVES = {
    # name -> (extra members or a manifest override, what the error must say)
    "unknown label": ({"monkey/m.png": image_bytes("PNG")}, ["'monkey/m.png'", "not one of the ten classes"]),
    "not an image": ({"cat/notes.png": b"just some text, honestly\n"}, ["cat/notes.png", "text file"]),
    "traversal": ({"cat/../../etc/x.png": image_bytes("PNG")}, ["'cat/../../etc/x.png'", "unsafe path"]),
    "absolute": ({"/cat/x.png": image_bytes("PNG")}, ["'/cat/x.png'", "unsafe path"]),
    "bomb": ({"cat/bomb.png": b"\0" * (12 << 20)}, ["'cat/bomb.png'", "ZIP bomb"]),
    "nested": ({"cat/more/x.png": image_bytes("PNG")}, ["'cat/more/x.png'", "<label>/<file>"]),
}


@pytest.mark.parametrize("case", BAD_ARCHIVES)
def test_bad_archives_are_refused_by_member_and_nothing_is_imported(backend, tmp_path, case):
    extra, phrases = BAD_ARCHIVES[case]
    members = {**good_members(600), **extra}  # more than one batch: the bad member comes after them
    members["labels.csv"] = manifest_for(members)
    path = make_zip(tmp_path / f"{case}.zip", members, zipfile.ZIP_DEFLATED)
    store = backend.store()
    with pytest.raises(ArchiveError) as caught:
        store.import_archive(path)
    for phrase in phrases:
        assert phrase in str(caught.value)
    assert store.count() == 0 and backend.image_names() == set()


@pytest.mark.parametrize("override, phrase", [
    ({"confidence": "high"}, "confidence 'high' is not a number"),
    ({"confidence": "1.5"}, "not between 0 and 1"),
    ({"predicted_label": "monkey"}, "predicted_label 'monkey'"),
    ({"final_label": "ship"}, "differs from the folder"),
    ({"created_at": "yesterday"}, "created_at 'yesterday'"),
])
def test_a_corrupt_labels_csv_is_refused_by_line(backend, tmp_path, override, phrase):
    members = good_members(5)
    victim = list(members)[3]
    path = make_zip(tmp_path / "bad.zip", {**members, "labels.csv": manifest_for(members, **{victim: override})})
    store = backend.store()
    with pytest.raises(ArchiveError, match="labels.csv line 5") as caught:
        store.import_archive(path)
    assert phrase in str(caught.value) and store.count() == 0


@pytest.mark.parametrize("manifest, phrase", [
    (b"\xff\xfe\x00garbage", "cannot be read as UTF-8"),
    (b"file,final_label\ncat/x.png,cat\n", "lacks the column"),
])
def test_an_unreadable_labels_csv_is_refused(store_env, tmp_path, manifest, phrase):
    members = good_members(3)
    path = make_zip(tmp_path / "bad.zip", {**members, "labels.csv": manifest})
    with pytest.raises(ArchiveError, match=phrase):
        Store.from_env().import_archive(path)


def test_labels_csv_must_list_each_image_once(store_env, tmp_path):
    members = good_members(3)
    listed = dict(list(members.items())[:2])
    with pytest.raises(ArchiveError, match="does not list"):
        Store.from_env().import_archive(make_zip(tmp_path / "a.zip", {**members, "labels.csv": manifest_for(listed)}))
    ghost = {**members, "cat/ghost.png": b""}
    with pytest.raises(ArchiveError, match="not an image in the archive"):
        Store.from_env().import_archive(make_zip(tmp_path / "b.zip", {**members, "labels.csv": manifest_for(ghost)}))


def test_not_a_zip_at_all(store_env, tmp_path):
    path = tmp_path / "backup.zip"
    path.write_text("hello")
    result = run_cli("import", str(path))
    assert result.returncode == 1 and "not a readable ZIP archive" in result.stderr


EXPORT_MEMORY = r"""
import resource, sys
sys.path.insert(0, sys.argv[1])
import db
store = db.open_store()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
db.main(["export", sys.argv[2]])
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_export_streams_in_bounded_memory(backend, tmp_path):
    """Defect 5: the export was built in memory, the whole image history twice. 30 images of 4 MB (120 MB)
    must go through with about one image in memory."""
    import hashlib

    store = backend.store()
    for start in range(0, 30, 5):
        blobs = [os.urandom(4 << 20) for _ in range(5)]
        store.save_predictions([NewPrediction(hashlib.sha256(b).hexdigest(), b, "jpg", f"big-{start + i}.jpg", "cat",
                                              0.5, "cat", "t") for i, b in enumerate(blobs)])
    target = tmp_path / "big.zip"
    run = subprocess.run([sys.executable, "-c", EXPORT_MEMORY, str(ROOT), str(target)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    before, after = map(int, run.stdout.split())
    assert target.stat().st_size > 120 << 20
    assert (after - before) / 1024 < 60, f"export grew the process by {(after - before) / 1024:.0f} MB"


def test_import_asks_for_the_admin_password_when_one_is_set(store_env, tmp_path):
    members = good_members(3)
    path = make_zip(tmp_path / "a.zip", {**members, "labels.csv": manifest_for(members)})
    refused = run_cli("import", str(path), stdin="guess\n", env={"CIFAR10_ADMIN_PASSWORD": "s3cret"})
    assert refused.returncode == 1 and "wrong admin password" in refused.stderr
    assert Store.from_env().count() == 0
    allowed = run_cli("import", str(path), stdin="s3cret\n", env={"CIFAR10_ADMIN_PASSWORD": "s3cret"})
    assert allowed.returncode == 0 and Store.from_env().count() == 3
