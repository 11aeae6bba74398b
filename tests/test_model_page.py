"""The Model page through AppTest, with real fine-tuning processes: what it shows of the versions, who may start a
job, a job started from the page runs in a process of its own and ends with a version, a second start is refused,
Cancel keeps nothing, a killed job fails, and a rollback makes every server follow."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from streamlit.testing.v1 import AppTest

import versions
from db import Store
from classes import CLASSES
from conftest import ROOT
from test_app import click
from test_team import open_page, page_words, signed_in
from test_train import make_image_folder
from test_versions import saved_feedback

PAGE = "pages/2_Model.py"


@pytest.fixture
def tiny_training_data(tmp_path, monkeypatch):
    """The jobs the page starts read CIFAR-10 from here: a made-up folder, so a job takes seconds."""
    make_image_folder(tmp_path / "data", per_class=3)
    monkeypatch.setenv("CIFAR10_TRAINING_DATA", str(tmp_path / "data"))


def model_page() -> AppTest:
    app = AppTest.from_file(str(ROOT / PAGE), default_timeout=120)
    app.run()
    assert not app.exception
    return app


def words(app: AppTest) -> str:
    return " ".join(page_words(app))


def wait_for_job(store, state: str = "running", timeout: float = 120) -> versions.ModelJob:
    """The last job, once it is no longer running (or once it is in `state`, when that is not "running")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = versions.latest_job(store)
        if job is not None and (job.state != "running" if state == "running" else job.state == state):
            return job
        time.sleep(0.5)
    raise AssertionError(f"the job did not end in {timeout} s: {versions.latest_job(store)}")


def job_processes(job_id: int) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"finetune.py --from-store --job {job_id} "], capture_output=True,
                           text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_the_page_shows_the_version_in_use_every_version_and_a_rollback_every_server_follows(backend):
    store = backend.store()
    app = model_page()
    assert "In use: version 1" in words(app) and "No job has run yet." in words(app)
    assert app.metric[0].value == f"{versions.active_version(store).card['test_accuracy_tta']:.1%}"

    weights, card, bank = versions.shipped_files()
    described = card | {"finetune": {"held_out": 20, "held_out_right": {"before": 14, "after": 17},
                                     "trained_on": 80}, "test_accuracy_tta": 0.9301}
    versions.add_version(store, weights, described, bank, versions.PROMOTED, 1, "ana@example.com", activate=True)
    app.run()
    assert "In use: version 2" in words(app) and (app.metric[3].value, app.metric[3].delta) == ("17 of 20", "+3 against v1")
    table = app.dataframe[0].value
    assert list(table["version"]) == [2, 1] and list(table["status"]) == ["promoted (in use)", "shipped"]

    other_server = backend.store()
    app.selectbox[0].set_value(1)
    click(app, "Use this version")
    assert versions.active_version_id(other_server) == 1 and "Version 1 is now in use" in words(app)
    assert "In use: version 1" in words(app)


def test_an_admin_password_guards_the_job_and_the_rollback(store_env, monkeypatch):
    monkeypatch.setenv("CIFAR10_ADMIN_PASSWORD", "s3cret")
    store = Store.from_env()
    app = model_page()
    app.text_input[0].set_value("wrong")
    click(app, "Improve the model")
    assert "Wrong admin password. No job was started." in words(app) and versions.latest_job(store) is None


def test_signed_in_only_admins_may_start_a_job_and_signed_out_browsers_see_nothing(store_env, monkeypatch):
    monkeypatch.setenv("CIFAR10_ADMINS", "alice@example.com")
    app = open_page({"is_logged_in": False}, PAGE)
    assert [button.label for button in app.button] == ["Sign in"] and not app.get("dataframe")
    bob = signed_in("bob@example.com", PAGE)
    [improve] = [button for button in bob.button if button.label == "Improve the model"]
    assert improve.disabled and "Only an admin may fine-tune the model" in words(bob)
    # Alice's page was drawn while she was an admin; she no longer is when she clicks: the callback asks again.
    alice = signed_in("alice@example.com", PAGE)
    monkeypatch.setenv("CIFAR10_ADMINS", "carol@example.com")
    click(alice, "Improve the model")
    assert "Only an admin may fine-tune the model" in words(alice) and "No job was started." in words(alice)
    assert versions.latest_job(Store.from_env()) is None


def test_a_job_started_on_the_page_runs_apart_and_a_second_start_is_refused(store_env, tiny_training_data):
    store = Store.from_env()
    saved_feedback(store, 20, lambda index: CLASSES[index % 10])
    app = model_page()
    click(app, "Improve the model")
    assert "Fine-tuning job 1 started." in words(app)
    job = versions.latest_job(store)
    assert job.state == "running" and job_processes(job.id)  # its own process, not the server's
    second = model_page()
    click(second, "Improve the model")
    assert "A fine-tuning job is running already: started by someone at" in words(second)
    ended = wait_for_job(store)
    assert ended.state == "done", ended.message
    made = versions.versions(store)[-1]
    assert ended.version_id == made.id == 2 and made.status in (versions.PROMOTED, versions.REJECTED)
    app.run()
    assert "Job 1, started by someone at" in words(app) and "done" in words(app)


def test_cancel_keeps_nothing_and_a_killed_job_fails_and_can_start_again(store_env, tiny_training_data, monkeypatch):
    store = Store.from_env()
    saved_feedback(store, 20, lambda index: CLASSES[index % 10])
    app = model_page()
    click(app, "Improve the model")
    click(app, "Cancel")
    job = wait_for_job(store)
    assert job.state == "cancelled" and "nothing was kept" in job.message
    assert [version.id for version in versions.versions(store)] == [1]

    click(app, "Improve the model")
    job = versions.latest_job(store)
    deadline = time.monotonic() + 60
    while not job_processes(job.id) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in job_processes(job.id):
        os.kill(pid, signal.SIGKILL)
    monkeypatch.setattr(versions, "JOB_SILENT_S", 1.0)  # the page's judge of silence, shortened for the test
    time.sleep(1.5)
    app.run()
    assert versions.latest_job(store).state == "failed" and "stopped answering" in words(app)
    assert [version.id for version in versions.versions(store)] == [1]
    click(app, "Improve the model")
    assert versions.latest_job(store).id == job.id + 1
    wait_for_job(store)


def test_two_servers_on_one_team_store_follow_the_active_version_and_see_the_same_job(browser, tmp_path, monkeypatch,
                                                                                     postgres_server, s3_server):
    """Two `streamlit run app.py` on one PostgreSQL + SeaweedFS store, in Chromium: a job started on one server's
    Model page is the job the other's shows; a version made active through one is served by both within 10 s;
    a picture classified before the switch is saved under the version that classified it."""
    from conftest import use_store
    from test_browser import app_run, new_page, open_app, pictures, streamlit_servers

    make_image_folder(tmp_path / "data", per_class=3)
    env = {"CIFAR10_DATABASE_URL": postgres_server.database("versions"),
           "CIFAR10_IMAGE_STORE": "s3://cifar10-tests/versions", **s3_server.env(),
           "CIFAR10_TRAINING_DATA": str(tmp_path / "data")}
    use_store(monkeypatch, env)
    with streamlit_servers(env, [tmp_path / "one.log", tmp_path / "two.log"]) as (one, two):
        first, second, classifying = new_page(browser), new_page(browser), new_page(browser)
        open_app(classifying, two.url)
        with app_run(classifying):
            classifying.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
                pictures(tmp_path, ("before.png", (200, 40, 40))))
            classifying.get_by_text("1 image classified").wait_for(timeout=60_000)
        store = Store.from_env()
        shipped = versions.active_version(store)
        assert classifying.get_by_text(f"Model {shipped.name}").count() == 1

        open_app(first, f"{one.url}/Model")
        with app_run(first):
            first.get_by_role("button", name="Improve the model").click()
        first.get_by_text("Fine-tuning job 1 started.").wait_for(timeout=30_000)
        open_app(second, f"{two.url}/Model")
        second.get_by_text("Job 1, started by someone").first.wait_for(timeout=60_000)
        second.get_by_text(", done:").first.wait_for(timeout=120_000)

        weights, card, bank = versions.shipped_files()
        made = versions.add_version(store, weights, card | {"note": "switched"}, bank, versions.PROMOTED, 1, "",
                                    activate=True)
        deadline = time.monotonic() + 10 + 5  # the switch, and a run to show it
        for page, server in ((first, one), (second, two)):
            while time.monotonic() < deadline and not page.get_by_text(f"Model {made.name}").count():
                open_app(page, server.url)
            assert page.get_by_text(f"Model {made.name}").count() == 1, server.url
        with app_run(classifying):
            classifying.get_by_role("button", name="Save 1 image").click()
        classifying.get_by_text("Saved 1 image").wait_for(timeout=30_000)
        [record] = store.list_predictions()
        assert record.model_version == shipped.name  # the version that classified it, not the one served at Save
        store.close()
