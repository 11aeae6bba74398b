"""History: page through, filter, delete and export everything saved, and who saved and labelled it."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import streamlit as st

import signin
from classes import CLASSES
from db import (DELETE, RecordFilter, SavedPrediction, SettingsError, Store, StoreError, configured_admin_password,
                open_store, refusal)
from display import THUMBNAIL_SIZE, code_span, escape_markdown, thumbnail
from inputs import InvalidImageError

PAGE_SIZE = 50

# Run through app.py's navigation, which has checked already; asked again so that this page never shows anything to a
# browser that is not signed in, however it is reached.
if signin.signed_in_or_sign_in_page() is None:
    st.stop()
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


@st.cache_data(max_entries=8, show_spinner=False)
def people(store_id: str, revision: int, _store: Store) -> list[str]:
    """Everyone who saved or labelled a record, read again only when the store changes."""
    return _store.people()


@st.cache_data(max_entries=8, show_spinner=False)
def model_names(store_id: str, revision: int, _store: Store) -> list[str]:
    """Every model version that predicted a saved record, read again only when the store changes."""
    return _store.model_names()


def delete_record(store: Store, record_id: int, owner: str) -> None:
    """Delete one record: without sign-in, with the admin password when one is set; with it, one's own, or any as an
    admin. Asked again here whatever the page showed (a wrong password, a secrets file that broke since, a click on a
    button the page had disabled); the store deletes only the owner's record unless an admin asks."""
    person = signin.current_person()
    refused = refusal(person, DELETE, state.get("history_password", ""), owner)
    if refused:
        state.history_flash = ("error", f"{escape_markdown(refused)} Nothing was deleted.")
        return
    only_own = person.sign_in and refusal(person, DELETE) is not None
    try:
        change = store.delete_predictions([record_id], saved_by=person.email if only_own else None)
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


def when(moment: str) -> str:
    return moment.replace("T", " ")[:16]


def attribution(record: SavedPrediction) -> str:
    """Who saved the record, and who gave its label last and when, if someone else or later; nothing for records
    saved before people signed in."""
    saved = f" · saved by {escape_markdown(record.saved_by)}" if record.saved_by else ""
    relabelled = record.labelled_by and (record.labelled_by != record.saved_by or record.edits)
    return saved + (f" · label by {escape_markdown(record.labelled_by)}, {when(record.labelled_at)} UTC"
                    if relabelled else "")


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
    everyone = people(store.store_id, store.revision(), store)
    # Someone chosen stays chosen when their last record goes (deleted, or relabelled by someone else): the filter
    # says so and matches none, instead of dropping them and showing everyone's records.
    offered = sorted({*everyone, *state.get("history_people", [])})
    chosen_people = st.multiselect("Saved or labelled by", offered, key="history_people", placeholder="Everyone",
                                   help="Records these people saved, or gave their label last.") if offered else []
with toggles_column:
    corrected_only = st.toggle("Corrected only", help="Only images whose prediction was corrected.")
    flagged_only = st.toggle("Maybe none of the ten only",
                             help="Only images the model said might be none of its ten classes.")
with dates_column:
    first_day = first_and_last[0]
    today = max(datetime.now(timezone.utc).date(), first_and_last[1])
    days = st.date_input("Saved between (UTC)", (first_day, today), min_value=first_day, max_value=today)
    models = st.multiselect("Predicted by model version", model_names(store.store_id, store.revision(), store),
                            placeholder="Every version", help="The version each record names is the one that "
                                                              "predicted it (the Model page lists them).")
since, until = (days[0], days[-1]) if days else (None, None)
record_filter = RecordFilter(tuple(labels), corrected_only, flagged_only, since, until, tuple(chosen_people),
                             tuple(models))
gone = [name for name in chosen_people if name not in everyone]
if gone:
    st.info(f"No record is saved or last labelled by {', '.join(escape_markdown(name) for name in gone)} any more: "
            "the last one was deleted, or relabelled by someone else. Remove "
            f"{'them' if len(gone) > 1 else 'the name'} from **Saved or labelled by** to see everyone's records.",
            icon=":material/person_off:")
if state.get("history_filter") != record_filter:  # a new filter starts at its first page
    state.history_filter, state.history_page = record_filter, 1

# Plain links to the server's streamed exports (app.py): a download of any size, never held in memory.
with st.container(horizontal=True):
    st.link_button("Download records (CSV)", "/export/cifar10_feedback.csv", icon=":material/download:")
    st.link_button("Download images (ZIP)", "/export/cifar10_feedback.zip", icon=":material/download:",
                   help="ImageFolder layout by final label (airplane/..., automobile/...) with a labels.csv manifest.")
person = signin.current_person()
delete_refused = False
others_refused = None  # with sign-in: why this person may not delete what others saved (None: an admin)
if person.sign_in:
    others_refused = refusal(person, DELETE)
    if others_refused:
        st.caption(f"You can delete the records you saved. {escape_markdown(others_refused)}")
else:
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
        st.caption(f"{escape_markdown(record.source)} · {when(record.created_at)} UTC · "
                   f"model {code_span(record.model_version)}{attribution(record)}")
    with action_column:
        others = person.sign_in and record.saved_by != person.email
        st.button("Delete", key=f"delete-{record.id}", on_click=delete_record, args=(store, record.id, record.saved_by),
                  disabled=delete_refused or bool(others and others_refused),
                  help="Only an admin can delete a record someone else saved." if others and others_refused else None)
