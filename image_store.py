"""What the store needs of an image store, and the names it keeps there: images named by content hash, the
partial files of writes in flight, and the marks of the databases that use it (see Store._claim_owner_mark)."""

from __future__ import annotations

import re
from typing import Iterator, Protocol, Sequence

# Image uploads and downloads in flight at once (object stores answer many requests in parallel).
IMAGE_THREADS = 8
# .mpo: what older versions named multi-picture JPEGs; they are removed like any other image.
IMAGE_NAME = re.compile(r"^[0-9a-f]{64}\.(jpg|png|gif|webp|mpo)$")
# Model versions' files (versions.py), beside the images, which no image sweep lists.
MODEL_FILE = re.compile(r"^models/[0-9a-f]{64}\.(pt|json|novelty\.pt)$")
PARTIAL_PREFIX = ".partial-"
OWNERS_SUFFIX = ".owners"  # which databases use an image store: .<folder>.owners/<id>, <prefix>.owners/<id> on S3


class ImageStore(Protocol):
    description: str

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None: ...
    def get(self, name: str) -> bytes: ...
    def delete_many(self, names: Sequence[str]) -> None: ...
    def stored(self) -> Iterator[tuple[str, float]]: ...
    def stored_models(self) -> Iterator[tuple[str, float]]: ...
    def remove_partials(self, older_than: float) -> int: ...
    owners_location: str  # where the marks are, for messages
    def owners(self) -> dict[str, str]: ...
    def add_owner(self, store_id: str, fingerprint: str) -> None: ...
