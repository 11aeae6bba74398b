"""Backup and restore: `python db.py export` / `import`, on both backends and from one to the other; bad archives
are refused by member with nothing imported; the export streams in bounded memory."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import struct
import subprocess
import sys
import zipfile
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings

import db
from archives import import_archive, iter_csv, iter_zip
from conftest import ROOT, image_bytes, zip_of
from db import ArchiveError, NewPrediction, Store
from display import thumbnail
from records import Duplicate
from test_inputs import header_places, mutated_zips, needing_version_6_4, version_6_4_zip, with_a_nameless_member


def picture(index: int, image_format: str = "PNG") -> NewPrediction:
    import hashlib

    data = image_bytes(image_format, size=(24 + index % 7, 20), color=(index * 37 % 256, 90, 200 - index % 150))
    return NewPrediction(hashlib.sha256(data).hexdigest(), data, "jpg" if image_format == "JPEG" else "png",
                         f"photo-{index}.{image_format.lower()}", "cat", 0.5 + index / 1000,
                         ("cat", "dog", "ship")[index % 3], "test@1")


def export(store: Store, path) -> None:
    with open(path, "wb") as stream:
        for chunk in iter_zip(store):
            stream.write(chunk)


def comparable(store: Store) -> list[tuple]:
    """Everything a restore must carry over (ids are the target's own)."""
    return sorted((r.content_hash, r.source, r.predicted_label, r.confidence, r.final_label, r.is_correct,
                   r.created_at, r.model_version, store.image_bytes(r)) for r in store.list_predictions())


def run_cli(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    # A session of its own has no terminal, so getpass reads the password from stdin.
    return subprocess.run([sys.executable, str(ROOT / "db.py"), *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, start_new_session=True)


# Every column of a record, as a person restoring a backup or reading the CSV expects them.
EXPECTED_COLUMNS = ["id", "source", "predicted_label", "confidence", "final_label", "is_correct", "created_at",
                    "model_version", "content_hash", "edits", "is_ood", "ood_score", "saved_by", "labelled_by",
                    "labelled_at"]


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
    assert list(rows[0]) == ["file", *EXPECTED_COLUMNS]  # written out here, not db.EXPORT_COLUMNS compared with itself
    assert next(csv.reader(io.StringIO(b"".join(iter_csv(store)).decode()))) == EXPECTED_COLUMNS
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
    result = import_archive(store, archive_path, db._predictor(store), make_thumbnail=thumbnail)
    assert result.saved == 2
    records = {record.source: record for record in store.list_predictions()}
    assert {name: record.final_label for name, record in records.items()} == {
        "airplane/sky.png": "airplane", "frog/pond.jpg": "frog"}
    for record in records.values():
        assert record.model_version.startswith("v1@") and 0 < record.confidence <= 1  # the store's active version
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
        import_archive(store, path, make_thumbnail=thumbnail)
    for phrase in phrases:
        assert phrase in str(caught.value)
    assert store.count() == 0 and backend.image_names() == set()


@pytest.mark.parametrize("override, phrase", [
    ({"confidence": "high"}, "confidence 'high' is not a number"),
    ({"confidence": "1.5"}, "not between 0 and 1"),
    ({"predicted_label": "monkey"}, "predicted_label 'monkey'"),
    ({"final_label": "ship"}, "differs from the folder"),
    ({"created_at": "yesterday"}, "created_at 'yesterday'"),
    ({"created_at": "0001-01-01T00:00:00+05:00"}, "created_at '0001-01-01T00:00:00+05:00'"),  # before year 1 in UTC
])
def test_a_corrupt_labels_csv_is_refused_by_line(backend, tmp_path, override, phrase):
    members = good_members(5)
    victim = list(members)[3]
    path = make_zip(tmp_path / "bad.zip", {**members, "labels.csv": manifest_for(members, **{victim: override})})
    store = backend.store()
    with pytest.raises(ArchiveError, match="labels.csv line 5") as caught:
        import_archive(store, path, make_thumbnail=thumbnail)
    assert phrase in str(caught.value) and store.count() == 0


@pytest.mark.parametrize("manifest, phrase", [
    (b"\xff\xfe\x00garbage", "cannot be read as UTF-8"),
    (b"file,final_label\ncat/x.png,cat\n", "lacks the column"),
])
def test_an_unreadable_labels_csv_is_refused(store_env, tmp_path, manifest, phrase):
    members = good_members(3)
    path = make_zip(tmp_path / "bad.zip", {**members, "labels.csv": manifest})
    with pytest.raises(ArchiveError, match=phrase):
        import_archive(Store.from_env(), path, make_thumbnail=thumbnail)


def test_labels_csv_must_list_each_image_once(store_env, tmp_path):
    members = good_members(3)
    listed = dict(list(members.items())[:2])
    with pytest.raises(ArchiveError, match="does not list"):
        import_archive(Store.from_env(), make_zip(tmp_path / "a.zip", {**members, "labels.csv": manifest_for(listed)}), make_thumbnail=thumbnail)
    ghost = {**members, "cat/ghost.png": b""}
    with pytest.raises(ArchiveError, match="not an image in the archive"):
        import_archive(Store.from_env(), make_zip(tmp_path / "b.zip", {**members, "labels.csv": manifest_for(ghost)}), make_thumbnail=thumbnail)


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


# ---------------------------------------------------------------- the same picture twice, failed batches

@pytest.mark.parametrize("listed", [False, True], ids=["imagefolder", "labels.csv"])
def test_the_same_picture_under_two_names_is_imported_once(backend, tmp_path, listed):
    """Issue 15.2: scraped data sets hold a picture under two names; both rows in one batch stopped the import
    with the images written and no rows, on every retry."""
    twin = picture(1).data
    members = {"cat/a.png": twin, "frog/other.png": picture(2).data, "dog/b.png": twin}
    if listed:
        members["labels.csv"] = manifest_for(members)
    path = make_zip(tmp_path / "twins.zip", members)
    store = backend.store()
    result = import_archive(store, path, db._predictor(store), make_thumbnail=thumbnail)
    assert (result.saved, result.unchanged) == (2, 0)
    assert result.duplicates == (Duplicate("dog/b.png", kept="cat/a.png", label="cat"),)
    assert sorted((r.source, r.final_label) for r in store.list_predictions()) == [
        ("cat/a.png", "cat"), ("frog/other.png", "frog")]
    assert len(backend.image_names()) == 2
    again = import_archive(store, path, db._predictor(store), make_thumbnail=thumbnail)
    assert (again.saved, again.unchanged, again.duplicates) == (0, 2, result.duplicates)
    assert store.count() == 2 and len(backend.image_names()) == 2


def test_the_command_line_says_which_duplicates_it_skipped(store_env, tmp_path):
    """With labels.csv, so the command line runs without the model (the test above covers a plain ImageFolder)."""
    twin = picture(1).data
    members = {"cat/a.png": twin, "dog/b.png": twin}
    path = make_zip(tmp_path / "twins.zip", {**members, "labels.csv": manifest_for(members)})
    for saved, unchanged in ((1, 0), (0, 1)):  # the second import changes nothing
        result = run_cli("import", str(path))
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert f"imported {saved} records; {unchanged} were already saved; 1 duplicate skipped" in result.stderr
        assert "skipped 'dog/b.png': the same picture as 'cat/a.png', imported with the label cat" in result.stderr
    assert Store.from_env().count() == 1


def refuse_to_insert(backend, source: str):
    """Make the database itself refuse the row of one picture (a trigger: a real insert error on either backend).
    Returns the statement that lifts it."""
    if backend.name == "sqlite":
        import sqlite3

        statements = [f"CREATE TRIGGER refuse BEFORE INSERT ON predictions WHEN NEW.source = '{source}' "
                      "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"]
        lift = "DROP TRIGGER refuse"
        connect = lambda: sqlite3.connect(backend.env["CIFAR10_DB_PATH"], isolation_level=None)  # noqa: E731
    else:
        import psycopg

        statements = ["CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                      "$$ BEGIN RAISE EXCEPTION 'refused by a test trigger'; END $$",
                      "CREATE TRIGGER refuse BEFORE INSERT ON predictions FOR EACH ROW "
                      f"WHEN (NEW.source = '{source}') EXECUTE FUNCTION refuse()"]
        lift = "DROP TRIGGER refuse ON predictions"
        connect = lambda: psycopg.connect(backend.env["CIFAR10_DATABASE_URL"], autocommit=True)  # noqa: E731

    def run(*sql: str) -> None:
        connection = connect()
        try:
            for statement in sql:
                connection.execute(statement)
        finally:
            connection.close()

    run(*statements)
    return lambda: run(lift)


def test_a_batch_the_database_refuses_leaves_no_image_behind(backend, tmp_path):
    """Issue 15.2: a failed import leaves nothing behind, fails the same way on a retry, and the command line says
    so in one line, without a traceback."""
    members = good_members(5)
    members["labels.csv"] = manifest_for(members)
    path = make_zip(tmp_path / "refused.zip", members)
    store = backend.store()
    lift = refuse_to_insert(backend, list(members)[3])
    with pytest.raises(Exception, match="refused by a test trigger"):
        import_archive(store, path, make_thumbnail=thumbnail)
    assert store.count() == 0 and backend.image_names() == set()
    retried = run_cli("import", str(path))
    errors = [line for line in retried.stderr.splitlines() if line.startswith("error:")]
    assert retried.returncode == 1 and "Traceback" not in retried.stderr, retried.stderr
    assert len(errors) == 1 and "refused by a test trigger" in errors[0]
    assert store.count() == 0 and backend.image_names() == set()
    lift()
    assert import_archive(store, path, make_thumbnail=thumbnail).saved == 5 and len(backend.image_names()) == 5


# ---------------------------------------------------------------- members zipfile cannot read, huge manifests

def patch_headers(path, name: str, **fields: int) -> None:
    """Rewrite one member's flag bits or compression method in both its ZIP headers, as another tool would write
    them (zipfile writes neither encrypted nor Deflate64 members)."""
    import struct

    with zipfile.ZipFile(path) as archive:
        local, central = archive.getinfo(name).header_offset, archive.start_dir
    data = bytearray(path.read_bytes())
    while data[central + 46:central + 46 + struct.unpack_from("<H", data, central + 28)[0]] != name.encode():
        central += 46 + sum(struct.unpack_from("<HHH", data, central + 28))
    offsets = {"flag_bits": (6, 8), "compress_type": (8, 10)}  # in the local header, in the central directory
    for field, value in fields.items():
        struct.pack_into("<H", data, local + offsets[field][0], value)
        struct.pack_into("<H", data, central + offsets[field][1], value)
    path.write_bytes(data)


@pytest.mark.parametrize("victim", ["image", "labels.csv"])
@pytest.mark.parametrize("patch, phrase", [({"flag_bits": 0x1}, "is encrypted"),
                                           ({"compress_type": 9}, "Deflate64"),
                                           ({"flag_bits": 0x20}, "compressed patched data")],
                         ids=["encrypted", "deflate64", "patched data"])
def test_a_member_zipfile_cannot_read_is_refused_by_name(backend, tmp_path, victim, patch, phrase):
    """Issue 15.8: an encrypted or Deflate64 member gave a traceback; one of compressed patched data (flag bit 5)
    "error: NotImplementedError: compressed patched data", naming no member."""
    members = good_members(4)
    members["labels.csv"] = manifest_for(members)
    name = list(members)[2] if victim == "image" else "labels.csv"
    path = make_zip(tmp_path / "odd.zip", members)
    patch_headers(path, name, **patch)
    store = backend.store()
    with pytest.raises(ArchiveError) as caught:
        import_archive(store, path, make_thumbnail=thumbnail)
    assert str(path) in str(caught.value) and repr(name) in str(caught.value) and phrase in str(caught.value)
    assert store.count() == 0 and backend.image_names() == set()


def corrupt_lzma_member(path, name: str) -> None:
    """Damage one LZMA member's compressed data, as a bad disk or download would: the range coder's first byte,
    always 0 in a valid stream (after zipfile's 4-byte header and 5 bytes of properties)."""
    import struct

    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(name).header_offset
    data = bytearray(path.read_bytes())
    start = local + 30 + sum(struct.unpack_from("<HH", data, local + 26))
    data[start + 9] ^= 0xFF
    path.write_bytes(data)


@pytest.mark.parametrize("victim", ["image", "labels.csv"])
def test_a_corrupt_lzma_member_is_refused_by_name(store_env, tmp_path, victim):
    """Issue 15.8: a corrupt LZMA member printed "error: LZMAError: Corrupt input data", naming no member."""
    members = good_members(4)
    members["labels.csv"] = manifest_for(members)
    name = list(members)[2] if victim == "image" else "labels.csv"
    path = make_zip(tmp_path / "lzma.zip", members, zipfile.ZIP_LZMA)
    corrupt_lzma_member(path, name)
    store = Store.from_env()
    with pytest.raises(ArchiveError) as caught:
        import_archive(store, path, make_thumbnail=thumbnail)
    assert str(path) in str(caught.value) and repr(name) in str(caught.value)
    assert "Corrupt input data" in str(caught.value) and store.count() == 0
    result = run_cli("import", str(path))
    assert result.returncode == 1 and repr(name) in result.stderr and "LZMAError" not in result.stderr


HUGE = 30 << 20
JUNK_ROWS = {
    "one huge field": b'cat/x.png,"' + b"y" * HUGE + b'"\n',
    "many small fields": b"x," * (HUGE // 2) + b"\n",
    "a quoted field over many lines": b'cat/x.png,"' + b"junk\n" * (HUGE // 5) + b'"\n',
}


@pytest.mark.parametrize("junk", JUNK_ROWS)
def test_a_huge_labels_csv_row_is_refused_by_line_in_little_memory(store_env, tmp_path, junk):
    """Issue 15.8: a labels.csv of tens of MB was read whole (and parsed into a list of every row, many times its
    size) before any row was checked. It is read row by row; a row longer than any export writes is refused."""
    import tracemalloc

    import display  # noqa: F401 (imported before measuring: modules are not what is measured)
    import inputs  # noqa: F401

    members = good_members(5)
    path = make_zip(tmp_path / "huge.zip", {**members, "labels.csv": manifest_for(members) + JUNK_ROWS[junk]})
    store = Store.from_env()
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match="labels.csv line 7"):  # the header, five rows, then the junk
            import_archive(store, path, make_thumbnail=thumbnail)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"reading a {HUGE >> 20} MB labels.csv peaked at {peak / 2**20:.1f} MB"
    assert store.count() == 0


# ---------------------------------------------------------------- every column across a round trip; hashes

def test_export_then_import_keeps_every_column(backend, request, tmp_path, monkeypatch):
    """Each exported column comes back, the "none of the ten" flag and score and who saved and labelled it
    included; only the id (the target store's own) and the edit count (how often this store relabelled it, for its
    undo) start afresh."""
    from conftest import make_backend

    source = backend.store()
    batch = [picture(i) for i in range(6)]
    batch[1] = replace(batch[1], is_ood=True, ood_score=0.8125)
    batch[2] = replace(batch[2], ood_score=0.03125)
    batch[4] = replace(batch[4], is_ood=True, ood_score=None)  # older records have no score
    source.save_predictions(batch[:5], by="ana@example.com")
    source.save_predictions(batch[5:])  # saved without sign-in: nobody named
    source.save_predictions([replace(batch[3], final_label="frog")], by="bo@example.com")  # relabelled: is_correct 0
    archive_path = tmp_path / "round-trip.zip"
    export(source, archive_path)
    expected = {record.content_hash: record for record in source.list_predictions()}
    assert {record.is_ood for record in expected.values()} == {True, False}
    assert {(record.saved_by, record.labelled_by) for record in expected.values()} == {
        ("ana@example.com", "ana@example.com"), ("ana@example.com", "bo@example.com"), ("", "")}

    target = make_backend(backend.name, request, tmp_path / "target", monkeypatch).store()
    assert import_archive(target, archive_path, make_thumbnail=thumbnail).saved == 6
    restored = {record.content_hash: record for record in target.list_predictions()}
    assert set(restored) == set(expected)
    kept = [column for column in EXPECTED_COLUMNS if column not in ("id", "edits")]
    for content_hash, record in expected.items():
        for column in kept:
            assert getattr(restored[content_hash], column) == getattr(record, column), (column, record.source)
        assert target.image_bytes(restored[content_hash]) == source.image_bytes(record)
    target.close()


def test_a_labels_csv_whose_content_hash_does_not_match_its_image_is_refused(store_env, tmp_path):
    store = Store.from_env()
    store.save_predictions([picture(i) for i in range(3)])
    export(store, tmp_path / "good.zip")
    with zipfile.ZipFile(tmp_path / "good.zip") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    table = list(csv.DictReader(io.StringIO(members["labels.csv"].decode())))
    table[1]["content_hash"] = table[0]["content_hash"]  # the second row claims the first row's picture
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    members["labels.csv"] = buffer.getvalue().encode()
    path = make_zip(tmp_path / "tampered.zip", members)
    store.clear()
    with pytest.raises(ArchiveError, match=f"labels.csv line 3: content_hash does not match {table[1]['file']!r}"):
        import_archive(store, path, make_thumbnail=thumbnail)
    assert store.count() == 0 and not list(store.images.stored())
    store.close()


# ---------------------------------------------------------------- ZIPs whose headers say anything (issue 27.2)

def test_a_zip_zipfile_will_not_open_is_refused_by_name(store_env, tmp_path):
    """The 214-byte ZIP that says it needs ZIP version 6.4: the command line said "error: NotImplementedError: zip
    file version 6.4", naming no file."""
    path = tmp_path / "v64.zip"
    path.write_bytes(version_6_4_zip())
    result = run_cli("import", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {path} is not a readable ZIP archive (zip file version 6.4)." in result.stderr, result.stderr


def test_a_member_whose_name_is_cut_to_nothing_is_refused_by_name(store_env, tmp_path):
    """zipfile cuts a name at its first NUL byte, and Python 3.11's ZipInfo.is_dir() raises IndexError on the empty
    name left: the command line said "error: IndexError: string index out of range", naming no file."""
    path = tmp_path / "nameless.zip"
    path.write_bytes(with_a_nameless_member(EXPORTED_ZIP))
    result = run_cli("import", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {path}: member '' has no name." in result.stderr, result.stderr


def test_an_imagefolder_zip_whose_directory_hides_entries_is_refused_not_imported_in_part(store_env, tmp_path):
    """Without labels.csv nothing else lists the images: zipfile reads the directory by the size the end record
    gives, and entries a damaged size hides would not be imported, without a word."""
    data = bytearray(zip_of(good_members(3)))
    places = header_places(bytes(data))
    last_entry = places["end"][0] - places["central"][-1]  # the directory's size and start: the last entry's
    struct.pack_into("<II", data, places["end"][0] + 12, last_entry, places["central"][-1])
    path = tmp_path / "hiding.zip"
    path.write_bytes(data)
    store = Store.from_env()
    with pytest.raises(ArchiveError) as caught:
        import_archive(store, path, db._predictor(store), make_thumbnail=thumbnail)
    assert str(caught.value) == (f"{path} claims 3 entries, but its directory lists 1: the headers of the other 2 "
                                 "are damaged.")
    assert store.count() == 0


EXPORTED = {**good_members(3)}
EXPORTED_ZIP = zip_of({**EXPORTED, "labels.csv": manifest_for(EXPORTED)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutant=mutated_zips(EXPORTED_ZIP))
@example(mutant=needing_version_6_4(EXPORTED_ZIP))
@example(mutant=with_a_nameless_member(EXPORTED_ZIP))
def test_any_export_whatever_its_headers_say_is_imported_or_refused_by_name_with_nothing_half_written(
        store_env, tmp_path, mutant):
    """`python db.py import` reads ZIPs with its own code: whatever the headers of an export say, it imports the
    export's pictures or refuses it naming the file, and a refusal writes nothing. (One store for every example:
    importing a picture again changes nothing.)"""
    path = tmp_path / "mutant.zip"
    path.write_bytes(mutant)
    store = Store.from_env()
    try:
        before = comparable(store)
        try:
            import_archive(store, path, make_thumbnail=thumbnail)
        except ArchiveError as error:
            assert str(error).startswith(str(path)), error
            assert comparable(store) == before
        assert {record[0] for record in comparable(store)} <= {hashlib.sha256(data).hexdigest()
                                                              for data in EXPORTED.values()}
    finally:
        store.close()
