"""What the pages say when the store is partly out of reach: a failing image store, a read-only database, a
brief outage; and the same picture given twice on one page. The real app through AppTest, on real stores."""

from __future__ import annotations

import hashlib
import shutil

import db
import store as store_module
from conftest import image_bytes, make_backend, shown
from test_app import BLUE, RED, click, start_app, start_history, upload
from test_db import _freeze_folder, _make_read_only, _wait_for, prediction


def test_delete_and_clear_with_an_image_folder_that_cannot_be_changed_say_what_happened(store_env, monkeypatch):
    """Round 2, 3: the rows went and the page said nothing had; Delete lost its undo. The images go once the
    folder can be changed again, without a restart."""
    monkeypatch.setattr(store_module, "CLEANUP_RETRY_S", 0.2)
    monkeypatch.setattr(store_module, "CLEANUP_RETRY_MAX_S", 0.4)  # no long backoff while the test waits
    db_path, image_dir = store_env
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg")])
    click(app, "Save 2 images")
    history = start_history()
    _freeze_folder(image_dir, True)
    try:
        history.button(key=[b.key for b in history.button if b.key and b.key.startswith("delete-")][0]).click()
        history.run()
        message = shown(history.success[0].value)
        assert message.startswith("Deleted ") and "1 image will be removed from the image folder" in message
        assert [b for b in history.button if b.label.startswith("Undo")]
        click(app, "Clear database")
        click(app, "Yes, delete everything")
        message = shown(app.success[0].value)
        assert "Database cleared: 1 saved image deleted." in message and "1 image will be removed" in message
        assert not app.error
    finally:
        _freeze_folder(image_dir, False)
    assert _wait_for(lambda: not any(image_dir.iterdir()))


def test_a_read_only_database_keeps_the_labels_on_the_page_and_history_readable(request, tmp_path, monkeypatch):
    """Round 2, 7: Save and Delete crashed the page on a read-only PostgreSQL, and a server started then could not
    open the store."""
    backend = make_backend("postgres", request, tmp_path, monkeypatch)
    url = backend.env["CIFAR10_DATABASE_URL"]
    backend.store().save_predictions([prediction("saved-before")])
    _make_read_only(url, True)
    try:
        app = start_app()
        assert app.sidebar.metric[0].value == "1" and not app.sidebar.error
        upload(app, [("red.png", RED, "image/png")])
        corrected = "ship" if app.selectbox[0].value != "ship" else "frog"
        app.selectbox[0].set_value(corrected)
        app.run()
        click(app, "Save 1 image")
        assert "read-only" in shown(app.error[0].value) and "Your labels are kept" in app.error[0].value
        assert app.selectbox[0].value == corrected
        history = start_history()
        assert "1 of 1 saved images match" in history.caption[0].value
        history.button(key=[b.key for b in history.button if b.key and b.key.startswith("delete-")][0]).click()
        history.run()
        assert "Nothing was deleted" in history.error[0].value and "read-only" in shown(history.error[0].value)
    finally:
        _make_read_only(url, False)
    click(app, "Save 1 image")
    assert "Saved 1 image" in app.success[0].value
    backend.close()


def test_history_shows_a_picture_again_after_a_brief_outage(store_env):
    """Round 2, 10: a record without a stored thumbnail showed 'image unavailable' for the life of the server
    after the image store failed once."""
    db_path, image_dir = store_env
    store = db.Store.from_env()
    data = image_bytes("PNG", size=(40, 30), color=(10, 200, 10))
    store.save_predictions([db.NewPrediction(hashlib.sha256(data).hexdigest(), data, "png", "green.png", "frog",
                                             0.9, "frog", "test@1")])
    store.close()
    shutil.move(image_dir, image_dir.with_name("away"))
    history = start_history()
    assert "image unavailable" in [caption.value for caption in history.caption]
    shutil.move(image_dir.with_name("away"), image_dir)
    history.run()
    assert "image unavailable" not in [caption.value for caption in history.caption]
    assert len(history.get("image")) == 1


def test_the_same_picture_twice_on_one_page_is_reviewed_and_saved_once(store_env):
    """Round 2, 10: two labels for one picture saved one record under a misleading message."""
    db_path, _ = store_env
    app = start_app()
    upload(app, [("red.png", RED, "image/png"), ("copy-of-red.png", RED, "image/png"),
                 ("blue.jpg", BLUE, "image/jpeg")])
    assert len(app.selectbox) == 2
    assert "copy-of-red.png is the same picture as red.png" in shown(app.info[0].value)
    click(app, "Save 2 images")
    assert shown(app.success[0].value) == "Saved 2 images."
    store = db.Store.from_env()
    assert sorted(record.source for record in store.list_predictions()) == ["blue.jpg", "red.png"]
    store.close()
