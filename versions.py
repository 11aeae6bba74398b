"""Model versions and fine-tuning jobs, kept in the store so that every server sees the same: each version's files
(weights, model card, novelty bank) in the image store under models/<sha256>, a row per version in the database,
one of them active; and the fine-tuning jobs, one running at a time across every server, each with its progress and
a heartbeat. Plain data layer: no torch (the model is loaded from these bytes by classifier.py, trained by
finetune.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Callable, Generic, TypeVar

import sql
from records import ModelJob, ModelVersion, StoreError
from settings import ROOT, SHIPPED_WEIGHTS
from store import Store

MODEL_FOLDER = "models"  # in the image store, beside the images (which its sweeps never list)
# A running job beats every few seconds; one silent this long has died (its process or its server was killed).
JOB_SILENT_S = 60.0
CHECK_S = 5.0  # how often a server asks which version is active
Loaded = TypeVar("Loaded")
SHIPPED = "shipped"
PROMOTED = "promoted"
REJECTED = "rejected"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_name(data: bytes, suffix: str) -> str:
    """Where a version's file lives in the image store: named by its content, so a file is stored once."""
    return f"{MODEL_FOLDER}/{hashlib.sha256(data).hexdigest()}{suffix}"


def weights_match_card(weights: bytes, card: dict) -> bool:
    """Whether the card describes these weights (its calibration and threshold were fitted on them)."""
    return card.get("weights_sha256") == hashlib.sha256(weights).hexdigest()


# ---------------------------------------------------------------- versions

def versions(store: Store) -> list[ModelVersion]:
    """Every version, oldest first (the shipped weights are version 1 of a store that has any)."""
    with store.database.transaction(write=False) as cursor:
        return sql.model_versions(cursor)


def active_version_id(store: Store) -> int | None:
    """The active version's id, from one small query: what each server asks every few seconds."""
    with store.database.transaction(write=False) as cursor:
        return sql.active_model(cursor)


def active_version(store: Store) -> ModelVersion:
    """The version every server serves. A store without any gets the shipped weights as version 1."""
    with store.database.transaction(write=False) as cursor:
        active = sql.active_model(cursor)
        version = sql.model_version(cursor, active) if active is not None else None
    if version is not None:
        return version
    try:
        weights, card, bank = shipped_files()
    except (OSError, ValueError) as error:
        raise StoreError(f"The shipped model at {SHIPPED_WEIGHTS} cannot be read ({error}), so the store has no "
                         "model to serve: restore models/ from git.") from error
    return add_version(store, weights, card, bank, SHIPPED, made_from=None, created_by="",
                       activate=True, records_seen=0, only_if_none=True)  # every saved record is new to it


def shipped_files() -> tuple[bytes, dict, bytes]:
    """The weights the app ships, their model card and novelty bank (models/), as version_files gives a version's."""
    return (SHIPPED_WEIGHTS.read_bytes(), json.loads(SHIPPED_WEIGHTS.with_suffix(".json").read_bytes()),
            SHIPPED_WEIGHTS.with_suffix(".novelty.pt").read_bytes())


class UnservableVersion(StoreError):
    """A version whose files are not the ones it was kept with: never served, never made active."""


def version_files(store: Store, version: ModelVersion) -> tuple[bytes, dict, bytes]:
    """A version's weights, model card and novelty bank, as stored; StoreError when a file is not the one the
    version was kept with (each is named by its content's hash) or the card describes other weights."""
    files = {}
    for name in (version.weights_file, version.card_file, version.bank_file):
        data = store.images.get(name)
        if file_name(data, name[name.index("."):]) != name:
            raise UnservableVersion(f"Model version {version.id}'s file {name} in {store.images.description} is not the "
                             "one it was kept with (its content changed): that version is never served.")
        files[name] = data
    weights, card, bank = files[version.weights_file], json.loads(files[version.card_file]), files[version.bank_file]
    if not weights_match_card(weights, card):
        raise UnservableVersion(f"Model version {version.id}'s card describes other weights: it is never served.")
    return weights, card, bank


def add_version(store: Store, weights: bytes, card: dict, bank: bytes, status: str, made_from: int | None,
                created_by: str, activate: bool, records_seen: int | None = None, only_if_none: bool = False,
                job: tuple[int, Callable[[int, bool], str]] | None = None) -> ModelVersion:
    """Keep a version: its files go to the image store before its row commits (a version is whole or absent),
    and it becomes the active one if `activate`. With only_if_none, a store that has a version meanwhile (another
    server seeded it) keeps that one, which is returned. With a job (its id, and its closing message for the new
    version's id and whether it is in use), the job ends done in the same transaction, or, cancelled or failed
    meanwhile, nothing is kept (JobStopped); and its version becomes active only over the one it was made from (an
    admin who chose another version while it ran keeps that one). A card that describes other weights is
    refused."""
    if not weights_match_card(weights, card):
        raise StoreError("The model card describes other weights than the ones given: the version was not kept.")
    card_bytes = json.dumps(card, indent=2).encode()
    files = {"weights_file": file_name(weights, ".pt"), "card_file": file_name(card_bytes, ".json"),
             "bank_file": file_name(bank, ".novelty.pt")}
    store.images.put_many([(files["weights_file"], weights), (files["card_file"], card_bytes),
                           (files["bank_file"], bank)])
    try:
        return _insert_version(store, files, card, status, made_from, created_by, activate, records_seen,
                               only_if_none, job)
    except JobStopped:
        store.remove_unnamed_models(list(files.values()))
        raise


def _insert_version(store: Store, files: dict[str, str], card: dict, status: str, made_from: int | None,
                    created_by: str, activate: bool, records_seen: int | None, only_if_none: bool,
                    job: tuple[int, Callable[[int, bool], str]] | None) -> ModelVersion:
    with store.database.transaction(write=True) as cursor:
        if only_if_none and sql.active_model(cursor) is not None:
            return sql.model_version(cursor, sql.active_model(cursor))
        if job is not None:
            current = sql.job(cursor, job[0])
            if current is None or current.cancel or current.state != "running":
                raise JobStopped("The job was cancelled (or failed) before its version was kept: nothing was kept.")
            activate = activate and sql.active_model(cursor) == made_from
        seen = sql.record_count(cursor) if records_seen is None else records_seen
        version_id = sql.insert_version(cursor, files | {
            "card": card, "status": status, "made_from": made_from, "created_at": now(), "created_by": created_by,
            "records_seen": seen})
        if activate:
            sql.set_active_model(cursor, version_id)
        if job is not None:
            sql.end_job(cursor, job[0], "done", job[1](version_id, activate), version_id)
        return sql.model_version(cursor, version_id)


def activate(store: Store, version_id: int) -> ModelVersion:
    """Make a version the one every server serves (a rollback, or a rejected one an admin wants after all)."""
    with store.database.transaction(write=False) as cursor:
        version = sql.model_version(cursor, version_id)
    if version is None:
        raise StoreError(f"There is no model version {version_id}.")
    version_files(store, version)  # a version whose files changed is never made active: no server could serve it
    with store.database.transaction(write=True) as cursor:
        sql.set_active_model(cursor, version_id)
    return version


def records_since(store: Store, version: ModelVersion) -> int:
    """Saved records now, less those there were when the version was made (the page's "new since")."""
    with store.database.transaction(write=False) as cursor:
        return max(0, sql.record_count(cursor) - version.records_seen)


class ActiveModel(Generic[Loaded]):
    """This server's copy of the store's active version: asked for at most every CHECK_S seconds (so every server
    follows a switch within 10 s, without a restart), loaded once per version by `load`, the old copy let go as the
    new one comes (at most one model more in memory, for a moment). A version that cannot be loaded (its weights
    are not the ones its card describes) is never served: the one before stays, and `problem` says why."""

    def __init__(self, load: Callable[[Store, ModelVersion], Loaded], check_s: float = CHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._load, self._check_s, self._clock = load, check_s, clock
        self._lock = threading.Lock()
        self._served: tuple[ModelVersion, Loaded] | None = None
        self._checked = -float("inf")
        self._refused: int | None = None
        self._failed: Exception | None = None  # why nothing could be served at the last check
        self.problem = ""  # why the active version is not the one served, or ""

    def get(self, store: Store) -> tuple[ModelVersion, Loaded]:
        """(the version served, its loaded model); StoreError or the loader's error when there is none to serve."""
        with self._lock:
            if self._clock() - self._checked < self._check_s:  # asked again only every check_s
                if self._served is not None:
                    return self._served
                if self._failed is not None:  # not read again on every page run
                    raise self._failed
            try:
                active = active_version_id(store)
                if self._served is not None and active == self._served[0].id:
                    self.problem = ""
            except StoreError as error:  # the store is down: the version served goes on
                if self._served is None:
                    self._failed, self._checked = error, self._clock()
                    raise
                self.problem = str(error)
                active = self._served[0].id
            if self._served is None or active not in (self._served[0].id, self._refused):
                try:
                    version = active_version(store)
                    loaded = self._load(store, version)
                except Exception as error:
                    if self._served is None:
                        self._failed, self._checked = error, self._clock()
                        raise
                    self.problem = str(error)
                    if not isinstance(error, StoreError) or isinstance(error, UnservableVersion):
                        self._refused = active  # not tried again until another is active (a store error is)
                else:
                    self._served, self._refused, self._failed, self.problem = (version, loaded), None, None, ""
            self._checked = self._clock()
            return self._served


# ---------------------------------------------------------------- jobs

class JobStopped(StoreError):
    """The job was cancelled, or failed as silent, while it worked: it keeps nothing."""


class JobRunning(StoreError):
    """A job is running already (anywhere): the message says who started it and when."""

    def __init__(self, job: ModelJob) -> None:
        super().__init__(f"A fine-tuning job is running already: started by {job.started_by or 'someone'} at "
                         f"{job.started_at[:16].replace('T', ' ')} UTC ({job.progress:.0%} done).")
        self.job = job


def latest_job(store: Store) -> ModelJob | None:
    """The last job, as it stands: a running one that has been silent for JOB_SILENT_S is marked failed first."""
    with store.database.transaction(write=False) as cursor:
        job = sql.latest_job(cursor)
    if job is not None and job.state == "running" and time.time() - job.beat_at > JOB_SILENT_S:
        end_job(store, job.id, "failed", f"stopped answering at {job.progress:.0%} (its process or its server "
                                         "was stopped); nothing was kept. It can be started again.")
        with store.database.transaction(write=False) as cursor:
            job = sql.job(cursor, job.id)
    return job


def start_job(store: Store, started_by: str) -> ModelJob:
    """Open a job, unless one is running (JobRunning says whose): under the store's write lock, so two starts on
    two servers at once open one job."""
    latest_job(store)  # a dead one is failed first
    with store.database.transaction(write=True) as cursor:
        running = sql.latest_job(cursor)
        if running is not None and running.state == "running":
            raise JobRunning(running)
        job_id = sql.insert_job(cursor, started_by, now(), time.time())
        return sql.job(cursor, job_id)


def beat(store: Store, job_id: int, progress: float, seconds_left: float | None, message: str) -> bool:
    """The job's process is alive and this far; returns whether it is to stop (Cancel, or it was failed as
    silent)."""
    with store.database.transaction(write=True) as cursor:
        sql.beat_job(cursor, job_id, time.time(), progress, seconds_left, message)
        job = sql.job(cursor, job_id)
    return job is None or job.cancel or job.state != "running"


def end_job(store: Store, job_id: int, state: str, message: str, version_id: int | None = None) -> None:
    with store.database.transaction(write=True) as cursor:
        sql.end_job(cursor, job_id, state, message, version_id)


def cancel_job(store: Store, job_id: int) -> None:
    """Ask the job to stop: its process stops at its next beat and keeps nothing."""
    with store.database.transaction(write=True) as cursor:
        sql.cancel_job(cursor, job_id)


def launch_job(store: Store, started_by: str) -> ModelJob:
    """Open a job (JobRunning while one runs anywhere) and start finetune.py on it, in a process of its own that
    outlives the page (and this server's restarts: it reports to the store). Its log joins the server's."""
    job = start_job(store, started_by)
    command = [sys.executable, str(ROOT / "finetune.py"), "--from-store", "--job", str(job.id),
               f"--started-by={started_by}"]
    try:  # in the server's working directory: relative paths in its settings name the same store and data
        subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as error:
        end_job(store, job.id, "failed", f"failed: its process could not start ({error}).")
        raise StoreError(f"The fine-tuning job could not start ({error}).") from error
    return job
