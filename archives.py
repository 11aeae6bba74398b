"""Export and import archives: the store's records and images as a ZIP in ImageFolder layout by final label with
a labels.csv manifest (or as CSV, for spreadsheets), streamed at any size; and such an archive, or a plain
ImageFolder ZIP, checked member by member and row by row before anything of it is saved."""

from __future__ import annotations

import csv
import io
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from classes import CLASSES
from image_store import IMAGE_THREADS
from records import EXPORT_COLUMNS, ArchiveError, Duplicate, ExportTally, ImportResult, NewPrediction, SavedPrediction
from sql import BATCH

if TYPE_CHECKING:  # for annotations only: inputs imports Pillow, which the command line loads only to import
    from inputs import ImageInput
    from store import Store

MAX_MANIFEST_BYTES = 256 * 1024 * 1024
# An exported labels.csv row is a few hundred characters (csv's own limit is 128 KiB a field): a longer one is
# refused before it is read whole, so reading labels.csv takes memory that does not grow with it.
MAX_MANIFEST_ROW_CHARS = 256 * 1024


# ---------------------------------------------------------------- export

def iter_csv(store: Store) -> Iterator[bytes]:
    """Every record as CSV, for spreadsheets (no cell starts a formula), a batch at a time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for number, record in enumerate(store.iter_records(), start=1):
        writer.writerow([_spreadsheet_cell(value) for value in _export_row(record)])
        if number % BATCH == 0:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()


def iter_zip(store: Store, tally: ExportTally | None = None) -> Iterator[bytes]:
    """The images in ImageFolder layout by final label (airplane/<hash>.jpg ...) and a labels.csv manifest
    with every column, as ZIP bytes produced one image at a time: memory stays at about one image. The tally,
    when given, counts what was written and lists the records left out for want of their image."""
    tally = tally if tally is not None else ExportTally()
    sink = _Sink()
    with tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+", newline="") as manifest:
        writer = csv.writer(manifest)
        writer.writerow(("file",) + EXPORT_COLUMNS)
        with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive:
            for record in store.iter_records():
                data = store.image_or_nothing(record)
                if not data:
                    tally.missing.append(record)  # a row an older version left without its image
                    continue
                name = f"{record.final_label}/{record.image_file}"
                archive.writestr(name, data)
                writer.writerow((name,) + _export_row(record))
                tally.written += 1
                yield sink.take()
            manifest.seek(0)
            listing = zipfile.ZipInfo("labels.csv", datetime.now().timetuple()[:6])
            with archive.open(listing, "w") as member:
                for block in iter(lambda: manifest.read(1 << 20), ""):
                    member.write(block.encode())
                    yield sink.take()
        yield sink.take()


def _export_row(record: SavedPrediction) -> tuple:
    return tuple(int(value) if isinstance(value, bool) else value
                 for value in (getattr(record, column) for column in EXPORT_COLUMNS))


def _spreadsheet_cell(value: object) -> object:
    """Text a spreadsheet would run as a formula (a source or model version from anyone) gets a leading quote, as
    OWASP advises against CSV injection; numbers stay numbers. labels.csv in the ZIP keeps exact values instead."""
    return "'" + value if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")) else value


class _Sink(io.RawIOBase):
    """A write-only stream that hands over what was written since the last take(): zipfile streams into it."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        data, self._buffer = bytes(self._buffer), bytearray()
        return data


# ---------------------------------------------------------------- import

@dataclass(frozen=True)
class ArchiveEntry:
    """One checked image of an archive: where it is, how big, when it was saved, and the record it becomes
    (its bytes are read from the archive again when it is saved)."""

    member: str
    size: int
    created_at: str
    prediction: NewPrediction


def import_archive(store: Store, path: str | Path, predict: Predict | None = None,
                   progress: Callable[[int, int], None] | None = None, *,
                   make_thumbnail: Callable[[bytes, str], bytes]) -> ImportResult:
    """Restore an export (or a plain ImageFolder ZIP: folder name = final label, `predict` supplies the rest).
    The whole archive is checked before anything is written; then it is saved in batches, each in one
    transaction. Pictures already saved are left as they are, so importing twice changes nothing; a picture the
    archive holds twice is imported once. Thumbnails (make_thumbnail(bytes, name): the caller's, as the data layer
    has no display code) are made outside the store's write lock."""
    entries, duplicates = read_archive(path, predict)
    created = done = 0
    with zipfile.ZipFile(path) as archive:
        for batch in _batches(entries):
            blobs = [archive.read(entry.member) for entry in batch]
            with ThreadPoolExecutor(IMAGE_THREADS) as pool:
                thumbnails = list(pool.map(make_thumbnail, blobs, [entry.member for entry in batch]))
            created += store.save_imported([(replace(entry.prediction, data=data, thumbnail=thumbnail), entry.created_at)
                                            for entry, data, thumbnail in zip(batch, blobs, thumbnails)])
            done += len(batch)
            if progress is not None:
                progress(done, len(entries))
    return ImportResult(saved=created, unchanged=len(entries) - created, duplicates=tuple(duplicates))


def _batches(entries: Sequence[ArchiveEntry], max_bytes: int = 64 << 20) -> Iterator[list[ArchiveEntry]]:
    """Runs of at most BATCH entries and max_bytes of image data: one lock and one round trip per run."""
    batch, size = [], 0
    for entry in entries:
        if batch and (len(batch) == BATCH or size + entry.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry.size
    if batch:
        yield batch


Predict = Callable[[list], tuple[list, str]]  # images -> (predictions, model version)


def read_archive(path: str | Path, predict: Predict | None = None) -> tuple[list[ArchiveEntry], list[Duplicate]]:
    """Check every member of an export or ImageFolder ZIP and say what to import, or raise ArchiveError naming
    the first bad member: unsafe path, bomb, unknown label, not an image, unreadable, or a corrupt labels.csv.
    Each picture is imported once, under its first name (in labels.csv's order, or the archive's); the other
    names are returned as duplicates. Images are decoded one at a time (a few dozen at once when the model must
    predict them) and labels.csv is checked row by row as it is read, so memory stays bounded."""
    from inputs import MEMBER_ERRORS, zip_error_text, zip_lost_entries

    try:
        archive = zipfile.ZipFile(path)
    except MEMBER_ERRORS as error:
        raise ArchiveError(f"{path} is not a readable ZIP archive ({zip_error_text(error)}).") from error
    with archive:
        lost = zip_lost_entries(archive)
        if lost:
            raise ArchiveError(f"{path} {lost}.")
        members = _image_members(path, archive)
        listed = "labels.csv" in archive.NameToInfo
        if not listed and predict is None:
            raise ArchiveError(f"{path} has no labels.csv, and no model was given to predict its images.")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entries: list[ArchiveEntry] = []
        duplicates: list[Duplicate] = []
        kept: dict[str, tuple[str, str]] = {}  # content hash -> the member imported for it, and its final label
        waiting: list = []  # (member, ImageInput) for the model, when there is no manifest

        def first_time(name: str, content_hash: str, label: str) -> bool:
            """Whether this member is the first to hold its picture; a later one is noted as a duplicate."""
            if content_hash in kept:
                duplicates.append(Duplicate(name, *kept[content_hash]))
                return False
            kept[content_hash] = (name, label)
            return True

        def predict_waiting() -> None:
            predictions, version = predict([item.image for _, item in waiting])
            entries.extend(ArchiveEntry(name, members[name].file_size, now, NewPrediction(
                item.content_hash, b"", item.extension, name, prediction.label, prediction.confidence,
                _label_of(name), version, prediction.is_ood, prediction.ood_score))
                for (name, item), prediction in zip(waiting, predictions))
            waiting.clear()

        if listed:
            for line, row in _manifest_rows(path, archive, members):
                name = row["file"]
                item = _read_image(path, archive, members[name])
                if row.get("content_hash") and row["content_hash"] != item.content_hash:
                    raise ArchiveError(f"{path}: labels.csv line {line}: content_hash does not match {name!r}.")
                if first_time(name, item.content_hash, row["final_label"]):
                    entries.append(ArchiveEntry(name, members[name].file_size, row.get("created_at") or now,
                                                NewPrediction(item.content_hash, b"", item.extension,
                                                              row.get("source") or name, row["predicted_label"],
                                                              row["confidence"], row["final_label"],
                                                              row.get("model_version") or "unknown", row["is_ood"],
                                                              row["ood_score"], saved_by=row.get("saved_by") or "",
                                                              labelled_by=row.get("labelled_by") or "",
                                                              labelled_at=row.get("labelled_at") or "")))
            return entries, duplicates
        for name, info in members.items():
            item = _read_image(path, archive, info)
            if first_time(name, item.content_hash, _label_of(name)):
                waiting.append((name, item))
                if len(waiting) == 64:
                    predict_waiting()
        if waiting:
            predict_waiting()
        return entries, duplicates


def _read_image(path: str | Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> ImageInput:
    """One image member, decoded and fingerprinted, or ArchiveError naming it."""
    from inputs import MAX_FILE_BYTES, MEMBER_ERRORS, InvalidImageError, read_image_input, zip_error_text

    try:
        with archive.open(info) as member:
            return read_image_input(member.read(MAX_FILE_BYTES + 1), info.filename)
    except InvalidImageError as error:
        raise ArchiveError(f"{path}: member {error}") from error
    except MEMBER_ERRORS as error:
        raise ArchiveError(f"{path}: member {info.filename!r} cannot be read ({zip_error_text(error)}).") from error


def _label_of(member: str) -> str:
    return member.partition("/")[0]


def _image_members(path: str | Path, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Every image member, checked for a safe path, a plausible size and a class folder; every member that
    will be read (labels.csv too), for being readable at all."""
    from inputs import MAX_FILE_BYTES, zip_member_problem

    images = {}
    for info in archive.infolist():
        name = info.filename
        problem = zip_member_problem(info, MAX_MANIFEST_BYTES if name == "labels.csv" else MAX_FILE_BYTES)
        if problem:
            raise ArchiveError(f"{path}: member {name!r} {problem}.")
        if info.is_dir():
            continue
        if name == "labels.csv":
            continue
        label, _, file_name = name.partition("/")
        if not file_name or "/" in file_name:
            raise ArchiveError(f"{path}: member {name!r} is not in a <label>/<file> folder.")
        if label not in CLASSES:
            raise ArchiveError(f"{path}: member {name!r} is in the folder {label!r}, which is not one of the ten "
                               f"classes ({', '.join(CLASSES)}).")
        images[name] = info
    if not images:
        raise ArchiveError(f"{path} holds no images in <label>/<file> folders.")
    return images


def _manifest_records(path: str | Path, archive: zipfile.ZipFile) -> Iterator[tuple[int, list[str]]]:
    """labels.csv's non-empty CSV records with the line each starts on, read as they are asked for: a record
    longer than MAX_MANIFEST_ROW_CHARS is refused before it is read whole."""
    from inputs import MEMBER_ERRORS, zip_error_text

    line, used = 1, 0  # the line the record being read starts on, and its characters so far

    def lines(stream: io.TextIOWrapper) -> Iterator[str]:
        nonlocal used
        for text in iter(lambda: stream.readline(MAX_MANIFEST_ROW_CHARS + 1), ""):
            used += len(text)
            if used > MAX_MANIFEST_ROW_CHARS:
                raise ArchiveError(f"{path}: labels.csv line {line} is longer than {MAX_MANIFEST_ROW_CHARS // 1024} "
                                   "KiB, far more than any export writes.")
            yield text

    try:
        with archive.open("labels.csv") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as stream:
            reader = csv.reader(lines(stream))
            for fields in reader:
                if fields:
                    yield line, fields
                line, used = reader.line_num + 1, 0
    except ArchiveError:  # a ValueError too: already says what is wrong
        raise
    except (UnicodeDecodeError, csv.Error) as error:
        raise ArchiveError(f"{path}: labels.csv line {line} cannot be read as UTF-8 CSV ({error}).") from error
    except MEMBER_ERRORS as error:
        raise ArchiveError(f"{path}: member 'labels.csv' cannot be read at line {line} "
                           f"({zip_error_text(error)}).") from error


def _manifest_rows(path: str | Path, archive: zipfile.ZipFile, images: dict) -> Iterator[tuple[int, dict]]:
    """labels.csv checked against the archive row by row, as it is read: each image listed exactly once, labels,
    numbers and dates valid. Yields (line number, row with its values converted)."""
    records = _manifest_records(path, archive)
    _, header = next(records, (1, []))
    missing = {"file", "final_label", "predicted_label", "confidence"} - set(header)
    if missing:
        raise ArchiveError(f"{path}: labels.csv lacks the column(s) {', '.join(sorted(missing))}.")
    listed: set[str] = set()
    for line, fields in records:
        where = f"{path}: labels.csv line {line}"
        if len(fields) != len(header):
            raise ArchiveError(f"{where} has the wrong number of fields.")
        row = dict(zip(header, fields))
        name = row["file"]
        if name not in images:
            raise ArchiveError(f"{where} names {name!r}, which is not an image in the archive.")
        if name in listed:
            raise ArchiveError(f"{where} lists {name!r} a second time.")
        if row["final_label"] != _label_of(name):
            raise ArchiveError(f"{where}: final_label {row['final_label']!r} differs from the folder of {name!r}.")
        if row["predicted_label"] not in CLASSES:
            raise ArchiveError(f"{where}: predicted_label {row['predicted_label']!r} is not one of the ten classes.")
        try:
            confidence = float(row["confidence"])
        except ValueError as error:
            raise ArchiveError(f"{where}: confidence {row['confidence']!r} is not a number.") from error
        if not 0.0 <= confidence <= 1.0:
            raise ArchiveError(f"{where}: confidence {row['confidence']!r} is not between 0 and 1.")
        for column in ("created_at", "labelled_at"):  # labelled_at: archives exported since sign-in have it
            if row.get(column):
                try:
                    moment = datetime.fromisoformat(row[column])
                    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
                    row[column] = moment.astimezone(timezone.utc).isoformat(timespec="seconds")
                except (ValueError, OverflowError) as error:  # OverflowError: before year 1 or after 9999 in UTC
                    raise ArchiveError(f"{where}: {column} {row[column]!r} is not an ISO date and time in the "
                                       f"years 1 to 9999 UTC ({error}).") from error
        flag, score = row.get("is_ood") or "0", row.get("ood_score") or ""
        if flag not in ("0", "1"):
            raise ArchiveError(f"{where}: is_ood {flag!r} is not 0 or 1.")
        try:
            ood_score = float(score) if score else None
        except ValueError as error:
            raise ArchiveError(f"{where}: ood_score {score!r} is not a number.") from error
        listed.add(name)
        yield line, {**row, "confidence": confidence, "is_ood": flag == "1", "ood_score": ood_score}
    unlisted = sorted(images.keys() - listed)
    if unlisted:
        more = f" and {len(unlisted) - 1} other image(s)" if len(unlisted) > 1 else ""
        raise ArchiveError(f"{path}: labels.csv does not list {unlisted[0]!r}{more}.")
