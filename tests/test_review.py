"""review.py without Streamlit: the inputs a page takes (spooled on disk, decoded and classified by the shipped
model, URLs from a real HTTP server), the order the views show, what each key of the one-at-a-time view does to the
place and the labels, and what a Save hands to the store."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import tracemalloc
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import example, given, settings

from classifier import Prediction
from conftest import ROOT, Route, files_held_open, image_bytes, zip_of
import review as review_module
from inputs import MAX_ZIP_ENTRIES, UNFORESEEN, zip_images
from review import BACK, CONFIRM, PAGE_SIZE, SKIP, Classified, Review, SessionReviews
from test_inputs import mutated_zips, needing_version_6_4, with_a_nameless_member
from test_spools import no_room_on_disk, spool_folder  # noqa: F401 (a fixture)

RED = image_bytes("PNG", size=(40, 30), color=(220, 20, 20))
BLUE = image_bytes("JPEG", size=(40, 30), color=(20, 40, 220))
GREEN = image_bytes("PNG", size=(40, 30), color=(20, 200, 40))


def add_picture(review: Review, key: str, label: str = "cat", confidence: float = 0.9, is_ood: bool = False) -> None:
    """A picture as the model would have left it on the page, with the prediction chosen by the test."""
    data = key.encode()
    review.results[key] = Classified(key, hashlib.sha256(data).hexdigest(), "png", (0, len(data)),
                                     Prediction(label, confidence, [(label, confidence)], [], 0.0, is_ood), "v1",
                                     b"", b"", b"")


def shown(review: Review, threshold: float = 0.75) -> str | None:
    """The key of the picture the one-at-a-time view shows (None: past the last)."""
    keys = [key for key, _ in review.ordered(threshold)]
    index = review.position(keys)
    return keys[index] if index < len(keys) else None


def labels_given(review: Review) -> dict[str, str]:
    """The label each picture on the page was given, by the input that lists it."""
    return {key: review.chosen(item) for key, item in review.items() if review.chosen(item) is not None}


def read_everything(review: Review, classifier) -> None:
    with ThreadPoolExecutor(2) as pool:
        while review.pending:
            review.classify_next(classifier.predict, pool, classifier.version)


def test_each_key_labels_the_picture_on_the_screen_and_moves_in_review_order():
    review = Review()
    add_picture(review, "sure", "cat", 0.9)
    add_picture(review, "unsure", "dog", 0.5)
    add_picture(review, "unknown", "frog", 0.95, is_ood=True)
    add_picture(review, "also-sure", "ship", 0.99)
    assert [key for key, _ in review.ordered(0.75)] == ["unsure", "unknown", "sure", "also-sure"]  # flagged first
    assert shown(review) == "unsure"
    review.press("bird", "unsure", 0.75)         # a class, then the next picture
    assert shown(review) == "unknown" and labels_given(review) == {"unsure": "bird"}
    review.press("truck", "unsure", 0.75)        # a key of the picture the view has left: dropped
    assert shown(review) == "unknown" and labels_given(review) == {"unsure": "bird"}
    review.press(CONFIRM, "unknown", 0.75)       # the prediction
    review.press(SKIP, "sure", 0.75)
    review.press(BACK, "also-sure", 0.75)        # back, to change it
    assert shown(review) == "sure"
    review.press("horse", "sure", 0.75)
    review.press(CONFIRM, "also-sure", 0.75)
    assert shown(review) is None                 # past the last: only Back moves
    review.press("cat", None, 0.75)
    assert shown(review) is None
    assert labels_given(review) == {"unsure": "bird", "unknown": "frog", "sure": "horse", "also-sure": "ship"}
    for _ in range(6):
        review.press(BACK, shown(review), 0.75)
    assert shown(review) == "unsure"             # and no further than the first
    assert [key for key, _ in review.to_save()] == ["sure", "unsure", "unknown", "also-sure"]
    review.label("sure", SKIP)                   # a choice made in Cards or Table
    review.label("also-sure", "not a class")
    assert [key for key, _ in review.to_save()] == ["unsure", "unknown", "also-sure"]


def test_the_view_stays_at_its_picture_whatever_comes_before_it_and_keeps_its_place_when_it_leaves():
    review = Review()
    for index in range(3):
        add_picture(review, f"p{index}")
    review.press(CONFIRM, "p0", 0.75)
    assert shown(review) == "p1"
    add_picture(review, "flagged", confidence=0.1)  # read later, listed first
    assert shown(review) == "p1" and review.position([key for key, _ in review.ordered(0.75)]) == 2
    del review.results["p1"]                        # its URL taken out of the box: the place stays
    assert shown(review) == "p2"


def test_moving_in_the_one_at_a_time_view_opens_cards_and_table_on_its_page():
    review = Review()
    for index in range(PAGE_SIZE + 7):
        add_picture(review, f"p{index:03d}")
    keys = [key for key, _ in review.items()]
    review.go_to(keys, PAGE_SIZE + 2)
    start, shown_on_page = review.page_of(review.items())
    assert review.page == 2 and start == PAGE_SIZE and [key for key, _ in shown_on_page] == keys[PAGE_SIZE:]
    review.page = 9                                  # out of range: the last page
    assert len(review.page_of(review.items())[1]) == 7 and review.page == 2
    review.go_to(keys, len(keys))                    # past the last: the last page
    assert review.page == 2 and review.at_key is None


def test_inputs_are_read_in_order_each_picture_once_and_a_url_leaves_with_its_line(classifier, local_server,
                                                                                   allow_loopback_urls):
    local_server.routes["/blue.jpg"] = Route(body=BLUE, headers={"Content-Type": "image/jpeg"})
    local_server.routes["/red-again.png"] = Route(body=RED, headers={"Content-Type": "image/png"})
    blue, red_again, missing = (local_server.url(path) for path in ("/blue.jpg", "/red-again.png", "/gone.png"))
    review = Review()
    review.take_urls([missing, red_again, blue])
    review.take_upload("u1", "red.png", io.BytesIO(RED))
    review.take_upload("u2", "green.png", io.BytesIO(GREEN))
    review.take_upload("u3", "notes.png", io.BytesIO(b"shopping list"))
    read_everything(review, classifier)
    # Uploads first, as read; then URLs, as in the box; the same picture twice is one picture on the page.
    assert [item.source for _, item in review.items()] == ["red.png", "green.png", blue]
    assert review.duplicates() == [(red_again, "red.png")]
    assert [error.split(" ", 1)[0] for error in review.errors()] == ["'notes.png'", f"{missing!r}"]
    assert review.failed_urls() == [f"url-{missing}"]
    requests = len(local_server.requests)
    review.take_urls([missing, red_again, blue])     # the same box again: nothing is fetched again
    assert len(local_server.requests) == requests
    review.forget(review.failed_urls())              # Retry: fetched again
    review.take_urls([missing, red_again, blue])
    assert len(local_server.requests) == requests + 1
    review.take_urls([red_again])                    # lines taken out of the box leave the page
    read_everything(review, classifier)
    assert [item.source for _, item in review.items()] == ["red.png", "green.png"] and not review.failed_urls()


def test_a_save_takes_the_labels_chosen_and_reads_each_original_back_byte_for_byte(classifier):
    review = Review()
    for index, (name, data) in enumerate((("red.png", RED), ("blue.jpg", BLUE), ("green.png", GREEN))):
        review.take_upload(f"u{index}", name, io.BytesIO(data))
    read_everything(review, classifier)
    (_, red), (blue_key, _), (green_key, _) = review.items()
    review.label(blue_key, SKIP)
    review.label(green_key, "deer")
    predictions = review.predictions()
    assert [(p.source, p.final_label, p.data, p.model_version) for p in predictions] == [
        ("red.png", red.prediction.label, b"", classifier.version), ("green.png", "deer", b"", classifier.version)]
    assert all(p.thumbnail for p in predictions)
    read = review.original_reader()
    assert [read(p) for p in predictions] == [RED, GREEN]
    review.close()
    assert review.spool is None


def test_pictures_that_arrive_ahead_of_the_view_are_still_shown_before_all_are_reviewed():
    """A batch read while a person reviews can put flagged pictures before the one on the screen: the view comes
    back for them, and says all are reviewed only once each has had its key."""
    review = Review()
    for name in ("a", "b", "c"):
        add_picture(review, name, "cat", 0.9)
    review.press(CONFIRM, "a", 0.75)
    assert shown(review) == "b"
    add_picture(review, "late-unsure", "dog", 0.5)   # listed first, before "b"
    review.press(CONFIRM, "b", 0.75)
    review.press(CONFIRM, "c", 0.75)
    assert shown(review) == "late-unsure"
    review.press("frog", "late-unsure", 0.75)
    assert shown(review) is None and set(labels_given(review)) == {"a", "b", "c", "late-unsure"}
    add_picture(review, "late-sure", "ship", 0.99)    # after everything was reviewed: the view shows it
    assert shown(review) == "late-sure"


def test_a_label_belongs_to_the_picture_not_to_the_input_that_brought_it(classifier, local_server, monkeypatch):
    """The same picture by URL and by upload is one picture: labelled while its URL listed it, it keeps that label
    (and counts as reviewed in the one-at-a-time view) once an upload of it lists it instead, or the URL leaves."""
    monkeypatch.setenv("CIFAR10_ALLOW_PRIVATE_URLS", "loopback")
    local_server.routes["/red.png"] = Route(body=RED)
    url = local_server.url("/red.png")
    review = Review()
    review.take_urls([url])
    read_everything(review, classifier)
    assert shown(review, 0.0) == f"url-{url}"
    review.press("frog", f"url-{url}", 0.0)          # its key, while the URL lists it
    review.take_upload("upload-1", "red copy.png", io.BytesIO(RED))
    review.take_upload("upload-2", "blue.jpg", io.BytesIO(BLUE))
    read_everything(review, classifier)
    [(red_key, red), _] = review.items()
    assert red_key == "file-upload-1"                # uploads list first: the upload lists the red picture now
    assert review.final_label(red) == "frog" and review.chosen(red) == "frog"
    assert shown(review, 0.0) == "file-upload-2"    # the red one has had its key: the view does not go back to it
    review.take_urls([])                             # the URL leaves the box; the upload of the same picture stays
    review.label("file-upload-2", SKIP)
    assert [(prediction.source, prediction.final_label) for prediction in review.predictions()] == [
        ("red copy.png", "frog")]


def test_a_zip_member_that_is_no_image_is_named_and_never_spooled():
    """Whether a member is an image its first bytes say: one that is not (a text, a megabyte of noise) is left out
    with its name and what it is, before the rest of it is inflated and kept on disk."""
    review = Review()
    noise = random.Random(0).randbytes(1 << 20)
    review.take_upload("1", "mixed.zip", io.BytesIO(zip_of({"noise.png": noise, "red.png": RED,
                                                              "notes.txt": b"shopping list"})))
    assert review.spool.size == len(RED)
    assert [pending.source for pending in review.pending] == ["mixed.zip/red.png"]
    errors = review.errors()
    assert len(errors) == 2
    assert any(error.startswith("'mixed.zip/noise.png' is not an image") for error in errors)
    assert any(error.startswith("'mixed.zip/notes.txt' is a text file, not an accepted image") for error in errors)


def lying_about_its_count(archive: bytes) -> io.BytesIO:
    """The same ZIP with its end record claiming a single entry (zipfile reads the directory by its size anyway)."""
    data = bytearray(archive)
    end = data.rindex(b"PK\x05\x06")
    data[end + 8:end + 12] = struct.pack("<HH", 1, 1)  # entries on this disk, entries in all
    return io.BytesIO(bytes(data))


@pytest.mark.parametrize("end_record", ["honest", "lying"])
def test_a_zip_listing_more_entries_than_a_page_may_take_is_refused_before_its_directory_is_read(end_record):
    """A few megabytes of ZIP can list a million empty entries, and zipfile builds an object for each when it opens
    the archive (607 MB for a million): the directory's entries are counted first, header by header, whatever the
    archive's end record claims."""
    members = zip_of({f"{index}.png": b"" for index in range(MAX_ZIP_ENTRIES + 1)})
    archive = lying_about_its_count(members) if end_record == "lying" else io.BytesIO(members)
    tracemalloc.start()
    try:
        results = list(zip_images(archive, "many.zip"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert results == [("many.zip", None, f"'many.zip' lists more than {MAX_ZIP_ENTRIES:,} entries, the most a ZIP "
                                          "may list (files, folders and the hidden files of macOS).")]
    assert peak < 2 << 20, f"{peak / 2**20:.1f} MB held to refuse it"


def test_a_zip_whose_end_record_lies_about_a_few_entries_is_read_whole():
    archive = lying_about_its_count(zip_of({"red.png": RED, "blue.jpg": BLUE}))
    assert [(name, error) for name, _, error in zip_images(archive, "two.zip")] == [
        ("two.zip/red.png", None), ("two.zip/blue.jpg", None)]


def test_a_page_holds_at_most_its_spool_limit_of_originals(monkeypatch):
    """Uploads are kept on disk until Save and Clear all: one page may not fill the server's disk. What would pass
    the limit is named, and the pictures already on the page stay."""
    monkeypatch.setattr(review_module, "MAX_SPOOL_BYTES", len(RED) + len(BLUE))
    review = Review()
    for upload_id, name, data in (("1", "red.png", RED), ("2", "blue.jpg", BLUE), ("3", "green.png", GREEN)):
        review.take_upload(upload_id, name, io.BytesIO(data))
    assert [pending.source for pending in review.pending] == ["red.png", "blue.jpg"]
    [error] = review.errors()
    assert error.startswith("'green.png' was left out: this page already holds")
    assert review.spool.size == len(RED) + len(BLUE)


def test_a_session_s_originals_go_once_streamlit_holds_it_no_more_and_never_under_a_save():
    """The sweep closes the spool of a session Streamlit dropped, not of one it keeps for a reconnection, and not
    while a Save or a read still uses it (then the next sweep does)."""
    sessions = SessionReviews()
    kept, gone, saving = Review(), Review(), Review()
    for session_id, review in (("kept", kept), ("gone", gone), ("saving", saving)):
        review.queue("file-1", "red.png", RED)
        sessions.seen(session_id, review)
    held = {"kept"}.__contains__
    with saving.in_use():
        assert sessions.sweep(held) == 1
        assert gone.spool is None and kept.spool.read((0, len(RED))) == RED and saving.spool is not None
    assert sessions.sweep(held) == 1 and saving.spool is None
    assert sessions.sweep(held) == 0 and kept.spool is not None
    replaced = Review()  # Clear all gives the session a new Review: that one is the session's now
    replaced.queue("file-2", "blue.jpg", BLUE)
    sessions.seen("kept", replaced)
    assert sessions.sweep(lambda session_id: False) == 1 and replaced.spool is None and kept.spool is not None


def pictures_zip() -> tuple[bytes, dict[str, bytes]]:
    """A valid ZIP of three pictures, stored and deflated, in folders and not, and its members."""
    members = {"cat/a.png": image_bytes("PNG", size=(16, 12), color=(250, 200, 0)),
               "dog/b.jpg": image_bytes("JPEG", size=(16, 12), color=(0, 90, 250)),
               "c.gif": image_bytes("GIF", size=(16, 12), color=(120, 0, 160))}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for (name, data), method in zip(members.items(), (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED,
                                                           zipfile.ZIP_STORED)):
            archive.writestr(name, data, compress_type=method)
    return buffer.getvalue(), members


PICTURES_ZIP, PICTURES = pictures_zip()
# What a message must never show a browser: a traceback, or where the server keeps its code.
SERVER_DETAILS = ("Traceback", 'File "', str(ROOT), "site-packages", "/usr/lib/", ".pyenv")


def same_prediction(images: list) -> list[Prediction]:
    """The model's place where what it says does not matter: the shipped one takes half a second a batch here, and
    hundreds of ZIPs go through the test below."""
    return [Prediction("cat", 0.9, [("cat", 0.9)], [], 0.0, False) for _ in images]


def read_with_same_prediction(review: Review) -> None:
    with ThreadPoolExecutor(2) as pool:
        while review.pending:
            review.classify_next(same_prediction, pool, "v1")


@settings(max_examples=300, deadline=None)
@given(mutated_zips(PICTURES_ZIP))
@example(needing_version_6_4(PICTURES_ZIP))
@example(with_a_nameless_member(PICTURES_ZIP))
def test_any_zip_of_pictures_whatever_its_headers_say_is_read_or_refused_by_name_and_the_drop_goes_on(mutant):
    """Issue 27.2: whatever a ZIP's headers say (versions, flags, methods, sizes, offsets, name lengths, counts),
    its pictures are on the page or it and its members are named in errors that say what is wrong, nothing escapes
    to the page, and the picture dropped after it is read."""
    review = Review()
    try:
        review.take_upload("zip", "mutant.zip", io.BytesIO(mutant))
        review.take_upload("png", "green.png", io.BytesIO(GREEN))
        read_with_same_prediction(review)
        on_page = {item.content_hash: item.source for _, item in review.items()}
        assert on_page.get(hashlib.sha256(GREEN).hexdigest()) == "green.png"
        for name, data in PICTURES.items():  # on the page, or the ZIP is named in an error
            assert hashlib.sha256(data).hexdigest() in on_page or any(
                error.startswith("'mutant.zip") for error in review.errors()), name
        for key, result in review.results.items():  # each error of the ZIP names it, or it and a member of it
            assert not (key.startswith("file-zip") and isinstance(result, str)) or result.startswith("'mutant.zip"), \
                result
        for error in review.errors():
            assert not any(detail in error for detail in SERVER_DETAILS), error
            assert UNFORESEEN not in error, error  # each refusal says what is wrong, not "an unforeseen error"
    finally:
        review.close()


def test_a_url_whose_body_is_not_the_gzip_it_says_is_named_and_the_other_urls_are_read(local_server,
                                                                                       allow_loopback_urls):
    """urllib3's DecodeError is no requests error: it came out of the fetch, and the page showed a traceback."""
    local_server.routes["/red.png"] = Route(body=RED)
    local_server.routes["/lying.png"] = Route(body=RED, headers={"Content-Encoding": "gzip"})
    lying, red = local_server.url("/lying.png"), local_server.url("/red.png")
    review = Review()
    review.take_urls([lying, red])
    assert [pending.source for pending in review.pending] == [red]
    assert review.errors() == [f"{lying!r} could not be downloaded: Error -3 while decompressing data: incorrect "
                               "header check."]


class FailsWithin(io.BytesIO):
    """A file whose storage fails, in a way nothing foresees, on reading any of its bytes from `start` to `stop`."""

    def __init__(self, data: bytes, start: int, stop: int) -> None:
        super().__init__(data)
        self.start, self.stop = start, stop

    def read(self, size: int | None = -1) -> bytes:
        at = self.tell()
        end = at + size if size is not None and size >= 0 else len(self.getbuffer())
        if at < self.stop and end > self.start:
            raise RuntimeError(f"the disk under {ROOT} failed")
        return super().read(size)


def test_an_input_that_fails_as_nothing_foresaw_is_named_its_traceback_logged_and_the_rest_are_read(
        local_server, allow_loopback_urls, monkeypatch, caplog):
    """The last resort, per upload, per ZIP member and per URL: the page names the input and says the server's log
    has the details (no path of the server, which the error's text and traceback hold); the log has the traceback."""
    members = {"a.png": RED, "b.png": BLUE, "c.png": GREEN}
    archive = zip_of(members)
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:  # the storage fails inside b.png's data
        b_data = opened.getinfo("b.png").header_offset + 40
    local_server.routes["/red.png"] = Route(body=RED)
    red = local_server.url("/red.png")
    real_fetch = review_module.fetch_image
    monkeypatch.setattr(review_module, "fetch_image", lambda url: real_fetch(red) if url == red else 1 / 0)
    review = Review()
    review.take_upload("1", "gone.png", FailsWithin(RED, 0, len(RED)))
    review.take_upload("2", "failing.zip", FailsWithin(archive, b_data, b_data + 1))
    review.take_upload("3", "green.png", io.BytesIO(GREEN))
    review.take_urls(["http://127.0.0.1:9/x.png", red])
    assert [pending.source for pending in review.pending] == ["failing.zip/a.png", "failing.zip/c.png", "green.png",
                                                               red]
    assert review.errors() == [
        f"'gone.png' could not be read: {UNFORESEEN} (RuntimeError).",
        f"'failing.zip': member 'b.png' cannot be read ({UNFORESEEN} (RuntimeError)); it was left out.",
        f"'http://127.0.0.1:9/x.png' could not be fetched: {UNFORESEEN} (ZeroDivisionError)."]
    logged = [(record.getMessage(), record.exc_info[0]) for record in caplog.records if record.exc_info]
    assert logged == [("reading 'gone.png' failed", RuntimeError), ("reading 'failing.zip/b.png' failed", RuntimeError),
                      ("reading 'http://127.0.0.1:9/x.png' failed", ZeroDivisionError)]


# ---------------------------------------------------------------- each picture kept once (issue 27.4)

def test_a_url_taken_out_and_pasted_back_is_fetched_afresh_but_its_picture_is_kept_once(local_server,
                                                                                      allow_loopback_urls):
    """Each paste fetches the URL again (what it serves may have changed since), and the same bytes are not kept
    again: a page showing one picture no longer grows its spool with every edit of the box."""
    local_server.routes["/red.png"] = Route(body=RED)
    url = local_server.url("/red.png")
    review = Review()
    for _ in range(6):
        review.take_urls([url])
        read_with_same_prediction(review)
        review.take_urls([])
    review.take_urls([url])
    read_with_same_prediction(review)
    assert local_server.requests.count("/red.png") == 7
    assert review.spool.size == len(RED) and [item.source for _, item in review.items()] == [url]
    local_server.routes["/red.png"] = Route(body=BLUE)  # the URL serves another picture now: pasted again, shown
    review.take_urls([])
    review.take_urls([url])
    read_with_same_prediction(review)
    assert [item.content_hash for _, item in review.items()] == [hashlib.sha256(BLUE).hexdigest()]
    assert review.spool.size == len(RED) + len(BLUE)


def test_the_same_pictures_dropped_again_are_kept_once():
    review = Review()
    for round_ in range(4):  # a new upload each time, as the uploader gives files dropped again
        review.take_upload(f"{round_}-red", "red.png", io.BytesIO(RED))
        review.take_upload(f"{round_}-blue", "blue copy.jpg", io.BytesIO(BLUE))
        review.take_upload(f"{round_}-zip", "both.zip", io.BytesIO(zip_of({"r.png": RED, "b.jpg": BLUE})))
        read_with_same_prediction(review)
    assert review.spool.size == len(RED) + len(BLUE)
    assert [item.source for _, item in review.items()] == ["red.png", "blue copy.jpg"]
    read = review.original_reader()
    assert [read(prediction) for prediction in review.predictions()] == [RED, BLUE]


def test_the_spool_limit_counts_the_distinct_pictures_a_page_keeps_not_what_it_was_sent(monkeypatch, local_server,
                                                                                          allow_loopback_urls):
    monkeypatch.setattr(review_module, "MAX_SPOOL_BYTES", len(RED) + len(BLUE))
    local_server.routes["/red.png"] = Route(body=RED)
    url = local_server.url("/red.png")
    review = Review()
    for index in range(10):
        review.take_upload(f"red-{index}", "red.png", io.BytesIO(RED))
        review.take_upload(f"blue-{index}", "blue.jpg", io.BytesIO(BLUE))
        review.take_urls([url] if index % 2 else [])
        read_with_same_prediction(review)
    assert not review.errors()
    review.take_upload("green", "green.png", io.BytesIO(GREEN))  # a third picture would pass the limit
    [error] = review.errors()
    assert error.startswith(f"'green.png' was left out: this page already holds {(len(RED) + len(BLUE)) / 2**30:.1f} "
                            "GB of pictures (each once, until Clear all)")


# ---------------------------------------------------------------- the spool: a full disk, what the page holds

def test_an_input_the_disk_has_no_room_for_is_named_and_the_others_are_read(local_server, allow_loopback_urls,
                                                                             spool_folder):
    """TMPDIR's disk full: the upload or URL whose picture cannot be kept is named (the URL raised OSError out of
    every run of the page; the upload got "an unforeseen error"), what it began to write leaves the disk, the other
    inputs are read, and a failed URL is fetched again by Retry once there is room."""
    local_server.routes["/blue.jpg"] = Route(body=BLUE)
    local_server.routes["/green.png"] = Route(body=GREEN)
    blue, green = local_server.url("/blue.jpg"), local_server.url("/green.png")
    review = Review()
    with pytest.MonkeyPatch.context() as full:
        no_room_on_disk(full, of=lambda data: data == BLUE)
        review.take_upload("1", "red.png", io.BytesIO(RED))
        review.take_upload("2", "blue.jpg", io.BytesIO(BLUE))
        for _ in range(2):  # each run of the page takes the box again
            review.take_urls([blue, green])
    no_room = "was left out: the server could not keep it on disk (No space left on device). Try again in a while."
    assert review.errors() == [f"'blue.jpg' {no_room}", f"'{blue}' {no_room}"]
    assert [pending.source for pending in review.pending] == ["red.png", green]
    assert files_held_open("self", spool_folder) == [len(RED) + len(GREEN)]
    read_with_same_prediction(review)
    review.forget(review.failed_urls())  # Retry failed URLs
    review.take_urls([blue, green])
    read_with_same_prediction(review)
    read = review.original_reader()
    assert [read(prediction) for prediction in review.predictions()] == [RED, BLUE, GREEN]


def test_what_the_page_no_longer_shows_neither_counts_toward_its_limit_nor_stays_on_disk(monkeypatch, local_server,
                                                                                         allow_loopback_urls,
                                                                                         spool_folder):
    """The page counts the pictures it shows or has queued, not what it was sent: a file that is no picture (10 GB
    of junk named .jpg blocked a page showing nothing) and a URL taken out of the box leave the count at once, and
    the disk once the spool's file would pass the limit: the pictures shown or queued then move to a new one, and
    each is read back byte for byte, sent again or saved."""
    yellow = image_bytes("GIF", size=(40, 30), color=(230, 220, 20))
    junk = random.Random(0).randbytes(len(GREEN) + len(yellow) // 2)
    local_server.routes["/blue.jpg"] = Route(body=BLUE)
    url = local_server.url("/blue.jpg")
    monkeypatch.setattr(review_module, "MAX_SPOOL_BYTES", len(junk) + len(BLUE) + len(RED))  # the first three
    review = Review()
    review.take_upload("junk", "junk.jpg", io.BytesIO(junk))  # first in the file: every picture after it moves
    review.take_urls([url])
    review.take_upload("red", "red.png", io.BytesIO(RED))
    review.take_upload("yellow-1", "yellow.gif", io.BytesIO(yellow))  # past the limit while the junk is queued
    read_with_same_prediction(review)
    review.take_upload("green", "green.png", io.BytesIO(GREEN))  # fits once the junk is read: still queued
    review.take_urls([])
    review.take_upload("yellow-2", "yellow.gif", io.BytesIO(yellow))  # fits once the URL has left
    [left_out] = [error for error in review.errors() if "was left out" in error]
    assert left_out.startswith("'yellow.gif' was left out: this page already holds")
    assert files_held_open("self", spool_folder) == [len(RED) + len(GREEN) + len(yellow)]
    review.take_upload("red-again", "red copy.png", io.BytesIO(RED))
    read_with_same_prediction(review)
    assert [item.source for _, item in review.items()] == ["red.png", "green.png", "yellow.gif"]
    assert review.duplicates() == [("red copy.png", "red.png")]
    read = review.original_reader()
    assert [read(prediction) for prediction in review.predictions()] == [RED, GREEN, yellow]


def test_a_save_or_read_under_way_keeps_the_spool_it_reads(monkeypatch, spool_folder):
    """The pictures move to a new spool only while no Save or read uses the page (Review.in_use): one under way
    reads every original byte for byte, and the file may pass the limit until the first input after it."""
    junk = bytes(len(GREEN) + 1)  # no picture
    monkeypatch.setattr(review_module, "MAX_SPOOL_BYTES", len(RED) + len(BLUE) + len(GREEN))
    review = Review()
    review.take_upload("junk", "junk.jpg", io.BytesIO(junk))
    review.take_upload("red", "red.png", io.BytesIO(RED))
    read_with_same_prediction(review)
    with review.in_use():
        read = review.original_reader()
        review.take_upload("blue", "blue.jpg", io.BytesIO(BLUE))
        assert [read(prediction) for prediction in review.predictions()] == [RED]
    assert files_held_open("self", spool_folder) == [len(junk) + len(RED) + len(BLUE)]
    review.take_upload("green", "green.png", io.BytesIO(GREEN))
    assert files_held_open("self", spool_folder) == [len(RED) + len(BLUE) + len(GREEN)]
    read_with_same_prediction(review)
    read = review.original_reader()
    assert [read(prediction) for prediction in review.predictions()] == [RED, BLUE, GREEN]
    assert not [error for error in review.errors() if "was left out" in error]
