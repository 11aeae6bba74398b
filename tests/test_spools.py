"""spools: the originals a page keeps on disk, and the uploads that wait there until a page reads them (the server
side is in test_browser: what a browser sends does not stay in the server's memory)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pytest

from conftest import image_bytes, zip_of
from inputs import zip_images
from review import Review
from spools import InboxFull, Spool, UploadInbox


@pytest.fixture
def spool_folder(tmp_path, monkeypatch) -> Path:
    """TMPDIR for the spools this test makes, to count them."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def open_spools(folder: Path) -> int:
    """How many files in `folder` this process holds open (a spool is a deleted file, its descriptor all of it)."""
    count = 0
    for descriptor in Path("/proc/self/fd").iterdir():
        try:
            count += os.readlink(descriptor).startswith(str(folder))
        except FileNotFoundError:  # the descriptor listing the folder, closed since
            pass
    return count


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
    assert open_spools(spool_folder) == 2  # one per session
    assert inbox.open("one", "a").read() == b"first" and inbox.open("two", "a").read() == b"other session"
    assert inbox.open("one", "missing") is None and inbox.open("three", "a") is None

    inbox.discard("one", "a")
    assert inbox.open("one", "a") is None and inbox.open("one", "b").read() == b"second"
    assert open_spools(spool_folder) == 2
    inbox.discard("one", "b")  # none of the session's waits: its spool goes
    assert open_spools(spool_folder) == 1
    inbox.put("one", "c", b"later")  # and a new one comes with the next upload
    assert inbox.open("one", "c").read() == b"later"

    inbox.discard_session("two")  # the session ended, its upload never read
    assert inbox.open("two", "a") is None and open_spools(spool_folder) == 1


def test_a_session_may_have_only_so_much_waiting_and_an_upload_sent_again_counts_once():
    inbox = UploadInbox(limit_bytes=100)
    inbox.put("session", "a", bytes(60))
    inbox.put("session", "a", bytes(70))  # sent again: replaces the first
    inbox.put("other", "a", bytes(100))   # each session has its own limit
    with pytest.raises(InboxFull, match="may hold"):
        inbox.put("session", "b", bytes(31))
    assert inbox.open("session", "b") is None and len(inbox.open("session", "a").read()) == 70
    inbox.put("session", "b", bytes(30))


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
    assert inbox.open("gone", "a") is None and inbox.open("here", "a").read() == b"still waiting"
    assert open_spools(spool_folder) == 1
