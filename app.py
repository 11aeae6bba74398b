"""CIFAR-10 image classifier: upload photos or paste URLs, confirm or correct each prediction, save.

    streamlit run app.py
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed

import pandas as pd
import streamlit as st

import charts
from classifier import CLASSES, Prediction, load_classifier
from db import DB_PATH_ENV, DEFAULT_DB_PATH, DEFAULT_IMAGE_DIR, IMAGE_DIR_ENV, NewPrediction, Store, Undo
from inputs import (ALLOWED_EXTENSIONS, DECODE_THREADS, MAX_FILE_BYTES, FetchError, ImageInput, InvalidImageError,
                    escape_markdown, fetch_image, read_image_input, thumbnail_data_url)

COLUMNS = 4

st.set_page_config(page_title="CIFAR-10 classifier", page_icon=":frame_with_picture:", layout="wide")


@st.cache_resource(show_spinner="Loading the model...")
def get_classifier():
    return load_classifier()


@st.cache_resource
def get_store(db_path: str, image_dir: str) -> Store:
    """Once per server process: open (and migrate) the database and remove files left by a killed save."""
    store = Store(db_path, image_dir)
    store.remove_orphan_files()
    return store


classifier = get_classifier()
store = get_store(os.environ.get(DB_PATH_ENV, DEFAULT_DB_PATH), os.environ.get(IMAGE_DIR_ENV, str(DEFAULT_IMAGE_DIR)))
state = st.session_state
state.setdefault("nonce", 0)          # part of every input widget key: bumping it resets the page
state.setdefault("results", {})       # input key -> (ImageInput, Prediction) or an error message
state.setdefault("corrections", {})   # input key -> the label the person chose
state.setdefault("flash", None)
state.setdefault("confirm_clear", False)
state.setdefault("undo", None)
state.setdefault("review_view", "Cards")
state.setdefault("review_threshold", 60)  # percent


def read_source(name: str, upload) -> ImageInput:
    return read_image_input(upload.getvalue() if upload is not None else fetch_image(name), name)


def final_label(key: str, prediction: Prediction) -> str:
    return state.corrections.get(key, prediction.label)


def remember_card_choice(key: str, widget_key: str) -> None:
    state.corrections[key] = state[widget_key]


def remember_table_edits(keys: list[str], widget_key: str) -> None:
    for row, change in state[widget_key]["edited_rows"].items():
        if change.get("label") in CLASSES:
            state.corrections[keys[row]] = change["label"]


def current_items() -> list[tuple[str, ImageInput, Prediction]]:
    return [(key, *result) for key, result in state.results.items() if not isinstance(result, str)]


def save_all() -> None:
    predictions = [
        NewPrediction(
            content_hash=image.content_hash, data=image.data, extension=image.extension, source=image.source,
            predicted_label=prediction.label, confidence=prediction.confidence,
            final_label=final_label(key, prediction), model_version=classifier.version,
        )
        for key, image, prediction in current_items()
    ]
    result = store.save_predictions(predictions)
    note = f" ({result.already_saved} already saved before, not duplicated)" if result.already_saved else ""
    state.flash = ("success", f"Saved {result.saved} image{'s' * (result.saved != 1)}{note}.")
    if result.ids:
        state.undo = Undo(f"save of {result.saved} image{'s' * (result.saved != 1)}", saved_ids=result.ids)


def undo_last() -> None:
    state.flash = ("info", state.undo.apply(store))
    state.undo = None


def clear_all() -> None:
    state.nonce += 1
    state.results = {}
    state.corrections = {}
    state.flash = None


def clear_database() -> None:
    deleted = store.clear()
    state.confirm_clear = False
    state.undo = None
    state.flash = ("success", f"Database cleared: {deleted} saved image{'s' * (deleted != 1)} deleted.")


# ---------------------------------------------------------------- sidebar: what has been saved
with st.sidebar:
    st.header("Saved feedback")
    correct, incorrect = store.accuracy_counts()
    total = correct + incorrect
    st.metric("Saved images", total)
    st.metric("Model accuracy", f"{correct / total:.1%}" if total else "n/a",
              help="Share of saved images whose prediction was confirmed rather than corrected.")
    if total:
        st.pyplot(charts.class_distribution_figure(store.class_counts()))
        st.pyplot(charts.accuracy_figure(correct, incorrect))
        with st.expander("Where the model goes wrong"):
            matrix = store.confusion_counts()
            st.pyplot(charts.per_class_accuracy_figure(matrix))
            st.pyplot(charts.confusion_matrix_figure(matrix, "Saved feedback: final vs predicted"))
    else:
        st.info("Nothing saved yet. Classify some images and click **Save** to see charts here.")

    st.divider()
    if not state.confirm_clear:
        st.button("Clear database", disabled=not total, on_click=lambda: state.update(confirm_clear=True))
    else:
        st.warning(f"Delete all {total} saved images and their records? This cannot be undone and affects everyone.")
        st.button("Yes, delete everything", type="primary", on_click=clear_database)
        st.button("Cancel", on_click=lambda: state.update(confirm_clear=False))

# ---------------------------------------------------------------- main page: inputs
st.title("CIFAR-10 image classifier")
accuracy_note = f", {classifier.test_accuracy:.1%} on the CIFAR-10 test set" if classifier.test_accuracy else ""
st.caption(f"Classifies photos as one of: {', '.join(CLASSES)}. Model `{classifier.version}`{accuracy_note}.")

uploads = st.file_uploader(
    "Upload images", type=list(ALLOWED_EXTENSIONS), accept_multiple_files=True,
    key=f"uploader-{state.nonce}", help=f"JPEG, PNG, GIF or WebP, up to {MAX_FILE_BYTES // 2**20} MB each.")
url_text = st.text_area("...or paste image URLs, one per line", key=f"urls-{state.nonce}",
                        placeholder="https://example.com/cat.jpg", help="Press Ctrl+Enter or click outside to fetch.")

sources = [(f"file-{upload.file_id}", upload.name, upload) for upload in uploads or []]
sources += [(f"url-{url}", url, None) for url in dict.fromkeys(line.strip() for line in url_text.splitlines()) if url]
state.results = {key: state.results[key] for key, _, _ in sources if key in state.results}

new_sources = [source for source in sources if source[0] not in state.results]
if new_sources:
    progress = st.progress(0.0, text=f"Reading {len(new_sources)} image(s)...")
    decoded = {}
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        futures = {pool.submit(read_source, name, upload): key for key, name, upload in new_sources}
        for number, future in enumerate(as_completed(futures), start=1):
            try:
                decoded[futures[future]] = future.result()
            except (InvalidImageError, FetchError) as error:
                state.results[futures[future]] = str(error)
            progress.progress(number / len(new_sources), text=f"Read {number} of {len(new_sources)}")
    progress.empty()
    if decoded:
        with st.spinner(f"Classifying {len(decoded)} image(s)..."):
            predictions = classifier.predict([image.image for image in decoded.values()])
        for (key, image), prediction in zip(decoded.items(), predictions):
            state.results[key] = (image, prediction)
    state.results = {key: state.results[key] for key, _, _ in sources}

if state.flash:
    kind, message = state.flash
    getattr(st, kind)(message)
    state.flash = None

for key, result in state.results.items():
    if isinstance(result, str):
        st.error(escape_markdown(result), icon=":material/error:")

# ---------------------------------------------------------------- main page: review
items = current_items()
if items:
    st.subheader(f"{len(items)} image{'s' * (len(items) != 1)} classified")
    view_column, threshold_column = st.columns([1, 2])
    # Streamlit forgets a widget's value while it is not drawn (after Clear all): re-seed it from a plain copy.
    for widget_key, kept_key in (("view_widget", "review_view"), ("threshold_widget", "review_threshold")):
        if widget_key not in state:
            state[widget_key] = state[kept_key]
    with view_column:
        st.segmented_control("Review as", ["Cards", "Table"], key="view_widget",
                             help="Cards show each image large; the table corrects many at once.")
    with threshold_column:
        st.slider("Flag predictions below this confidence", 0, 100, step=5, format="%d%%", key="threshold_widget")
    state.review_view = state.view_widget or state.review_view
    state.review_threshold = state.threshold_widget
    view, threshold = state.review_view, state.review_threshold / 100
    items.sort(key=lambda item: item[2].confidence >= threshold)  # flagged first, otherwise in upload order
    flagged = sum(prediction.confidence < threshold for _, _, prediction in items)
    st.caption(f"{flagged} flagged as low confidence, listed first. Leave a label to confirm the prediction, "
               "or pick the right class to correct it.")
    seen = store.find_saved([image.content_hash for _, image, _ in items])

    if view == "Table":
        keys = [key for key, _, _ in items]
        table_key = f"table-{state.nonce}-{hash(tuple(keys))}"
        table = pd.DataFrame({
            "image": [thumbnail_data_url(image.image) for _, image, _ in items],
            "source": [image.source for _, image, _ in items],
            "prediction": [prediction.label for _, _, prediction in items],
            "confidence": [prediction.confidence for _, _, prediction in items],
            "flag": ["low confidence" if prediction.confidence < threshold else "" for _, _, prediction in items],
            "label": [final_label(key, prediction) for key, _, prediction in items],
            "already saved": [seen[image.content_hash].final_label if image.content_hash in seen else ""
                              for _, image, _ in items],
        })
        st.data_editor(
            table, key=table_key, hide_index=True, width="stretch",
            disabled=[column for column in table.columns if column != "label"],
            column_config={
                "image": st.column_config.ImageColumn("image", width="small"),
                "confidence": st.column_config.ProgressColumn("confidence", format="percent", min_value=0, max_value=1),
                "label": st.column_config.SelectboxColumn("label", options=CLASSES, required=True,
                                                          help="Change to correct the prediction."),
            },
            on_change=remember_table_edits, args=(keys, table_key),
        )
    else:
        for row_start in range(0, len(items), COLUMNS):
            for column, (key, image, prediction) in zip(st.columns(COLUMNS), items[row_start:row_start + COLUMNS]):
                with column:
                    st.image(image.image, width=220)
                    st.caption(escape_markdown(image.source))
                    flag = " :orange-badge[low confidence]" if prediction.confidence < threshold else ""
                    st.markdown(f"**{prediction.label}** {prediction.confidence:.1%}{flag}")
                    st.caption(" · ".join(f"{label} {probability:.1%}" for label, probability in prediction.top_k))
                    widget_key = f"label-{state.nonce}-{key}"
                    st.selectbox("Label", CLASSES, index=CLASSES.index(final_label(key, prediction)), key=widget_key,
                                 on_change=remember_card_choice, args=(key, widget_key))
                    if image.content_hash in seen:
                        record = seen[image.content_hash]
                        st.caption(f"Already saved {record.created_at[:16].replace('T', ' ')} UTC "
                                   f"as **{record.final_label}**.")

save_column, undo_column, clear_column, _ = st.columns([1, 1, 1, 3])
with save_column:
    st.button(f"Save {len(items)} image{'s' * (len(items) != 1)}", type="primary", disabled=not items,
              on_click=save_all)
with undo_column:
    if state.undo is not None:
        st.button("Undo last change", on_click=undo_last, help=f"Take back the {state.undo.description}.")
with clear_column:
    st.button("Clear all", on_click=clear_all, help="Empty the page. Saved images stay in the database.")
