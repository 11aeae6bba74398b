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


class Spool:
    """Bytes kept on disk for one browser session: each add returns where its bytes are, and reads give them back
    byte for byte. Appends and reads may come from several threads."""

    def __init__(self, prefix: str = "cifar10-originals-") -> None:
        self._file = tempfile.TemporaryFile(prefix=prefix)
        self._lock = threading.Lock()
        self._size = 0

    def add(self, data: bytes) -> Place:
        """Keep these bytes; returns where they are."""
        with self._lock:
            offset = self._size
            self._size += len(data)
        view, at = memoryview(data), offset
        while view:
            written = os.pwrite(self._file.fileno(), view, at)
            view, at = view[written:], at + written
        return offset, len(data)

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


class InboxFull(Exception):
    """An upload refused: its session already has as much waiting as it may."""


class UploadInbox:
    """Uploads from the moment they arrive until a page reads them, on disk. Streamlit would keep each in the
    server's memory until then, and of a thousand photos dropped at once, all have arrived before the page reads the
    first. One spool per session, closed (its disk space freed) once none of its uploads waits; each session may
    have at most `limit_bytes` waiting. Safe from any thread: uploads arrive on the server's, pages read on theirs."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._spools: dict[str, Spool] = {}                  # session id -> its spool
        self._waiting: dict[str, dict[str, Place]] = {}      # session id -> upload id -> where its bytes are
        self._lock = threading.Lock()

    def put(self, session_id: str, upload_id: str, data: bytes) -> None:
        """Keep an upload's bytes (those of an upload sent again replace them); InboxFull past the session's limit."""
        with self._lock:
            waiting = self._waiting.setdefault(session_id, {})
            waiting.pop(upload_id, None)
            held = sum(length for _, length in waiting.values())
            if held + len(data) > self.limit_bytes:
                raise InboxFull(f"{held / 2**30:.1f} GB of uploads wait to be read on this page, and it may hold "
                                f"{self.limit_bytes / 2**30:.0f} GB")
            spool = self._spools.get(session_id)
            if spool is None:
                spool = self._spools[session_id] = Spool("cifar10-uploads-")
            waiting[upload_id] = spool.add(data)

    def open(self, session_id: str, upload_id: str) -> BinaryIO | None:
        """The upload's bytes as a file (close it), or None when none are here."""
        with self._lock:
            place = self._waiting.get(session_id, {}).get(upload_id)
            return None if place is None else self._spools[session_id].open(place)

    def discard(self, session_id: str, upload_id: str) -> None:
        """Read, or removed in the browser: its bytes go (with the spool, once none waits)."""
        with self._lock:
            waiting = self._waiting.get(session_id, {})
            waiting.pop(upload_id, None)
            if not waiting:
                self._forget(session_id)

    def discard_session(self, session_id: str) -> None:
        """The session ended: whatever it never read goes."""
        with self._lock:
            self._forget(session_id)

    def sweep(self, held: Callable[[str], bool]) -> int:
        """Forget what the sessions that `held` says are gone for good never read; returns how many sessions. (A
        session Streamlit kept for its browser to come back, it drops without a word to its keeper of uploads.)"""
        with self._lock:
            sessions = list(self._waiting)
        gone = [session_id for session_id in sessions if not held(session_id)]
        with self._lock:
            for session_id in gone:
                self._forget(session_id)
        return len(gone)

    def _forget(self, session_id: str) -> None:
        self._waiting.pop(session_id, None)
        spool = self._spools.pop(session_id, None)
        if spool is not None:
            spool.close()
