"""spools: the originals a page keeps on disk, and the uploads that wait there until a page reads them (the server
side is in test_browser: what a browser sends does not stay in the server's memory; and in test_server_uploads)."""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from conftest import files_held_open, image_bytes, zip_of
from inputs import zip_images
from review import Review
from spools import WRITERS, NotWaiting, Spool, UploadInbox


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


def no_room_on_disk(monkeypatch: pytest.MonkeyPatch, of: Callable[[bytes], bool] = lambda data: True) -> None:
    """From now on, as on a full disk, each write of the bytes `of` picks writes their first half, then fails."""
    write = os.pwrite

    def half_then_disk_full(descriptor: int, data, offset: int) -> int:
        if not of(bytes(data)):
            return write(descriptor, data, offset)
        write(descriptor, bytes(data[:len(data) // 2]), offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", half_then_disk_full)


def test_bytes_a_spool_could_not_keep_are_neither_counted_nor_left_on_disk(spool_folder):
    """What was set aside for bytes whose write failed (a full disk, a file that ends early) is given back: the
    spool's size and file end at the last bytes it kept, and the next bytes follow them."""
    spool = Spool()
    kept = spool.add(b"kept")
    with pytest.MonkeyPatch.context() as full:
        no_room_on_disk(full)
        with pytest.raises(OSError, match="No space left on device"):
            spool.add(bytes(600))
        with pytest.raises(OSError, match="No space left on device"):
            spool.add_from(io.BytesIO(bytes(600)), 600)
    with pytest.raises(OSError, match="^the file to keep ends 4 bytes early$"):
        spool.add_from(io.BytesIO(bytes(6)), 10)
    assert spool.size == 4 and files_held_open("self", spool_folder) == [4]
    assert spool.add(b"next") == (4, 4) and spool.read(kept) == b"kept" and spool.read((4, 4)) == b"next"
    spool.close()


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


def test_a_write_that_fails_leaves_nothing_behind_and_says_why(spool_folder, monkeypatch):
    inbox = UploadInbox(limit_bytes=2**20)
    write = os.pwrite

    def half_then_disk_full(descriptor: int, data, offset: int) -> int:
        write(descriptor, bytes(data[:len(data) // 2]), offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", half_then_disk_full)
    inbox.put("session", "a", bytes(600))
    monkeypatch.undo()
    assert len(files_held_open("self", spool_folder)) == 0
    with pytest.raises(NotWaiting, match=r"^was not taken: the server could not keep it on disk \(No space left on "
                                         r"device\)\. Upload it again in a while\.$"):
        inbox.open("session", "a")
    inbox.put("session", "a", b"sent again")  # the disk has room again
    assert inbox.open("session", "a").read() == b"sent again"


def test_all_sessions_together_may_keep_waiting_only_a_share_of_the_free_disk(spool_folder):
    free = shutil.disk_usage(spool_folder).free
    inbox = UploadInbox(limit_bytes=2**20, disk_share=1000 / free)  # room for about 1,000 bytes in all
    inbox.put("one", "a", bytes(600))
    inbox.put("two", "a", bytes(600))
    with pytest.raises(NotWaiting, match=r"^was not taken: the uploads that pages on this server have not read yet "
                                         r"may take at most 0% of the disk space free for them \(now [0-9.]+ GB\), "
                                         r"every page's together\. Upload it again once they have been read\.$"):
        inbox.open("two", "a")
    assert sum(files_held_open("self", spool_folder)) == 600
    inbox.discard_session("one")  # its session gone: there is room again
    inbox.put("two", "b", bytes(600))
    assert len(inbox.open("two", "b").read()) == 600
    inbox.put("two", "b", bytes(900))  # sent again: only what waits counts
    assert len(inbox.open("two", "b").read()) == 900
    inbox.discard("two", "b")  # read
    inbox.put("three", "a", bytes(900))
    assert len(inbox.open("three", "a").read()) == 900


def test_the_event_loop_hands_uploads_over_without_waiting_for_the_disk(spool_folder, monkeypatch):
    """put_soon, discard_soon and discard_session_soon return at once, though the disk holds every write up (big
    uploads, a slow disk): the server's event loop calls them, and every session's page waits on it. The page that
    reads an upload waits for it to be written; one removed before its turn is never written."""
    disk_free, under_way = threading.Event(), threading.Semaphore(0)
    write = os.pwrite

    def held_up(descriptor: int, data, offset: int) -> int:
        under_way.release()
        disk_free.wait()
        return write(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", held_up)
    inbox = UploadInbox(limit_bytes=2**20)
    busy = [f"busy-{number}" for number in range(WRITERS)]

    def event_loop() -> None:
        for session_id in busy:
            inbox.put_soon(session_id, "a", b"first")
        for _ in busy:  # every thread of the inbox's is writing, held up
            assert under_way.acquire(timeout=10)
        inbox.put_soon("queued", "a", b"queued")  # its turn comes once a thread is free
        inbox.put_soon("busy-0", "removed", b"never kept")
        inbox.discard_soon("busy-0", "removed")
        inbox.discard_session_soon("busy-1")

    with ThreadPoolExecutor(2) as threads:
        try:
            threads.submit(event_loop).result(timeout=20)
            reading = threads.submit(lambda: inbox.open("queued", "a").read())
            assert not reading.done()
        finally:
            disk_free.set()
        assert reading.result(timeout=10) == b"queued"
    kept = 3 * len(b"first") + len(b"queued")  # busy-0, busy-2, busy-3 and queued
    deadline = time.monotonic() + 10
    while sum(files_held_open("self", spool_folder)) != kept and time.monotonic() < deadline:
        time.sleep(0.05)  # the inbox's threads finish their turns
    assert sum(files_held_open("self", spool_folder)) == kept
    for session_id, upload_id in (("busy-0", "removed"), ("busy-1", "a")):
        with pytest.raises(NotWaiting, match="removed from the uploader"):
            inbox.open(session_id, upload_id)
    assert inbox.open("busy-0", "a").read() == b"first" and inbox.arrival("busy-0", "a") is None


def hold_writes(monkeypatch, *prefixes: bytes) -> tuple[threading.Semaphore, list[threading.Event]]:
    """A write of bytes that start with one of `prefixes` says it is under way, then waits until the event of its
    prefix is set; the others are written at once."""
    under_way, free = threading.Semaphore(0), [threading.Event() for _ in prefixes]
    write = os.pwrite

    def held_up(descriptor: int, data, offset: int) -> int:
        for prefix, event in zip(prefixes, free):
            if bytes(data[:len(prefix)]) == prefix:
                under_way.release()
                event.wait()
        return write(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", held_up)
    return under_way, free


def test_one_sessions_uploads_never_hold_up_another_sessions(spool_folder, monkeypatch):
    """However many uploads one session sends at once, and however slowly its disk takes them, another session's
    uploads and removals are done meanwhile, and its page answered: a session's work takes one of the inbox's
    threads at a time."""
    under_way, [disk_free] = hold_writes(monkeypatch, b"greedy")
    inbox = UploadInbox(limit_bytes=2**20)
    inbox.put("bystander", "a", b"to be removed")
    greedy = [f"upload-{number}" for number in range(2 * WRITERS)]
    with ThreadPoolExecutor(1) as threads:
        try:
            for upload_id in greedy:
                inbox.put_soon("greedy", upload_id, f"greedy {upload_id}".encode())
            assert under_way.acquire(timeout=10)  # its first write is held up, the others wait their turn
            inbox.put_soon("other", "a", b"small")
            inbox.discard_soon("bystander", "a")
            assert threads.submit(lambda: inbox.open("other", "a").read()).result(timeout=10) == b"small"
            deadline = time.monotonic() + 10
            while len(files_held_open("self", spool_folder)) != 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # the bystander's spool goes; greedy's and other's stay
            assert sorted(files_held_open("self", spool_folder)) == [0, len(b"small")]
        finally:
            disk_free.set()
    for upload_id in greedy:
        assert inbox.open("greedy", upload_id).read() == f"greedy {upload_id}".encode()


def test_sessions_busy_on_every_thread_let_the_others_have_a_turn_between_uploads(spool_folder, monkeypatch):
    """Sessions whose uploads keep every thread of the inbox's busy write one each, then wait behind the sessions
    that handed theirs over meanwhile: a page waits for one upload of each other session at most."""
    under_way, (first_free, second_free) = hold_writes(monkeypatch, b"greedy first", b"greedy second")
    inbox = UploadInbox(limit_bytes=2**20)
    greedy = [f"greedy-{number}" for number in range(WRITERS)]
    with ThreadPoolExecutor(1) as threads:
        try:
            for upload_id in ("first", "second"):
                for session_id in greedy:
                    inbox.put_soon(session_id, upload_id, f"greedy {upload_id}".encode())
            for _ in greedy:  # each of them is writing its first upload, on a thread of its own
                assert under_way.acquire(timeout=10)
            inbox.put_soon("other", "a", b"small")
            first_free.set()  # the disk takes their first uploads; their second wait for it
            assert threads.submit(lambda: inbox.open("other", "a").read()).result(timeout=10) == b"small"
        finally:
            first_free.set()
            second_free.set()
    for session_id in greedy:
        assert inbox.open(session_id, "second").read() == b"greedy second"


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
