"""History: page through, filter, delete and export everything saved."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import streamlit as st

from classes import CLASSES
from db import (RecordFilter, SavedPrediction, SettingsError, Store, StoreError, admin_refusal,
                configured_admin_password, open_store)
from display import THUMBNAIL_SIZE, code_span, escape_markdown, thumbnail
from inputs import InvalidImageError

PAGE_SIZE = 50

state = st.session_state
state.setdefault("undo", None)
state.setdefault("history_flash", None)
state.setdefault("history_page", 1)


@st.cache_data(max_entries=2000, show_spinner=False)
def thumbnail_from_image(content_hash: str, _store: Store, _record: SavedPrediction) -> bytes | None:
    """For records saved before thumbnails were stored: made from the image once per picture (named by its
    hash), then reused. A picture that cannot be decoded stays None; a store that fails raises StoreError, which
    is not cached, so the picture shows again once the store is back."""
    try:
        return thumbnail(_store.image_bytes(_record), _record.source)
    except InvalidImageError:
        return None


def saved_thumbnail(store: Store, record: SavedPrediction) -> bytes | None:
    try:
        return thumbnail_from_image(record.content_hash, store, record)
    except StoreError:
        return None


def delete_record(store: Store, record_id: int) -> None:
    refusal = admin_refusal(state.get("history_password", ""))
    if refusal:  # a wrong password, or a secrets file that broke after the page was shown
        state.history_flash = ("error", f"{escape_markdown(refusal)} Nothing was deleted.")
        return
    try:
        change = store.delete_predictions([record_id])
    except StoreError as error:
        state.history_flash = ("error", f"Nothing was deleted: {escape_markdown(str(error))}")
        return
    if change is None:
        state.history_flash = ("info", "That record was already deleted.")
        return
    state.undo = change
    state.history_flash = ("success", f"Deleted {escape_markdown(change.deleted[0].record.source)}."
                                      + escape_markdown(change.removal_note))


def undo_last(store: Store) -> None:
    try:
        state.history_flash = ("info", escape_markdown(store.undo(state.undo)))  # it names files and URLs
    except StoreError as error:
        state.history_flash = ("error", f"Nothing was undone: {escape_markdown(str(error))}")
        return
    state.undo = None


def turn_page(step: int) -> None:
    state.history_page += step


st.title("History")
try:
    store = open_store()
    first_and_last = store.date_range()
except StoreError as error:
    st.error(escape_markdown(str(error)), icon=":material/database:")
    st.stop()
if state.history_flash:  # markdown, its names and error texts escaped when it was written
    kind, message = state.history_flash
    getattr(st, kind)(message)
    state.history_flash = None
if state.undo is not None:
    st.button(f"Undo the last {escape_markdown(state.undo.description)}", on_click=undo_last, args=(store,))
if first_and_last is None:
    st.info("Nothing saved yet. Classify images on the main page and click **Save**.")
    st.stop()

labels_column, toggles_column, dates_column = st.columns([3, 2, 2])
with labels_column:
    labels = st.multiselect("Final label", CLASSES, placeholder="All labels")
with toggles_column:
    corrected_only = st.toggle("Corrected only", help="Only images whose prediction was corrected.")
    flagged_only = st.toggle("Maybe none of the ten only",
                             help="Only images the model said might be none of its ten classes.")
with dates_column:
    first_day = first_and_last[0]
    today = max(datetime.now(timezone.utc).date(), first_and_last[1])
    days = st.date_input("Saved between (UTC)", (first_day, today), min_value=first_day, max_value=today)
since, until = (days[0], days[-1]) if days else (None, None)
record_filter = RecordFilter(tuple(labels), corrected_only, flagged_only, since, until)
if state.get("history_filter") != record_filter:  # a new filter starts at its first page
    state.history_filter, state.history_page = record_filter, 1

# Plain links to the server's streamed exports (app.py): a download of any size, never held in memory.
with st.container(horizontal=True):
    st.link_button("Download records (CSV)", "/export/cifar10_feedback.csv", icon=":material/download:")
    st.link_button("Download images (ZIP)", "/export/cifar10_feedback.zip", icon=":material/download:",
                   help="ImageFolder layout by final label (airplane/..., automobile/...) with a labels.csv manifest.")
delete_refused = False
try:
    if configured_admin_password():
        st.text_input("Admin password", type="password", key="history_password", help="Needed to delete records.")
except SettingsError as error:  # the password is unknown: nothing is deleted until the setting is fixed
    delete_refused = True
    st.error(escape_markdown(str(error)), icon=":material/key:")

matching, total = store.count(record_filter), store.count()
pages = max(1, math.ceil(matching / PAGE_SIZE))
page = state.history_page = min(max(1, state.history_page), pages)
st.caption(f"{matching} of {total} saved images match. Page {page} of {pages}, newest first.")
with st.container(horizontal=True):
    st.button("Previous page", disabled=page == 1, on_click=turn_page, args=(-1,))
    st.button("Next page", disabled=page == pages, on_click=turn_page, args=(1,))

records = store.list_predictions(record_filter, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
thumbnails = store.thumbnails(records)
for record in records:
    image_column, details_column, action_column = st.columns([1, 5, 1])
    with image_column:
        picture = thumbnails.get(record.id) or saved_thumbnail(store, record)
        if picture is not None:
            st.image(picture, width=THUMBNAIL_SIZE)
        else:
            st.caption("image unavailable")
    with details_column:
        verdict = "confirmed" if record.is_correct else f"corrected from **{escape_markdown(record.predicted_label)}**"
        unknown = " · :violet-badge[maybe none of these classes]" if record.is_ood else ""
        st.markdown(f"**{escape_markdown(record.final_label)}** · {verdict} · {record.confidence:.1%} confidence"
                    f"{unknown}")
        st.caption(f"{escape_markdown(record.source)} · {record.created_at.replace('T', ' ')[:16]} UTC · "
                   f"model {code_span(record.model_version)}")
    with action_column:
        st.button("Delete", key=f"delete-{record.id}", on_click=delete_record, args=(store, record.id),
                  disabled=delete_refused)
