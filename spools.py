"""Inputs kept on disk instead of in memory: each page's originals (Spool), and the uploads that have arrived but
that no page has read yet (UploadInbox). Anonymous temporary files in TMPDIR: they go when closed, when the server
stops, and even when it is killed."""

from __future__ import annotations

import io
import os
import tempfile
import threading
from typing import BinaryIO, Callable

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
        """Keep these bytes; returns where they are."""
        offset = self._reserve(len(data))
        self._write(data, offset)
        return offset, len(data)

    def add_from(self, stream: BinaryIO, length: int) -> Place:
        """Keep the next `length` bytes of this file, read a megabyte at a time; returns where they are."""
        offset = self._reserve(length)
        for at in range(offset, offset + length, COPY_BYTES):
            chunk = stream.read(min(COPY_BYTES, offset + length - at))
            if not chunk:
                raise OSError(f"the file to keep ends {offset + length - at} bytes early")
            self._write(chunk, at)
        return offset, length

    def _reserve(self, length: int) -> int:
        with self._lock:
            offset = self._size
            self._size += length
        return offset

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


class _Waiting:
    """One session's uploads: those waiting, in a spool of their own (made with the first, closed once none waits),
    and those refused with why. Its lock is held while a file is written: other sessions never wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spool: Spool | None = None
        self.places: dict[str, Place] = {}   # upload id -> where its bytes are
        self.refused: dict[str, str] = {}    # upload id -> why
        self.closed = False                  # forgotten: an upload that finds it so starts another

    def forget(self, upload_id: str) -> None:
        """Under the lock."""
        self.places.pop(upload_id, None)
        self.refused.pop(upload_id, None)
        if not self.places:
            self._close_spool()

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

    def close(self) -> None:
        """Under the lock."""
        self.places.clear()
        self.refused.clear()
        self._close_spool()
        self.closed = True

    def _close_spool(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


class UploadInbox:
    """Uploads from the moment they arrive until a page reads them, on disk. Streamlit would keep each in the
    server's memory until then, and of a thousand photos dropped at once, all have arrived before the page reads the
    first. Each session writes to its own spool, freed once none of its uploads waits. A session may have at most
    `limit_bytes` waiting: what would pass that is refused, to be said on the page; and a spool that would pass it
    (it only grows, with what was sent again or removed meanwhile) gives way to a new one with what waits. Safe from
    any thread: uploads arrive on the server's, pages read on theirs."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._sessions: dict[str, _Waiting] = {}
        self._lock = threading.Lock()  # held only to find a session's _Waiting

    def put(self, session_id: str, upload_id: str, data: bytes) -> None:
        """Keep an upload's bytes (an upload sent again under its id replaces them), or why not."""
        while True:
            with self._lock:
                waiting = self._sessions.setdefault(session_id, _Waiting())
            with waiting.lock:
                if waiting.closed:  # forgotten since it was found: the next turn finds a new one
                    continue
                waiting.forget(upload_id)
                live = waiting.live_bytes()
                if live + len(data) > self.limit_bytes:
                    waiting.refused[upload_id] = (
                        f"was not taken: {live / 2**30:.1f} GB of uploads are waiting to be read on this page, and "
                        f"it may have {self.limit_bytes / 2**30:.0f} GB. Upload it again once the page has read them.")
                    return
                if waiting.spool is None:
                    waiting.spool = Spool(UPLOADS_PREFIX)
                elif waiting.spool.size + len(data) > self.limit_bytes:
                    waiting.compact()
                try:
                    waiting.places[upload_id] = waiting.spool.add(data)
                except OSError:  # the disk is full: what this write left goes now, unless others wait
                    waiting.forget(upload_id)
                    raise
                return

    def open(self, session_id: str, upload_id: str) -> BinaryIO:
        """The upload's bytes as a file (close it); NotWaiting says why there are none."""
        with self._lock:
            waiting = self._sessions.get(session_id)
        if waiting is None:
            raise NotWaiting(REMOVED)
        with waiting.lock:
            if upload_id in waiting.places:
                return waiting.spool.open(waiting.places[upload_id])
            raise NotWaiting(waiting.refused.get(upload_id, REMOVED))

    def discard(self, session_id: str, upload_id: str) -> None:
        """Read, or removed in the browser: its bytes go (with the spool, once none waits)."""
        with self._lock:
            waiting = self._sessions.get(session_id)
        if waiting is None:
            return
        with waiting.lock:
            waiting.forget(upload_id)
            if not waiting.places and not waiting.refused:
                self._close(session_id, waiting)

    def discard_session(self, session_id: str) -> None:
        """The session ended, or its page was cleared: whatever it has not read goes."""
        with self._lock:
            waiting = self._sessions.get(session_id)
        if waiting is not None:
            with waiting.lock:
                self._close(session_id, waiting)

    def sweep(self, held: Callable[[str], bool]) -> int:
        """Forget what the sessions that `held` says are gone for good never read; returns how many sessions. (A
        session Streamlit kept for its browser to come back, it drops without a word to its keeper of uploads.)"""
        with self._lock:
            sessions = list(self._sessions)
        gone = [session_id for session_id in sessions if not held(session_id)]
        for session_id in gone:
            self.discard_session(session_id)
        return len(gone)

    def _close(self, session_id: str, waiting: _Waiting) -> None:
        """Under the session's lock, so that an upload never finds it closed but still listed."""
        waiting.close()
        with self._lock:
            if self._sessions.get(session_id) is waiting:
                del self._sessions[session_id]
