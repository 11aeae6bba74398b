"""Model versions and fine-tuning jobs in the store, on both backends: the shipped weights are version 1, versions
are whole or absent, one job runs at a time across servers, a silent job fails, Cancel keeps nothing, and the job
itself (finetune.py --from-store) promotes a better candidate, rejects a worse one and never trains on the held-out
feedback."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

import finetune
import versions
from classes import CLASSES
from classifier import DEFAULT_WEIGHTS, load_classifier, load_version
from conftest import image_bytes
from inputs import load_image
from records import NewPrediction, StoreError
from test_train import make_image_folder


def other_weights() -> bytes:
    """The shipped weights with another final bias: weights of their own, stored under another name."""
    import io

    state = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_a_new_store_serves_the_shipped_weights_as_version_1_once(backend):
    first, second = backend.store(), backend.store()  # two servers on one new store
    assert versions.active_version_id(first) is None
    served = versions.active_version(first)
    assert versions.active_version(second) == served and len(versions.versions(second)) == 1
    assert served.id == 1 and served.status == versions.SHIPPED
    classifier = load_version(second, served)
    assert classifier.version == served.name == f"v1@{hashlib.sha256(versions.shipped_files()[0]).hexdigest()[:12]}"
    shipped = load_classifier()
    picture = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(classifier.outputs(picture)[0], shipped.outputs(picture)[0])
    assert served.weights_file.removeprefix("models/").startswith(hashlib.sha256(versions.shipped_files()[0]).hexdigest())
    assert backend.image_names() == set()  # the images' sweeps never see the model files


def test_a_version_whose_weights_do_not_match_its_card_is_never_kept_or_served(backend):
    store = backend.store()
    weights, card, bank = versions.shipped_files()
    with pytest.raises(StoreError, match="describes other weights"):
        versions.add_version(store, weights[:-1] + b"x", card, bank, versions.PROMOTED, None, "", activate=True)
    assert versions.versions(store) == []
    shipped = versions.active_version(store)
    # Its weights changed in the image store behind the database's back: that version is never served.
    store.images.delete_many([shipped.weights_file])
    store.images.put_many([(shipped.weights_file, weights[:-2] + b"xx")])
    with pytest.raises(versions.UnservableVersion, match="is not the one it was kept with .*never served"):
        load_version(backend.store(), shipped)
    with pytest.raises(versions.UnservableVersion):  # nor made active
        versions.activate(store, shipped.id)


def test_rollback_and_every_server_follows(backend):
    one, two = backend.store(), backend.store()
    weights, card, bank = versions.shipped_files()
    versions.active_version(one)
    card_two = card | {"note": "the same weights, described again"}
    second = versions.add_version(one, weights, card_two, bank, versions.PROMOTED, 1, "ana@example.com",
                                  activate=True)
    assert versions.active_version_id(two) == second.id == 2 and versions.active_version(two).card["note"]
    versions.activate(two, 1)
    assert versions.active_version_id(one) == 1
    with pytest.raises(StoreError, match="no model version 9"):
        versions.activate(one, 9)


def test_one_job_at_a_time_a_silent_one_fails_and_cancel_is_seen(backend, monkeypatch):
    one, two = backend.store(), backend.store()
    job = versions.start_job(one, "ana@example.com")
    with pytest.raises(versions.JobRunning, match="started by ana@example.com at"):
        versions.start_job(two, "bo@example.com")
    assert versions.beat(two, job.id, 0.5, 30.0, "halfway") is False
    seen = versions.latest_job(two)
    assert (seen.progress, seen.seconds_left, seen.message) == (0.5, 30.0, "halfway")
    versions.cancel_job(two, job.id)
    assert versions.beat(one, job.id, 0.6, 20.0, "on") is True  # the process learns it at its next beat

    # A process that stops beating (killed, or its server) is failed once silent for JOB_SILENT_S.
    versions.end_job(one, job.id, "cancelled", "cancelled")
    silent = versions.start_job(two, "bo@example.com")
    monkeypatch.setattr(versions, "JOB_SILENT_S", 0.5)
    time.sleep(1.0)
    failed = versions.latest_job(one)
    assert failed.id == silent.id and failed.state == "failed" and "stopped answering" in failed.message
    assert versions.start_job(one, "ana@example.com").state == "running"  # and it can be started again


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """A made-up CIFAR-10 folder: the job's CIFAR-10 images and test split, in seconds; its test split stands in
    for the real photos too (the job measures a candidate on them, as train.py does)."""
    import evaluate

    make_image_folder(tmp_path / "data", per_class=3)
    monkeypatch.setattr(evaluate, "REAL_PHOTOS", tmp_path / "data" / "test")
    return str(tmp_path / "data")


PALETTE = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (230, 30, 230), (30, 230, 230),
           (120, 60, 0), (250, 250, 250), (10, 10, 10), (128, 128, 128)]


def saved_feedback(store, count: int, label_of) -> list[str]:
    """Save `count` distinct pictures, picture i of colour PALETTE[i % 10] (a little different each time) with final
    label label_of(i); returns their content hashes."""
    predictions = []
    for index in range(count):
        red, green, blue = PALETTE[index % 10]
        data = image_bytes("PNG", size=(40, 40), color=(red, green, (blue + index // 10) % 256))
        predictions.append(NewPrediction(hashlib.sha256(data).hexdigest(), data, "png", f"{index}.png", "cat", 0.5,
                                         label_of(index), "v1"))
    store.save_predictions(predictions)
    return [prediction.content_hash for prediction in predictions]


def job(store, tiny_cifar: str, *flags: str) -> tuple[str, versions.ModelVersion]:
    """The job, as `python finetune.py --from-store` runs it, on a made-up CIFAR-10; returns how it ended and the
    version it made."""
    args = finetune.parse_args(["--from-store", "--data", tiny_cifar, "--lr", "0.5", "--steps", "100", *flags])
    ending = finetune.run_job(store, None, args, "ana@example.com")
    return ending, versions.versions(store)[-1]


def test_the_job_never_trains_on_the_held_out_feedback_and_promotes_what_learnt_it(backend, tiny_cifar,
                                                                                   monkeypatch):
    store = backend.store()
    hashes = saved_feedback(store, 60, lambda index: CLASSES[index % 10])
    trained_on = []
    real_train = finetune.train_final_layer

    def recorded(old, features, labels, feedback, args, beat):
        trained_on.append(int(feedback.sum()))
        return real_train(old, features, labels, feedback, args, beat)

    monkeypatch.setattr(finetune, "train_final_layer", recorded)
    held = sum(finetune.held_out(digest) for digest in hashes)
    assert 0 < held < 60
    ending, made = job(store, tiny_cifar, "--max-drop", "1")  # a made-up CIFAR-10 of 30 test images: not guarded
    tuned = made.card["finetune"]
    assert trained_on == [60 - held] and tuned["trained_on"] == 60 - held and tuned["held_out"] == held
    assert made.status == versions.PROMOTED and versions.active_version_id(store) == made.id == 2, ending
    assert made.card["real_photos"]["photos"] == 30  # measured on the photos, which it did not train on
    assert tuned["held_out_right"]["after"] > tuned["held_out_right"]["before"]
    assert load_version(store, made).version == made.name == f"v2@{made.weights_file.removeprefix('models/')[:12]}"


def test_the_guard_rejects_a_candidate_made_worse_on_purpose_or_that_forgets_cifar10(backend, tiny_cifar):
    store = backend.store()
    hashes = saved_feedback(store, 60, lambda index: CLASSES[index % 10])
    said = {record.content_hash: load_classifier().predict([load_image(store.image_bytes(record))])[0].label
            for record in store.list_predictions()}
    store.clear()
    # The held-out pictures labelled as the model in use says (it gets them all right), the others as another
    # class (shuffled): a candidate that learnt the shuffle can only get fewer of the held-out ones right.
    saved_feedback(store, 60, lambda index: said[hashes[index]] if finetune.held_out(hashes[index]) else
                   CLASSES[(CLASSES.index(said[hashes[index]]) + 1) % 10])
    ending, made = job(store, tiny_cifar, "--max-drop", "1")
    tuned = made.card["finetune"]
    assert made.status == versions.REJECTED and "rejected" in ending, ending
    assert tuned["held_out_right"]["after"] < tuned["held_out_right"]["before"] == tuned["held_out"]
    assert versions.active_version_id(store) == 1

    store.clear()
    saved_feedback(store, 60, lambda index: CLASSES[index % 10])
    ending, made = job(store, tiny_cifar, "--max-drop", "-1")  # a guard no candidate can pass on CIFAR-10
    tuned = made.card["finetune"]
    assert tuned["held_out_right"]["after"] > tuned["held_out_right"]["before"]  # better on the feedback...
    assert made.status == versions.REJECTED and versions.active_version_id(store) == 1  # ...and still refused
    assert f"{tuned['held_out_right']['after']} of {tuned['held_out']}" in ending


def test_the_command_line_classifies_with_the_version_the_store_has_active(backend, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    store = backend.store()
    weights, card, bank = versions.shipped_files()
    versions.active_version(store)
    flattened = card | {"calibration": {"parameters": {"a": 3.0}}}  # a temperature of e^3: every answer unsure
    versions.add_version(store, weights, flattened, bank, versions.PROMOTED, 1, "", activate=True)
    photo = tmp_path / "photo.png"
    photo.write_bytes(image_bytes("PNG", size=(64, 64)))

    def classify() -> list[str]:
        run = subprocess.run([sys.executable, str(ROOT / "classifier.py"), str(photo)], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip().splitlines()

    model, line = classify()
    assert model.startswith("model v2@") and float(line.split("\t")[2].rstrip("%")) < 20
    versions.activate(store, 1)
    model, line = classify()
    assert model.startswith("model v1@") and float(line.split("\t")[2].rstrip("%")) > 20


def test_every_record_names_the_version_that_predicted_it_and_history_filters_by_version(backend):
    from streamlit.testing.v1 import AppTest

    from conftest import ROOT

    store = backend.store()
    for version, first in (("v1@aaaaaaaaaaaa", 0), ("v2@bbbbbbbbbbbb", 100)):
        pictures = [image_bytes("PNG", size=(20, 20), color=(first + index, 10, 10)) for index in range(3 if first else 2)]
        store.save_predictions([NewPrediction(hashlib.sha256(data).hexdigest(), data, "png", f"{version}-{index}.png",
                                              "cat", 0.5, "cat", version) for index, data in enumerate(pictures)])
    history = AppTest.from_file(str(ROOT / "pages" / "1_History.py"), default_timeout=120)
    history.run()
    [versions_box] = [box for box in history.multiselect if box.label == "Predicted by model version"]
    assert versions_box.options == ["v1@aaaaaaaaaaaa", "v2@bbbbbbbbbbbb"]
    versions_box.set_value(["v2@bbbbbbbbbbbb"])
    history.run()
    assert any(caption.value.startswith("3 of 5 saved images match") for caption in history.caption)


def test_a_server_follows_the_active_version_loads_each_once_and_never_serves_a_refused_one(backend):
    store = backend.store()
    loads, now = [], [0.0]

    def load(store_, version):
        loads.append(version.id)
        return load_version(store_, version)

    served = versions.ActiveModel(load, check_s=5.0, clock=lambda: now[0])
    first, _ = served.get(store)
    assert first.id == 1 and served.get(store)[0].id == 1 and loads == [1]  # loaded once
    weights, card, bank = versions.shipped_files()
    second = versions.add_version(backend.store(), weights, card | {"note": 2}, bank, versions.PROMOTED, 1, "",
                                  activate=True)
    now[0] += 4.9
    assert served.get(store)[0].id == 1  # the store is asked again only every check_s
    now[0] += 0.2
    assert served.get(store)[0].id == second.id and loads == [1, 2]

    # A version whose weights changed once it was active is refused: the one before goes on, and the page
    # can say why.
    other = other_weights()
    broken = versions.add_version(store, other, card | {"weights_sha256": hashlib.sha256(other).hexdigest()}, bank,
                                  versions.PROMOTED, 2, "", activate=False)
    versions.activate(store, broken.id)
    store.images.delete_many([broken.weights_file])
    store.images.put_many([(broken.weights_file, weights)])  # the shipped weights, which its card does not describe
    now[0] += 5.1
    assert served.get(store)[0].id == second.id and "is not the one it was kept with" in served.problem
    now[0] += 5.1
    assert served.get(store)[0].id == second.id and loads == [1, 2, 3]  # not loaded again while it stays active
    versions.activate(store, 1)
    now[0] += 5.1
    assert served.get(store)[0].id == 1 and served.problem == "" and loads == [1, 2, 3, 1]

    # A store that fails for a moment is asked again at the next check: the version is served once it answers.
    versions.activate(store, second.id)
    real_get = store.images.get
    store.images.get = lambda name: (_ for _ in ()).throw(StoreError("the image store is down"))
    now[0] += 5.1
    assert served.get(store)[0].id == 1 and "down" in served.problem
    store.images.get = real_get
    now[0] += 5.1
    assert served.get(store)[0].id == second.id and served.problem == ""


def test_the_files_of_a_job_killed_while_it_kept_its_version_are_removed_later(backend):
    store = backend.store()
    kept = versions.active_version(store)
    other = other_weights()  # a job killed after writing its files, before its row committed
    orphans = [versions.file_name(other, ".pt"), versions.file_name(b'{"a": 1}', ".json")]
    store.images.put_many([(orphans[0], other), (orphans[1], b'{"a": 1}')])
    assert store.remove_leftovers() == 0  # within the grace period: a job may still be keeping them
    time.sleep(1.1)
    assert store.remove_leftovers(grace_s=1) == 2
    assert {name for name, _ in store.images.stored_models()} == {kept.weights_file, kept.card_file, kept.bank_file}
    load_version(store, kept)  # its own files stay


def test_a_server_with_nothing_to_serve_asks_again_only_every_few_seconds(backend):
    """A new server whose active version cannot be served fails each page run at once, without reading the
    version's files again, until the next check."""
    store = backend.store()
    loads, now = [], [0.0]

    def load(store_, version):
        loads.append(version.id)
        raise StoreError("the image store is down")

    served = versions.ActiveModel(load, check_s=5.0, clock=lambda: now[0])
    for _ in range(3):
        with pytest.raises(StoreError, match="down"):
            served.get(store)
    assert loads == [1]
    now[0] += 5.1
    with pytest.raises(StoreError):
        served.get(store)
    assert loads == [1, 1]
