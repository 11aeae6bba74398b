"""Text never becomes markup: file names, URLs, sources, labels and model versions, from uploads and from imported
archives, are shown as text on every page; the CSV for spreadsheets cannot start a formula, while the ZIP's
labels.csv keeps every value exact for re-import."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import zipfile

import pytest
from streamlit.testing.v1 import AppTest

from archives import iter_csv, iter_zip
from conftest import ROOT, image_bytes, shown, without_code_spans
from db import NewPrediction, Store
from display import code_span, escape_markdown
from test_browser import app_run, new_page, open_app, streamlit_servers

RED = image_bytes("PNG", size=(64, 48), color=(220, 20, 20))
# A model_version from an imported archive: it closes a plain `...` code span around it, then links and shows
# an outside picture to every visitor.
HOSTILE_VERSION = "v1` [log in again](http://evil.example) ![x](http://evil.example/p.png) `"
HOSTILE_SOURCE = "www.evil.example/cat.png"
HOSTILE_LABEL = "[cat](https://evil.example/label)"
UPLOAD_NAME = "www.evil.example.png"
BROKEN_NAME = "user@evil.example.jpg"  # not an image: its name comes back in an error message

# Streamlit turns these into links, icons or arrows in the parsed text, however their characters were escaped.
REWRITTEN = re.compile(r"://|www\.|@|:material_|:streamlit:|(^|\s)(->|--)(\s|$)", re.IGNORECASE)


def left_to_rewrite(markdown: str) -> bool:
    """Whether Streamlit would link or rewrite some of the text outside code spans, as its parser hands it on."""
    return bool(REWRITTEN.search(shown(without_code_spans(markdown))))


def save_hostile_record() -> None:
    """A record as an imported archive or another client can leave it: free-text source, label and model version."""
    store = Store.from_env()
    store.save_predictions([NewPrediction(hashlib.sha256(RED).hexdigest(), RED, "png", HOSTILE_SOURCE, "cat", 0.9,
                                          HOSTILE_LABEL, HOSTILE_VERSION)])
    store.close()


@pytest.mark.parametrize("text", [
    HOSTILE_VERSION, HOSTILE_SOURCE, HOSTILE_LABEL, UPLOAD_NAME, BROKEN_NAME, "HTTPS://EVIL.EXAMPLE/a.png",
    "photo :material/home: :material_home: :streamlit: a -> b -- c.png", "``tick`` `` ` <b>x</b> &amp; $x$ :red[x]",
    "1. item\n# heading\n    code\n> quote | a | b |", "=HYPERLINK(\"http://evil.example\")", "x\x00y",
    " Its image follows."])
def test_escape_markdown_keeps_the_text_and_leaves_nothing_to_link(text):
    escaped = escape_markdown(text)
    assert shown(escaped) == re.sub(r"\s+", " ", text.replace("\x00", "\ufffd"))  # as HTML shows white space
    assert not left_to_rewrite(escaped)
    assert ":material/" not in escaped  # Streamlit rewrites it to :material_ in the source, before parsing
    assert not re.search(r"[!-/:-@\[-`{-~]", re.sub(r"\\.", "", without_code_spans(escaped)))  # the rest escaped
    assert "\n" not in escaped  # one paragraph: no list, heading, code block or quote can start
    as_code = code_span(text)  # how model versions are shown
    assert shown(as_code) == shown(escaped) and without_code_spans(as_code).strip() == ""


def start_app() -> AppTest:
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    app.run()
    assert not app.exception
    return app


def page_texts(app: AppTest) -> list[str]:
    """Every markdown the page shows: captions, paragraphs, alerts, button labels and tooltips."""
    elements = [*app.caption, *app.markdown, *app.error, *app.warning, *app.info, *app.success]
    return [element.value for element in elements] + [text for button in app.button
                                                       for text in (button.label, button.help) if text]


def assert_only_text(app: AppTest, *expected: str) -> None:
    """Each expected string is shown, and nothing on the page is left for Streamlit to link."""
    texts = page_texts(app)
    assert not [text for text in texts if left_to_rewrite(text)]
    for text in expected:
        assert any(text in shown(markdown) for markdown in texts), text


def test_main_page_shows_names_sources_and_labels_as_text(store_env):
    save_hostile_record()
    app = start_app()
    app.file_uploader[0].set_value([(UPLOAD_NAME, RED, "image/png"), (BROKEN_NAME, b"not a picture", "image/jpeg")])
    app.run()
    assert not app.exception
    assert_only_text(app, UPLOAD_NAME, BROKEN_NAME, f"as **{HOSTILE_LABEL}**")


def test_history_shows_sources_labels_and_model_versions_as_text(store_env):
    save_hostile_record()
    app = start_app()
    app.switch_page("pages/1_History.py")
    app.run()
    assert_only_text(app, f"**{HOSTILE_LABEL}** · corrected from **cat**", HOSTILE_SOURCE + " · ",
                     f" · model {HOSTILE_VERSION}")
    app.button(key=[button.key for button in app.button if (button.key or "").startswith("delete-")][0]).click()
    app.run()
    assert_only_text(app, f"Deleted {HOSTILE_SOURCE}.", f"Undo the last delete of {HOSTILE_SOURCE}")
    app.switch_page("app.py")  # the main page offers the same undo, its tooltip naming the record
    app.run()
    assert_only_text(app, f"Take back the delete of {HOSTILE_SOURCE}.")


def test_hostile_text_renders_as_text_in_a_real_browser(browser, store_env, tmp_path):
    """What Chromium draws on both pages: no link or picture pointing outside, nothing fetched from outside, and the
    text as written."""
    db_path, image_dir = store_env
    save_hostile_record()
    requested: list[str] = []

    def outside_addresses(page) -> list[str]:
        links = page.eval_on_selector_all("a[href]", "nodes => nodes.map(node => node.href)")
        pictures = page.eval_on_selector_all("img[src]", "nodes => nodes.map(node => node.src)")
        return [address for address in links + pictures + requested if "evil" in address]

    with streamlit_servers({"CIFAR10_DB_PATH": str(db_path), "CIFAR10_IMAGE_DIR": str(image_dir)},
                           [tmp_path / "server.log"]) as [server]:
        page = new_page(browser)
        page.on("request", lambda request: requested.append(request.url))
        open_app(page, server.url)
        with app_run(page):
            page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files([
                {"name": UPLOAD_NAME, "mimeType": "image/png", "buffer": RED},
                {"name": BROKEN_NAME, "mimeType": "image/jpeg", "buffer": b"not a picture"}])
        page.get_by_text("1 image classified").wait_for(timeout=60_000)
        assert outside_addresses(page) == []
        main = page.locator('[data-testid="stMain"]').inner_text()
        assert UPLOAD_NAME in main and BROKEN_NAME in main and f"as {HOSTILE_LABEL}." in main

        with app_run(page):
            page.get_by_role("link", name="History").click()
        page.get_by_text("1 of 1 saved images match").wait_for(timeout=30_000)
        assert outside_addresses(page) == []
        history = page.locator('[data-testid="stMain"]').inner_text()
        assert HOSTILE_SOURCE in history and HOSTILE_LABEL in history and f"model {HOSTILE_VERSION}" in history


FORMULAS = ["=HYPERLINK(\"http://evil.example\",\"open\")", "+1+2.png", "-3.png", "@SUM(1).png", "\tx.png",
            "\rx.png"]


def test_csv_for_spreadsheets_cannot_start_a_formula_and_the_zip_keeps_exact_values(backend):
    store = backend.store()
    sources = [*FORMULAS, "plain.png"]
    pictures = [image_bytes(color=(index * 40, 0, 0)) for index in range(len(sources))]
    store.save_predictions([NewPrediction(hashlib.sha256(data).hexdigest(), data, "png", source, "cat", 0.5, "dog",
                                          "=1+1", ood_score=-1.5) for data, source in zip(pictures, sources)])

    rows = list(csv.DictReader(io.StringIO(b"".join(iter_csv(store)).decode(), newline="")))
    assert sorted(row["source"] for row in rows) == sorted(["'" + source for source in FORMULAS] + ["plain.png"])
    assert {row["model_version"] for row in rows} == {"'=1+1"}
    assert {row["ood_score"] for row in rows} == {"-1.5"}  # a number is a number, not a formula

    with zipfile.ZipFile(io.BytesIO(b"".join(iter_zip(store)))) as archive:
        manifest = list(csv.DictReader(io.StringIO(archive.read("labels.csv").decode(), newline="")))
    assert sorted(row["source"] for row in manifest) == sorted(sources)
    assert {row["model_version"] for row in manifest} == {"=1+1"}
