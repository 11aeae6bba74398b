"""Inputs kept on disk instead of in memory: each page's originals (Spool), and the uploads that have arrived but
that no page has read yet (UploadInbox). Anonymous temporary files in TMPDIR: they go when closed, when the server
stops, and even when it is killed."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Callable, Iterator

Place = tuple[int, int]  # (offset, length) in a Spool
COPY_BYTES = 2**20  # what moving uploads to a new spool holds in memory at a time


class Spool:
    """Bytes kept on disk for one browser session: each add returns where its bytes are, and reads give them back
    byte for byte. Appends and reads may come from several threads."""

    def __init__(self, prefix: str = "cifar10-originals-") -> None:
        self._file = tempfile.TemporaryFile(prefix=prefix)
        self._lock = threading.Lock()
        self._size = 0

    def add(self, data: bytes) -> Place:
        """Keep these bytes; returns where they are. Should the write fail (OSError: the disk is full), nothing of
        them is kept."""
        offset = self._reserve(len(data))
        with self._given_back_on_error(offset, len(data)):
            self._write(data, offset)
        return offset, len(data)

    def add_from(self, stream: BinaryIO, length: int) -> Place:
        """Keep the next `length` bytes of this file, read a megabyte at a time; returns where they are. Should the
        file end early or the write fail (OSError), nothing of them is kept."""
        offset = self._reserve(length)
        with self._given_back_on_error(offset, length):
            at, end = offset, offset + length
            while at < end:
                chunk = stream.read(min(COPY_BYTES, end - at))
                if not chunk:
                    raise OSError(f"the file to keep ends {end - at} bytes early")
                self._write(chunk, at)
                at += len(chunk)
        return offset, length

    def _reserve(self, length: int) -> int:
        with self._lock:
            offset = self._size
            self._size += length
        return offset

    @contextlib.contextmanager
    def _given_back_on_error(self, offset: int, length: int) -> Iterator[None]:
        """The bytes reserved at `offset` go back if their write fails, so that they neither count nor hold the disk:
        unless bytes reserved after them are being kept, the file ends where they began again (else they stay a
        gap, counted, until the spool goes)."""
        try:
            yield
        except BaseException:
            with self._lock:
                if self._size == offset + length:
                    self._size = offset
                    os.ftruncate(self._file.fileno(), offset)
            raise

    def _write(self, data: bytes, at: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._file.fileno(), view, at)
            view, at = view[written:], at + written

    @property
    def size(self) -> int:
        """Bytes kept so far."""
        return self._size

    def read(self, place: Place) -> bytes:
        offset, length = place
        parts = []
        while length:
            part = os.pread(self._file.fileno(), length, offset)
            if not part:
                raise OSError(f"the spool of uploads ends {length} bytes early")
            parts.append(part)
            offset, length = offset + len(part), length - len(part)
        return b"".join(parts)

    def open(self, place: Place) -> BinaryIO:
        """A file of these bytes alone, read a part at a time (a ZIP member by member), through a descriptor of its
        own: it stays readable when the spool closes."""
        return io.BufferedReader(_SpoolPart(self._file.fileno(), *place))

    def close(self) -> None:
        self._file.close()


class _SpoolPart(io.RawIOBase):
    """A stretch of a spool's file, seekable within it."""

    def __init__(self, descriptor: int, offset: int, length: int) -> None:
        super().__init__()
        self._descriptor = os.dup(descriptor)
        self._start, self._length, self._at = offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._length - self._at)
        if count <= 0:
            return 0
        data = os.pread(self._descriptor, count, self._start + self._at)
        buffer[:len(data)] = data
        self._at += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        at = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._length}[whence] + offset
        if at < 0:
            raise ValueError(f"negative seek position {at}")
        self._at = at
        return at

    def tell(self) -> int:
        return self._at

    def close(self) -> None:
        if not self.closed:
            os.close(self._descriptor)
        super().close()


class NotWaiting(Exception):
    """An upload the page asked for is not in the inbox: why, said after the file's name."""


REMOVED = "was removed from the uploader before the page read it."
UPLOADS_PREFIX = "cifar10-uploads-"
# All sessions' uploads waiting together may take at most this share of the disk space TMPDIR has free at the time
# of each upload: the pages that read them need as much again for their originals.
DISK_SHARE = 0.5
WRITERS = 4  # the inbox's threads that write what the event loop hands over (a session's on one at a time)


class _Waiting:
    """One session's uploads: those waiting, in a spool of their own (made with the first, closed once none waits),
    and those refused with why. Its lock is held while a file is written: other sessions never wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spool: Spool | None = None
        self.places: dict[str, Place] = {}   # upload id -> where its bytes are
        self.refused: dict[str, str] = {}    # upload id -> why
        self.closed = False                  # forgotten: an upload that finds it so starts another

    def forget(self, upload_id: str) -> int:
        """Under the lock; returns how many bytes no longer wait."""
        _, length = self.places.pop(upload_id, (0, 0))
        self.refused.pop(upload_id, None)
        if not self.places:
            self._close_spool()
        return length

    def live_bytes(self) -> int:
        return sum(length for _, length in self.places.values())

    def compact(self) -> None:
        """Under the lock: the uploads waiting move to a new spool, and the bytes sent again or removed meanwhile
        go with the old one (readers of it have descriptors of their own)."""
        spool, places = Spool(UPLOADS_PREFIX), {}
        try:
            for upload_id, place in self.places.items():
                with self.spool.open(place) as reader:
                    places[upload_id] = spool.add_from(reader, place[1])
        except BaseException:  # the disk is full: everything stays as it was
            spool.close()
            raise
        self.spool.close()
        self.spool, self.places = spool, places

    def close(self) -> int:
        """Under the lock; returns how many bytes no longer wait."""
        freed = self.live_bytes()
        self.places.clear()
        self.refused.clear()
        self._close_spool()
        self.closed = True
        return freed

    def _close_spool(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


class UploadInbox:
    """Uploads from the moment they arrive until a page reads them, on disk. Streamlit would keep each in the
    server's memory until then, and of a thousand photos dropped at once, all have arrived before the page reads the
    first. Each session writes to its own spool, freed once none of its uploads waits. A session may have at most
    `limit_bytes` waiting, and all sessions together at most `disk_share` of the disk space TMPDIR has free at the
    time of each upload: what would pass either is refused, to be said on the page; and a spool that would pass the
    first (it only grows, with what was sent again or removed meanwhile) gives way to a new one with what waits.
    Safe from any thread: uploads arrive on the server's event loop, which hands them over with the *_soon methods
    (the inbox's own threads write them), and pages read on theirs."""

    def __init__(self, limit_bytes: int, disk_share: float = DISK_SHARE) -> None:
        self.limit_bytes, self.disk_share = limit_bytes, disk_share
        self._sessions: dict[str, _Waiting] = {}
        self._lock = threading.Lock()  # held only to find a session's _Waiting, and for the counts below
        self._waiting_bytes = 0        # every session's, with the writes under way
        # (session id, upload id) -> the put_soon on its way to the disk, done once the inbox's thread has had its
        # turn: open waits for it; a discard takes it out, and its turn then writes nothing.
        self._arriving: dict[tuple[str, str], Future] = {}
        self._arrived = threading.Condition(self._lock)
        # session id -> its work handed over and not yet done, in order; listed while one of its turns is queued or
        # under way. A session never has two, so a thousand uploads of one hold one thread and nobody else's.
        self._queued: dict[str, deque[Callable[[], None]]] = {}
        self._writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="upload-inbox")

    def put(self, session_id: str, upload_id: str, data: bytes) -> None:
        """Keep an upload's bytes (an upload sent again under its id replaces them), or why not."""
        self._put(session_id, upload_id, data, arrival=None)

    def put_soon(self, session_id: str, upload_id: str, data: bytes) -> None:
        """put, by one of the inbox's threads: returns at once, whatever the disk. Until it is written, open waits
        for it, and `arrival` has it."""
        arrival = Future()
        with self._lock:
            self._arriving[session_id, upload_id] = arrival
        self._hand_over(session_id, lambda: self._put_arriving(session_id, upload_id, data, arrival))

    def arrival(self, session_id: str, upload_id: str) -> Future | None:
        """The turn of an upload that put_soon handed over, done once it is written (or not to be); None when none
        is on its way."""
        with self._lock:
            return self._arriving.get((session_id, upload_id))

    def _put(self, session_id: str, upload_id: str, data: bytes, arrival: Future | None) -> None:
        """put; one that put_soon handed over (its arrival) is left out if it was discarded meanwhile."""
        while True:
            with self._lock:
                waiting = self._sessions.setdefault(session_id, _Waiting())
            with waiting.lock:
                if waiting.closed:  # forgotten since it was found: the next turn finds a new one
                    continue
                if arrival is not None and self.arrival(session_id, upload_id) is not arrival:
                    self._close_if_empty(session_id, waiting)  # removed, or its session gone, before its turn
                    return
                self._release(waiting.forget(upload_id))
                why = self._take_room(waiting.live_bytes(), len(data))
                if why:
                    waiting.refused[upload_id] = why
                    return
                try:
                    if waiting.spool is None:
                        waiting.spool = Spool(UPLOADS_PREFIX)
                    elif waiting.spool.size + len(data) > self.limit_bytes:
                        waiting.compact()
                    waiting.places[upload_id] = waiting.spool.add(data)
                except OSError as error:  # the disk is full: what this write left goes now, unless others wait
                    self._release(len(data))
                    waiting.forget(upload_id)
                    waiting.refused[upload_id] = (f"was not taken: the server could not keep it on disk "
                                                  f"({error.strerror or 'a disk error'}). Upload it again in a while.")
                return

    def open(self, session_id: str, upload_id: str) -> BinaryIO:
        """The upload's bytes as a file (close it); NotWaiting says why there are none."""
        with self._lock:
            self._arrived.wait_for(lambda: (session_id, upload_id) not in self._arriving)
            waiting = self._sessions.get(session_id)
        if waiting is None:
            raise NotWaiting(REMOVED)
        with waiting.lock:
            if upload_id in waiting.places:
                return waiting.spool.open(waiting.places[upload_id])
            raise NotWaiting(waiting.refused.get(upload_id, REMOVED))

    def discard(self, session_id: str, upload_id: str) -> None:
        """Read, or removed in the browser: its bytes go (with the spool, once none waits)."""
        self._cancel(lambda key: key == (session_id, upload_id))
        with self._lock:
            waiting = self._sessions.get(session_id)
        if waiting is None:
            return
        with waiting.lock:
            self._release(waiting.forget(upload_id))
            self._close_if_empty(session_id, waiting)

    def discard_soon(self, session_id: str, upload_id: str) -> None:
        """discard, by the inbox's threads (a write of the session's may hold it up); put_soon's upload of it, if
        its turn has not come yet, is never written."""
        self._cancel(lambda key: key == (session_id, upload_id))
        self._hand_over(session_id, lambda: self.discard(session_id, upload_id))

    def discard_session(self, session_id: str) -> None:
        """The session ended, or its page was cleared: whatever it has not read goes."""
        self._cancel(lambda key: key[0] == session_id)
        with self._lock:
            waiting = self._sessions.get(session_id)
        if waiting is not None:
            with waiting.lock:
                self._close(session_id, waiting)

    def discard_session_soon(self, session_id: str) -> None:
        """discard_session, by the inbox's threads; those of its uploads whose turn has not come yet are never
        written."""
        self._cancel(lambda key: key[0] == session_id)
        self._hand_over(session_id, lambda: self.discard_session(session_id))

    def sweep(self, held: Callable[[str], bool]) -> int:
        """Forget what the sessions that `held` says are gone for good never read; returns how many sessions. (A
        session Streamlit kept for its browser to come back, it drops without a word to its keeper of uploads.)"""
        with self._lock:
            sessions = list(self._sessions)
        gone = [session_id for session_id in sessions if not held(session_id)]
        for session_id in gone:
            self.discard_session(session_id)
        return len(gone)

    def _hand_over(self, session_id: str, work: Callable[[], None]) -> None:
        """Do this for the session on the inbox's threads, after what it handed over before (a discard after the
        put of its upload)."""
        with self._lock:
            queued = self._queued.get(session_id)
            if queued is not None:  # its turn is queued or under way, and takes this too
                queued.append(work)
                return
            self._queued[session_id] = deque([work])
        self._writers.submit(self._take_turn, session_id)

    def _take_turn(self, session_id: str) -> None:
        """One piece of the session's work; then, if it has more, a turn after those of the sessions queued
        meanwhile, so that each session waits for at most one piece of each other's."""
        with self._lock:
            work = self._queued[session_id].popleft()
        try:
            work()
        except Exception:  # an upload is not kept, and its page says it was removed; the server log says why
            logging.getLogger(__name__).exception("keeping or removing an upload failed")
        with self._lock:
            more = bool(self._queued[session_id])
            if not more:
                del self._queued[session_id]
        if more:
            self._writers.submit(self._take_turn, session_id)

    def _put_arriving(self, session_id: str, upload_id: str, data: bytes, arrival: Future) -> None:
        try:
            self._put(session_id, upload_id, data, arrival)
        finally:
            self._cancel(lambda key: key == (session_id, upload_id) and self._arriving[key] is arrival)
            arrival.set_result(None)

    def _cancel(self, which: Callable[[tuple[str, str]], bool]) -> None:
        """Uploads no longer on their way: written, or not to be (open stops waiting for them)."""
        with self._lock:
            for key in [key for key in self._arriving if which(key)]:
                del self._arriving[key]
            self._arrived.notify_all()

    def _take_room(self, session_bytes: int, length: int) -> str:
        """Count `length` bytes more waiting, `session_bytes` of its session's waiting already; or, when they may
        not wait, why not."""
        if session_bytes + length > self.limit_bytes:
            return (f"was not taken: {session_bytes / 2**30:.1f} GB of uploads are waiting to be read on this page, "
                    f"and it may have {self.limit_bytes / 2**30:.0f} GB. Upload it again once the page has read them.")
        free = shutil.disk_usage(tempfile.gettempdir()).free
        with self._lock:
            if self._waiting_bytes + length > self.disk_share * free:
                return (f"was not taken: the uploads that pages on this server have not read yet may take at most "
                        f"{self.disk_share:.0%} of the disk space free for them (now {free / 2**30:.1f} GB), every "
                        "page's together. Upload it again once they have been read.")
            self._waiting_bytes += length
        return ""

    def _release(self, length: int) -> None:
        with self._lock:
            self._waiting_bytes -= length

    def _close_if_empty(self, session_id: str, waiting: _Waiting) -> None:
        """Under the session's lock."""
        if not waiting.places and not waiting.refused:
            self._close(session_id, waiting)

    def _close(self, session_id: str, waiting: _Waiting) -> None:
        """Under the session's lock, so that an upload never finds it closed but still listed."""
        self._release(waiting.close())
        with self._lock:
            if self._sessions.get(session_id) is waiting:
                del self._sessions[session_id]
