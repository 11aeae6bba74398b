"""spools: the originals a page keeps on disk, and the uploads that wait there until a page reads them (the server
side is in test_browser: what a browser sends does not stay in the server's memory)."""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path

import pytest

from conftest import files_held_open, image_bytes, zip_of
from inputs import zip_images
from review import Review
from spools import NotWaiting, Spool, UploadInbox


@pytest.fixture
def spool_folder(tmp_path, monkeypatch) -> Path:
    """TMPDIR for the spools this test makes, to count them."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_part_of_a_spool_reads_and_seeks_like_a_file_and_outlives_the_spool():
    spool = Spool()
    spool.add(b"before")
    place = spool.add(b"0123456789")
    spool.add(b"after")
    part = spool.open(place)
    spool.close()
    assert part.read(4) == b"0123" and part.tell() == 4
    assert part.seek(-3, io.SEEK_END) == 7 and part.read() == b"789" and part.read() == b""
    assert part.seek(2) == 2 and part.read(100) == b"23456789"
    with pytest.raises(ValueError):
        part.seek(-1)
    part.close()


def test_a_zip_waiting_in_the_inbox_is_read_member_by_member():
    red, blue = image_bytes("PNG", color=(200, 0, 0)), image_bytes("JPEG", color=(0, 0, 200))
    inbox = UploadInbox(limit_bytes=2**20)
    inbox.put("session", "upload", zip_of({"cat/red.png": red, "blue.jpg": blue}))
    with inbox.open("session", "upload") as content:
        members = {name: data for name, data, error in zip_images(content, "pets.zip")}
    assert members == {"pets.zip/cat/red.png": red, "pets.zip/blue.jpg": blue}


def test_the_inbox_gives_back_each_upload_until_it_is_read_then_frees_its_disk(spool_folder):
    inbox = UploadInbox(limit_bytes=2**20)
    inbox.put("one", "a", b"first")
    inbox.put("one", "b", b"second")
    inbox.put("two", "a", b"other session")
    assert len(files_held_open("self", spool_folder)) == 2  # one per session
    assert inbox.open("one", "a").read() == b"first" and inbox.open("two", "a").read() == b"other session"

    inbox.discard("one", "a")
    assert inbox.open("one", "b").read() == b"second"
    assert len(files_held_open("self", spool_folder)) == 2
    inbox.discard("one", "b")  # none of the session's waits: its spool goes
    assert len(files_held_open("self", spool_folder)) == 1
    inbox.put("one", "c", b"later")  # and a new one comes with the next upload
    assert inbox.open("one", "c").read() == b"later"

    inbox.discard_session("two")  # the session ended, its upload never read
    assert len(files_held_open("self", spool_folder)) == 1


def test_an_upload_not_waiting_says_why():
    inbox = UploadInbox(limit_bytes=2**20)
    inbox.put("session", "a", b"read")
    inbox.discard("session", "a")
    for session_id, upload_id in (("session", "a"), ("session", "never sent"), ("no such session", "a")):
        with pytest.raises(NotWaiting, match="removed from the uploader before the page read it"):
            inbox.open(session_id, upload_id)


def test_a_session_may_have_only_so_much_waiting_and_says_what_it_refused():
    inbox = UploadInbox(limit_bytes=100)
    inbox.put("session", "a", bytes(60))
    inbox.put("other", "a", bytes(100))  # each session has its own limit
    inbox.put("session", "b", bytes(41))
    with pytest.raises(NotWaiting, match=r"was not taken: 0\.0 GB of uploads are waiting to be read on this page, and "
                                         r"it may have 0 GB\. Upload it again once the page has read them\."):
        inbox.open("session", "b")
    assert len(inbox.open("session", "a").read()) == 60
    inbox.discard("session", "a")  # read: the page has room again
    inbox.discard("session", "b")
    inbox.put("session", "c", bytes(100))
    assert len(inbox.open("session", "c").read()) == 100


def test_bytes_sent_again_or_removed_leave_the_disk_though_an_upload_still_waits(spool_folder):
    """A spool only grows: uploads sent again under one id, or sent and removed, while one never read waits, must
    neither fill the disk past the limit nor have the page refuse what fits."""
    inbox = UploadInbox(limit_bytes=100)
    inbox.put("session", "never read", b"w")
    for turn in range(10):
        inbox.put("session", "again", bytes([turn]) * 40)
        assert sum(files_held_open("self", spool_folder)) <= 100
    for turn in range(10):
        inbox.put("session", f"removed-{turn}", bytes(40))
        inbox.discard("session", f"removed-{turn}")
        assert sum(files_held_open("self", spool_folder)) <= 100
    assert inbox.open("session", "again").read() == bytes([9]) * 40
    assert inbox.open("session", "never read").read() == b"w"


def test_a_write_that_fails_leaves_nothing_behind(spool_folder, monkeypatch):
    inbox = UploadInbox(limit_bytes=2**20)
    write = os.pwrite

    def half_then_disk_full(descriptor: int, data, offset: int) -> int:
        write(descriptor, bytes(data[:len(data) // 2]), offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", half_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        inbox.put("session", "a", bytes(600))
    monkeypatch.undo()
    assert len(files_held_open("self", spool_folder)) == 0
    with pytest.raises(NotWaiting, match="removed"):
        inbox.open("session", "a")


def test_an_upload_read_from_the_inbox_is_queued_like_one_read_from_memory():
    red = image_bytes("PNG", color=(200, 0, 0))
    inbox = UploadInbox(limit_bytes=2**20)
    inbox.put("session", "upload", red)
    review = Review()
    with inbox.open("session", "upload") as content:
        review.take_upload("upload", "red.png", content)
    [pending] = review.pending
    assert pending.key == "file-upload" and review.spool.read(pending.original) == red


def test_a_sweep_forgets_what_sessions_gone_for_good_never_read(spool_folder):
    inbox = UploadInbox(limit_bytes=2**20)
    inbox.put("gone", "a", b"never read")
    inbox.put("here", "a", b"still waiting")
    assert inbox.sweep(lambda session_id: session_id == "here") == 1
    assert inbox.open("here", "a").read() == b"still waiting"
    with pytest.raises(NotWaiting):
        inbox.open("gone", "a")
    assert len(files_held_open("self", spool_folder)) == 1
