"""CIFAR-10 image classifier: upload photos or paste URLs, confirm or correct each prediction, save.

    streamlit run app.py

In order: the web server (`app`: Streamlit plus the streamed export downloads), the main page top to bottom (the
sidebar, the inputs, the review, its actions), and the navigation each browser session runs. What the page holds and
does without drawing it (the queue of inputs, the labels, the review's order and place, what a Save takes) is
review.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import pandas as pd
import streamlit as st
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from streamlit.runtime import Runtime
from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager
from streamlit.runtime.scriptrunner import get_script_run_ctx
from streamlit.runtime.uploaded_file_manager import UploadedFile, UploadedFileRec

import charts
import signin
from classes import CLASSES
from classifier import Classifier, Prediction, WeightsError, load_classifier, load_version
from db import (CLEAR, Person, SettingsError, Store, StoreError, Summary, configured_admin_password, iter_csv, iter_zip,
                open_store, refusal)
from display import CARD_SIZE, CLASS_KEYS, code_span, data_url, escape_markdown, keyboard_help
from inputs import ALLOWED_EXTENSIONS, DECODE_THREADS, MAX_FILE_BYTES, MAX_ZIP_BYTES, ZIP_EXTENSIONS
from records import SaveResult
from review import (BACK, CONFIRM, LABEL_CHOICES, LOW_CONFIDENCE_FLAG, MAX_SPOOL_BYTES, SKIP, UNKNOWN_FLAG, Item, Review,
                    SessionReviews, flag, page_count)
from spools import NotWaiting, UploadInbox
from versions import ActiveModel

COLUMNS = 4
ONE_AT_A_TIME = "One at a time"
VIEWS = ("Cards", "Table", ONE_AT_A_TIME)
RUN_SECONDS = 1.0     # a run reads batches for about this long; the page is drawn, and the next run goes on
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
PICTURE_WIDTH = 440  # pixels: the one-at-a-time view's picture on the page
# In the page's address while the page holds pictures not saved (how many): a session that starts at an address with
# it knows they went with an earlier session (the page was reloaded, or its server stopped and the browser was sent to
# another one behind the balancer), and says so.
UNSAVED_PARAM = "unsaved"
SWEEP_SECONDS = 30  # at most, between two sweeps of the spools of sessions gone for good
# Streamlit's upload route, under any base path or mount: (session id, file id).
UPLOAD_ROUTE = re.compile(r"/_stcore/upload_file/([^/]+)/([^/]+)$")
SESSION_ID_BYTES = 64  # more than a session id (a UUID) takes: /session-alive reads no further
EXPORTS = {  # file name -> (media type, the store's generator of its bytes)
    "cifar10_feedback.zip": ("application/zip", iter_zip),
    "cifar10_feedback.csv": ("text/csv", iter_csv),
}
# Streamlit lets a shortcut with Ctrl through from a text box; in a text box Ctrl+Enter is the box's own (the URL box
# fetches), so it stops here, after the box had it (React listens at the page's root) and before the shortcuts
# (listening on the document) do. Installed once per browser page.
TEXT_BOXES_KEEP_CTRL_ENTER = """<script>
if (!window.textBoxesKeepCtrlEnter) {
  window.textBoxesKeepCtrlEnter = true;
  document.body.addEventListener("keydown", event => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && event.target.closest("textarea, input")) {
      event.stopPropagation();
    }
  });
}
</script>"""
# The browser's websocket reconnects by itself (a network blip, a restarted server, or, behind a balancer, another
# server). Should the server it reaches not hold this page's session, Streamlit goes on showing the old page, whose
# fragment's buttons and keys then do nothing (the new session drops their reruns): such a page is loaded again, and
# starts afresh (saying what it lost, see UNSAVED_PARAM). Installed once per browser page; the session's id is kept up
# to date on every run.
RELOAD_WHEN_SESSION_IS_GONE = """<script>
window.appSessionId = "%s";
if (!window.reloadsWhenSessionIsGone) {
  window.reloadsWhenSessionIsGone = true;
  const PageWebSocket = window.WebSocket;
  window.WebSocket = class extends PageWebSocket {  // the page's first socket is open already: these reconnect
    constructor(...args) {
      super(...args);
      this.addEventListener("open", async () => {
        const answer = await fetch("/session-alive", {method: "POST", body: window.appSessionId, cache: "no-store"});
        if (answer.status === 404) location.reload();
      });
    }
  };
}
</script>"""


# ---------------------------------------------------------------- the server

def signed_out_refusal(request: Request, what: str) -> Response | None:
    """With sign-in on, the answer to a browser whose identity cookie Streamlit did not sign: 401, `what` being for
    people signed in; while the secrets cannot be read, to every browser: 503. None for a request that may go on."""
    try:
        if signin.sign_in_required() and not signin.cookie_email(request.cookies):
            return PlainTextResponse(f"Sign in first: {what} for people signed in to this app.", status_code=401)
    except SettingsError as error:  # the secrets cannot be read: nobody can be told apart
        return PlainTextResponse(str(error), status_code=503)
    return None


def export_download(request: Request) -> Response:
    """A whole-store export streamed as it is made: one image in memory at a time, whatever the store's size. With
    sign-in on, only for a browser signed in."""
    refused = signed_out_refusal(request, "the downloads are")
    if refused is not None:
        return refused
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


def session_alive_before(request: Request) -> Response:
    """Pages loaded before the id went into the body ask GET /session-alive/<id>; the server they asked then has
    restarted since, so their session is gone."""
    return Response(status_code=404)


async def session_alive(request: Request) -> Response:
    """204 while this server holds the browser session named, 404 when it does not (a page reconnected to it after
    its own server stopped, or after the session expired). The id comes in the body, never in the address: addresses
    end up in logs (the balancer's among them), and without sign-in a session's id is all it takes to resume it."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > SESSION_ID_BYTES:
            return Response(status_code=413)
    session_id = body.decode("ascii", errors="replace")
    alive = Runtime.exists() and Runtime.instance().is_active_session(session_id)
    return Response(status_code=204 if alive else 404)


class UploadGate:
    """In front of Streamlit's upload route (a PUT of one file for one session). With sign-in on, an upload from a
    browser that is not signed in is refused before a byte of it is read: Streamlit's route takes one for any session
    it holds, the session of a page that shows only "Sign in" among them, and writes it to TMPDIR as it arrives.
    Signed in means the identity cookie Streamlit signed, as for the downloads: the uploader sends it with every
    file. And an upload is answered once the inbox has it on disk (UploadsWaitOnDisk hands it over without waiting
    for that): the uploader shows it uploaded only then, and a browser that sends faster than the disk writes waits,
    rather than its files piling up in the server's memory."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upload = scope["type"] == "http" and scope["method"] == "PUT" and UPLOAD_ROUTE.search(scope["path"])
        if not upload:
            await self.app(scope, receive, send)
            return
        refused = signed_out_refusal(Request(scope), "uploads are")
        if refused is not None:
            await refused(scope, receive, send)
            return
        session_id, file_id = upload.groups()

        async def answer_once_kept(message: Message) -> None:
            if message["type"] == "http.response.start":
                inbox = getattr(Runtime.instance().uploaded_file_mgr, "inbox", None)
                arrival = inbox.arrival(session_id, file_id) if inbox is not None else None
                if arrival is not None:
                    await asyncio.wrap_future(arrival)
            await send(message)

        await self.app(scope, receive, answer_once_kept)


class UploadsWaitOnDisk(MemoryUploadedFileManager):
    """Streamlit's keeper of uploads, but the bytes of each wait in an UploadInbox on disk until the page reads them
    (see take_uploads); Streamlit's own record of the file keeps none. Streamlit calls it on the server's event loop,
    which every session's page waits on: the inbox's threads do the disk work, and a gigabyte written holds nobody
    up. Streamlit has no setting for this: the server's keeper becomes one of these as the server starts, before
    any browser can upload."""

    inbox: UploadInbox

    def add_file(self, session_id: str, file: UploadedFileRec) -> None:
        self.inbox.put_soon(session_id, file.file_id, file.data)  # or, past a limit, why not: said on the page
        super().add_file(session_id, file._replace(data=b""))

    def remove_file(self, session_id: str, file_id: str) -> None:
        super().remove_file(session_id, file_id)
        self.inbox.discard_soon(session_id, file_id)

    def remove_session_files(self, session_id: str) -> None:
        super().remove_session_files(session_id)
        self.inbox.discard_session_soon(session_id)


def keep_uploads_on_disk(keeper: MemoryUploadedFileManager, inbox: UploadInbox) -> None:
    """Make Streamlit's keeper of uploads one that keeps them in this inbox."""
    keeper.inbox = inbox
    keeper.__class__ = UploadsWaitOnDisk


def sweep_gone_sessions(keeper: MemoryUploadedFileManager) -> asyncio.Task:
    """As the server starts, on its event loop: every session's Review is kept beside Streamlit's keeper of uploads
    (its `reviews`: the one object of the server's that each page's run is handed, see session_reviews), and every
    few seconds the originals of the sessions Streamlit holds no more, and the uploads they never read, leave the
    disk. Streamlit keeps a session whose browser left for server.disconnectedSessionTTL seconds, for it to come
    back, then drops it without a word to the keeper. Returns the sweep's task."""
    keeper.reviews = SessionReviews()
    loop = asyncio.get_running_loop()
    sessions = Runtime.instance()._session_mgr  # only it knows the sessions kept for a reconnection
    every = min(SWEEP_SECONDS, max(1, st.get_option("server.disconnectedSessionTTL")))

    def held(session_id: str) -> bool:
        """Asked from the sweep's thread, answered on the event loop: the session manager is the loop's alone."""
        async def ask() -> bool:
            return sessions.get_session_info(session_id) is not None

        return asyncio.run_coroutine_threadsafe(ask(), loop).result(timeout=SWEEP_SECONDS)

    def sweep() -> None:
        keeper.reviews.sweep(held)
        inbox = getattr(keeper, "inbox", None)
        if inbox is not None:
            inbox.sweep(held)

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(sweep)  # a Save, a read or a write may hold a session's spool a while
            except Exception:  # the next sweep tries again
                logging.getLogger(__name__).exception("sweeping the sessions' spools failed")

    return loop.create_task(sweep_forever())


@contextlib.asynccontextmanager
async def uploads_wait_on_disk(_: st.App) -> AsyncIterator[None]:
    """As the server starts: a thousand photos dropped at once have all arrived before the page reads the first, and
    in memory they would take as much of it as they are big. And the sweep of gone sessions starts."""
    keeper = Runtime.instance().uploaded_file_mgr
    keep_uploads_on_disk(keeper, UploadInbox(MAX_SPOOL_BYTES))
    sweeping = sweep_gone_sessions(keeper)
    try:
        yield
    finally:
        sweeping.cancel()


class StartedWithoutLifespan:
    """Mounted in another ASGI app (Starlette's Mount, FastAPI's mount) without Streamlit's lifespan, the app's
    lifespan never runs: Streamlit starts at the first request instead. At that request the sweep of gone sessions
    starts, and uploads stay with Streamlit's own keeper, in the server's memory until their page reads them, which
    the log says once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.sweeping: asyncio.Task | None = None  # held here: the event loop holds its tasks weakly

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.sweeping is None and scope["type"] in ("http", "websocket"):
            keeper = Runtime.instance().uploaded_file_mgr
            if not hasattr(keeper, "reviews"):  # what uploads_wait_on_disk sets up
                logging.getLogger(__name__).warning(
                    "The app's lifespan did not run (it is mounted in another ASGI app that was not given "
                    "st.App.lifespan()): uploads wait in the server's memory until their page reads them, as "
                    "Streamlit keeps them, and no limit of what may wait applies. To keep them on disk, give the outer "
                    "app Streamlit's lifespan, as in FastAPI(lifespan=app.lifespan()).")
                self.sweeping = sweep_gone_sessions(keeper)
        await self.app(scope, receive, send)


# `streamlit run app.py` serves this: Streamlit itself, plus /export/<file> for the History page's downloads and
# /session-alive for the pages' reconnections; uploads only from browsers signed in, where sign-in is on.
app = st.App(__file__, routes=[Route("/export/{name}", export_download),
                               Route("/session-alive", session_alive, methods=["POST"]),
                               Route("/session-alive/{session_id}", session_alive_before)],
             middleware=[Middleware(StartedWithoutLifespan), Middleware(UploadGate)],
             lifespan=uploads_wait_on_disk)


# ---------------------------------------------------------------- the main page

@st.cache_resource(show_spinner="Loading the model...")
def served_model() -> ActiveModel:
    """Once per server: the version the store has active, followed within 10 s of a switch on any server."""
    return ActiveModel(load_version)


@st.cache_resource(show_spinner="Loading the model...")
def shipped_classifier() -> Classifier:
    return load_classifier()


def get_classifier() -> tuple[Classifier, str]:
    """The model this server serves: the store's active version, or the one before while that cannot be served, or
    the shipped weights while the store has none this server can serve; and why it is not the active version
    (else "")."""
    served = served_model()
    try:
        return served.get(open_store())[1], served.problem
    except StoreError as error:
        return shipped_classifier(), f"{error} This server classifies with the shipped weights meanwhile."


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


def session_reviews() -> SessionReviews:
    """Every session's Review on this server, whose sweep closes the Review of each session gone for good
    (sweep_gone_sessions); without a server (AppTest), one of the run's own."""
    reviews = getattr(get_script_run_ctx().uploaded_file_mgr, "reviews", None)
    return SessionReviews() if reviews is None else reviews


def classify_page() -> None:
    """The main page, top to bottom."""
    state = st.session_state
    person = signin.current_person()
    state.setdefault("nonce", 0)          # part of every input widget key: bumping it resets the page
    state.setdefault("upload_round", 0)   # part of the uploader's key: bumped once its files are read
    state.setdefault("flash", None)
    state.setdefault("confirm_clear", False)
    state.setdefault("undo", None)        # the last save or delete (db.Change), shared with History
    state.setdefault("review_view", "Cards")
    if Runtime.exists():  # a server (AppTest runs the page without one)
        session_reviews().seen(get_script_run_ctx().session_id, state.review)
    state.pop("rerun_page", None)  # this run draws the whole page already

    with st.sidebar:
        saved_feedback_sidebar(person)
    try:
        classifier, problem = get_classifier()
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
    if problem:  # the version the store has active cannot be served here
        st.warning(f"The model in use is not the store's active version: {escape_markdown(problem)}",
                   icon=":material/model_training:")
    uploads, urls = input_sources()
    # Progress and messages each in a place of their own: the review after them keeps its place from run to run, so
    # the browser replaces it instead of briefly showing an old copy beside the new one.
    status = st.empty()
    taken = take_uploads(uploads)
    take_urls(urls, status)
    read_queue(classifier, status)
    with st.container():
        show_messages()
    review_section()
    if taken or state.review.pending:
        st.rerun()  # the next batch, and an empty uploader


def report_lost_pictures() -> None:
    """On a session's first run, on either page: what its address says the session before it lost."""
    lost = st.query_params.get(UNSAVED_PARAM, "")
    if re.fullmatch(r"[0-9]{1,6}", lost) and int(lost):  # ASCII digits only, and a count a page can hold
        one = int(lost) == 1
        st.warning(f"{plural(int(lost), 'picture')} on this page had not been saved and "
                   f"{'is gone, with its label' if one else 'are gone, with their labels'}: the page was reloaded, or "
                   "the server that held it stopped. What was saved is safe (the sidebar counts it, History lists "
                   f"it). Upload {'it' if one else 'them'} again.", icon=":material/warning:")


@st.cache_data(max_entries=64, show_spinner=False)
def stored_labels(store_id: str, revision: int, content_hashes: tuple[str, ...], _store: Store) -> dict[str, str]:
    """content hash -> the label the store holds, for these pictures: asked again only when the store changes, not
    at every key."""
    return {content_hash: record.final_label
            for content_hash, record in _store.find_saved(list(content_hashes)).items()}


def mark_unsaved_in_address() -> None:
    """The address carries how many pictures the page would lose with its session, for report_lost_pictures: the
    store is asked which labels it holds, so a Save, an Undo, a Delete or a Clear by anyone counts."""
    review = st.session_state.review
    try:
        store = open_store()
        stored = stored_labels(store.store_id, store.revision(),
                               tuple(item.content_hash for _, item in review.to_save()), store)
    except StoreError:
        stored = {}  # the store cannot say: every picture counts as unsaved (the sidebar says what is wrong)
    count = review.unsaved(stored)
    if st.query_params.get(UNSAVED_PARAM) != (str(count) if count else None):
        if count:
            st.query_params[UNSAVED_PARAM] = str(count)
        else:
            st.query_params.pop(UNSAVED_PARAM, None)


# ---------------------------------------------------------------- the main page: the sidebar

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


@st.cache_data(max_entries=64, show_spinner=False)
def own_summary(store_id: str, revision: int, person: str, _store: Store) -> tuple[int, int]:
    """(records this person saved, how many the model had right), read again only when the store changes."""
    return _store.saved_by(person)


def saved_feedback_sidebar(person: Person) -> None:
    state = st.session_state
    st.header("Saved feedback")
    try:
        store = open_store()
        revision = store.revision()
        summary, pictures = saved_summary(store.store_id, revision, store)
        own = own_summary(store.store_id, revision, person.email, store) if person.email else None
    except StoreError as error:
        st.error(escape_markdown(str(error)), icon=":material/database:")
        return
    everyone, yours = st.columns(2) if own is not None else (st.container(), None)
    with everyone:
        st.metric("Saved images", summary.total)
        st.metric("Model accuracy", f"{summary.correct / summary.total:.1%}" if summary.total else "n/a",
                  help="Share of saved images whose prediction was confirmed rather than corrected.")
    if yours is not None:
        with yours:
            saved, right = own
            st.metric("Saved by you", saved)
            st.metric("Model accuracy on yours", f"{right / saved:.1%}" if saved else "n/a",
                      help="The same, on the images you saved.")
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
    if person.sign_in:  # admins by name: no password
        password_needed = False
        refused = refusal(person, CLEAR)
        if refused:
            st.caption(escape_markdown(refused))
    else:
        try:
            password_needed = configured_admin_password() is not None
        except SettingsError as error:  # the password is unknown: nothing is deleted until the setting is fixed
            st.error(escape_markdown(str(error)), icon=":material/key:")
            st.button("Clear database", disabled=True)
            return
        refused = None
    if not state.confirm_clear:
        st.button("Clear database", disabled=not summary.total or bool(refused),
                  on_click=lambda: state.update(confirm_clear=True))
    else:
        st.warning(f"Delete all {summary.total} saved images and their records? This cannot be undone and "
                   "affects everyone using this store.")
        if password_needed:
            st.text_input("Admin password", type="password", key="clear_password")
        st.button("Yes, delete everything", type="primary", on_click=clear_database)
        st.button("Cancel", on_click=lambda: state.update(confirm_clear=False))


def clear_database() -> None:
    state = st.session_state
    state.confirm_clear = False
    # Asked again here, whatever the page showed: a wrong password, a secrets file that broke while the confirmation
    # was open, or a click no admin made (a disabled button is only the page's; a crafted message reaches this).
    refused = refusal(signin.current_person(), CLEAR, state.get("clear_password", ""))
    if refused:
        state.flash = ("error", f"{escape_markdown(refused)} The database was not cleared.")
        return
    try:
        cleared = open_store().clear()
    except StoreError as error:
        state.flash = ("error", f"The database was not cleared: {escape_markdown(str(error))}")
        return
    state.undo = None
    state.flash = ("success", f"Database cleared: {plural(cleared.deleted, 'saved image')} deleted."
                              + escape_markdown(cleared.removal_note))


# ---------------------------------------------------------------- the main page: the inputs

def input_sources() -> tuple[list, list[str]]:
    """The uploader and the URL box: the uploads not read yet, and the URLs (each once, in order). While the page
    reviews pictures one at a time they fold into one line that opens with a click, and the review has the screen.
    Folded or not they are the same expander (its new label folds it), so a URL half typed in the box stays there."""
    state = st.session_state
    # Folded only in the one-at-a-time view, which needs the screen: a selection dropped as the inputs fold can be
    # lost with the uploader's old place in the page, and in Cards and Table people keep dropping more.
    state.inputs_folded = bool(state.review.items()) and state.review_view == ONE_AT_A_TIME
    with st.expander("Add more images" if state.inputs_folded else "Add images", expanded=not state.inputs_folded,
                     icon=":material/add_photo_alternate:"):
        uploads = st.file_uploader(
            "Upload images", type=[*ALLOWED_EXTENSIONS, *ZIP_EXTENSIONS], accept_multiple_files=True,
            key=f"uploader-{state.nonce}-{state.upload_round}",
            help=f"JPEG, PNG, GIF or WebP, up to {MAX_FILE_BYTES // 2**20} MB each, as many as you like, or ZIPs of "
                 f"them up to {MAX_ZIP_BYTES // 2**20:,} MB (folders are read through). Once read they stay on the "
                 "page until **Clear all**.")
        url_text = st.text_area("...or paste image URLs, one per line", key=f"urls-{state.nonce}",
                                placeholder="https://example.com/cat.jpg",
                                help="Press Ctrl+Enter or click outside to fetch.")
    st.html(TEXT_BOXES_KEEP_CTRL_ENTER, unsafe_allow_javascript=True)
    # A selection dropped while the page read the ones before went to an uploader a run retired (the browser still
    # showed it; three drops in a row can reach one two rounds old): Streamlit hands over their values too, until this
    # run ends. Files already read are in them as deleted ones.
    retired = [upload for key in list(state.keys()) if key.startswith(f"uploader-{state.nonce}-")
               and key != f"uploader-{state.nonce}-{state.upload_round}" for upload in state[key] or []]
    uploads = [upload for upload in [*retired, *(uploads or [])] if isinstance(upload, UploadedFile)]
    return uploads, [url for url in dict.fromkeys(line.strip() for line in url_text.splitlines()) if url]


def take_uploads(uploads: list) -> bool:
    """Move new uploads, and each image in an uploaded ZIP, into the spool and the queue; one that cannot be read
    (past the limit of what may wait, or removed meanwhile) is named. Streamlit keeps every upload (its bytes in the
    inbox) while its widget lists it: once spooled, each is dropped there, and the uploader starts empty on the next
    run. Returns whether any were new."""
    state = st.session_state
    new = [upload for upload in uploads if upload.file_id not in state.review.taken_uploads]
    context = get_script_run_ctx()
    inbox = upload_inbox()
    for upload in new:
        try:  # on a server its bytes wait in the inbox; in AppTest they are in the upload itself
            with (upload if inbox is None else inbox.open(context.session_id, upload.file_id)) as content:
                state.review.take_upload(upload.file_id, upload.name, content)
        except NotWaiting as why:
            state.review.refuse_upload(upload.file_id, f"'{upload.name}' {why}")
        if context is not None:
            context.uploaded_file_mgr.remove_file(context.session_id, upload.file_id)
        upload.close()  # its bytes: the widget's value still names the file, which is enough
    if new:
        state.upload_round += 1
    return bool(new)


def upload_inbox() -> UploadInbox | None:
    """The server's uploads waiting to be read (see UploadsWaitOnDisk); None in AppTest, which runs the page without
    a server."""
    context = get_script_run_ctx()
    return getattr(context.uploaded_file_mgr, "inbox", None) if context is not None else None


def take_urls(urls: list[str], status) -> None:
    """Fetch the URLs not seen before into the queue, under a spinner; a URL taken out of the box leaves the page."""
    review = st.session_state.review
    new = review.new_urls(urls)
    with status, st.spinner(f"Fetching {plural(len(new), 'URL')}...") if new else contextlib.nullcontext():
        review.take_urls(urls)


def read_queue(classifier: Classifier, status) -> None:
    """Decode (on every core) and classify what is queued, a batch at a time, for about RUN_SECONDS: then the page is
    drawn, usable, and the next run goes on, so a thousand photos never hold the page for long."""
    review = st.session_state.review
    if not review.pending:
        return
    started = time.monotonic()
    progress = status.progress(0.0, text=f"Reading {plural(review.queued, 'image')}...")
    with review.in_use(), ThreadPoolExecutor(DECODE_THREADS) as pool:
        while review.pending and time.monotonic() - started < RUN_SECONDS:
            done, queued = review.classify_next(classifier.predict, pool, classifier.version)
            progress.progress(done / queued, text=f"Read and classified {done:,} of {queued:,} images")
    if not review.pending:
        progress.empty()


def show_messages() -> None:
    state = st.session_state
    if state.flash:  # markdown whose names, URLs and error texts were escaped when it was written
        kind, message = state.flash
        getattr(st, kind)(message)
        state.flash = None
    for error in state.review.errors():
        st.error(escape_markdown(error), icon=":material/error:")
    for source, first in state.review.duplicates():
        st.info(f"{escape_markdown(source)} is the same picture as {escape_markdown(first)}: it is reviewed and "
                "saved once, under that name.", icon=":material/content_copy:")
    failed_urls = state.review.failed_urls()
    if failed_urls:  # a server that was down, slow or wrong a moment ago may answer now
        st.button(f"Retry {plural(len(failed_urls), 'failed URL')}", on_click=state.review.forget, args=(failed_urls,))


# ---------------------------------------------------------------- the main page: the review

@st.fragment
def review_section() -> None:
    """The classified images, their labels and the actions on them. A label change or a key reruns only this part;
    Save, Undo and Clear all then rerun the page once (the sidebar and the inputs change too)."""
    state = st.session_state
    if state.pop("rerun_page", False):  # set by a callback of this fragment's own run
        st.rerun(scope="app")
    items = state.review.items()
    view = state.review_view
    if state.get("inputs_folded") != (bool(items) and view == ONE_AT_A_TIME):  # the view chosen, or the first
        st.rerun(scope="app")  # pictures from URLs this run fetched: the inputs are drawn again, (un)folded
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
        items = state.review.ordered(threshold)
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
    keyboard = bool(items) and view == ONE_AT_A_TIME
    actions(keyboard)
    if keyboard:  # under Save: the review's buttons and Save fit the screen together
        with st.expander("Keyboard", icon=":material/keyboard:"):
            st.markdown(keyboard_help())
    mark_unsaved_in_address()


def choose_view(widget_key: str) -> None:
    state = st.session_state
    if state[widget_key] is None:  # a click on the chosen view leaves it chosen
        state[widget_key] = state.review_view
    state.review_view = state[widget_key]


def page_of(items: list[Item]) -> list[Item]:
    """The pictures of the current page of Cards and Table, and the buttons to the others."""
    review = st.session_state.review
    start, shown = review.page_of(items)
    pages = page_count(len(items))
    if pages > 1:
        with st.container(horizontal=True, vertical_alignment="center"):
            st.button("Previous page", on_click=turn_page, args=(-1,), disabled=review.page == 1)
            st.caption(f"Images {start + 1}–{start + len(shown)} of {len(items):,} · page {review.page} of {pages}")
            st.button("Next page", on_click=turn_page, args=(1,), disabled=review.page == pages)
    return shown


def turn_page(step: int) -> None:
    st.session_state.review.page += step


# The one-at-a-time view on one screen, a laptop's (1366x768, or the 1366x600 its browser leaves) or a phone's
# (390x844): the picture's box no taller than what its line, the prediction, the ten classes and Save leave of the
# screen, and the same for every picture (nothing moves from key to key); the ten classes a grid of two columns,
# which Streamlit's columns would stack into one on a phone.
ONE_AT_A_TIME_FITS = """<style>
.st-key-one-review { scroll-margin-top: 4.25rem; }
.st-key-one-picture p { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.st-key-one-picture img { height: min(%dpx, calc(100vh - 17rem)); object-fit: contain; object-position: left top; }
div.st-key-one-classes { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 0.5rem; }
[data-testid="stLayoutWrapper"]:has(> .st-key-keep-review-in-view) { display: none; }
@media (max-width: 640px) {
  .st-key-one-picture img { height: 26vh; }
  .st-key-one-review [data-testid="stVerticalBlock"], .st-key-one-review [data-testid="stHorizontalBlock"] {
    gap: 0.5rem;
  }
}
</style>""" % PICTURE_WIDTH
# Brings the review into view, from its top to Save, when it is not: the view just chosen, or a key pressed with the
# page scrolled away. Not while a text box has the cursor (someone typing URLs). Runs once per picture shown and
# once more when the inputs fold or open (the comment names both), each time as soon as Save has arrived (the page's
# parts arrive one after another, later on a busy server).
KEEP_REVIEW_IN_VIEW = """<script>
/* picture %d of %d, inputs folded: %s */
{
const started = performance.now();
const bringIntoView = () => {
  const review = document.querySelector(".st-key-one-review");
  const actions = document.querySelector(".st-key-review-actions");
  if (!review || !actions) {
    if (performance.now() - started < 5000) requestAnimationFrame(bringIntoView);
    return;
  }
  if (document.activeElement?.closest("textarea, input")) return;
  const header = document.querySelector('[data-testid="stHeader"]')?.getBoundingClientRect().bottom ?? 0;
  if (review.getBoundingClientRect().top < header || actions.getBoundingClientRect().bottom > window.innerHeight) {
    review.scrollIntoView({block: "start", behavior: "instant"});
  }
};
requestAnimationFrame(bringIntoView);
}
</script>"""


def review_one(items: list[Item], threshold: float) -> None:
    """One picture large, with what the model said and its place; beside it the ten classes and the moves, each
    with its key. The picture is drawn last: by the time it shows, its keys are on the page."""
    review = st.session_state.review
    keys = [key for key, _ in items]
    index = review.position(keys)
    done = index == len(items)
    shown, item = items[index] if not done else (None, None)
    st.html(ONE_AT_A_TIME_FITS)
    with st.container(key="one-review"):
        picture_column, keys_column = st.columns([3, 2], gap="medium")
        with keys_column:
            current = None
            if not done:
                prediction = item.prediction
                current = review.final_label(item)
                with st.container(key="one-prediction"):
                    st.markdown(f"**{prediction.label}** {prediction.confidence:.1%}{badge(prediction, threshold)}")
                    st.caption(" · ".join(f"{label} {probability:.1%}" for label, probability in prediction.top_k))
                chosen = review.chosen(item)
                st.markdown(f"Label: **{prediction.label}**, the prediction (`Enter` confirms it)"
                            if chosen is None else
                            f"Label: **{SKIP}**, left out of the save" if chosen == SKIP else
                            f"Label: **{chosen}**, confirmed" if chosen == prediction.label else
                            f"Label: **{chosen}**, corrected from {prediction.label}")
                record = saved_before([(shown, item)]).get(item.content_hash)
                if record is not None:
                    st.caption(already_saved(record))
            with st.container(key="one-classes"):
                for label in CLASSES:
                    st.button(label, key=f"key-{label}-{shown}", shortcut=CLASS_KEYS[label], on_click=press,
                              args=(label, shown), disabled=done, type="primary" if label == current else "secondary",
                              width="stretch")
            with st.container(horizontal=True):
                st.button("Confirm", key=f"key-confirm-{shown}", shortcut="Enter", on_click=press,
                          args=(CONFIRM, shown), disabled=done, help="The prediction is right.")
                st.button("Skip", key=f"key-skip-{shown}", shortcut="X", on_click=press, args=(SKIP, shown),
                          disabled=done)
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
    with st.container(key="keep-review-in-view"):  # takes no room on the page
        st.html(KEEP_REVIEW_IN_VIEW % (index, len(items), st.session_state.get("inputs_folded")),
                unsafe_allow_javascript=True)


def press(action: str, shown: str | None) -> None:
    """A key of the one-at-a-time view (or its button), bound to the picture `shown` when it was drawn."""
    state = st.session_state
    state.review.press(action, shown, state.review_threshold / 100)


def review_table(items: list[Item], threshold: float, seen: dict) -> None:
    review = st.session_state.review
    keys = [key for key, _ in items]
    table_key = f"table-{st.session_state.nonce}-{hash(tuple(keys))}"
    table = pd.DataFrame({
        "image": [data_url(item.card) for _, item in items],
        "source": [item.source for _, item in items],
        "prediction": [item.prediction.label for _, item in items],
        "confidence": [item.prediction.confidence for _, item in items],
        "flag": [flag(item.prediction, threshold) for _, item in items],
        "label": [review.final_label(item) for _, item in items],
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


def remember_table_edits(keys: list[str], widget_key: str) -> None:
    for row, change in st.session_state[widget_key]["edited_rows"].items():
        if "label" in change:
            st.session_state.review.label(keys[row], change["label"])


def review_cards(items: list[Item], threshold: float, seen: dict) -> None:
    review = st.session_state.review
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
                st.selectbox("Label", LABEL_CHOICES, index=LABEL_CHOICES.index(review.final_label(item)),
                             key=widget_key, on_change=remember_card_choice, args=(key, widget_key),
                             format_func=lambda choice: "skip (don't save)" if choice == SKIP else choice)
                if item.content_hash in seen:
                    st.caption(already_saved(seen[item.content_hash]))


def remember_card_choice(key: str, widget_key: str) -> None:
    st.session_state.review.label(key, st.session_state[widget_key])


def saved_before(items: list[Item]) -> dict:
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


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


# ---------------------------------------------------------------- the main page: the review's actions

def actions(keyboard: bool) -> None:
    """Save, undo and clear; in the one-at-a-time view Ctrl+Enter saves."""
    state = st.session_state
    saving = len(state.review.to_save())
    with st.container(horizontal=True, key="review-actions"):
        st.button(f"Save {plural(saving, 'image')}", type="primary", disabled=not saving, on_click=save_all,
                  shortcut="Ctrl+Enter" if keyboard else None)
        if state.undo is not None:
            st.button("Undo last change", on_click=undo_last,
                      help=f"Take back the {escape_markdown(state.undo.description)}.")
        st.button("Clear all", on_click=clear_all, help="Empty the page. Saved images stay in the database.")


def save_all() -> None:
    """Save every picture not marked skip in one transaction, its original read back from the spool as it is stored;
    one undo takes back all of it; each record names the model version that predicted it. Should the store fail,
    nothing is saved and every label stays."""
    state = st.session_state
    state.rerun_page = True  # the sidebar shows what was saved
    review = state.review
    predictions = review.predictions()
    person = signin.current_person()
    if person.sign_in and not person.email:  # signed out in another tab since the page was drawn
        state.flash = ("error", "Nothing was saved: sign in first. Your labels are kept.")
        return
    try:
        with review.in_use():
            result = open_store().save_predictions(predictions, original=review.original_reader(), by=person.email)
    except StoreError as error:
        state.flash = ("error", f"Nothing was saved: {escape_markdown(str(error))} Your labels are kept: press Save "
                                "again once that is fixed.")
        return
    state.flash = ("success", saved_message(result, skipped=len(review.items()) - len(predictions)))
    if result.change is not None:
        state.undo = result.change


def saved_message(result: SaveResult, skipped: int) -> str:
    parts = [f"saved {plural(result.saved, 'image')}"] if result.saved or not result.updated else []
    if result.updated:
        parts.append(f"updated the label of {plural(result.updated, 'image')} saved before")
    if result.unchanged:
        parts.append(f"{result.unchanged} already saved with that label, not duplicated")
    if skipped:
        parts.append(f"{skipped} marked skip, not saved")
    message = "; ".join(parts)
    return message[0].upper() + message[1:] + "."


def undo_last() -> None:
    state = st.session_state
    state.rerun_page = True
    try:
        state.flash = ("info", escape_markdown(open_store().undo(state.undo)))  # it names files and URLs
    except StoreError as error:
        state.flash = ("error", f"Nothing was undone: {escape_markdown(str(error))}")
        return
    state.undo = None


def clear_all() -> None:
    """Empty the page: inputs (and the uploads not read yet), pictures (and their spooled originals), labels, the
    review's place."""
    state = st.session_state
    state.rerun_page = True
    state.nonce += 1
    inbox = upload_inbox()
    if inbox is not None:
        inbox.discard_session(get_script_run_ctx().session_id)
    state.review.close()
    state.review = Review()
    state.flash = None


# ---------------------------------------------------------------- navigation (each browser session)

if __name__ == "__main__":
    st.set_page_config(page_title="CIFAR-10 classifier", page_icon=":frame_with_picture:", layout="wide")
    person = signin.current_person()
    if person.sign_in and not person.email:
        # Not signed in (or the secrets cannot be read): one page, whatever the address asked for. st.navigation is
        # still called, so Streamlit never falls back to listing pages/ by itself.
        st.navigation([st.Page(signin.sign_in_page, title="Sign in", icon=":material/login:")], position="hidden").run()
    else:
        signin.sidebar(person)
        st.html(RELOAD_WHEN_SESSION_IS_GONE % get_script_run_ctx().session_id, unsafe_allow_javascript=True)
        if "review" not in st.session_state:  # a new session
            report_lost_pictures()
            st.session_state.review = Review()  # the pictures, their labels, the queue, the review's place
        # On either page (a switch of page leaves the address without it), after the callbacks (a Save, an Undo, a
        # Delete) and before a page can stop the run; the review marks it again once it has read more pictures.
        mark_unsaved_in_address()
        st.navigation([
            st.Page(classify_page, title="Classify", icon=":material/image_search:", default=True),
            st.Page("pages/1_History.py", title="History", icon=":material/history:"),
            st.Page("pages/2_Model.py", title="Model", icon=":material/model_training:"),
        ]).run()
