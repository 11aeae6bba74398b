"""CIFAR-10 image classifier: upload photos or paste URLs, confirm or correct each prediction, save.

    streamlit run app.py

In order: the web server (`app`: Streamlit plus the streamed export downloads), the main page and its parts,
and the navigation each browser session runs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import pandas as pd
import streamlit as st
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import charts
from classes import CLASSES
from classifier import Classifier, Prediction, WeightsError, load_classifier
from db import (NewPrediction, SettingsError, Store, StoreError, Summary, admin_password_ok, configured_admin_password,
                iter_csv, iter_zip, open_store)
from display import CARD_SIZE, THUMBNAIL_SIZE, code_span, data_url, encode_image, escape_markdown
from inputs import (ALLOWED_EXTENSIONS, DECODE_THREADS, MAX_FILE_BYTES, FetchError, ImageInput, InvalidImageError,
                    fetch_image, read_image_input)

COLUMNS = 4
SKIP = "skip"  # a label choice that means: do not save this image
LABEL_CHOICES = (*CLASSES, SKIP)
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


@dataclass(frozen=True)
class Classified:
    """One image on the page: what was read, what the model said, and its pictures (encoded once, on upload)."""

    image: ImageInput
    prediction: Prediction
    card: bytes        # shown on its card and in the table
    thumbnail: bytes   # saved with the record, for History


def read_source(name: str, upload) -> tuple[ImageInput, bytes, bytes]:
    image = read_image_input(upload.getvalue() if upload is not None else fetch_image(name), name)
    return image, encode_image(image.image, CARD_SIZE), encode_image(image.image, THUMBNAIL_SIZE)


def final_label(key: str, item: Classified) -> str:
    """The class the person chose, the prediction if they left it, or SKIP."""
    return st.session_state.corrections.get(key, item.prediction.label)


def flag(prediction: Prediction, threshold: float) -> str:
    """Why an image is listed first: the model thinks it is none of the ten, or is not sure which; else ''."""
    if prediction.is_ood:
        return UNKNOWN_FLAG
    return LOW_CONFIDENCE_FLAG if prediction.confidence < threshold else ""


def remember_choice(key: str, label: str) -> None:
    """A label change reruns only the review; one to or from skip changes the Save button, so the whole page."""
    state = st.session_state
    if SKIP in (label, state.corrections.get(key)):
        state.rerun_page = True
    state.corrections[key] = label


def remember_card_choice(key: str, widget_key: str) -> None:
    remember_choice(key, st.session_state[widget_key])


def remember_table_edits(keys: list[str], widget_key: str) -> None:
    for row, change in st.session_state[widget_key]["edited_rows"].items():
        if change.get("label") in LABEL_CHOICES:
            remember_choice(keys[row], change["label"])


def current_items() -> list[tuple[str, Classified]]:
    """The pictures on the page, each once: a picture given again (under another name or URL) is listed by
    duplicates() instead, so one picture never gets two labels."""
    # Errors are the strings; no isinstance(Classified): each rerun of this script defines the class anew.
    items, seen = [], set()
    for key, result in st.session_state.results.items():
        if not isinstance(result, str) and result.image.content_hash not in seen:
            seen.add(result.image.content_hash)
            items.append((key, result))
    return items


def duplicates() -> list[tuple[str, str]]:
    """(source, source of the same picture earlier on the page) for each picture given more than once."""
    first: dict[str, str] = {}
    repeated = []
    for result in st.session_state.results.values():
        if isinstance(result, str):
            continue
        if result.image.content_hash in first:
            repeated.append((result.image.source, first[result.image.content_hash]))
        else:
            first[result.image.content_hash] = result.image.source
    return repeated


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def to_save(items: list[tuple[str, Classified]]) -> list[tuple[str, Classified]]:
    return [(key, item) for key, item in items if final_label(key, item) != SKIP]


def save_all(model_version: str) -> None:
    state = st.session_state
    items = current_items()
    predictions = [
        NewPrediction(content_hash=item.image.content_hash, data=item.image.data, extension=item.image.extension,
                      source=item.image.source, predicted_label=item.prediction.label,
                      confidence=item.prediction.confidence, final_label=final_label(key, item),
                      model_version=model_version, is_ood=item.prediction.is_ood,
                      ood_score=item.prediction.ood_score, thumbnail=item.thumbnail)
        for key, item in to_save(items)
    ]
    skipped = len(items) - len(predictions)
    try:
        result = open_store().save_predictions(predictions)
    except StoreError as error:
        state.flash = ("error", f"Nothing was saved: {escape_markdown(str(error))} Your labels are kept: press Save "
                                "again once it is back.")
        return
    parts = [f"saved {plural(result.saved, 'image')}"] if result.saved or not result.updated else []
    if result.updated:
        parts.append(f"updated the label of {plural(result.updated, 'image')} saved before")
    if result.unchanged:
        parts.append(f"{result.unchanged} already saved with that label, not duplicated")
    if skipped:
        parts.append(f"{skipped} marked skip, not saved")
    message = "; ".join(parts)
    state.flash = ("success", message[0].upper() + message[1:] + ".")
    if result.change is not None:
        state.undo = result.change


def undo_last() -> None:
    state = st.session_state
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
    state = st.session_state
    state.nonce += 1
    state.results = {}
    state.corrections = {}
    state.flash = None


def clear_database() -> None:
    state = st.session_state
    state.confirm_clear = False
    try:
        allowed = admin_password_ok(state.get("clear_password", ""))
    except SettingsError as error:  # the secrets file broke while the confirmation was open
        state.flash = ("error", f"The database was not cleared: {escape_markdown(str(error))}")
        return
    if not allowed:
        state.flash = ("error", "Wrong admin password: nothing was deleted.")
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


def input_sources() -> list[tuple[str, str, object]]:
    """The uploader and the URL box; returns (key, name, upload or None) for each input on the page."""
    nonce = st.session_state.nonce
    uploads = st.file_uploader(
        "Upload images", type=list(ALLOWED_EXTENSIONS), accept_multiple_files=True, key=f"uploader-{nonce}",
        help=f"JPEG, PNG, GIF or WebP, up to {MAX_FILE_BYTES // 2**20} MB each.")
    url_text = st.text_area("...or paste image URLs, one per line", key=f"urls-{nonce}",
                            placeholder="https://example.com/cat.jpg", help="Press Ctrl+Enter or click outside to fetch.")
    sources = [(f"file-{upload.file_id}", upload.name, upload) for upload in uploads or []]
    urls = dict.fromkeys(line.strip() for line in url_text.splitlines())
    return sources + [(f"url-{url}", url, None) for url in urls if url]


def read_and_classify(sources: list[tuple[str, str, object]], classifier: Classifier) -> None:
    """Decode the inputs not seen before on every core, classify them in one batch, keep the results."""
    state = st.session_state
    state.results = {key: state.results[key] for key, _, _ in sources if key in state.results}
    new_sources = [source for source in sources if source[0] not in state.results]
    if not new_sources:
        return
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
            predictions = classifier.predict([image.image for image, _, _ in decoded.values()])
        for (key, (image, card, thumbnail)), prediction in zip(decoded.items(), predictions):
            state.results[key] = Classified(image, prediction, card, thumbnail)
    state.results = {key: state.results[key] for key, _, _ in sources}


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


@st.fragment
def review() -> None:
    """The classified images, their labels and the actions on them. A label change reruns only this part."""
    state = st.session_state
    items = current_items()
    if items:
        st.subheader(f"{plural(len(items), 'image')} classified")
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
        threshold = state.review_threshold / 100
        items.sort(key=lambda pair: not flag(pair[1].prediction, threshold))  # flagged first, else upload order
        unknown = sum(flag(item.prediction, threshold) == UNKNOWN_FLAG for _, item in items)
        unsure = sum(flag(item.prediction, threshold) == LOW_CONFIDENCE_FLAG for _, item in items)
        st.caption(f"{unsure} flagged as low confidence and {unknown} as maybe none of these classes, listed first. "
                   f"Leave a label to confirm the prediction, pick the right class to correct it, or pick "
                   f"**{SKIP}** to leave an image out of the save.")
        try:
            seen = open_store().find_saved([item.image.content_hash for _, item in items])
        except StoreError:
            seen = {}  # the sidebar says what is wrong with the store
        if state.review_view == "Table":
            review_table(items, threshold, seen)
        else:
            review_cards(items, threshold, seen)
    if state.pop("rerun_page", False):
        st.rerun(scope="app")  # the Save button's count changed


def actions(model_version: str) -> None:
    """Save, undo and clear: each changes more than the review (the sidebar, the inputs), so the whole page
    reruns, once, after the callback."""
    state = st.session_state
    saving = len(to_save(current_items()))
    with st.container(horizontal=True):
        st.button(f"Save {plural(saving, 'image')}", type="primary", disabled=not saving, on_click=save_all,
                  args=(model_version,))
        if state.undo is not None:
            st.button("Undo last change", on_click=undo_last,
                      help=f"Take back the {escape_markdown(state.undo.description)}.")
        st.button("Clear all", on_click=clear_all, help="Empty the page. Saved images stay in the database.")


def review_table(items: list[tuple[str, Classified]], threshold: float, seen: dict) -> None:
    keys = [key for key, _ in items]
    table_key = f"table-{st.session_state.nonce}-{hash(tuple(keys))}"
    table = pd.DataFrame({
        "image": [data_url(item.card) for _, item in items],
        "source": [item.image.source for _, item in items],
        "prediction": [item.prediction.label for _, item in items],
        "confidence": [item.prediction.confidence for _, item in items],
        "flag": [flag(item.prediction, threshold) for _, item in items],
        "label": [final_label(key, item) for key, item in items],
        "already saved": [seen[item.image.content_hash].final_label if item.image.content_hash in seen else ""
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
                st.caption(escape_markdown(item.image.source))
                badge = {UNKNOWN_FLAG: f" :violet-badge[{UNKNOWN_FLAG.capitalize()}]",
                         LOW_CONFIDENCE_FLAG: f" :orange-badge[{LOW_CONFIDENCE_FLAG}]", "": ""}[flag(prediction, threshold)]
                st.markdown(f"**{prediction.label}** {prediction.confidence:.1%}{badge}")
                st.caption(" · ".join(f"{label} {probability:.1%}" for label, probability in prediction.top_k))
                widget_key = f"label-{nonce}-{key}"
                st.selectbox("Label", LABEL_CHOICES, index=LABEL_CHOICES.index(final_label(key, item)), key=widget_key,
                             on_change=remember_card_choice, args=(key, widget_key),
                             format_func=lambda choice: "skip (don't save)" if choice == SKIP else choice)
                if item.image.content_hash in seen:
                    record = seen[item.image.content_hash]
                    st.caption(f"Already saved {record.created_at[:16].replace('T', ' ')} UTC "
                               f"as **{escape_markdown(record.final_label)}**.")


def classify_page() -> None:
    """The main page, top to bottom."""
    state = st.session_state
    state.setdefault("nonce", 0)          # part of every input widget key: bumping it resets the page
    state.setdefault("results", {})       # input key -> Classified, or an error message
    state.setdefault("corrections", {})   # input key -> the label the person chose
    state.setdefault("flash", None)
    state.setdefault("confirm_clear", False)
    state.setdefault("undo", None)        # the last save or delete (db.Change), shared with History
    state.setdefault("review_view", "Cards")

    with st.sidebar:
        saved_feedback_sidebar()
    try:
        classifier = get_classifier()
    except WeightsError as error:
        st.error(escape_markdown(str(error)), icon=":material/error:")
        st.stop()
    # Percent; the model card's default, chosen on calibrated confidences to catch half of the model's mistakes.
    state.setdefault("review_threshold", round(classifier.low_confidence * 100))
    st.title("CIFAR-10 image classifier")
    accuracy_note = f", {classifier.test_accuracy:.1%} on the CIFAR-10 test set" if classifier.test_accuracy else ""
    st.caption(f"Classifies photos as one of: {', '.join(CLASSES)}. "
               f"Model {code_span(classifier.version)}{accuracy_note}.")
    read_and_classify(input_sources(), classifier)
    show_messages()
    review()
    actions(classifier.version)


# ---------------------------------------------------------------- navigation (each browser session)

if __name__ == "__main__":
    st.set_page_config(page_title="CIFAR-10 classifier", page_icon=":frame_with_picture:", layout="wide")
    st.navigation([
        st.Page(classify_page, title="Classify", icon=":material/image_search:", default=True),
        st.Page("pages/1_History.py", title="History", icon=":material/history:"),
    ]).run()
