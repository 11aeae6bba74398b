"""The real app.py through Streamlit's AppTest: upload, URLs, corrections, Save, charts, clearing."""

from __future__ import annotations

import re
import sqlite3

import pytest
from streamlit.testing.v1 import AppTest

from conftest import ROOT, Route, image_bytes

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


def unescape(text: str) -> str:
    return text.replace("\\", "")


def rows(db_path) -> list[tuple]:
    with sqlite3.connect(db_path) as connection:
        return connection.execute(
            "SELECT source, predicted_label, final_label, is_correct, image_file FROM predictions ORDER BY source").fetchall()


def sidebar_metrics(app: AppTest) -> dict[str, str]:
    return {metric.label: metric.value for metric in app.sidebar.metric}


def label_box(app: AppTest, source: str):
    """The label selectbox on the card of this source (flagged cards come first, so not upload order)."""
    names = [unescape(c.value) for c in app.caption if c.value and not c.value.startswith(("Already", "·"))]
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


def test_upload_correct_and_save(store_env):
    db_path, image_dir = store_env
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg"), ("notes.jpg", b"hello", "image/jpeg")])
    assert len(app.selectbox) == 2
    [error] = app.error
    assert "notes.jpg" in unescape(error.value) and "text file" in error.value
    predicted = {name: label_box(app, name).value for name in ("red.png", "blue.jpg")}
    corrected = "cat" if predicted["blue.jpg"] != "cat" else "dog"
    label_box(app, "blue.jpg").set_value(corrected)
    app.run()
    click(app, "Save 2 images")
    assert "Saved 2 images" in app.success[0].value
    saved = rows(db_path)
    assert [(source, final) for source, _, final, _, _ in saved] == [("blue.jpg", corrected),
                                                                      ("red.png", predicted["red.png"])]
    assert [correct for *_, correct, _ in saved] == [0, 1]
    assert sorted(path.name for path in image_dir.iterdir()) == sorted(file for *_, file in saved)
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


def test_correcting_an_image_saved_before_updates_it_and_undo_restores_the_old_label(store_env):
    db_path, _ = store_env
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg")])
    predicted = label_box(app, "red.png").value
    click(app, "Save")
    corrected = "truck" if predicted != "truck" else "ship"
    label_box(app, "red.png").set_value(corrected)
    app.run()
    click(app, "Save")
    message = unescape(app.success[0].value)
    assert "Updated the label of 1 image saved before" in message and "1 already saved" in message
    assert [(source, final) for source, _, final, _, _ in rows(db_path)][1] == ("red.png", corrected)
    assert sidebar_metrics(app)["Model accuracy"] == "50.0%"
    click(app, "Undo last change")
    assert "given back its old label" in unescape(app.info[0].value)
    assert [(source, final) for source, _, final, _, _ in rows(db_path)] == [
        ("blue.jpg", label_box(app, "blue.jpg").value), ("red.png", predicted)]


def test_an_image_already_saved_says_so(store_env):
    app = start_app()
    upload(app, [("red.png", RED, "image/png")])
    click(app, "Save")
    fresh = start_app()
    upload(fresh, [("copy-of-red.png", RED, "image/png")])
    assert any("Already saved" in caption.value for caption in fresh.caption)


def test_clear_database_asks_first(store_env):
    db_path, image_dir = store_env
    app = start_app()
    upload(app, [("red.png", RED, "image/png")])
    click(app, "Save")
    click(app, "Clear database")
    assert "cannot be undone" in app.sidebar.warning[0].value
    assert len(rows(db_path)) == 1
    click(app, "Cancel")
    assert len(rows(db_path)) == 1 and not app.sidebar.warning
    click(app, "Clear database")
    click(app, "Yes, delete everything")
    assert rows(db_path) == [] and list(image_dir.iterdir()) == []
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
    errors = [unescape(error.value) for error in app.error]
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
    assert any(unescape(caption) == name for caption in captions)
    # Every character that could start a link, HTML tag, emphasis or directive arrives escaped.
    assert not any(re.search(r"(?<!\\)[\[\]<>*:]", caption) for caption in captions if unescape(caption) == name)
    click(app, "Save")
    [(source, *_, image_file)] = rows(db_path)
    assert source == name and "/" not in image_file and len(image_file.split(".")[0]) == 64
    assert [path.name for path in image_dir.iterdir()] == [image_file]


def save_three(store_env) -> AppTest:
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg"), ("green.png", GREEN, "image/png")])
    predicted = label_box(app, "red.png").value
    label_box(app, "red.png").set_value("truck" if predicted != "truck" else "ship")
    app.run()
    click(app, "Save 3 images")
    return app


def test_undo_the_last_save(store_env):
    db_path, image_dir = store_env
    app = save_three(store_env)
    assert len(rows(db_path)) == 3
    click(app, "Undo last change")
    assert rows(db_path) == [] and list(image_dir.iterdir()) == []
    assert "Undid the save of 3 images: 3 removed" in unescape(app.info[0].value)
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
    shown = [undo.label, app.success[0].value]
    app.switch_page("app.py")  # the main page offers the same undo, its tooltip naming the file
    app.run()
    [undo] = [b for b in app.button if b.label == "Undo last change"]
    shown.append(undo.help)
    undo.click()
    app.run()
    shown.append(app.info[0].value)
    for text in shown:
        assert name in unescape(text)
        assert not re.search(r"(?<!\\)[\[\]<>*]", text), text  # every link, tag and emphasis character escaped
    assert "1 restored" in shown[-1]


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
    shown = [unescape(c.value) for c in app.caption if unescape(c.value) in {name for name, _, _ in files}]
    assert shown == ["2.png", "4.png", "0.png", "1.png", "3.png"]
    assert len([m for m in app.markdown if "Maybe none of these classes" in m.value]) == 2
    assert "2 as maybe none of these classes" in app.caption[1].value
    label_box(app, "4.png").set_value("skip")
    label_box(app, "2.png").set_value("frog")  # a person can still save a flagged image, with any label
    app.run()
    click(app, "Save 4 images")
    assert "1 marked skip, not saved" in unescape(app.success[0].value)
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

    def shown() -> list[str]:
        return [unescape(c.value) for c in app.caption if unescape(c.value) in {name for name, _, _ in files}]

    assert shown() == [name for name, _, _ in files]  # nothing flagged: upload order
    for threshold, flagged in ((60, [1, 3]), (75, [1, 2, 3])):  # flagged first, each part in upload order
        app.slider[0].set_value(threshold)
        app.run()
        assert shown() == [f"{i}.png" for i in flagged + [i for i in range(5) if i not in flagged]]
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


def test_history_lists_filters_deletes_and_undoes(store_env):
    db_path, image_dir = store_env
    save_three(store_env)
    history = start_history()
    assert "3 of 3 saved images match" in history.caption[0].value and len(history.get("image")) == 3
    history.toggle[0].set_value(True)
    history.run()
    assert "1 of 3 saved images match" in history.caption[0].value
    assert "corrected from" in history.markdown[0].value
    history.toggle[0].set_value(False)
    history.multiselect[0].set_value(["frog", "bird"])
    history.run()
    expected = sum(1 for _, _, final, _, _ in rows(db_path) if final in ("frog", "bird"))
    assert f"{expected} of 3 saved images match" in history.caption[0].value
    history.multiselect[0].set_value([])
    history.run()

    victim_source = unescape(history.caption[1].value).split(" · ")[0]
    history.button(key=[b.key for b in history.button if b.key and b.key.startswith("delete-")][0]).click()
    history.run()
    assert victim_source not in [source for source, *_ in rows(db_path)] and len(rows(db_path)) == 2
    assert len(list(image_dir.iterdir())) == 2
    [undo] = [b for b in history.button if b.label.startswith("Undo")]
    undo.click()
    history.run()
    assert len(rows(db_path)) == 3 and len(list(image_dir.iterdir())) == 3


def test_history_links_both_streamed_downloads_and_has_an_empty_state(store_env):
    history = start_history()
    assert "Nothing saved yet" in history.info[0].value
    save_three(store_env)
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

    def shown() -> list[str]:
        return [unescape(c.value).split(" · ")[0] for c in history.caption if c.value.startswith("record")]

    first = shown()
    assert len(first) == 50
    [next_page] = [b for b in history.button if b.label == "Next page"]
    next_page.click()
    history.run()
    second = shown()
    assert "Page 2 of 3" in history.caption[0].value and len(second) == 50 and not set(first) & set(second)
    [b for b in history.button if b.label == "Next page"][0].click()
    history.run()
    assert len(shown()) == 20 and [b for b in history.button if b.label == "Next page"][0].disabled
    assert len(set(first) | set(second) | set(shown())) == 120


def test_history_delete_needs_the_admin_password_when_one_is_set(store_env, monkeypatch):
    db_path, _ = store_env
    save_three(store_env)
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
    errors = [unescape(error.value) for error in app.error]
    assert len(errors) == len(bad)
    for name, error in zip(bad, errors):
        assert f"'{name}'" in error
    assert len(app.selectbox) == 1
    click(app, "Save 1 image")
    assert [source for source, *_ in rows(db_path)] == ["good.png"] and len(list(image_dir.iterdir())) == 1


def test_upload_limit_in_config_matches_the_server_check():
    import tomllib

    import inputs

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] * 2**20 == inputs.MAX_FILE_BYTES


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
        assert "PostgreSQL database at 127.0.0.1" in unescape(sidebar_error) and "CIFAR10\\_DATABASE\\_URL" in sidebar_error
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
    message = unescape(app.sidebar.error[0].value)
    assert "object store s3://cifar10-tests/app-creds" in message and "AWS_SECRET_ACCESS_KEY" in message
    upload(app, [("red.png", RED, "image/png")])
    assert len(app.selectbox) == 1  # classifying needs no store
