"""Images as files in one folder (a personal install, or a folder every server mounts)."""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from image_store import IMAGE_NAME, IMAGE_THREADS, MODEL_FILE, OWNERS_SUFFIX, PARTIAL_PREFIX
from records import ImageMissing, StoreError
from settings import IMAGE_DIR_ENV


class FolderImages:
    """Images as files in one folder, each written to a temporary name, synced, then renamed into place."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.description = f"the image folder {self.folder}"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            raise StoreError(f"{self.description} failed ({error}). Check that it exists, is writable and "
                             f"the disk is not full ({IMAGE_DIR_ENV}).") from error

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        with self._errors():
            self.folder.mkdir(parents=True, exist_ok=True)
            with ThreadPoolExecutor(IMAGE_THREADS) as pool:
                list(pool.map(lambda item: self._write(*item), items))
            if items:  # the renames themselves survive a power cut only once the folder is synced
                descriptor = os.open(self.folder, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)

    def _write(self, name: str, data: bytes) -> None:
        path = self.folder / name
        if not path.exists():  # named by content: an existing file already holds these bytes
            path.parent.mkdir(exist_ok=True)  # models/ (see versions.py): the images lie in the folder itself
            _write_whole(path, data)

    def get(self, name: str) -> bytes:
        with self._errors():
            try:
                return (self.folder / name).read_bytes()
            except FileNotFoundError as error:
                raise ImageMissing(f"{self.description} has no {name}.") from error

    def delete_many(self, names: Sequence[str]) -> None:
        with self._errors():
            for name in names:
                (self.folder / name).unlink(missing_ok=True)

    def stored(self) -> Iterator[tuple[str, float]]:
        """(name, modification time) of every image this store wrote; nothing else in the folder."""
        with self._errors():
            if not self.folder.is_dir():
                return
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    if IMAGE_NAME.match(entry.name) and entry.is_file():
                        yield entry.name, entry.stat().st_mtime

    def stored_models(self) -> Iterator[tuple[str, float]]:
        """(name, modification time) of every model version's file this store wrote (under models/)."""
        with self._errors():
            models = self.folder / "models"
            for path in models.iterdir() if models.is_dir() else ():
                name = f"models/{path.name}"
                if MODEL_FILE.match(name) and path.is_file():
                    yield name, path.stat().st_mtime

    def remove_partials(self, older_than: float) -> int:
        """Temporary files of writes that died half-way (only the object store's own puts are atomic), beside the
        images and beside the model versions' files."""
        removed = 0
        with self._errors():
            folders = [folder for folder in (self.folder, self.folder / "models") if folder.is_dir()]
            for path in (path for folder in folders for path in folder.glob(PARTIAL_PREFIX + "*")):
                if path.is_file() and path.stat().st_mtime < older_than:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    @property
    def _owners_folder(self) -> Path:
        """Beside the image folder, not in it: the folder holds the images and nothing else. Beside its real path,
        so that databases reaching one folder through a link share one set of marks."""
        folder = self.folder.resolve()
        return folder.parent / f".{folder.name}{OWNERS_SUFFIX}"

    @property
    def owners_location(self) -> str:
        return str(self._owners_folder)

    def owners(self) -> dict[str, str]:
        with self._errors():
            if not self._owners_folder.is_dir():
                return {}
            return {path.name: path.read_text() for path in self._owners_folder.iterdir()
                    if not path.name.startswith(PARTIAL_PREFIX)}

    def add_owner(self, store_id: str, fingerprint: str) -> None:
        """Written whole: a mark read half-written (empty) would count as another database's."""
        with self._errors():
            self._owners_folder.mkdir(parents=True, exist_ok=True)
            _write_whole(self._owners_folder / store_id, fingerprint.encode())


def _write_whole(path: Path, data: bytes) -> None:
    """Write to a temporary name beside the file, sync, then rename into place: readers see the old file or the
    new one, never part of one, even after a power cut."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=PARTIAL_PREFIX)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
