"""CIFAR-10 image classifier: upload photos or paste URLs, confirm or correct each prediction, save.

    streamlit run app.py

In order: the web server (`app`: Streamlit plus the streamed export downloads), the main page and its parts,
and the navigation each browser session runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import pandas as pd
import streamlit as st
from PIL import Image
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from streamlit.runtime.scriptrunner import get_script_run_ctx

import charts
from classes import CLASSES
from classifier import Classifier, Prediction, WeightsError, load_classifier
from db import (Change, NewPrediction, SettingsError, Store, StoreError, Summary, admin_refusal,
                configured_admin_password, iter_csv, iter_zip, open_store)
from display import (CARD_SIZE, CLASS_KEYS, PICTURE_SIZE, THUMBNAIL_SIZE, code_span, data_url, encode_image,
                     escape_markdown, keyboard_help)
from inputs import (ALLOWED_EXTENSIONS, DECODE_THREADS, MAX_FILE_BYTES, ZIP_EXTENSIONS, FetchError, InvalidImageError,
                    Spool, fetch_image, is_zip, read_image_input, zip_images)

COLUMNS = 4
PAGE_SIZE = 50  # pictures on one page of Cards or Table
ONE_AT_A_TIME = "One at a time"
VIEWS = ("Cards", "Table", ONE_AT_A_TIME)
SKIP = "skip"  # a label choice that means: do not save this image
LABEL_CHOICES = (*CLASSES, SKIP)
CONFIRM, BACK = "confirm", "back"  # the one-at-a-time view's other moves (besides the ten classes and SKIP)
BATCH = 32            # pictures decoded (on every core) and classified together
RUN_SECONDS = 1.0     # a run reads batches for about this long; the page is drawn, and the next run goes on
SAVE_BATCH_BYTES = 64 << 20  # originals read back from the spool for one transaction of a Save
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
PICTURE_WIDTH = 440  # pixels: the one-at-a-time view's picture on the page
UNKNOWN_FLAG = "maybe none of these classes"
LOW_CONFIDENCE_FLAG = "low confidence"
EXPORTS = {  # file name -> (media type, the store's generator of its bytes)
    "cifar10_feedback.zip": ("application/zip", iter_zip),
    "cifar10_feedback.csv": ("text/csv", iter_csv),
}


# ---------------------------------------------------------------- the server

def export_download(request: Request) -> Response:
    """A whole-store export streamed as it is made: one image in memory at a time, whatever the store's size."""
    name = request.path_params["name"]
    if name not in EXPORTS:
        return PlainTextResponse(f"No export called {name!r}.", status_code=404)
    try:
        store = open_store()
    except StoreError as error:
        return PlainTextResponse(str(error), status_code=503)
    media_type, produce = EXPORTS[name]
    return StreamingResponse(produce(store), media_type=media_type,
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})


# `streamlit run app.py` serves this: Streamlit itself, plus /export/<file> for the History page's downloads.
app = st.App(__file__, routes=[Route("/export/{name}", export_download)])


# ---------------------------------------------------------------- the main page

@st.cache_resource(show_spinner="Loading the model...")
def get_classifier() -> Classifier:
    return load_classifier()


@st.cache_resource
def tune_memory() -> None:
    """Once per server, with the model loaded. What is loaded by now (torch, pandas, matplotlib, the model) lives as
    long as the server: kept out of the garbage collector's full passes, each takes milliseconds instead of the
    0.3 s every click used to wait for. And memory freed in blocks of 128 KB or more (uploads, originals read back
    for Save) goes back to the system at once: glibc otherwise raises that threshold to the size of the largest
    block freed, and keeps a thousand photos' worth of heap after they are read (Linux with glibc only)."""
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10)


@dataclass(frozen=True)
class Classified:
    """One picture on the page: what the model said, and its display copies (encoded once, on upload). Memory holds
    only those; the original, which Save stores byte for byte, waits in the session's spool on disk."""

    source: str
    content_hash: str
    extension: str
    original: tuple[int, int]  # (offset, length) in the session's Spool
    prediction: Prediction
    picture: bytes     # the large copy of the one-at-a-time view
    card: bytes        # shown on its card and in the table
    thumbnail: bytes   # saved with the record, for History


@dataclass(frozen=True)
class Pending:
    """An input in the spool, waiting to be decoded and classified."""

    key: str
    source: str
    original: tuple[int, int]


def decode(spool: Spool, pending: Pending) -> tuple[Image.Image, str, str, bytes, bytes, bytes]:
    """The picture for the model, its hash and extension, and its three display copies."""
    image = read_image_input(spool.read(pending.original), pending.source)
    return (image.image, image.content_hash, image.extension, encode_image(image.image, PICTURE_SIZE),
            encode_image(image.image, CARD_SIZE), encode_image(image.image, THUMBNAIL_SIZE))


def final_label(key: str, item: Classified) -> str:
    """The class the person chose, the prediction if they left it, or SKIP."""
    return st.session_state.corrections.get(key, item.prediction.label)


def flag(prediction: Prediction, threshold: float) -> str:
    """Why an image is listed first: the model thinks it is none of the ten, or is not sure which; else ''."""
    if prediction.is_ood:
        return UNKNOWN_FLAG
    return LOW_CONFIDENCE_FLAG if prediction.confidence < threshold else ""


def review_order(items: list[tuple[str, Classified]], threshold: float) -> list[tuple[str, Classified]]:
    """The order every view shows: flagged first (maybe none of the ten, low confidence), else upload order."""
    return sorted(items, key=lambda pair: not flag(pair[1].prediction, threshold))


def remember_card_choice(key: str, widget_key: str) -> None:
    st.session_state.corrections[key] = st.session_state[widget_key]


def remember_table_edits(keys: list[str], widget_key: str) -> None:
    for row, change in st.session_state[widget_key]["edited_rows"].items():
        if change.get("label") in LABEL_CHOICES:
            st.session_state.corrections[keys[row]] = change["label"]


def review_position(keys: list[str]) -> int:
    """Where the one-at-a-time view is: at the picture it showed last (wherever new uploads put it), or len(keys)
    once every picture has had its key."""
    state = st.session_state
    if state.review_key in keys:
        return keys.index(state.review_key)
    return min(state.review_index, len(keys))


def go_to(keys: list[str], index: int) -> None:
    state = st.session_state
    state.review_index = index
    state.review_key = keys[index] if index < len(keys) else None
    if keys:  # Cards and Table open on the page of that picture
        state.review_page = min(index, len(keys) - 1) // PAGE_SIZE + 1


def press(action: str, shown: str | None) -> None:
    """A key of the one-at-a-time view (or its button), pressed while the picture `shown` was on the screen (None:
    past the last): give it a class, the prediction (CONFIRM) or SKIP and go to the next one, or go BACK one.
    Each picture's keys are buttons of their own, bound to it, and a key is taken only if the view is still at
    its picture: a key pressed before the next picture's keys were drawn is dropped (the picture stays, and the
    key can be pressed again), never given to a picture nobody has seen yet or to the one before."""
    state = st.session_state
    items = review_order(current_items(), state.review_threshold / 100)
    keys = [key for key, _ in items]
    index = review_position(keys)
    if shown != (keys[index] if index < len(keys) else None):
        return
    if action == BACK:
        index = max(0, index - 1)
    elif shown is not None:
        item = items[index][1]
        state.corrections[shown] = item.prediction.label if action == CONFIRM else action
        index += 1
    go_to(keys, index)


def choose_view(widget_key: str) -> None:
    state = st.session_state
    if state[widget_key] is None:  # a click on the chosen view leaves it chosen
        state[widget_key] = state.review_view
    state.review_view = state[widget_key]


def turn_page(step: int) -> None:
    st.session_state.review_page += step


def current_items() -> list[tuple[str, Classified]]:
    """The pictures on the page, each once: a picture given again (under another name or URL) is listed by
    duplicates() instead, so one picture never gets two labels."""
    # Errors are the strings; no isinstance(Classified): each rerun of this script defines the class anew.
    items, seen = [], set()
    for key, result in st.session_state.results.items():
        if not isinstance(result, str) and result.content_hash not in seen:
            seen.add(result.content_hash)
            items.append((key, result))
    return items


def duplicates() -> list[tuple[str, str]]:
    """(source, source of the same picture earlier on the page) for each picture given more than once."""
    first: dict[str, str] = {}
    repeated = []
    for result in st.session_state.results.values():
        if isinstance(result, str):
            continue
        if result.content_hash in first:
            repeated.append((result.source, first[result.content_hash]))
        else:
            first[result.content_hash] = result.source
    return repeated


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def to_save(items: list[tuple[str, Classified]]) -> list[tuple[str, Classified]]:
    return [(key, item) for key, item in items if final_label(key, item) != SKIP]


def save_batches(items: list[tuple[str, Classified]]) -> list[list[tuple[str, Classified]]]:
    """Runs of pictures whose originals come to at most SAVE_BATCH_BYTES (one transaction each): a page of a
    thousand photos is never read back into memory at once. Twenty phone photos are one run."""
    batches, size = [[]], 0
    for key, item in items:
        if batches[-1] and size + item.original[1] > SAVE_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append((key, item))
        size += item.original[1]
    return [batch for batch in batches if batch]


def save_all(model_version: str) -> None:
    """Save every picture not marked skip, its original read back from the spool, in one transaction per
    SAVE_BATCH_BYTES; one undo takes back all of it."""
    state = st.session_state
    state.rerun_page = True  # the sidebar shows what was saved
    items = current_items()
    chosen = to_save(items)
    skipped = len(items) - len(chosen)
    saved = updated = unchanged = 0
    created: list = []
    relabelled: list = []
    try:
        store = open_store()
        for batch in save_batches(chosen):
            result = store.save_predictions([
                NewPrediction(content_hash=item.content_hash, data=state.spool.read(item.original),
                              extension=item.extension, source=item.source, predicted_label=item.prediction.label,
                              confidence=item.prediction.confidence, final_label=final_label(key, item),
                              model_version=model_version, is_ood=item.prediction.is_ood,
                              ood_score=item.prediction.ood_score, thumbnail=item.thumbnail)
                for key, item in batch])
            saved, updated, unchanged = saved + result.saved, updated + result.updated, unchanged + result.unchanged
            if result.change is not None:
                created += result.change.created
                relabelled += result.change.relabelled
    except StoreError as error:
        done = saved + updated + unchanged
        state.flash = ("error", f"Nothing was saved: {escape_markdown(str(error))} Your labels are kept: press Save "
                                "again once it is back." if not done else
                                f"Saved {done} of {len(chosen)} images, then: {escape_markdown(str(error))} Every "
                                "label is kept: press Save again once it is back (what was saved is not saved twice).")
        remember_save(created, relabelled)
        return
    parts = [f"saved {plural(saved, 'image')}"] if saved or not updated else []
    if updated:
        parts.append(f"updated the label of {plural(updated, 'image')} saved before")
    if unchanged:
        parts.append(f"{unchanged} already saved with that label, not duplicated")
    if skipped:
        parts.append(f"{skipped} marked skip, not saved")
    message = "; ".join(parts)
    state.flash = ("success", message[0].upper() + message[1:] + ".")
    remember_save(created, relabelled)


def remember_save(created: list, relabelled: list) -> None:
    """What Undo takes back: the records this Save made or relabelled, in however many transactions."""
    if created or relabelled:
        st.session_state.undo = Change(f"save of {plural(len(created) + len(relabelled), 'image')}", tuple(created),
                                       tuple(relabelled))


def undo_last() -> None:
    state = st.session_state
    state.rerun_page = True
    try:
        state.flash = ("info", escape_markdown(open_store().undo(state.undo)))  # it names files and URLs
    except StoreError as error:
        state.flash = ("error", f"Nothing was undone: {escape_markdown(str(error))}")
        return
    state.undo = None


def forget_results(keys: list[str]) -> None:
    """Dropped results are read again on this rerun, as if just added."""
    for key in keys:
        st.session_state.results.pop(key, None)


def clear_all() -> None:
    """Empty the page: inputs, pictures (and their spooled originals), labels, the review's place."""
    state = st.session_state
    state.rerun_page = True
    state.nonce += 1
    state.results = {}
    state.corrections = {}
    state.pending = []
    state.queued = 0
    state.read_uploads = set()
    state.review_key, state.review_index, state.review_page = None, 0, 1
    if state.spool is not None:
        state.spool.close()
        state.spool = None
    state.flash = None


def clear_database() -> None:
    state = st.session_state
    state.confirm_clear = False
    refusal = admin_refusal(state.get("clear_password", ""))
    if refusal:  # a wrong password, or a secrets file that broke while the confirmation was open
        state.flash = ("error", f"{escape_markdown(refusal)} The database was not cleared.")
        return
    try:
        cleared = open_store().clear()
    except StoreError as error:
        state.flash = ("error", f"The database was not cleared: {escape_markdown(str(error))}")
        return
    state.undo = None
    state.flash = ("success", f"Database cleared: {plural(cleared.deleted, 'saved image')} deleted."
                              + escape_markdown(cleared.removal_note))


@st.cache_data(max_entries=8, show_spinner=False)
def saved_summary(store_id: str, revision: int, _store: Store) -> tuple[Summary, list[bytes]]:
    """The saved feedback and its two main figures as PNGs, made only when the store's revision changes."""
    summary = _store.summary()
    if not summary.total:
        return summary, []
    return summary, [charts.to_png(charts.class_distribution_figure(summary.class_counts)),
                     charts.to_png(charts.accuracy_figure(summary.correct, summary.incorrect))]


@st.cache_data(max_entries=8, show_spinner=False)
def insight_charts(store_id: str, revision: int, _summary: Summary) -> list[bytes]:
    """Per-class accuracy and the confusion matrix: drawn only while someone looks at them (and cached)."""
    return [charts.to_png(charts.per_class_accuracy_figure(_summary.confusion)),
            charts.to_png(charts.confusion_matrix_figure(_summary.confusion, "Saved feedback: final vs predicted"))]


def saved_feedback_sidebar() -> None:
    state = st.session_state
    st.header("Saved feedback")
    try:
        store = open_store()
        revision = store.revision()
        summary, pictures = saved_summary(store.store_id, revision, store)
    except StoreError as error:
        st.error(escape_markdown(str(error)), icon=":material/database:")
        return
    st.metric("Saved images", summary.total)
    st.metric("Model accuracy", f"{summary.correct / summary.total:.1%}" if summary.total else "n/a",
              help="Share of saved images whose prediction was confirmed rather than corrected.")
    if pictures:
        st.image(pictures[0], width="stretch")
        st.image(pictures[1], width="stretch")
        if st.toggle("Where the model goes wrong", key="show_insights",
                     help="Accuracy per class and the confusion matrix of the saved feedback."):
            for picture in insight_charts(store.store_id, revision, summary):
                st.image(picture, width="stretch")
    else:
        st.info("Nothing saved yet. Classify some images and click **Save** to see charts here.")

    st.divider()
    try:
        password_needed = configured_admin_password() is not None
    except SettingsError as error:  # the password is unknown: nothing is deleted until the setting is fixed
        st.error(escape_markdown(str(error)), icon=":material/key:")
        st.button("Clear database", disabled=True)
        return
    if not state.confirm_clear:
        st.button("Clear database", disabled=not summary.total, on_click=lambda: state.update(confirm_clear=True))
    else:
        st.warning(f"Delete all {summary.total} saved images and their records? This cannot be undone and "
                   "affects everyone using this store.")
        if password_needed:
            st.text_input("Admin password", type="password", key="clear_password")
        st.button("Yes, delete everything", type="primary", on_click=clear_database)
        st.button("Cancel", on_click=lambda: state.update(confirm_clear=False))


def input_sources() -> tuple[list, list[str]]:
    """The uploader and the URL box: the uploads not read yet, and the URLs (each once, in order)."""
    state = st.session_state
    uploads = st.file_uploader(
        "Upload images", type=[*ALLOWED_EXTENSIONS, *ZIP_EXTENSIONS], accept_multiple_files=True,
        key=f"uploader-{state.nonce}-{state.upload_round}",
        help=f"JPEG, PNG, GIF or WebP, up to {MAX_FILE_BYTES // 2**20} MB each, as many as you like, or ZIPs of them "
             "(folders are read through). Once read they stay on the page until **Clear all**.")
    url_text = st.text_area("...or paste image URLs, one per line", key=f"urls-{state.nonce}",
                            placeholder="https://example.com/cat.jpg", help="Press Ctrl+Enter or click outside to fetch.")
    return uploads or [], [url for url in dict.fromkeys(line.strip() for line in url_text.splitlines()) if url]


def session_spool() -> Spool:
    state = st.session_state
    if state.spool is None:
        state.spool = Spool()
    return state.spool


def queue(key: str, source: str, data: bytes) -> None:
    """Keep an input's bytes in the spool, to be decoded and classified in a batch."""
    state = st.session_state
    state.pending.append(Pending(key, source, session_spool().add(data)))
    state.queued += 1


def take_uploads(uploads: list) -> bool:
    """Move new uploads, and each image in an uploaded ZIP, into the spool and the queue; the ZIP's members that
    cannot be read are named. Streamlit keeps every upload in the server's memory while its widget lists it: once
    spooled, each is dropped there, and the uploader starts empty on the next run. Returns whether any were new."""
    state = st.session_state
    new = [upload for upload in uploads if upload.file_id not in state.read_uploads]
    context = get_script_run_ctx()
    for upload in new:
        state.read_uploads.add(upload.file_id)
        if is_zip(upload.name):
            for name, data, error in zip_images(upload.getvalue(), upload.name):
                key = f"file-{upload.file_id}/{name}"
                if error is None:
                    queue(key, name, data)
                else:
                    state.results[key] = error
        else:
            queue(f"file-{upload.file_id}", upload.name, upload.getvalue())
        if context is not None:
            context.uploaded_file_mgr.remove_file(context.session_id, upload.file_id)
        upload.close()  # its bytes: the widget's value still names the file, which is enough
    if new:
        state.upload_round += 1
    return bool(new)


def take_urls(urls: list[str], status) -> None:
    """Fetch the URLs not seen before (at once, each with its deadline) into the queue; a URL taken out of the box
    leaves the page."""
    state = st.session_state
    wanted = {f"url-{url}" for url in urls}
    state.results = {key: result for key, result in state.results.items()
                     if not key.startswith("url-") or key in wanted}
    state.pending = [pending for pending in state.pending
                     if not pending.key.startswith("url-") or pending.key in wanted]
    waiting = {pending.key for pending in state.pending}
    new = [url for url in urls if f"url-{url}" not in state.results and f"url-{url}" not in waiting]
    if not new:
        return
    with status, st.spinner(f"Fetching {plural(len(new), 'URL')}..."), ThreadPoolExecutor(min(16, len(new))) as pool:
        futures = {pool.submit(fetch_image, url): url for url in new}
        for future in as_completed(futures):
            url = futures[future]
            try:
                queue(f"url-{url}", url, future.result())
            except FetchError as error:
                state.results[f"url-{url}"] = str(error)


def read_queue(classifier: Classifier, status) -> None:
    """Decode (on every core) and classify what is queued, BATCH at a time, for about RUN_SECONDS: then the page is
    drawn, usable, and the next run goes on, so a thousand photos never hold the page for long."""
    state = st.session_state
    if not state.pending:
        return
    started = time.monotonic()
    progress = status.progress(0.0, text=f"Reading {plural(state.queued, 'image')}...")
    spool = session_spool()
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        while state.pending and time.monotonic() - started < RUN_SECONDS:
            batch = state.pending[:BATCH]
            decoded = []
            for pending, future in zip(batch, [pool.submit(decode, spool, pending) for pending in batch]):
                try:
                    decoded.append((pending, future.result()))
                except InvalidImageError as error:
                    state.results[pending.key] = str(error)
            if decoded:
                predictions = classifier.predict([image for _, (image, *_) in decoded])
                for (pending, (_, *copies)), prediction in zip(decoded, predictions):
                    digest, extension, picture, card, thumbnail = copies
                    state.results[pending.key] = Classified(pending.source, digest, extension, pending.original,
                                                            prediction, picture, card, thumbnail)
            state.pending = state.pending[len(batch):]
            done = state.queued - len(state.pending)
            progress.progress(done / state.queued, text=f"Read and classified {done:,} of {state.queued:,} images")
    if not state.pending:
        state.queued = 0
        progress.empty()


def keep_input_order(urls: list[str]) -> None:
    """Uploads first, in the order they were read; then URLs, in the order of the box."""
    state = st.session_state
    uploads = {key: result for key, result in state.results.items() if not key.startswith("url-")}
    state.results = uploads | {f"url-{url}": state.results[f"url-{url}"] for url in urls
                               if f"url-{url}" in state.results}


def show_messages() -> None:
    state = st.session_state
    if state.flash:  # markdown whose names, URLs and error texts were escaped when it was written
        kind, message = state.flash
        getattr(st, kind)(message)
        state.flash = None
    for result in state.results.values():
        if isinstance(result, str):
            st.error(escape_markdown(result), icon=":material/error:")
    for source, first in duplicates():
        st.info(f"{escape_markdown(source)} is the same picture as {escape_markdown(first)}: it is reviewed and "
                "saved once, under that name.", icon=":material/content_copy:")
    failed_urls = [key for key, result in state.results.items() if isinstance(result, str) and key.startswith("url-")]
    if failed_urls:  # a server that was down, slow or wrong a moment ago may answer now
        st.button(f"Retry {plural(len(failed_urls), 'failed URL')}", on_click=forget_results, args=(failed_urls,))


def saved_before(items: list[tuple[str, Classified]]) -> dict:
    """content hash -> the saved record, for the pictures shown."""
    try:
        return open_store().find_saved([item.content_hash for _, item in items])
    except StoreError:
        return {}  # the sidebar says what is wrong with the store


def badge(prediction: Prediction, threshold: float) -> str:
    return {UNKNOWN_FLAG: f" :violet-badge[{UNKNOWN_FLAG.capitalize()}]",
            LOW_CONFIDENCE_FLAG: f" :orange-badge[{LOW_CONFIDENCE_FLAG}]", "": ""}[flag(prediction, threshold)]


def already_saved(record) -> str:
    return f"Already saved {record.created_at[:16].replace('T', ' ')} UTC as **{escape_markdown(record.final_label)}**."


@st.fragment
def review(model_version: str) -> None:
    """The classified images, their labels and the actions on them. A label change or a key reruns only this part;
    Save, Undo and Clear all then rerun the page once (the sidebar and the inputs change too)."""
    state = st.session_state
    if state.pop("rerun_page", False):  # set by a callback of this fragment's own run
        st.rerun(scope="app")
    items = current_items()
    view = state.review_view
    if items:
        st.subheader(f"{plural(len(items), 'image')} classified")
        view_column, threshold_column = st.columns([1, 2])
        # The view control is a new widget whenever the one-at-a-time view comes or goes: the browser's focus leaves
        # it, so Enter (which a focused control would keep for itself) reaches the view's shortcut.
        view_key = f"view_widget-{view == ONE_AT_A_TIME}"
        # Streamlit forgets a widget's value while it is not drawn (after Clear all): re-seed it from a plain copy.
        for widget_key, kept_key in ((view_key, "review_view"), ("threshold_widget", "review_threshold")):
            if widget_key not in state:
                state[widget_key] = state[kept_key]
        with view_column:
            st.segmented_control("Review as", VIEWS, key=view_key, on_change=choose_view, args=(view_key,),
                                 help="Cards show each image large; the table corrects many at once; one at a time "
                                      "goes through them by keyboard.")
        with threshold_column:
            st.slider("Flag predictions below this confidence", 0, 100, step=5, format="%d%%", key="threshold_widget")
        state.review_threshold = state.threshold_widget
        threshold = state.review_threshold / 100
        items = review_order(items, threshold)
        unknown = sum(flag(item.prediction, threshold) == UNKNOWN_FLAG for _, item in items)
        unsure = sum(flag(item.prediction, threshold) == LOW_CONFIDENCE_FLAG for _, item in items)
        how = ("A digit gives the picture its class, Enter confirms the prediction, X skips it, Backspace goes back "
               "(see *Keyboard*)." if view == ONE_AT_A_TIME else
               f"Leave a label to confirm the prediction, pick the right class to correct it, or pick **{SKIP}** to "
               "leave an image out of the save.")
        st.caption(f"{unsure} flagged as low confidence and {unknown} as maybe none of these classes, listed first. "
                   + how)
        if view == ONE_AT_A_TIME:
            review_one(items, threshold)
        else:
            shown = page_of(items)
            (review_table if view == "Table" else review_cards)(shown, threshold, saved_before(shown))
    actions(model_version, keyboard=bool(items) and view == ONE_AT_A_TIME)


def page_of(items: list[tuple[str, Classified]]) -> list[tuple[str, Classified]]:
    """The PAGE_SIZE pictures of the current page, and the buttons to the others."""
    state = st.session_state
    pages = max(1, math.ceil(len(items) / PAGE_SIZE))
    state.review_page = page = min(max(1, state.review_page), pages)
    start = (page - 1) * PAGE_SIZE
    shown = items[start:start + PAGE_SIZE]
    if pages > 1:
        with st.container(horizontal=True, vertical_alignment="center"):
            st.button("Previous page", on_click=turn_page, args=(-1,), disabled=page == 1)
            st.caption(f"Images {start + 1}–{start + len(shown)} of {len(items):,} · page {page} of {pages}")
            st.button("Next page", on_click=turn_page, args=(1,), disabled=page == pages)
    return shown


def actions(model_version: str, keyboard: bool) -> None:
    """Save, undo and clear; in the one-at-a-time view Ctrl+Enter saves."""
    state = st.session_state
    saving = len(to_save(current_items()))
    with st.container(horizontal=True):
        st.button(f"Save {plural(saving, 'image')}", type="primary", disabled=not saving, on_click=save_all,
                  args=(model_version,), shortcut="Ctrl+Enter" if keyboard else None)
        if state.undo is not None:
            st.button("Undo last change", on_click=undo_last,
                      help=f"Take back the {escape_markdown(state.undo.description)}.")
        st.button("Clear all", on_click=clear_all, help="Empty the page. Saved images stay in the database.")


def review_one(items: list[tuple[str, Classified]], threshold: float) -> None:
    """One picture large, with what the model said and its place; beside it the ten classes and the moves, each
    with its key. The picture is drawn last: by the time it shows, its keys are on the page."""
    keys = [key for key, _ in items]
    index = review_position(keys)
    done = index == len(items)
    shown, item = items[index] if not done else (None, None)
    picture_column, keys_column = st.columns([3, 2], gap="medium")
    with keys_column:
        current = None
        if not done:
            prediction = item.prediction
            current = final_label(shown, item)
            with st.container(key="one-prediction"):
                st.markdown(f"**{prediction.label}** {prediction.confidence:.1%}{badge(prediction, threshold)}")
                st.caption(" · ".join(f"{label} {probability:.1%}" for label, probability in prediction.top_k))
            chosen = st.session_state.corrections.get(shown)
            st.markdown(f"Label: **{prediction.label}**, the prediction (`Enter` confirms it)" if chosen is None else
                        f"Label: **{SKIP}**, left out of the save" if chosen == SKIP else
                        f"Label: **{chosen}**, confirmed" if chosen == prediction.label else
                        f"Label: **{chosen}**, corrected from {prediction.label}")
            record = saved_before([(shown, item)]).get(item.content_hash)
            if record is not None:
                st.caption(already_saved(record))
        for start in range(0, len(CLASSES), 2):
            for column, label in zip(st.columns(2), CLASSES[start:start + 2]):
                with column:
                    st.button(label, key=f"key-{label}-{shown}", shortcut=CLASS_KEYS[label], on_click=press,
                              args=(label, shown), disabled=done, type="primary" if label == current else "secondary",
                              width="stretch")
        with st.container(horizontal=True):
            st.button("Confirm", key=f"key-confirm-{shown}", shortcut="Enter", on_click=press, args=(CONFIRM, shown),
                      disabled=done, help="The prediction is right.")
            st.button("Skip", key=f"key-skip-{shown}", shortcut="X", on_click=press, args=(SKIP, shown), disabled=done)
            st.button("Back", key=f"key-back-{shown}", shortcut="Backspace", on_click=press, args=(BACK, shown),
                      disabled=index == 0)
    with picture_column:
        if not done:
            with st.container(key="one-picture"):
                st.markdown(f"**{index + 1} of {len(items)}** · {escape_markdown(item.source)}")
                st.image(item.picture, width=PICTURE_WIDTH)
        else:
            st.success(f"All {plural(len(items), 'picture')} reviewed. `Ctrl+Enter` saves them; `Backspace` goes "
                       "back.", icon=":material/done_all:")
    with st.expander("Keyboard", icon=":material/keyboard:"):
        st.markdown(keyboard_help())


def review_table(items: list[tuple[str, Classified]], threshold: float, seen: dict) -> None:
    keys = [key for key, _ in items]
    table_key = f"table-{st.session_state.nonce}-{hash(tuple(keys))}"
    table = pd.DataFrame({
        "image": [data_url(item.card) for _, item in items],
        "source": [item.source for _, item in items],
        "prediction": [item.prediction.label for _, item in items],
        "confidence": [item.prediction.confidence for _, item in items],
        "flag": [flag(item.prediction, threshold) for _, item in items],
        "label": [final_label(key, item) for key, item in items],
        "already saved": [seen[item.content_hash].final_label if item.content_hash in seen else ""
                          for _, item in items],
    })
    st.data_editor(
        table, key=table_key, hide_index=True, width="stretch",
        disabled=[column for column in table.columns if column != "label"],
        column_config={
            "image": st.column_config.ImageColumn("image", width="small"),
            "confidence": st.column_config.ProgressColumn("confidence", format="percent", min_value=0, max_value=1),
            "label": st.column_config.SelectboxColumn("label", options=LABEL_CHOICES, required=True,
                                                      help=f"Change to correct the prediction; {SKIP} leaves the "
                                                           "image out of the save."),
        },
        on_change=remember_table_edits, args=(keys, table_key),
    )


def review_cards(items: list[tuple[str, Classified]], threshold: float, seen: dict) -> None:
    nonce = st.session_state.nonce
    for row_start in range(0, len(items), COLUMNS):
        for column, (key, item) in zip(st.columns(COLUMNS), items[row_start:row_start + COLUMNS]):
            prediction = item.prediction
            with column:
                st.image(item.card, width=CARD_SIZE)
                st.caption(escape_markdown(item.source))
                st.markdown(f"**{prediction.label}** {prediction.confidence:.1%}{badge(prediction, threshold)}")
                st.caption(" · ".join(f"{label} {probability:.1%}" for label, probability in prediction.top_k))
                widget_key = f"label-{nonce}-{key}"
                st.selectbox("Label", LABEL_CHOICES, index=LABEL_CHOICES.index(final_label(key, item)), key=widget_key,
                             on_change=remember_card_choice, args=(key, widget_key),
                             format_func=lambda choice: "skip (don't save)" if choice == SKIP else choice)
                if item.content_hash in seen:
                    st.caption(already_saved(seen[item.content_hash]))


def classify_page() -> None:
    """The main page, top to bottom."""
    state = st.session_state
    state.setdefault("nonce", 0)          # part of every input widget key: bumping it resets the page
    state.setdefault("upload_round", 0)   # part of the uploader's key: bumped once its files are read
    state.setdefault("results", {})       # input key -> Classified, or an error message
    state.setdefault("pending", [])       # Pending inputs, in the spool, not yet classified
    state.setdefault("queued", 0)         # inputs queued since the queue was last empty (for the progress bar)
    state.setdefault("read_uploads", set())  # file ids of the uploads already taken
    state.setdefault("spool", None)       # the session's Spool of originals
    state.setdefault("corrections", {})   # input key -> the label the person chose
    state.setdefault("flash", None)
    state.setdefault("confirm_clear", False)
    state.setdefault("undo", None)        # the last save or delete (db.Change), shared with History
    state.setdefault("review_view", "Cards")
    state.setdefault("review_page", 1)    # the page of Cards and Table
    state.setdefault("review_key", None)  # the picture the one-at-a-time view is at (None: past the last)
    state.setdefault("review_index", 0)
    state.pop("rerun_page", None)  # this run draws the whole page already

    with st.sidebar:
        saved_feedback_sidebar()
    try:
        classifier = get_classifier()
    except WeightsError as error:
        st.error(escape_markdown(str(error)), icon=":material/error:")
        st.stop()
    tune_memory()
    # Percent; the model card's default, chosen on calibrated confidences to catch half of the model's mistakes.
    state.setdefault("review_threshold", round(classifier.low_confidence * 100))
    st.title("CIFAR-10 image classifier")
    accuracy_note = f", {classifier.test_accuracy:.1%} on the CIFAR-10 test set" if classifier.test_accuracy else ""
    st.caption(f"Classifies photos as one of: {', '.join(CLASSES)}. "
               f"Model {code_span(classifier.version)}{accuracy_note}.")
    uploads, urls = input_sources()
    # Progress and messages each in a place of their own: the review after them keeps its place from run to run, so
    # the browser replaces it instead of briefly showing an old copy beside the new one.
    status = st.empty()
    taken = take_uploads(uploads)
    take_urls(urls, status)
    read_queue(classifier, status)
    keep_input_order(urls)
    with st.container():
        show_messages()
    review(classifier.version)
    if taken or state.pending:
        st.rerun()  # the next batch, and an empty uploader


# ---------------------------------------------------------------- navigation (each browser session)

if __name__ == "__main__":
    st.set_page_config(page_title="CIFAR-10 classifier", page_icon=":frame_with_picture:", layout="wide")
    st.navigation([
        st.Page(classify_page, title="Classify", icon=":material/image_search:", default=True),
        st.Page("pages/1_History.py", title="History", icon=":material/history:"),
    ]).run()
