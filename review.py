"""The main page's work, without drawing it: the pictures one browser session brings (their originals waiting in a
spool on disk, queued, then classified), the labels given to them, the order every view shows them in, where the
one-at-a-time view is and what each of its keys does, and what a Save hands to the store. app.py draws it; the tests
drive it directly. No Streamlit here: one `Review` per browser session lives in the session's state."""

from __future__ import annotations

import contextlib
import io
import threading
from concurrent.futures import Executor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, Mapping, Sequence

from PIL import Image

from classes import CLASSES
from display import CARD_SIZE, PICTURE_SIZE, THUMBNAIL_SIZE, encode_image
from inputs import (FetchError, InvalidImageError, content_hash, fetch_image, is_zip, read_image_input, unforeseen,
                    upload_problem, zip_images)
from records import NewPrediction
from spools import Place, Spool

if TYPE_CHECKING:  # the model (torch) is the page's to load
    from classifier import Prediction

PAGE_SIZE = 50  # pictures on one page of Cards or Table
SKIP = "skip"  # a label choice that means: do not save this image
LABEL_CHOICES = (*CLASSES, SKIP)
CONFIRM, BACK = "confirm", "back"  # the one-at-a-time view's other moves (besides the ten classes and SKIP)
BATCH = 32  # pictures decoded (on every core) and classified together
URL_THREADS = 16  # URLs fetched at once, each with its own deadline
# The originals of the pictures one page shows or has queued, each once however often it is sent, kept on disk until
# Clear all: about 1,500 photos of 12 megapixels. Its spool's file holds no more (see Review._room_for).
MAX_SPOOL_BYTES = 10 * 2**30
UNKNOWN_FLAG = "maybe none of these classes"
LOW_CONFIDENCE_FLAG = "low confidence"


@dataclass(frozen=True)
class Classified:
    """One picture on the page: what the model said, and its display copies (encoded once, on upload). Memory holds
    only those; the original, which Save stores byte for byte, waits in the session's spool on disk."""

    source: str
    content_hash: str
    extension: str
    original: tuple[int, int]  # (offset, length) in the session's Spool
    prediction: Prediction
    model_version: str  # the version that made the prediction: what its record names, whatever is served at Save
    picture: bytes     # the large copy of the one-at-a-time view
    card: bytes        # shown on its card and in the table
    thumbnail: bytes   # saved with the record, for History


@dataclass(frozen=True)
class Pending:
    """An input in the spool, waiting to be decoded and classified."""

    key: str
    source: str
    original: tuple[int, int]
    content_hash: str  # hashed as it was kept: decoding does not hash it again


Item = tuple[str, Classified]  # (input key, picture): the key tells two uploads of one name apart


def flag(prediction: Prediction, threshold: float) -> str:
    """Why an image is listed first: the model thinks it is none of the ten, or is not sure which; else ''."""
    if prediction.is_ood:
        return UNKNOWN_FLAG
    return LOW_CONFIDENCE_FLAG if prediction.confidence < threshold else ""


def review_order(items: Sequence[Item], threshold: float) -> list[Item]:
    """The order every view shows: flagged first (maybe none of the ten, low confidence), else upload order."""
    return sorted(items, key=lambda pair: not flag(pair[1].prediction, threshold))


def upload_key(upload_id: str) -> str:
    """An upload's key among the page's inputs (a ZIP's members add /<place>)."""
    return f"file-{upload_id}"


def page_count(count: int) -> int:
    """How many pages of Cards and Table `count` pictures take (one, when there are none)."""
    return max(1, -(-count // PAGE_SIZE))


def decode(spool: Spool, pending: Pending) -> tuple[Image.Image, str, str, bytes, bytes, bytes]:
    """The picture for the model, its hash and extension, and its three display copies."""
    image = read_image_input(spool.read(pending.original), pending.source, pending.content_hash)
    return (image.image, image.content_hash, image.extension, encode_image(image.image, PICTURE_SIZE),
            encode_image(image.image, CARD_SIZE), encode_image(image.image, THUMBNAIL_SIZE))


class Review:
    """What one browser session has on the main page, from the inputs to the Save. Inputs are keyed: `file-<upload
    id>` (and `/<member>` for a ZIP's), `url-<url>`; each key's result is its Classified picture or, when it could
    not be read, the error that says why."""

    def __init__(self) -> None:
        self.results: dict[str, Classified | str] = {}
        self.pending: list[Pending] = []   # in the spool, not yet classified
        self.queued = 0                    # inputs queued since the queue was last empty (for the progress bar)
        self.taken_uploads: set[str] = set()  # the upload ids already read
        # Content hash -> the label the person chose (a class or SKIP): a label is the picture's, whichever of the
        # inputs that brought it lists it (the same picture can come by URL, then by upload).
        self.corrections: dict[str, str] = {}
        self.spool: Spool | None = None
        self.kept: dict[str, Place] = {}   # content hash -> where the spool has its bytes: each once
        # The places of the pictures shown or queued, and their bytes (held_bytes); None: to be counted again.
        self._held: set[Place] | None = None
        self._held_bytes = 0
        self.at_key: str | None = None     # the picture the one-at-a-time view is at (None: past the last)
        self.at_index = 0                  # its place, which stays when that picture leaves the page
        self.page = 1                      # the page of Cards and Table
        self.urls: list[str] = []          # the URL box's, in its order
        self._use = threading.Lock()       # see in_use

    def close(self) -> None:
        """Forget the spooled originals (the temporary file goes)."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None
            self.kept = {}
            self._held = None

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Held while a Save or a read uses the spool, so that a sweep never closes it under them."""
        with self._use:
            yield

    def close_if_idle(self) -> bool:
        """Close, unless a Save or a read holds the page; returns whether it closed."""
        if not self._use.acquire(blocking=False):
            return False
        try:
            self.close()
        finally:
            self._use.release()
        return True

    # ------------------------------------------------------------ inputs

    def queue(self, key: str, source: str, data: bytes) -> None:
        """Keep an input's bytes in the spool, to be decoded and classified in a batch. A picture is kept once, by
        its content, however often it is sent (a URL pasted back, photos dropped again), and the page's limit of
        MAX_SPOOL_BYTES counts the pictures it holds (held_bytes); past it, or should the disk have no room, say so
        instead."""
        digest = content_hash(data)
        if digest not in self.kept:
            try:
                why = self._room_for(len(data))
                if not why:
                    self.kept[digest] = self.spool.add(data)
            except OSError as error:  # TMPDIR's disk is full: this input is left out, and the others go on
                why = (f"the server could not keep it on disk ({error.strerror or 'a disk error'}). Try again in a "
                       "while.")
            if why:
                self.results[key] = f"'{source}' was left out: {why}"
                return
        place = self.kept[digest]
        self.pending.append(Pending(key, source, place, digest))
        if self._held is not None and place not in self._held:
            self._held.add(place)
            self._held_bytes += place[1]
        self.queued += 1

    def held_bytes(self) -> int:
        """What the page's limit counts: the bytes of the distinct pictures it shows or has queued. An input that
        could not be decoded, or that left with its URL, is counted no more (its bytes stay in the spool's file,
        where a picture sent again is found, until the file would pass the limit)."""
        # A pass over the page, then kept up by queue: this is asked for each input past the limit, and a ZIP can
        # bring thousands.
        if self._held is None:
            self._held = ({pending.original for pending in self.pending}
                          | {result.original for result in self.results.values() if isinstance(result, Classified)})
            self._held_bytes = sum(length for _, length in self._held)
        return self._held_bytes

    def _room_for(self, length: int) -> str:
        """Make room in the spool for `length` bytes more, or say why the page may not keep them. Once the spool's
        file would pass MAX_SPOOL_BYTES, the pictures shown or queued move to a new one (_compact)."""
        if self.spool is None:
            self.spool = Spool()
        if self.spool.size + length <= MAX_SPOOL_BYTES:
            return ""
        held = self.held_bytes()
        if held + length > MAX_SPOOL_BYTES:
            return (f"this page already holds {held / 2**30:.1f} GB of pictures (each once, until Clear all), and "
                    f"may hold {MAX_SPOOL_BYTES / 2**30:.0f} GB. Save them, then Clear all, and upload the rest.")
        self._compact()
        return ""

    def _compact(self) -> None:
        """Move the pictures shown or queued to a new spool (every place that names them follows), and let the old
        one go with the rest. Not while a Save or a read uses the page (in_use), whose places it would move: the
        file then passes the limit until the next input after it. Should the disk be full, all stays as it was."""
        if not self._use.acquire(blocking=False):
            return
        try:
            self.held_bytes()
            spool, moved = Spool(), {}
            try:
                for place in sorted(self._held):  # in the order of the file
                    with self.spool.open(place) as part:
                        moved[place] = spool.add_from(part, place[1])
            except BaseException:
                spool.close()
                raise
            self.spool.close()
            self.spool = spool
            self.kept = {digest: moved[place] for digest, place in self.kept.items() if place in moved}
            self.pending = [replace(pending, original=moved[pending.original]) for pending in self.pending]
            self.results = {key: replace(result, original=moved[result.original]) if isinstance(result, Classified)
                            else result for key, result in self.results.items()}
            self._held = set(moved.values())
        finally:
            self._use.release()

    def take_upload(self, upload_id: str, name: str, content: BinaryIO) -> None:
        """Queue an uploaded file, or each image of an uploaded ZIP, member by member; what cannot be read (a file
        over its size limit, a ZIP member left out) is named in an error, and the rest go on. Nothing raises out of
        here: the uploads after this one are still read."""
        self.taken_uploads.add(upload_id)
        key = upload_key(upload_id)
        try:
            problem = upload_problem(name, content.seek(0, io.SEEK_END))
            content.seek(0)
            if problem:
                self.refuse_upload(upload_id, problem)
            elif is_zip(name):
                # Keyed by place in the archive, not by name: a ZIP can hold one name twice.
                for place, (member, data, error) in enumerate(zip_images(content, name)):
                    if error is None:
                        self.queue(f"{key}/{place}", member, data)
                    else:
                        self.results[f"{key}/{place}"] = error
            else:
                self.queue(key, name, content.read())
        except Exception as error:  # noqa: BLE001 (one upload may not stop the others or reach the page)
            self.results[key] = f"'{name}' could not be read: {unforeseen(error, name)}."

    def refuse_upload(self, upload_id: str, why: str) -> None:
        """An upload that cannot be read, and why."""
        self.taken_uploads.add(upload_id)
        self.results[upload_key(upload_id)] = why

    def take_urls(self, urls: Sequence[str]) -> None:
        """The URLs in the box, in order: a URL taken out of the box leaves the page; those not seen before are
        fetched (at once, each with its deadline) into the queue. A URL pasted back is fetched afresh, as what it
        serves may have changed; the same bytes are not kept again (queue)."""
        self.urls = list(urls)
        wanted = {f"url-{url}" for url in urls}
        self.results = {key: result for key, result in self.results.items()
                        if not key.startswith("url-") or key in wanted}
        self.pending = [pending for pending in self.pending
                        if not pending.key.startswith("url-") or pending.key in wanted]
        self._held = None
        for url, fetched in self._fetched(self.new_urls(urls)):
            if isinstance(fetched, FetchError):
                self.results[f"url-{url}"] = str(fetched)
            else:
                self.queue(f"url-{url}", url, fetched)

    def new_urls(self, urls: Sequence[str]) -> list[str]:
        """The URLs neither read nor waiting: what take_urls fetches."""
        waiting = {pending.key for pending in self.pending}
        return [url for url in urls if f"url-{url}" not in self.results and f"url-{url}" not in waiting]

    @staticmethod
    def _fetched(urls: list[str]) -> list[tuple[str, bytes | FetchError]]:
        """(url, its bytes or why not) for each of these URLs, fetched at once."""
        if not urls:
            return []
        with ThreadPoolExecutor(min(URL_THREADS, len(urls))) as pool:
            futures = {pool.submit(fetch_image, url): url for url in urls}
            fetched = []
            for future in as_completed(futures):
                try:
                    fetched.append((futures[future], future.result()))
                except FetchError as error:
                    fetched.append((futures[future], error))
                except Exception as error:  # noqa: BLE001 (one URL may not stop the others or reach the page)
                    url = futures[future]
                    fetched.append((url, FetchError(f"{url!r} could not be fetched: {unforeseen(error, url)}.")))
        return fetched

    def classify_next(self, predict: Callable[[list[Image.Image]], list[Prediction]], pool: Executor,
                      model_version: str) -> tuple[int, int]:
        """Decode (on the pool) and classify the next BATCH queued inputs with `predict`, the model `model_version`.
        Returns (read, queued) for the progress bar; once the queue is empty, the count of queued inputs starts
        again from zero."""
        batch = self.pending[:BATCH]
        decoded = []
        for pending, future in zip(batch, [pool.submit(decode, self.spool, pending) for pending in batch]):
            try:
                decoded.append((pending, future.result()))
            except InvalidImageError as error:
                self.results[pending.key] = str(error)
        if decoded:
            predictions = predict([image for _, (image, *_) in decoded])
            for (pending, (_, digest, extension, picture, card, thumbnail)), prediction in zip(decoded, predictions):
                self.results[pending.key] = Classified(pending.source, digest, extension, pending.original, prediction,
                                                       model_version, picture, card, thumbnail)
        self.pending = self.pending[len(batch):]
        self._held = None  # what could not be decoded is counted no more
        done, queued = self.queued - len(self.pending), self.queued
        if not self.pending:
            self.queued = 0
        return done, queued

    def forget(self, keys: Sequence[str]) -> None:
        """Drop these results: their inputs are read again, as if just given (Retry failed URLs)."""
        for key in keys:
            self.results.pop(key, None)
        self._held = None

    # ------------------------------------------------------------ what is on the page

    def _in_input_order(self) -> list[tuple[str, Classified | str]]:
        """Every result: uploads first, in the order they were read; then URLs, in the order of the box."""
        uploads = [(key, result) for key, result in self.results.items() if not key.startswith("url-")]
        urls = [f"url-{url}" for url in self.urls]
        return uploads + [(key, self.results[key]) for key in urls if key in self.results]

    def items(self) -> list[Item]:
        """The pictures on the page, each once: a picture given again (under another name or URL) is listed by
        duplicates() instead, so one picture never gets two labels."""
        items, seen = [], set()
        for key, result in self._in_input_order():
            if isinstance(result, Classified) and result.content_hash not in seen:
                seen.add(result.content_hash)
                items.append((key, result))
        return items

    def errors(self) -> list[str]:
        """Why each input that could not be read was left out."""
        return [result for _, result in self._in_input_order() if isinstance(result, str)]

    def failed_urls(self) -> list[str]:
        """The keys of the URLs that could not be read: a server that was down a moment ago may answer now."""
        return [key for key, result in self._in_input_order() if isinstance(result, str) and key.startswith("url-")]

    def duplicates(self) -> list[tuple[str, str]]:
        """(source, source of the same picture earlier on the page) for each picture given more than once."""
        first: dict[str, str] = {}
        repeated = []
        for _, result in self._in_input_order():
            if not isinstance(result, Classified):
                continue
            if result.content_hash in first:
                repeated.append((result.source, first[result.content_hash]))
            else:
                first[result.content_hash] = result.source
        return repeated

    def chosen(self, item: Classified) -> str | None:
        """The label the person gave this picture (a class or SKIP), or None: they have not."""
        return self.corrections.get(item.content_hash)

    def final_label(self, item: Classified) -> str:
        """The class the person chose, the prediction if they left it, or SKIP."""
        return self.corrections.get(item.content_hash, item.prediction.label)

    def label(self, key: str, label: str) -> None:
        """A choice made in Cards or Table for the picture this input lists: a class, or SKIP."""
        result = self.results.get(key)
        if label in LABEL_CHOICES and isinstance(result, Classified):
            self.corrections[result.content_hash] = label

    def ordered(self, threshold: float) -> list[Item]:
        return review_order(self.items(), threshold)

    # ------------------------------------------------------------ pages of Cards and Table

    def page_of(self, items: Sequence[Item]) -> tuple[int, list[Item]]:
        """The pictures of the current page (kept within the pages there are), and the index of its first."""
        self.page = min(max(1, self.page), page_count(len(items)))
        start = (self.page - 1) * PAGE_SIZE
        return start, list(items[start:start + PAGE_SIZE])

    # ------------------------------------------------------------ one at a time

    def position(self, keys: Sequence[str]) -> int:
        """Where the one-at-a-time view is: at the picture it showed last (wherever new uploads put it), or
        len(keys) once every picture has had its key. Its place follows that picture, so should the picture leave
        the page (its URL taken out of the box), the view shows the one after it."""
        if self.at_key in keys:
            self.at_index = keys.index(self.at_key)
        elif self.at_key is None:  # past the last: pictures read since then, or listed before, still wait
            self.at_index = self._unreviewed_after(keys, -1)
        return min(self.at_index, len(keys))

    def _unreviewed_after(self, keys: Sequence[str], index: int) -> int:
        """The first picture after `index` that has had no key yet, else the first before it (a batch read during
        the review can list flagged pictures ahead of the view), else len(keys): all are reviewed."""
        for candidate in [*range(index + 1, len(keys)), *range(0, min(index + 1, len(keys)))]:
            if self.results[keys[candidate]].content_hash not in self.corrections:
                return candidate
        return len(keys)

    def go_to(self, keys: Sequence[str], index: int) -> None:
        """Put the view at this picture; Cards and Table then open on its page."""
        self.at_index = index
        self.at_key = keys[index] if index < len(keys) else None
        if keys:
            self.page = min(index, len(keys) - 1) // PAGE_SIZE + 1

    def press(self, action: str, shown: str | None, threshold: float) -> None:
        """A key of the one-at-a-time view (or its button), pressed while the picture `shown` was on the screen (None:
        past the last): give it a class, the prediction (CONFIRM) or SKIP and go to the next one, or go BACK one.
        A key is taken only if the view is still at its picture: a key pressed before the next picture's keys were
        drawn is dropped (the picture stays, and the key can be pressed again), never given to a picture nobody has
        seen yet or to the one before."""
        items = self.ordered(threshold)
        keys = [key for key, _ in items]
        index = self.position(keys)
        if shown != (keys[index] if index < len(keys) else None):
            return
        if action == BACK:
            index = max(0, index - 1)
        elif shown is not None:
            item = items[index][1]
            self.corrections[item.content_hash] = item.prediction.label if action == CONFIRM else action
            index = self._unreviewed_after(keys, index)
        self.go_to(keys, index)

    # ------------------------------------------------------------ saving

    def to_save(self) -> list[Item]:
        """The pictures a Save takes: every one not marked SKIP."""
        return [(key, item) for key, item in self.items() if self.final_label(item) != SKIP]

    def predictions(self) -> list[NewPrediction]:
        """What a Save hands to the store, each naming the model version that predicted it, without the originals:
        the store reads each from the spool (through original_reader()) as it writes it, so a Save of a thousand
        photos never holds them all in memory."""
        return [NewPrediction(content_hash=item.content_hash, data=b"", extension=item.extension, source=item.source,
                              predicted_label=item.prediction.label, confidence=item.prediction.confidence,
                              final_label=self.final_label(item), model_version=item.model_version,
                              is_ood=item.prediction.is_ood, ood_score=item.prediction.ood_score,
                              thumbnail=item.thumbnail)
                for _, item in self.to_save()]

    def unsaved(self, stored_labels: Mapping[str, str]) -> int:
        """How many pictures the page would lose with this session: those still being read, and those whose label
        the store does not hold (content hash -> its label there); pictures marked skip are not counted, nobody
        meant to save them."""
        return len(self.pending) + sum(stored_labels.get(item.content_hash) != self.final_label(item)
                                       for _, item in self.to_save())

    def original_reader(self) -> Callable[[NewPrediction], bytes]:
        """Reads the bytes of a picture on the page back from the spool, byte for byte as uploaded or downloaded."""
        places = {item.content_hash: item.original for _, item in self.items()}
        spool = self.spool
        return lambda prediction: spool.read(places[prediction.content_hash])


class SessionReviews:
    """Every browser session's Review on one server, so that the originals spooled on disk go with the session.
    Streamlit keeps a session whose browser left for a while (it may reconnect), then drops it without a word, and
    the Review, spool and all, lingers until a garbage collection: an abandoned thousand photos would hold the disk.
    A sweep closes the Review of each session Streamlit holds no more, unless a Save or a read is using it."""

    def __init__(self) -> None:
        self._reviews: dict[str, Review] = {}  # session id -> its Review
        self._lock = threading.Lock()

    def seen(self, session_id: str, review: Review) -> None:
        """A run of this session, with the Review it has now."""
        with self._lock:
            self._reviews[session_id] = review

    def sweep(self, held: Callable[[str], bool]) -> int:
        """Close the Reviews of the sessions that `held` says are gone for good; returns how many."""
        with self._lock:
            gone = [(session_id, review) for session_id, review in self._reviews.items() if not held(session_id)]
        closed = 0
        for session_id, review in gone:
            if review.close_if_idle():  # else the next sweep
                with self._lock:
                    if self._reviews.get(session_id) is review:
                        del self._reviews[session_id]
                closed += 1
        return closed
