"""CIFAR-10 image classifier: upload photos or paste URLs, confirm or correct each prediction, save.

    streamlit run app.py
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed

import streamlit as st

import charts
from classifier import CLASSES, load_classifier
from db import DB_PATH_ENV, DEFAULT_DB_PATH, DEFAULT_IMAGE_DIR, IMAGE_DIR_ENV, NewPrediction, Store
from inputs import (ALLOWED_EXTENSIONS, DECODE_THREADS, MAX_FILE_BYTES, FetchError, ImageInput, InvalidImageError,
                    escape_markdown, fetch_image, read_image_input)

LOW_CONFIDENCE = 0.5
COLUMNS = 4

st.set_page_config(page_title="CIFAR-10 classifier", page_icon=":frame_with_picture:", layout="wide")


@st.cache_resource(show_spinner="Loading the model...")
def get_classifier():
    return load_classifier()


@st.cache_resource
def get_store(db_path: str, image_dir: str) -> Store:
    store = Store(db_path, image_dir)
    store.remove_orphan_files()
    return store


classifier = get_classifier()
store = get_store(os.environ.get(DB_PATH_ENV, DEFAULT_DB_PATH), os.environ.get(IMAGE_DIR_ENV, str(DEFAULT_IMAGE_DIR)))
state = st.session_state
state.setdefault("nonce", 0)          # part of every input widget key: bumping it resets the page
state.setdefault("results", {})       # input key -> (ImageInput, Prediction) or an error message
state.setdefault("flash", None)
state.setdefault("confirm_clear", False)


def label_key(input_key: str) -> str:
    return f"label-{state.nonce}-{input_key}"


def current_items() -> list[tuple[str, object, object]]:
    return [(key, *result) for key, result in state.results.items() if not isinstance(result, str)]


def read_source(name: str, upload) -> ImageInput:
    return read_image_input(upload.getvalue() if upload is not None else fetch_image(name), name)


def save_all() -> None:
    predictions = [
        NewPrediction(
            content_hash=image.content_hash, data=image.data, extension=image.extension, source=image.source,
            predicted_label=prediction.label, confidence=prediction.confidence,
            final_label=state.get(label_key(key), prediction.label), model_version=classifier.version,
        )
        for key, image, prediction in current_items()
    ]
    result = store.save_predictions(predictions)
    note = f" ({result.already_saved} already saved before, not duplicated)" if result.already_saved else ""
    state.flash = ("success", f"Saved {result.saved} image{'s' * (result.saved != 1)}{note}.")


def clear_all() -> None:
    state.nonce += 1
    state.results = {}
    state.flash = None


def clear_database() -> None:
    deleted = store.clear()
    state.confirm_clear = False
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
    else:
        st.info("Nothing saved yet. Classify some images and click **Save** to see charts here.")

    st.divider()
    if not state.confirm_clear:
        st.button("Clear database", disabled=not total, on_click=lambda: state.update(confirm_clear=True))
    else:
        st.warning(f"Delete all {total} saved images and their records? This cannot be undone and affects everyone.")
        st.button("Yes, delete everything", type="primary", on_click=clear_database)
        st.button("Cancel", on_click=lambda: state.update(confirm_clear=False))

# ---------------------------------------------------------------- main page
st.title("CIFAR-10 image classifier")
st.caption(f"Classifies photos as one of: {', '.join(CLASSES)}. Model `{classifier.version}`.")

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
        futures = {pool.submit(read_source, name, upload): (key, name) for key, name, upload in new_sources}
        for number, future in enumerate(as_completed(futures), start=1):
            key, name = futures[future]
            try:
                decoded[key] = future.result()
            except (InvalidImageError, FetchError) as error:
                state.results[key] = str(error)
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

items = current_items()
if items:
    seen = store.find_saved([image.content_hash for _, image, _ in items])
    st.subheader(f"{len(items)} image{'s' * (len(items) != 1)} classified")
    st.caption("Check each label. Leave it to confirm the prediction, or pick the right class to correct it.")
    for row_start in range(0, len(items), COLUMNS):
        for column, (key, image, prediction) in zip(st.columns(COLUMNS), items[row_start:row_start + COLUMNS]):
            with column:
                st.image(image.image, width=220)
                st.caption(escape_markdown(image.source))
                flag = " :orange-badge[low confidence]" if prediction.confidence < LOW_CONFIDENCE else ""
                st.markdown(f"**{prediction.label}** {prediction.confidence:.1%}{flag}")
                st.caption(" · ".join(f"{label} {probability:.1%}" for label, probability in prediction.top_k))
                st.selectbox("Label", CLASSES, index=CLASSES.index(prediction.label), key=label_key(key))
                if image.content_hash in seen:
                    record = seen[image.content_hash]
                    st.caption(f"Already saved {record.created_at[:16].replace('T', ' ')} UTC as **{record.final_label}**.")

left, right, _ = st.columns([1, 1, 4])
with left:
    st.button(f"Save {len(items)} image{'s' * (len(items) != 1)}", type="primary", disabled=not items,
              on_click=save_all)
with right:
    st.button("Clear all", on_click=clear_all, help="Empty the page. Saved images stay in the database.")
