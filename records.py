"""What a saved record is: the records and changes the store takes and gives, and its errors. Plain data: no
database, no image store, no display code."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

COLUMNS = ("id", "content_hash", "image_file", "source", "predicted_label", "confidence", "final_label",
           "is_correct", "created_at", "model_version", "edits", "is_ood", "ood_score", "saved_by", "labelled_by",
           "labelled_at")
EXPORT_COLUMNS = ("id", "source", "predicted_label", "confidence", "final_label", "is_correct", "created_at",
                  "model_version", "content_hash", "edits", "is_ood", "ood_score", "saved_by", "labelled_by",
                  "labelled_at")


class StoreError(RuntimeError):
    """The database or the image store failed; the message names which one and what to check."""


class SettingsError(StoreError):
    """A setting cannot be used as written (malformed, or where it is not read). The message names the setting or
    file and what is wrong, never a password; a StoreError, so every page and the command line show it."""


class ImageMissing(StoreError):
    """A record's image is not in the image store (a row left by an older version's bug)."""


class ArchiveError(ValueError):
    """An archive cannot be imported; the message names the member (or line) and what is wrong with it."""


@dataclass(frozen=True)
class NewPrediction:
    """What the app hands over to be saved for one image."""

    content_hash: str
    data: bytes
    extension: str
    source: str
    predicted_label: str
    confidence: float
    final_label: str
    model_version: str
    is_ood: bool = False
    ood_score: float | None = None
    thumbnail: bytes | None = None    # display.THUMBNAIL_SIZE JPEG; History makes one from the image when absent
    # Who saved it and who gave it its final label, when (an imported record's, from its archive; a Save sets its own).
    saved_by: str = ""
    labelled_by: str = ""
    labelled_at: str = ""


@dataclass(frozen=True)
class SavedPrediction:
    id: int
    content_hash: str
    image_file: str
    source: str
    predicted_label: str
    confidence: float
    final_label: str
    is_correct: bool
    created_at: str
    model_version: str
    edits: int = 0
    is_ood: bool = False
    ood_score: float | None = None
    # The signed-in person (e-mail) who saved it, and who gave it its final label last and when (ISO, UTC); "" for
    # records saved before sign-in existed, or without it (labelled_at: before it was kept).
    saved_by: str = ""
    labelled_by: str = ""
    labelled_at: str = ""


@dataclass(frozen=True)
class DeletedPrediction:
    """A deleted record with its image bytes and stored thumbnail, kept so that one deletion can be undone."""

    record: SavedPrediction
    data: bytes
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class Change:
    """One save or delete, exactly: which records it created, relabelled or removed, as they were left.

    Undo touches a record only if it is still as this change left it (same id, same edit count)."""

    description: str
    created: tuple[tuple[int, int], ...] = ()                # (id, edits)
    # (id, edits after the change, and as it was before: final label, labelled_by, labelled_at)
    relabelled: tuple[tuple[int, int, str, str, str], ...] = ()
    deleted: tuple[DeletedPrediction, ...] = ()
    removal_note: str = ""   # why images of deleted records are still in the image store (failing or shared)


@dataclass(frozen=True)
class ClearResult:
    deleted: int          # records
    removal_note: str     # why their images are still in the image store (failing, or shared), or ""


@dataclass
class ExportTally:
    """What an export wrote, and the records it left out because their image is missing from the image store."""

    written: int = 0
    missing: list[SavedPrediction] = field(default_factory=list)


@dataclass(frozen=True)
class SaveResult:
    saved: int
    updated: int
    unchanged: int
    change: Change | None


@dataclass(frozen=True)
class RecordFilter:
    """Which records History shows: some final labels, only corrections, a range of days (UTC), some people, some
    model versions."""

    labels: tuple[str, ...] = ()
    corrected_only: bool = False
    flagged_only: bool = False        # only those the model said were maybe none of the ten
    since: date | None = None
    until: date | None = None
    people: tuple[str, ...] = ()      # only records one of them saved or gave its final label last
    models: tuple[str, ...] = ()      # only records one of these model versions predicted


@dataclass(frozen=True)
class Summary:
    """What the sidebar draws: counts per final label, confirmed vs corrected, and the confusion matrix."""

    class_counts: dict[str, int]
    correct: int
    incorrect: int
    confusion: list[list[int]]

    @property
    def total(self) -> int:
        return self.correct + self.incorrect


def image_name(content_hash: str, extension: str) -> str:
    return f"{content_hash}.{extension}"


@dataclass(frozen=True)
class Duplicate:
    """A member skipped because the archive holds the same picture under an earlier name, imported instead."""

    member: str
    kept: str
    label: str  # the final label the picture was imported with: the kept member's


@dataclass(frozen=True)
class ImportResult:
    saved: int
    unchanged: int  # already saved before, left as they are
    duplicates: tuple[Duplicate, ...]


@dataclass(frozen=True)
class ModelVersion:
    """One model the store keeps: its files in the image store (by content hash), its model card, and how it came
    to be. `status`: "shipped" (the weights the app ships, version 1 of a new store), "promoted" (a fine-tuned
    candidate that passed the guard) or "rejected" (one that did not, kept to compare)."""

    id: int
    weights_file: str
    card_file: str
    bank_file: str
    card: dict
    status: str
    made_from: int | None
    created_at: str
    created_by: str
    records_seen: int   # saved records when it was made: the Model page counts those new since

    @property
    def name(self) -> str:
        """What records name as their model version: the version and its weights' hash."""
        return f"v{self.id}@{self.weights_file.rsplit('/', 1)[-1][:12]}"


@dataclass(frozen=True)
class ModelJob:
    """A fine-tuning job as every server sees it: who started it, when, how far it is, and how it ended."""

    id: int
    started_by: str
    started_at: str
    state: str                   # running, done, failed or cancelled
    beat_at: float               # when its process last said it was alive (Unix time)
    progress: float              # 0..1
    seconds_left: float | None
    message: str                 # what it is doing, or how it ended
    cancel: bool                 # Cancel was pressed: the process stops at its next beat
    version_id: int | None       # the version it made (promoted or rejected)
