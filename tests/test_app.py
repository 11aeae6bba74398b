"""The real app.py through Streamlit's AppTest: upload, URLs, corrections, Save, charts, clearing. The flows that
touch storage (save, correct, undo, delete, History, export) run on both backends: SQLite + a folder and
PostgreSQL + SeaweedFS S3."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import warnings
import zipfile
from datetime import datetime, timedelta, timezone

import pytest
from streamlit.testing.v1 import AppTest

from conftest import ROOT, Route, export, image_bytes, shown, without_code_spans, zip_of
from review import SKIP

RED = image_bytes("PNG", size=(64, 48), color=(220, 20, 20))
BLUE = image_bytes("JPEG", size=(80, 60), color=(20, 40, 220))
GREEN = image_bytes("PNG", size=(50, 50), color=(20, 200, 40))


def start_app() -> AppTest:
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    app.run()
    assert not app.exception
    return app


def click(app: AppTest, label_start: str) -> None:
    [button] = [b for b in app.button if b.label.startswith(label_start)]
    button.click()
    app.run()
    assert not app.exception


def rows(db_path) -> list[tuple]:
    with sqlite3.connect(db_path) as connection:
        return connection.execute(
            "SELECT source, predicted_label, final_label, is_correct, image_file FROM predictions ORDER BY source").fetchall()


@pytest.fixture
def reader(backend):
    """A Store of its own on the test's backend, as another server would open it: how the tests look at what the
    pages saved, whichever the backend."""
    return backend.store()


def saved_rows(reader) -> list[tuple]:
    """rows() through the Store API: (source, predicted, final, is_correct, image file), by source."""
    return sorted((r.source, r.predicted_label, r.final_label, int(r.is_correct), r.image_file)
                  for r in reader.list_predictions())


def image_names(reader) -> list[str]:
    return sorted(name for name, _ in reader.images.stored())


def sidebar_metrics(app: AppTest) -> dict[str, str]:
    return {metric.label: metric.value for metric in app.sidebar.metric}


def label_box(app: AppTest, source: str):
    """The label selectbox on the card of this source (flagged cards come first, so not upload order)."""
    names = [shown(c.value) for c in app.caption if c.value and not c.value.startswith(("Already", "·"))]
    cards = [name for name in names if " · " not in name and "%" not in name and "flagged" not in name]
    return app.selectbox[cards.index(source)]


def upload(app: AppTest, files: list[tuple[str, bytes, str]], threshold: int = 0) -> None:
    """Upload; with the low-confidence threshold at 0 nothing is flagged, so images stay in upload order."""
    app.file_uploader[0].set_value(files)
    app.run()
    assert not app.exception
    if app.slider:
        app.slider[0].set_value(threshold)
        app.run()


def test_empty_database_shows_a_friendly_empty_state(store_env):
    app = start_app()
    assert "Nothing saved yet" in app.sidebar.info[0].value
    assert sidebar_metrics(app)["Saved images"] == "0"
    assert [b.disabled for b in app.button if b.label.startswith("Save")] == [True]


def test_an_upload_past_what_a_page_may_have_waiting_is_named_and_the_rest_are_read(store_env, monkeypatch):
    """On a server, uploads wait on disk until the page reads them (app.UploadsWaitOnDisk). AppTest makes its own
    keeper of uploads for each run: here each is given that same kind of inbox, with room for one picture."""
    from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager
    from streamlit.testing.v1 import local_script_runner

    import app as app_module
    from spools import UploadInbox

    inbox = UploadInbox(limit_bytes=len(RED) + 10)

    def keeper_with_the_inbox(endpoint: str) -> MemoryUploadedFileManager:
        keeper = MemoryUploadedFileManager(endpoint)
        app_module.keep_uploads_on_disk(keeper, inbox)
        return keeper

    monkeypatch.setattr(local_script_runner, "MemoryUploadedFileManager", keeper_with_the_inbox)
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg")])
    assert len(app.selectbox) == 1  # red.png's card
    [error] = app.error
    assert shown(error.value).startswith("'blue.jpg' was not taken: ")
    assert "are waiting to be read on this page, and it may have 0 GB" in shown(error.value)


def test_upload_correct_and_save(backend, reader):
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg"), ("notes.jpg", b"hello", "image/jpeg")])
    assert len(app.selectbox) == 2
    [error] = app.error
    assert "notes.jpg" in shown(error.value) and "text file" in error.value
    predicted = {name: label_box(app, name).value for name in ("red.png", "blue.jpg")}
    corrected = "cat" if predicted["blue.jpg"] != "cat" else "dog"
    label_box(app, "blue.jpg").set_value(corrected)
    app.run()
    click(app, "Save 2 images")
    assert "Saved 2 images" in app.success[0].value
    saved = saved_rows(reader)
    assert [(source, final) for source, _, final, _, _ in saved] == [("blue.jpg", corrected),
                                                                      ("red.png", predicted["red.png"])]
    assert [correct for *_, correct, _ in saved] == [0, 1]
    assert image_names(reader) == sorted(file for *_, file in saved)
    assert {reader.image_bytes(record) for record in reader.list_predictions()} == {RED, BLUE}
    metrics = sidebar_metrics(app)
    assert metrics["Saved images"] == "2" and metrics["Model accuracy"] == "50.0%"
    assert len(app.sidebar.get("image")) == 2  # class distribution and accuracy
    app.sidebar.toggle[0].set_value(True)  # "Where the model goes wrong": per class, and the confusion matrix
    app.run()
    assert len(app.sidebar.get("image")) == 4


def test_two_files_with_the_same_name_keep_their_own_corrections(store_env):
    db_path, _ = store_env
    app = start_app()
    upload(app, [("photo.png", RED, "image/png"), ("photo.png", GREEN, "image/png")])
    assert len(app.selectbox) == 2 and len({box.key for box in app.selectbox}) == 2
    app.selectbox[0].set_value("ship")
    app.selectbox[1].set_value("frog")
    app.run()
    click(app, "Save")
    assert sorted(final for _, _, final, _, _ in rows(db_path)) == ["frog", "ship"]


def test_saving_twice_does_not_duplicate(store_env):
    db_path, _ = store_env
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg")])
    click(app, "Save")
    click(app, "Save")
    assert "2 already saved" in app.success[0].value
    app.run()
    assert len(rows(db_path)) == 2


def test_correcting_an_image_saved_before_updates_it_and_undo_restores_the_old_label(backend, reader):
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg")])
    predicted = label_box(app, "red.png").value
    click(app, "Save")
    corrected = "truck" if predicted != "truck" else "ship"
    label_box(app, "red.png").set_value(corrected)
    app.run()
    click(app, "Save")
    message = shown(app.success[0].value)
    assert "Updated the label of 1 image saved before" in message and "1 already saved" in message
    assert [(source, final) for source, _, final, _, _ in saved_rows(reader)][1] == ("red.png", corrected)
    assert sidebar_metrics(app)["Model accuracy"] == "50.0%"
    click(app, "Undo last change")
    assert "given back its old label" in shown(app.info[0].value)
    assert [(source, final) for source, _, final, _, _ in saved_rows(reader)] == [
        ("blue.jpg", label_box(app, "blue.jpg").value), ("red.png", predicted)]


def test_an_image_already_saved_says_so(store_env):
    app = start_app()
    upload(app, [("red.png", RED, "image/png")])
    click(app, "Save")
    fresh = start_app()
    upload(fresh, [("copy-of-red.png", RED, "image/png")])
    assert any("Already saved" in caption.value for caption in fresh.caption)


def test_clear_database_asks_first(backend, reader):
    app = start_app()
    upload(app, [("red.png", RED, "image/png")])
    click(app, "Save")
    click(app, "Clear database")
    assert "cannot be undone" in app.sidebar.warning[0].value
    assert len(saved_rows(reader)) == 1
    click(app, "Cancel")
    assert len(saved_rows(reader)) == 1 and not app.sidebar.warning
    click(app, "Clear database")
    click(app, "Yes, delete everything")
    assert saved_rows(reader) == [] and image_names(reader) == []
    assert "Database cleared: 1 saved image deleted" in app.success[0].value
    assert sidebar_metrics(app)["Saved images"] == "0"


def test_clear_database_needs_the_admin_password_when_one_is_set(store_env, monkeypatch):
    db_path, _ = store_env
    monkeypatch.setenv("CIFAR10_ADMIN_PASSWORD", "team-s3cret")
    app = start_app()
    upload(app, [("red.png", RED, "image/png")])
    click(app, "Save")
    click(app, "Clear database")
    app.sidebar.text_input[0].input("guess")
    click(app, "Yes, delete everything")
    assert "Wrong admin password" in app.error[0].value and len(rows(db_path)) == 1
    click(app, "Clear database")
    app.sidebar.text_input[0].input("team-s3cret")
    click(app, "Yes, delete everything")
    assert rows(db_path) == [] and "Database cleared" in app.success[0].value


def test_clear_all_empties_the_page_and_keeps_the_database(store_env):
    db_path, _ = store_env
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg")])
    app.text_area[0].input("http://127.0.0.1:9/none.png")
    app.run()
    click(app, "Save")
    click(app, "Clear all")
    assert len(app.selectbox) == 0 and not app.error
    assert app.file_uploader[0].value in (None, [])
    assert app.text_area[0].value == ""
    assert len(rows(db_path)) == 2


def session_after(app: AppTest) -> AppTest:
    """A new session at the address this one shows (the page reloaded, or its server died behind the balancer)."""
    after = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    if app.query_params.get("unsaved"):
        after.query_params["unsaved"] = app.query_params["unsaved"]
    return after


def test_a_new_session_says_the_unsaved_pictures_of_the_old_one_are_gone(store_env):
    """The page's address counts the pictures a lost session would take with it: still being read, or with a label
    the store does not hold, whoever saved, undid, deleted or cleared. A session that starts at that address, on
    either page, says so, once."""
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg"), ("green.png", GREEN, "image/png")])
    assert app.query_params.get("unsaved") == "3"
    label_box(app, "green.png").set_value(SKIP)  # left out on purpose: not lost
    app.run()
    assert app.query_params.get("unsaved") == "2"
    click(app, "Save 2 images")
    assert "unsaved" not in app.query_params
    red = label_box(app, "red.png")
    red.set_value("truck" if red.value != "truck" else "ship")  # a label changed since the save
    app.run()
    assert app.query_params.get("unsaved") == "1"

    after_the_loss = session_after(app)
    after_the_loss.run()
    [warning] = after_the_loss.warning
    assert shown(warning.value).startswith("1 picture on this page had not been saved and is gone, with its label")
    assert shown(warning.value).endswith("Upload it again.")
    assert "unsaved" not in after_the_loss.query_params and sidebar_metrics(after_the_loss)["Saved images"] == "2"
    after_the_loss.run()
    assert not after_the_loss.warning  # said once

    click(app, "Save 2 images")  # red's new label stored; then that Save undone: red's old label is back, blue stays
    click(app, "Undo last change")
    assert app.query_params.get("unsaved") == "1"

    app.switch_page("pages/1_History.py")
    app.run()
    for _ in range(2):  # both records deleted on History: nothing of the page is stored
        app.button(key=next(button.key for button in app.button if (button.key or "").startswith("delete-"))).click()
        app.run()
    app.switch_page("app.py")
    app.run()
    assert app.query_params.get("unsaved") == "2"
    two_lost = session_after(app)
    two_lost.run()
    assert shown(two_lost.warning[0].value).startswith(
        "2 pictures on this page had not been saved and are gone, with their labels")
    assert shown(two_lost.warning[0].value).endswith("Upload them again.")
    click(app, "Clear all")
    assert "unsaved" not in app.query_params


@pytest.mark.parametrize("hostile", ["²", "٣", "9" * 5000, "-1", "1e3", "3\n**x**", "99999999999"])
def test_an_address_with_a_hostile_unsaved_count_says_nothing_and_breaks_nothing(store_env, hostile):
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    app.query_params["unsaved"] = hostile
    app.run()
    assert not app.exception and not app.warning
    app.run()
    assert not app.exception and app.title[0].value == "CIFAR-10 image classifier"


def test_urls_are_fetched_and_bad_ones_report_themselves(store_env, local_server, monkeypatch):
    monkeypatch.setenv("CIFAR10_ALLOW_PRIVATE_URLS", "loopback")
    db_path, _ = store_env
    local_server.routes["/red.png"] = Route(body=RED)
    local_server.routes["/page.html"] = Route(body=b"<html>hi</html>")
    good, missing, html = local_server.url("/red.png"), local_server.url("/missing.png"), local_server.url("/page.html")
    app = start_app()
    upload(app, [("blue.jpg", BLUE, "image/jpeg")])
    app.text_area[0].input(f"{good}\n{missing}\n  \n{html}\nftp://127.0.0.1/x.png")
    app.run()
    assert not app.exception
    assert len(app.selectbox) == 2
    errors = [shown(error.value) for error in app.error]
    assert len(errors) == 3
    assert missing in errors[0] and "HTTP 404" in errors[0]
    assert html in errors[1] and "not an accepted image" in errors[1]
    assert "only http:// and https://" in errors[2]
    click(app, "Save")
    assert sorted(source for source, *_ in rows(db_path)) == ["blue.jpg", good]


def test_a_failed_url_can_be_retried_from_the_page(store_env, local_server, monkeypatch):
    monkeypatch.setenv("CIFAR10_ALLOW_PRIVATE_URLS", "loopback")
    local_server.routes["/flaky.png"] = Route(status=503, body=b"busy")
    app = start_app()
    app.text_area[0].input(local_server.url("/flaky.png"))
    app.run()
    assert "HTTP 503" in app.error[0].value and len(app.selectbox) == 0
    local_server.routes["/flaky.png"] = Route(body=RED)
    click(app, "Retry 1 failed URL")
    assert not app.error and len(app.selectbox) == 1
    assert local_server.requests.count("/flaky.png") == 2


def test_private_urls_are_refused_by_default(store_env, local_server, monkeypatch):
    monkeypatch.delenv("CIFAR10_ALLOW_PRIVATE_URLS", raising=False)
    local_server.routes["/red.png"] = Route(body=RED)
    app = start_app()
    app.text_area[0].input(local_server.url("/red.png"))
    app.run()
    assert "private or local address" in app.error[0].value and local_server.requests == []


@pytest.mark.parametrize("name", ["[click me](http://evil.example)<img src=x onerror=alert(1)>.png",
                                  "../../etc/passwd.png", "**bold**:red[x].png"])
def test_hostile_file_names_are_shown_literally_and_not_used_on_disk(store_env, name):
    db_path, image_dir = store_env
    app = start_app()
    upload(app, [(name, RED, "image/png")])
    captions = [caption.value for caption in app.caption]
    assert any(shown(caption) == name for caption in captions)
    # Every character that could start a link, HTML tag, emphasis or directive arrives escaped or in a code span.
    assert not any(re.search(r"[\[\]<>*:]", re.sub(r"\\.", "", without_code_spans(caption)))
                   for caption in captions if shown(caption) == name)
    click(app, "Save")
    [(source, *_, image_file)] = rows(db_path)
    assert source == name and "/" not in image_file and len(image_file.split(".")[0]) == 64
    assert [path.name for path in image_dir.iterdir()] == [image_file]


def save_three() -> AppTest:
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg"), ("green.png", GREEN, "image/png")])
    predicted = label_box(app, "red.png").value
    label_box(app, "red.png").set_value("truck" if predicted != "truck" else "ship")
    app.run()
    click(app, "Save 3 images")
    return app


def test_undo_the_last_save(backend, reader):
    app = save_three()
    assert len(saved_rows(reader)) == 3 and len(image_names(reader)) == 3
    click(app, "Undo last change")
    assert saved_rows(reader) == [] and image_names(reader) == []
    assert "Undid the save of 3 images: 3 removed" in shown(app.info[0].value)
    assert not [b for b in app.button if b.label.startswith("Undo")]


def test_undo_messages_show_a_crafted_name_literally(store_env):
    """The name of a deleted file appears in the undo button, its tooltip and the undo message: as text only."""
    name = "[click me](http://evil.example) <img src=x onerror=alert(1)> **bold**.png"
    app = start_app()
    upload(app, [(name, RED, "image/png")])
    click(app, "Save 1 image")
    app.switch_page("pages/1_History.py")
    app.run()
    app.button(key=[b.key for b in app.button if b.key and b.key.startswith("delete-")][0]).click()
    app.run()
    [undo] = [b for b in app.button if b.label.startswith("Undo the last")]
    texts = [undo.label, app.success[0].value]
    app.switch_page("app.py")  # the main page offers the same undo, its tooltip naming the file
    app.run()
    [undo] = [b for b in app.button if b.label == "Undo last change"]
    texts.append(undo.help)
    undo.click()
    app.run()
    texts.append(app.info[0].value)
    for text in texts:
        assert name in shown(text)
        # Every link, tag and emphasis character escaped or in a code span.
        assert not re.search(r"[\[\]<>*]", re.sub(r"\\.", "", without_code_spans(text))), text
    assert "1 restored" in texts[-1]


COLORS = [(250, 250, 250), (10, 10, 10), (200, 30, 30), (30, 160, 60), (40, 90, 220)]


def fixed_predictions(monkeypatch, confidence_by_color: dict[tuple, float], unknown: set = frozenset()) -> None:
    """The model answers 'airplane' with a set confidence per picture (known by its colour), flagged as maybe none
    of the ten for the colours in `unknown`: the page is tested on numbers chosen here, not on the weights."""
    from classifier import CLASSES, Classifier, Prediction

    def predict(self, images, top_k=3):
        predictions = []
        for image in images:
            color = image.getpixel((1, 1))
            confidence = confidence_by_color[color]
            probabilities = [confidence] + [(1 - confidence) / 9] * 9
            ranked = list(zip(CLASSES, probabilities))[:top_k]
            score = 0.5 if color in unknown else 0.01
            predictions.append(Prediction("airplane", confidence, ranked, probabilities, score, color in unknown))
        return predictions

    monkeypatch.setattr(Classifier, "predict", predict)


def test_maybe_none_of_these_is_shown_listed_first_saved_with_its_flag_or_skipped(store_env, monkeypatch):
    db_path, _ = store_env
    fixed_predictions(monkeypatch, dict(zip(COLORS, [0.97, 0.96, 0.95, 0.94, 0.93])), unknown={COLORS[2], COLORS[4]})
    app = start_app()
    files = [(f"{i}.png", image_bytes("PNG", size=(60, 40), color=color), "image/png") for i, color in enumerate(COLORS)]
    upload(app, files, threshold=60)
    order = [shown(c.value) for c in app.caption if shown(c.value) in {name for name, _, _ in files}]
    assert order == ["2.png", "4.png", "0.png", "1.png", "3.png"]
    assert len([m for m in app.markdown if "Maybe none of these classes" in m.value]) == 2
    assert "2 as maybe none of these classes" in app.caption[1].value
    label_box(app, "4.png").set_value("skip")
    label_box(app, "2.png").set_value("frog")  # a person can still save a flagged image, with any label
    app.run()
    click(app, "Save 4 images")
    assert "1 marked skip, not saved" in shown(app.success[0].value)
    with sqlite3.connect(db_path) as connection:
        saved = connection.execute("SELECT source, final_label, is_ood, ood_score FROM predictions ORDER BY source").fetchall()
    assert saved == [("0.png", "airplane", 0, 0.01), ("1.png", "airplane", 0, 0.01), ("2.png", "frog", 1, 0.5),
                     ("3.png", "airplane", 0, 0.01)]
    assert sidebar_metrics(app)["Model accuracy"] == "75.0%"  # the skipped one counts nowhere
    app.segmented_control[0].set_value("Table")
    app.run()
    [table] = app.dataframe
    assert list(table.value["flag"]) == ["maybe none of these classes"] * 2 + [""] * 3
    assert list(table.value["label"]) == ["frog", "skip", "airplane", "airplane", "airplane"]
    history = start_history()
    history.toggle[1].set_value(True)
    history.run()
    assert "1 of 4 saved images match" in history.caption[0].value
    assert "maybe none of these classes" in history.markdown[0].value


def test_review_settings_persist_and_low_confidence_is_flagged_first(store_env, monkeypatch):
    confidences = [0.95, 0.30, 0.72, 0.45, 0.88]
    fixed_predictions(monkeypatch, dict(zip(COLORS, confidences)))
    app = start_app()
    files = [(f"{i}.png", image_bytes("PNG", size=(60, 40), color=color), "image/png") for i, color in enumerate(COLORS)]
    upload(app, files, threshold=0)

    def card_order() -> list[str]:
        return [shown(c.value) for c in app.caption if shown(c.value) in {name for name, _, _ in files}]

    assert card_order() == [name for name, _, _ in files]  # nothing flagged: upload order
    for threshold, flagged in ((60, [1, 3]), (75, [1, 2, 3])):  # flagged first, each part in upload order
        app.slider[0].set_value(threshold)
        app.run()
        assert card_order() == [f"{i}.png" for i in flagged + [i for i in range(5) if i not in flagged]]
        assert len([m for m in app.markdown if "low confidence" in m.value]) == len(flagged)
        assert f"{len(flagged)} flagged as low confidence" in app.caption[1].value
    app.segmented_control[0].set_value("Table")
    app.run()
    assert not app.exception and len(app.selectbox) == 0
    click(app, "Clear all")
    assert not app.segmented_control
    app.file_uploader[0].set_value(files[:1])
    app.run()
    assert app.segmented_control[0].value == "Table" and app.slider[0].value == 75


def start_history() -> AppTest:
    history = AppTest.from_file(str(ROOT / "pages" / "1_History.py"), default_timeout=120)
    history.run()
    assert not history.exception
    return history


def test_history_lists_filters_deletes_and_undoes(backend, reader):
    save_three()
    history = start_history()
    assert "3 of 3 saved images match" in history.caption[0].value and len(history.get("image")) == 3
    history.toggle[0].set_value(True)
    history.run()
    assert "1 of 3 saved images match" in history.caption[0].value
    assert "corrected from" in history.markdown[0].value
    history.toggle[0].set_value(False)
    history.multiselect[0].set_value(["frog", "bird"])
    history.run()
    expected = sum(1 for _, _, final, _, _ in saved_rows(reader) if final in ("frog", "bird"))
    assert f"{expected} of 3 saved images match" in history.caption[0].value
    history.multiselect[0].set_value([])
    history.run()

    victim_source = shown(history.caption[1].value).split(" · ")[0]
    history.button(key=[b.key for b in history.button if b.key and b.key.startswith("delete-")][0]).click()
    history.run()
    assert victim_source not in [source for source, *_ in saved_rows(reader)] and len(saved_rows(reader)) == 2
    assert len(image_names(reader)) == 2
    [undo] = [b for b in history.button if b.label.startswith("Undo")]
    undo.click()
    history.run()
    assert len(saved_rows(reader)) == 3 and len(image_names(reader)) == 3
    assert victim_source in [source for source, *_ in saved_rows(reader)]


def test_history_links_both_streamed_downloads_and_has_an_empty_state(store_env):
    history = start_history()
    assert "Nothing saved yet" in history.info[0].value
    save_three()
    history = start_history()
    links = {button.proto.label: button.proto.url for button in history.get("link_button")}
    assert links == {"Download records (CSV)": "/export/cifar10_feedback.csv",
                     "Download images (ZIP)": "/export/cifar10_feedback.zip"}


def test_history_pages_through_every_record(store_env):
    import hashlib

    from db import NewPrediction, Store

    store = Store.from_env()
    for start in range(0, 120, 40):
        store.save_predictions([NewPrediction(hashlib.sha256(str(i).encode()).hexdigest(), str(i).encode(), "png",
                                              f"record-{i:03d}.png", "cat", 0.5, "cat", "t")
                                for i in range(start, start + 40)])
    history = start_history()
    assert "120 of 120 saved images match. Page 1 of 3" in history.caption[0].value

    def page_sources() -> list[str]:
        return [shown(c.value).split(" · ")[0] for c in history.caption if c.value.startswith("record")]

    first = page_sources()
    assert len(first) == 50
    [next_page] = [b for b in history.button if b.label == "Next page"]
    next_page.click()
    history.run()
    second = page_sources()
    assert "Page 2 of 3" in history.caption[0].value and len(second) == 50 and not set(first) & set(second)
    [b for b in history.button if b.label == "Next page"][0].click()
    history.run()
    assert len(page_sources()) == 20 and [b for b in history.button if b.label == "Next page"][0].disabled
    assert len(set(first) | set(second) | set(page_sources())) == 120


def test_history_delete_needs_the_admin_password_when_one_is_set(store_env, monkeypatch):
    db_path, _ = store_env
    save_three()
    monkeypatch.setenv("CIFAR10_ADMIN_PASSWORD", "team-s3cret")
    history = start_history()
    delete_keys = [b.key for b in history.button if b.key and b.key.startswith("delete-")]
    history.button(key=delete_keys[0]).click()
    history.run()
    assert "Wrong admin password" in history.error[0].value and len(rows(db_path)) == 3
    history.text_input[0].input("team-s3cret")
    history.button(key=delete_keys[0]).click()
    history.run()
    assert len(rows(db_path)) == 2 and history.success


def test_a_batch_of_bad_files_reports_each_and_saves_only_the_good_one(store_env):
    from test_inputs import png_declaring

    db_path, image_dir = store_env
    truncated = image_bytes("JPEG", size=(200, 200))
    bad = {
        "empty.jpg": b"",
        "report.jpg": b"%PDF-1.7\n%binary\n",
        "cut.jpg": truncated[: len(truncated) // 2],
        "bomb.png": png_declaring(30000, 30000),
        "scan.png": image_bytes("TIFF"),
    }
    app = start_app()
    upload(app, [(name, data, "image/png") for name, data in bad.items()] + [("good.png", RED, "image/png")])
    errors = [shown(error.value) for error in app.error]
    assert len(errors) == len(bad)
    for name, error in zip(bad, errors):
        assert f"'{name}'" in error
    assert len(app.selectbox) == 1
    click(app, "Save 1 image")
    assert [source for source, *_ in rows(db_path)] == ["good.png"] and len(list(image_dir.iterdir())) == 1


def test_the_upload_limit_in_config_is_the_zip_limit():
    """Streamlit applies one limit to every file: a ZIP's. The page applies one image's to each file itself."""
    import tomllib

    import inputs

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] * 2**20 == inputs.MAX_ZIP_BYTES > 50 * inputs.MAX_FILE_BYTES


def test_a_database_that_is_down_keeps_the_page_working_and_save_retries_once_it_is_back(monkeypatch, s3_server):
    """The page says which store failed and what to check; nothing is saved; the labels stay on the page, and
    the same Save works once the database is back."""
    from conftest import use_store
    from servers import PostgresServer

    postgres = PostgresServer()
    try:
        url = postgres.database("app_down")
        use_store(monkeypatch, {"CIFAR10_DATABASE_URL": url, "CIFAR10_IMAGE_STORE": "s3://cifar10-tests/app-down",
                                **s3_server.env()})
        postgres.stop()
        app = start_app()
        sidebar_error = app.sidebar.error[0].value
        assert "PostgreSQL database at 127.0.0.1" in shown(sidebar_error) and "CIFAR10\\_DATABASE\\_URL" in sidebar_error
        upload(app, [("red.png", RED, "image/png")])
        corrected = "ship" if app.selectbox[0].value != "ship" else "frog"
        app.selectbox[0].set_value(corrected)
        app.run()
        click(app, "Save 1 image")
        assert "Nothing was saved" in app.error[0].value and "press Save again" in app.error[0].value
        assert app.selectbox[0].value == corrected
        postgres.start()
        click(app, "Save 1 image")
        assert "Saved 1 image" in app.success[0].value and sidebar_metrics(app)["Saved images"] == "1"
        import psycopg

        with psycopg.connect(url) as connection:
            assert connection.execute("SELECT source, final_label FROM predictions").fetchall() == [("red.png", corrected)]
    finally:
        postgres.close()


def test_wrong_object_store_credentials_are_named_on_the_page(monkeypatch, postgres_server, s3_server):
    from conftest import use_store

    use_store(monkeypatch, {"CIFAR10_DATABASE_URL": postgres_server.database("app_creds"),
                            "CIFAR10_IMAGE_STORE": "s3://cifar10-tests/app-creds",
                            **s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong"})
    app = start_app()
    message = shown(app.sidebar.error[0].value)
    assert "object store s3://cifar10-tests/app-creds" in message and "AWS_SECRET_ACCESS_KEY" in message
    upload(app, [("red.png", RED, "image/png")])
    assert len(app.selectbox) == 1  # classifying needs no store


# ---------------------------------------------------------------- issue 16: behaviours that had no failing test

def chart_urls(app: AppTest) -> list[str]:
    """The sidebar's chart pictures; AppTest names each by a hash of its bytes, so new bytes mean a new name."""
    return [url for image in app.sidebar.get("image") for url in image.value]


def accuracy(reader) -> str:
    flags = [correct for *_, correct, _ in saved_rows(reader)]
    return f"{sum(flags) / len(flags):.1%}"


def test_undo_delete_and_clear_update_the_sidebar_counts_and_charts_on_the_same_run(store_env):
    """The sidebar's figures are cached on the store's revision: each change must show on the run its click
    starts, not one run later (nor never)."""
    from db import Store

    reader = Store.from_env()
    app = save_three()
    first = chart_urls(app)
    assert sidebar_metrics(app) == {"Saved images": "3", "Model accuracy": accuracy(reader)} and len(first) == 2
    blue = label_box(app, "blue.jpg")
    blue.set_value("deer" if blue.value != "deer" else "horse")
    app.run()
    click(app, "Save 3 images")
    relabelled = chart_urls(app)
    assert sidebar_metrics(app)["Model accuracy"] == accuracy(reader) == "33.3%" and relabelled != first

    click(app, "Undo last change")  # the relabel, taken back
    assert "given back its old label" in shown(app.info[0].value)
    assert sidebar_metrics(app) == {"Saved images": "3", "Model accuracy": accuracy(reader)} != {
        "Saved images": "3", "Model accuracy": "33.3%"}
    assert chart_urls(app) not in (relabelled, [])

    app.switch_page("pages/1_History.py")
    app.run()
    app.button(key=[b.key for b in app.button if b.key and b.key.startswith("delete-")][0]).click()
    app.run()
    assert app.success and len(saved_rows(reader)) == 2
    app.switch_page("app.py")
    app.run()
    after_delete = chart_urls(app)
    assert sidebar_metrics(app) == {"Saved images": "2", "Model accuracy": accuracy(reader)}
    assert after_delete not in (first, [])

    click(app, "Undo last change")  # the delete, taken back
    assert "1 restored" in shown(app.info[0].value)
    assert sidebar_metrics(app) == {"Saved images": "3", "Model accuracy": accuracy(reader)}
    assert chart_urls(app) not in (after_delete, [])

    click(app, "Clear database")
    click(app, "Yes, delete everything")
    assert sidebar_metrics(app) == {"Saved images": "0", "Model accuracy": "n/a"} and chart_urls(app) == []
    assert "Nothing saved yet" in app.sidebar.info[0].value
    reader.close()


def test_the_downloads_carry_what_the_pages_saved(backend, reader):
    save_three()
    saved = {record.source: record for record in reader.list_predictions()}
    status, body = export("cifar10_feedback.csv")
    assert status == 200
    table = list(csv.DictReader(io.StringIO(body.decode())))
    assert sorted((row["source"], row["final_label"], row["content_hash"]) for row in table) == sorted(
        (source, record.final_label, record.content_hash) for source, record in saved.items())
    status, body = export("cifar10_feedback.zip")
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert set(archive.namelist()) == {f"{r.final_label}/{r.image_file}" for r in saved.values()} | {"labels.csv"}
        for source, data in (("red.png", RED), ("blue.jpg", BLUE), ("green.png", GREEN)):
            assert archive.read(f"{saved[source].final_label}/{saved[source].image_file}") == data


def test_save_stores_a_thumbnail_and_history_shows_it_without_the_full_image(backend, reader):
    """History draws a page from the thumbnails stored with the records; it never needs the full images."""
    from PIL import Image

    from display import THUMBNAIL_SIZE

    plum = image_bytes("PNG", size=(90, 70), color=(123, 45, 67))  # a picture no other test shows History
    app = start_app()
    upload(app, [("plum.png", plum, "image/png")])
    click(app, "Save 1 image")
    [record] = reader.list_predictions()
    stored = reader.thumbnails([record])
    assert record.id in stored
    small = Image.open(io.BytesIO(stored[record.id]))
    assert small.format == "JPEG" and max(small.size) <= THUMBNAIL_SIZE
    reader.images.delete_many([record.image_file])  # the full image gone: only the stored thumbnail can show
    history = start_history()
    assert "image unavailable" not in [caption.value for caption in history.caption]
    assert len(history.get("image")) == 1


def edit_table(app: AppTest, edited_rows: dict[int, dict]) -> None:
    """What the browser sends when cells of the review table are edited. AppTest reads a data_editor but does not
    edit one (set_value raises), and a value put in session_state does not run its on_change; so the run gets the
    widget state a browser would send for it, with the rest of the page's widget states."""
    from streamlit.proto.WidgetStates_pb2 import WidgetState

    [editor] = app.data_editor
    states = app._tree.get_widget_states()
    states.widgets.append(WidgetState(id=editor.proto.id, string_value=json.dumps(
        {"edited_rows": {str(row): change for row, change in edited_rows.items()}, "added_rows": [],
         "deleted_rows": []})))
    app._run(states)
    assert not app.exception


def test_edits_made_in_the_table_view_are_saved(store_env):
    db_path, _ = store_env
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg"), ("green.png", GREEN, "image/png")])
    app.segmented_control[0].set_value("Table")
    app.run()
    [table] = app.data_editor
    sources = list(table.value["source"])  # flagged rows first: find each by its source
    assert sorted(sources) == ["blue.jpg", "green.png", "red.png"]
    predicted = dict(zip(sources, table.value["prediction"]))
    corrected = "frog" if predicted["blue.jpg"] != "frog" else "ship"
    edit_table(app, {sources.index("blue.jpg"): {"label": corrected}, sources.index("green.png"): {"label": "skip"}})
    labels = dict(zip(app.data_editor[0].value["source"], app.data_editor[0].value["label"]))
    assert labels == {"red.png": predicted["red.png"], "blue.jpg": corrected, "green.png": "skip"}
    click(app, "Save 2 images")
    assert [(source, final) for source, _, final, _, _ in rows(db_path)] == [("blue.jpg", corrected),
                                                                              ("red.png", predicted["red.png"])]


def test_history_date_filter_filters_and_a_new_filter_starts_at_page_1(store_env):
    import hashlib

    from db import NewPrediction, Store

    db_path, _ = store_env
    today = datetime.now(timezone.utc).date()
    old_day = today - timedelta(days=30)
    store = Store.from_env()
    store.save_predictions([NewPrediction(hashlib.sha256(f"dated {i}".encode()).hexdigest(), f"dated {i}".encode(),
                                          "png", f"record-{i:03d}.png", "cat", 0.5, ("cat", "dog")[i % 2], "t")
                            for i in range(110)])
    store.close()
    with sqlite3.connect(db_path) as connection:  # the first 60 were saved a month ago
        connection.execute("UPDATE predictions SET created_at = ? WHERE source < 'record-060.png'",
                           (f"{old_day.isoformat()}T12:00:00+00:00",))
    history = start_history()

    def page_sources() -> list[str]:
        return [shown(c.value).split(" · ")[0] for c in history.caption if c.value.startswith("record")]

    def next_page() -> None:
        [b for b in history.button if b.label == "Next page"][0].click()
        history.run()

    assert "110 of 110 saved images match. Page 1 of 3" in history.caption[0].value
    next_page()
    assert "Page 2 of 3" in history.caption[0].value
    history.date_input[0].set_value((old_day, old_day))
    history.run()
    assert "60 of 110 saved images match. Page 1 of 2" in history.caption[0].value
    shown_now = page_sources()
    next_page()
    assert "Page 2 of 2" in history.caption[0].value
    assert sorted(shown_now + page_sources()) == [f"record-{i:03d}.png" for i in range(60)]
    history.date_input[0].set_value((today, today))
    history.run()
    assert "50 of 110 saved images match. Page 1 of 1" in history.caption[0].value
    assert sorted(page_sources()) == [f"record-{i:03d}.png" for i in range(60, 110)]
    history.date_input[0].set_value((old_day, today))
    history.run()
    next_page()
    assert "110 of 110 saved images match. Page 2 of 3" in history.caption[0].value
    history.multiselect[0].set_value(["dog"])  # any filter, not only the dates, starts again at page 1
    history.run()
    assert "55 of 110 saved images match. Page 1 of 2" in history.caption[0].value


def test_the_model_cards_low_confidence_threshold_is_the_pages_default(store_env):
    card = json.loads((ROOT / "models" / "resnet18_cifar10.json").read_text())
    expected = round(card["low_confidence_threshold"] * 100)
    app = start_app()
    app.file_uploader[0].set_value([("red.png", RED, "image/png")])
    app.run()
    [slider] = app.slider
    assert slider.value == expected and 0 < expected < 100


# ---------------------------------------------------------------- one at a time, by keys; ZIPs; pages of 50

CLASS_KEYS = dict(zip(("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
                      "1234567890"))
POSITION = re.compile(r"^\*\*(\d+) of (\d+)\*\*")


def colour_pictures(count: int, size: tuple[int, int] = (40, 30)) -> list[tuple[str, bytes, str]]:
    """`count` small PNGs, each of its own colour."""
    return [(f"p{index:03d}.png", image_bytes("PNG", size=size, color=(index * 37 % 256, index * 91 % 256,
                                                                     (index * 53 + 40) % 256)), "image/png")
            for index in range(count)]


def review_as(app: AppTest, view: str) -> None:
    app.segmented_control[0].set_value(view)
    app.run()
    assert not app.exception


def position(app: AppTest) -> tuple[int, int, str]:
    """(n, total, source) of the picture the one-at-a-time view shows."""
    [text] = [m.value for m in app.markdown if POSITION.match(m.value)]
    number, total = map(int, POSITION.match(text).groups())
    return number, total, shown(text.split(" · ", 1)[1])


def press(app: AppTest, key: str) -> None:
    """What a key does in the browser: the button with that shortcut is clicked (AppTest has no keyboard)."""
    [button] = [b for b in app.button if b.proto.shortcut == key.lower()]  # Streamlit keeps them in lower case
    assert not button.disabled, key
    button.click()
    app.run()
    assert not app.exception


def table_column(app: AppTest, column: str) -> dict[str, str]:
    table = app.dataframe[0].value if app.dataframe else app.data_editor[0].value
    return dict(zip(table["source"], table[column]))


def test_one_at_a_time_by_keys_saves_exactly_the_labels_chosen_and_shares_them_with_cards_and_table(store_env):
    db_path, _ = store_env
    app = start_app()
    files = colour_pictures(6)
    upload(app, files)
    review_as(app, "Table")
    order = list(app.data_editor[0].value["source"])  # the review order: flagged first, then upload order
    predicted = table_column(app, "prediction")
    review_as(app, "One at a time")

    shortcuts = {b.label: b.proto.shortcut for b in app.button if b.proto.shortcut}
    assert {label: shortcuts[label] for label in CLASS_KEYS} == CLASS_KEYS
    assert shortcuts["Confirm"] == "enter" and shortcuts["Back"] == "backspace"
    assert shortcuts["Skip"] == "x" and shortcuts["Save 6 images"] == "ctrl+enter"
    assert any("Backspace" in m.value and "Ctrl+Enter" in m.value for m in app.markdown)  # the Keyboard help

    def other_than(source: str, start: int) -> str:
        labels = list(CLASS_KEYS)
        return next(label for label in labels[start:] + labels[:start] if label != predicted[source])

    expected = {}
    assert position(app) == (1, 6, order[0])
    stale = next(b for b in app.button if b.label == other_than(order[0], 0))
    press(app, "Enter")                       # 1: the prediction is right
    expected[order[0]] = predicted[order[0]]
    assert position(app) == (2, 6, order[1])
    stale.click().run()  # a key of picture 1 that arrives after the view left it is dropped, not given to picture 2
    assert position(app) == (2, 6, order[1])
    label = other_than(order[1], 3)
    press(app, CLASS_KEYS[label])             # 2: corrected with a digit
    expected[order[1]] = label
    press(app, "X")                           # 3: skipped
    label = other_than(order[3], 6)
    press(app, CLASS_KEYS[label])             # 4: corrected...
    assert position(app)[:2] == (5, 6)
    press(app, "Backspace")                   # ...revisited...
    assert position(app) == (4, 6, order[3])
    assert any(f"**{label}**" in m.value and "corrected" in m.value for m in app.markdown)
    label = other_than(order[3], 8)
    press(app, CLASS_KEYS[label])             # ...and changed
    expected[order[3]] = label
    press(app, "Enter")                       # 5: confirmed
    expected[order[4]] = predicted[order[4]]
    label = other_than(order[5], 1)
    press(app, CLASS_KEYS[label])             # 6: corrected
    expected[order[5]] = label
    assert not [m for m in app.markdown if POSITION.match(m.value)]
    assert "All 6 pictures reviewed" in app.success[0].value
    assert [b.label for b in app.button if b.proto.shortcut and not b.disabled] == ["Back", "Save 5 images"]

    # The choices are the page's: Cards and Table show them, and a change there shows here.
    review_as(app, "Cards")
    assert {name: label_box(app, name).value for name, _, _ in files} == {**expected, order[2]: "skip"}
    review_as(app, "Table")
    assert table_column(app, "label") == {**expected, order[2]: "skip"}
    edit_table(app, {0: {"label": "skip"}})
    del expected[order[0]]
    review_as(app, "One at a time")
    press(app, "Backspace")
    assert position(app) == (6, 6, order[5])
    for _ in range(5):
        press(app, "Backspace")
    assert position(app) == (1, 6, order[0]) and any("**skip**" in m.value for m in app.markdown)

    click(app, "Save 4 images")
    assert "Saved 4 images" in shown(app.success[0].value) and "2 marked skip" in shown(app.success[0].value)
    with sqlite3.connect(db_path) as connection:
        assert dict(connection.execute("SELECT source, final_label FROM predictions")) == expected
    click(app, "Undo last change")  # the same Save, with its undo
    assert rows(db_path) == []


def test_a_zip_of_images_is_read_member_by_member_and_bad_members_are_named(store_env):
    db_path, image_dir = store_env
    pictures = {name: data for (name, data, _) in colour_pictures(4)}
    members = {"../escape.png": pictures["p003.png"], "cat/": b"", "cat/a.png": pictures["p000.png"],
               "notes.txt": b"shopping list", "dog/deep/b.png": pictures["p001.png"], "flat.png": pictures["p002.png"],
               "__MACOSX/._flat.png": b"\x00\x05\x16\x07 resource fork", ".DS_Store": b"\x00\x00\x00\x01Bud1"}
    app = start_app()
    upload(app, [("photos.zip", zip_of(members), "application/zip"), ("single.jpg", BLUE, "image/jpeg"),
                 ("broken.zip", b"PK\x03\x04 not really", "application/zip")])
    errors = [shown(error.value) for error in app.error]
    assert len(errors) == 3, errors
    assert any("'photos.zip/notes.txt'" in error and "text file" in error for error in errors)
    assert any("../escape.png" in error and "unsafe path" in error for error in errors)
    assert any("'broken.zip'" in error and "not a readable ZIP" in error for error in errors)
    assert "4 images classified" in app.subheader[0].value
    assert app.file_uploader[0].value in (None, [])  # read: the uploader is free for the next ones
    upload(app, [("later.png", RED, "image/png")])  # more photos join those on the page
    assert "5 images classified" in app.subheader[0].value
    click(app, "Save 5 images")
    with sqlite3.connect(db_path) as connection:
        saved = dict(connection.execute("SELECT source, image_file FROM predictions"))
    assert sorted(saved) == ["later.png", "photos.zip/cat/a.png", "photos.zip/dog/deep/b.png", "photos.zip/flat.png",
                             "single.jpg"]
    # What is stored is the member's bytes exactly, as for any upload.
    assert (image_dir / saved["photos.zip/dog/deep/b.png"]).read_bytes() == members["dog/deep/b.png"]
    assert (image_dir / saved["single.jpg"]).read_bytes() == BLUE


def test_cards_and_table_show_50_pictures_a_page(store_env):
    app = start_app()
    files = colour_pictures(57, size=(16, 12))
    upload(app, files)
    assert "57 images classified" in app.subheader[0].value
    assert len(app.selectbox) == 50
    assert any("page 1 of 2" in c.value for c in app.caption)
    click(app, "Next page")
    assert len(app.selectbox) == 7
    review_as(app, "Table")
    assert len(app.data_editor[0].value) == 7  # the page stays when the view changes
    second = set(table_column(app, "source"))
    click(app, "Previous page")
    assert len(app.data_editor[0].value) == 50
    assert set(table_column(app, "source")) | second == {name for name, _, _ in files}


def padded_pictures(count: int, padding: int) -> list[tuple[str, bytes, str]]:
    """`count` tiny PNGs, each carrying `padding` random bytes in a private chunk: originals as big as photos that
    decode in a millisecond, each with its own hash."""
    import os

    from PIL import Image, PngImagePlugin

    files = []
    for index in range(count):
        extra = PngImagePlugin.PngInfo()
        extra.add(b"prVt", os.urandom(padding))
        buffer = io.BytesIO()
        Image.new("RGB", (32, 24), (index * 37 % 256, index * 91 % 256, 90)).save(buffer, "PNG", pnginfo=extra)
        files.append((f"padded-{index:02d}.png", buffer.getvalue(), "image/png"))
    return files


def test_a_save_is_one_transaction_read_from_disk_in_bounded_memory(backend, reader, monkeypatch):
    """16 originals of 2 MB go to the store 4 MB at a time, in one transaction: when the database refuses the last
    row, nothing of the Save is committed, no image is left behind and every label stays; the same Save then saves
    all of them, and one undo takes them all back. Memory holds one group of originals, not the 32 MB."""
    import tracemalloc

    import store as store_module
    from test_archive import refuse_to_insert

    monkeypatch.setattr(store_module, "SAVE_GROUP_BYTES", 4 << 20)
    files = padded_pictures(16, 2 << 20)
    total = sum(len(data) for _, data, _ in files)
    app = start_app()
    upload(app, files)
    review_as(app, "Table")
    order = list(app.data_editor[0].value["source"])
    edit_table(app, {0: {"label": "skip"}, 1: {"label": "frog"}})
    lift = refuse_to_insert(backend, order[-1])
    tracemalloc.start()
    try:
        click(app, "Save 15 images")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 2, f"{peak / 2**20:.0f} MB held while saving {total / 2**20:.0f} MB"
    message = shown(app.error[0].value)
    assert message.startswith("Nothing was saved:") and "refused the change (refused by a test trigger" in message
    assert saved_rows(reader) == [] and image_names(reader) == []
    assert table_column(app, "label")[order[0]] == "skip" and table_column(app, "label")[order[1]] == "frog"
    assert not [b for b in app.button if b.label == "Undo last change"]
    lift()
    click(app, "Save 15 images")
    assert "Saved 15 images" in app.success[0].value and "1 marked skip" in app.success[0].value
    saved = {record.source: record for record in reader.list_predictions()}
    assert sorted(saved) == sorted(order[1:]) and saved[order[1]].final_label == "frog"
    originals = {name: data for name, data, _ in files}
    assert all(reader.image_bytes(saved[name]) == originals[name] for name in (order[1], order[-1]))
    assert len(image_names(reader)) == 15
    click(app, "Undo last change")
    assert "Undid the save of 15 images: 15 removed" in shown(app.info[0].value)
    assert saved_rows(reader) == [] and image_names(reader) == []


def test_a_zip_may_be_far_bigger_than_one_image_but_each_file_keeps_the_image_limit(store_env, monkeypatch):
    """A 22 MB ZIP of two 11 MB pictures is read; a single 21 MB picture is refused by name and the rest of the
    batch goes on; a ZIP over the ZIP limit is refused by name."""
    import inputs

    members = dict((name, data) for name, data, _ in padded_pictures(2, 11 << 20))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(f"photos/{name}", data)
    big_zip = buffer.getvalue()
    [(_, huge, _)] = padded_pictures(1, 21 << 20)
    assert len(big_zip) > inputs.MAX_FILE_BYTES < len(huge)
    app = start_app()
    upload(app, [("big.zip", big_zip, "application/zip"), ("huge.png", huge, "image/png"),
                 ("red.png", RED, "image/png")])
    [error] = [shown(error.value) for error in app.error]
    assert error == "'huge.png' is 21.0 MB; one image may be at most 20 MB (a ZIP of images up to 2,048 MB)."
    assert "3 images classified" in app.subheader[0].value
    monkeypatch.setattr(inputs, "MAX_ZIP_BYTES", 16 << 20)
    upload(app, [("again.zip", big_zip, "application/zip"), ("blue.jpg", BLUE, "image/jpeg")])
    assert "'again.zip' is 22 MB; a ZIP may be at most 16 MB." in [shown(error.value) for error in app.error]
    assert "4 images classified" in app.subheader[0].value


def test_a_zip_of_many_small_bombs_is_read_only_up_to_100_times_its_size(store_env):
    """Members under 1 MB are not checked one by one for their ratio; together they may inflate 100 times the
    archive at most, or a 20 MB upload could fill the disk with gigabytes of zeros."""
    members = {"a.png": RED, **{f"zeros/{index:03d}.png": bytes(256 << 10) for index in range(40)}, "z.png": GREEN}
    app = start_app()
    upload(app, [("many.zip", zip_of(members), "application/zip")])
    errors = [shown(error.value) for error in app.error]
    assert [error for error in errors if "inflates to more than 100 times its size" in error] and len(errors) < 40
    assert "1 image classified" in app.subheader[0].value  # a.png, read before the limit; z.png after it


def test_two_zip_members_of_one_name_are_both_read(store_env):
    """A ZIP can hold one name twice (an archive appended to): each member is its own picture on the page."""
    pictures = [data for (_, data, _) in colour_pictures(3)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        for name, data in (("cat/a.png", pictures[0]), ("cat/a.png", pictures[1]), ("dog/b.png", pictures[2])):
            archive.writestr(name, data)
    app = start_app()
    upload(app, [("twice.zip", buffer.getvalue(), "application/zip")])
    assert not app.error and "3 images classified" in app.subheader[0].value


def test_a_zip_zipfile_will_not_open_is_named_and_the_picture_dropped_with_it_is_read(store_env):
    """Issue 27.2: a 214-byte ZIP whose headers say "version needed 6.4" raised NotImplementedError out of
    zipfile: the page showed a traceback with the server's paths, and the picture dropped after it was never read."""
    from test_inputs import version_6_4_zip

    app = start_app()
    upload(app, [("v64.zip", version_6_4_zip(), "application/zip"), ("red.png", RED, "image/png")])
    [error] = [shown(error.value) for error in app.error]
    assert error == "'v64.zip' is not a readable ZIP archive (zip file version 6.4)."
    assert "1 image classified" in app.subheader[0].value and len(app.selectbox) == 1


def test_an_error_no_page_foresaw_reaches_the_browser_without_its_details():
    """Issue 27.2: .streamlit/config.toml's client.showErrorDetails. Its type, message and traceback name the
    server's files: the browser gets Streamlit's generic words, the server's log the rest."""
    app = AppTest.from_string(f"raise RuntimeError('under {ROOT}')")
    app.run()
    [error] = app.exception
    assert error.message.startswith("This app has encountered an error.") and not error.stack_trace
    assert str(ROOT) not in str(error.proto) and "RuntimeError" not in str(error.proto)


def test_a_picture_sent_again_and_again_is_kept_once(store_env, local_server, monkeypatch):
    """Issue 27.4: a URL taken out of the box and pasted back, and a photo dropped again, were kept again each time:
    a page showing two pictures grew its spool with every edit, until it refused new pictures at its limit."""
    monkeypatch.setenv("CIFAR10_ALLOW_PRIVATE_URLS", "loopback")
    local_server.routes["/red.png"] = Route(body=RED)
    url = local_server.url("/red.png")
    app = start_app()
    for _ in range(3):
        app.text_area[0].input(url)
        app.run()
        app.text_area[0].input("")
        app.run()
        upload(app, [("blue.jpg", BLUE, "image/jpeg")])
    app.text_area[0].input(url)
    app.run()
    assert not app.exception and "2 images classified" in app.subheader[0].value
    assert app.session_state["review"].spool.size == len(RED) + len(BLUE)


def test_a_url_or_an_upload_the_disk_has_no_room_for_is_named_on_every_run(store_env, local_server, monkeypatch):
    """TMPDIR's disk full: a URL's OSError came out of every run of the page, and an upload got "an unforeseen
    error". Each is named, and the picture dropped with them is shown."""
    from test_spools import no_room_on_disk

    monkeypatch.setenv("CIFAR10_ALLOW_PRIVATE_URLS", "loopback")
    local_server.routes["/blue.jpg"] = Route(body=BLUE)
    url = local_server.url("/blue.jpg")
    app = start_app()
    no_room_on_disk(monkeypatch, of=lambda data: data in (BLUE, GREEN))
    app.text_area[0].input(url)
    app.run()
    upload(app, [("green.png", GREEN, "image/png"), ("red.png", RED, "image/png")])
    app.run()
    assert not app.exception
    no_room = "was left out: the server could not keep it on disk (No space left on device). Try again in a while."
    assert [shown(error.value) for error in app.error] == [f"'green.png' {no_room}", f"'{url}' {no_room}"]
    assert "1 image classified" in app.subheader[0].value
