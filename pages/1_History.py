"""History: browse, filter, delete and export what has been saved."""

from __future__ import annotations

from datetime import datetime, timezone

import streamlit as st

from classifier import CLASSES
from db import Store, Undo
from inputs import escape_markdown

PAGE_SIZE = 50

st.set_page_config(page_title="History - CIFAR-10 classifier", page_icon=":card_file_box:", layout="wide")
store = Store.from_env()
state = st.session_state
state.setdefault("undo", None)
state.setdefault("history_flash", None)


def delete_record(record_id: int, source: str) -> None:
    deleted = store.delete_predictions([record_id])
    if deleted:
        state.undo = Undo(f"delete of {source}", deleted=tuple(deleted))
        state.history_flash = f"Deleted {source}."


def undo_last() -> None:
    state.history_flash = state.undo.apply(store)
    state.undo = None


st.title("History")
everything = store.list_predictions()
if not everything:
    st.info("Nothing saved yet. Classify images on the main page and click **Save**.")
    st.stop()

labels_column, corrected_column, dates_column = st.columns([3, 1.5, 2])
with labels_column:
    labels = st.multiselect("Final label", CLASSES, placeholder="All labels")
with corrected_column:
    corrected_only = st.toggle("Corrected only", help="Only images whose prediction was corrected.")
with dates_column:
    first_day = datetime.fromisoformat(everything[-1].created_at).date()
    today = datetime.now(timezone.utc).date()
    days = st.date_input("Saved between (UTC)", (first_day, today), min_value=first_day, max_value=today)
since, until = (days[0], days[-1]) if days else (None, None)
records = store.list_predictions(labels=labels, corrected_only=corrected_only, since=since, until=until)

if state.history_flash:
    st.success(escape_markdown(state.history_flash))
    state.history_flash = None
if state.undo is not None:
    st.button(f"Undo the last {escape_markdown(state.undo.description)}", on_click=undo_last)

csv_column, zip_column, _ = st.columns([1, 1, 3])
with csv_column:
    st.download_button("Download records (CSV)", store.export_csv, file_name="cifar10_feedback.csv",
                       mime="text/csv", on_click="ignore")
with zip_column:
    st.download_button("Download images (ZIP)", store.export_zip, file_name="cifar10_feedback.zip",
                       mime="application/zip", on_click="ignore",
                       help="ImageFolder layout by final label (airplane/..., automobile/...) with a labels.csv manifest.")

st.caption(f"{len(records)} of {len(everything)} saved images match." +
           (f" Showing the newest {PAGE_SIZE}." if len(records) > PAGE_SIZE else ""))
for record in records[:PAGE_SIZE]:
    image_column, details_column, action_column = st.columns([1, 5, 1])
    path = store.image_path(record.image_file)
    with image_column:
        if path.exists():
            st.image(str(path), width=96)
    with details_column:
        verdict = "confirmed" if record.is_correct else f"corrected from **{record.predicted_label}**"
        st.markdown(f"**{record.final_label}** · {verdict} · {record.confidence:.1%} confidence")
        st.caption(f"{escape_markdown(record.source)} · {record.created_at.replace('T', ' ')[:16]} UTC · "
                   f"model `{record.model_version}`")
    with action_column:
        st.button("Delete", key=f"delete-{record.id}", on_click=delete_record, args=(record.id, record.source))
