"""Model: the version in use and every earlier one with their numbers, the fine-tuning job that learns from the saved
feedback (start, progress, Cancel), and the choice of the version in use (rollback)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import signin
import versions
from db import IMPROVE, SettingsError, StoreError, configured_admin_password, open_store, refusal
from display import code_span, escape_markdown
from records import ModelJob, ModelVersion

JOB_REFRESH_S = 2  # how often the job's progress is read again while it runs

# Run through app.py's navigation, which has checked already; asked again so that this page never shows anything to a
# browser that is not signed in, however it is reached.
if signin.signed_in_or_sign_in_page() is None:
    st.stop()
state = st.session_state
state.setdefault("model_flash", None)


def held_out(version: ModelVersion) -> tuple[int, int, int] | None:
    """(held-out saved pictures the version it was made from got right, it got right, held out), when the job that
    made it measured them."""
    tuned = version.card.get("finetune") or {}
    if not tuned.get("held_out"):
        return None
    return tuned["held_out_right"]["before"], tuned["held_out_right"]["after"], tuned["held_out"]


def held_out_share(version: ModelVersion) -> float | None:
    held = held_out(version)
    return None if held is None else held[1] / held[2]


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def numbers(version: ModelVersion) -> dict:
    """What the page shows of a version, from its model card: the same columns for every version."""
    card = version.card
    photos = card.get("real_photos") or {}
    tuned = card.get("finetune") or {}
    held = held_out(version)
    return {
        "version": version.id,
        "status": version.status + (" (in use)" if version.id == active_id else ""),
        "made": card.get("date", version.created_at[:10]) if version.status == versions.SHIPPED else
                version.created_at[:16].replace("T", " ") + " UTC",
        "by": version.created_by,
        "from": f"v{version.made_from}, {tuned.get('trained_on', 0)} saved pictures" if version.made_from else
                "trained from scratch, shipped with the app",
        "CIFAR-10 test (flip TTA)": card.get("test_accuracy_tta"),
        "real photos right": f"{photos['right']} of {photos['photos']}" if photos else "",
        "calibration error": (card.get("calibration") or {}).get("ece_after"),
        "held-out feedback right": f"{held[1]} of {held[2]} (was {held[0]})" if held else "",
    }


def refused_here(password_key: str) -> str | None:
    """Why this person may not start a job or choose the version in use: with sign-in, only admins may; without it,
    the admin password when one is set."""
    return refusal(signin.current_person(), IMPROVE, state.get(password_key, ""))


def improve() -> None:
    refused = refused_here("improve_password")
    if refused:
        state.model_flash = ("error", f"{escape_markdown(refused)} No job was started.")
        return
    try:
        job = versions.launch_job(open_store(), signin.current_person().email)
    except StoreError as error:  # JobRunning among them: who started the running one, and when
        state.model_flash = ("error", escape_markdown(str(error)))
        return
    state.model_flash = ("info", f"Fine-tuning job {job.id} started.")


def cancel(job_id: int) -> None:
    refused = refused_here("improve_password")
    if refused:
        state.model_flash = ("error", f"{escape_markdown(refused)} The job goes on.")
        return
    try:
        versions.cancel_job(open_store(), job_id)
    except StoreError as error:
        state.model_flash = ("error", escape_markdown(str(error)))


def make_active(version_id: int) -> None:
    refused = refused_here("activate_password")
    if refused:
        state.model_flash = ("error", f"{escape_markdown(refused)} The model in use was not changed.")
        return
    try:
        version = versions.activate(open_store(), version_id)
    except StoreError as error:
        state.model_flash = ("error", escape_markdown(str(error)))
        return
    state.model_flash = ("success", f"Version {version.id} is now in use; every server switches to it within 10 "
                                    "seconds.")


@st.fragment(run_every=JOB_REFRESH_S)
def job_status() -> None:
    """The last job as every server sees it, read again every JOB_REFRESH_S seconds."""
    try:
        job = versions.latest_job(open_store())
    except StoreError as error:
        st.error(escape_markdown(str(error)), icon=":material/database:")
        return
    if job is None:
        st.caption("No job has run yet.")
        return
    who = escape_markdown(job.started_by or "someone")
    when = job.started_at[:16].replace("T", " ")
    if job.state == "running":
        left = f", about {job_time_left(job)} left" if job.seconds_left is not None else ""
        st.progress(job.progress, text=f"Job {job.id}, started by {who} at {when} UTC: "
                                       f"{escape_markdown(job.message)} ({job.progress:.0%}{left})")
        st.button("Cancel", key=f"cancel-{job.id}", on_click=cancel, args=(job.id,), disabled=job.cancel,
                  help="Stops the job; it keeps nothing.")
    else:
        show = {"done": st.success, "failed": st.error, "cancelled": st.warning}[job.state]
        show(f"Job {job.id}, started by {who} at {when} UTC, {job.state}: {escape_markdown(job.message)}")


def job_time_left(job: ModelJob) -> str:
    seconds = int(job.seconds_left or 0)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


st.title("Model")
try:
    store = open_store()
    active = versions.active_version(store)
    every = versions.versions(store)
    new_records = versions.records_since(store, active)
except StoreError as error:
    st.error(escape_markdown(str(error)), icon=":material/database:")
    st.stop()
active_id = active.id
if state.model_flash:
    kind, message = state.model_flash
    getattr(st, kind)(message)
    state.model_flash = None

shown = numbers(active)
st.subheader(f"In use: version {active.id} {code_span(active.name)}")
st.caption(f"Made {shown['made']}, {shown['from']}" + (f", by {escape_markdown(shown['by'])}" if shown["by"] else "")
           + f". {new_records:,} saved record{'s' * (new_records != 1)} new since it was made.")
columns = st.columns(4)
columns[0].metric("CIFAR-10 test (flip TTA)", percent(shown["CIFAR-10 test (flip TTA)"]))
columns[1].metric("Real photos right", shown["real photos right"] or "n/a",
                  help="Of the real photos of the ten classes the model was measured on when it was made.")
columns[2].metric("Calibration error", percent(shown["calibration error"]),
                  help="On half the CIFAR-10 test split that the calibration was not fitted on.")
held = held_out(active)
columns[3].metric("Held-out feedback right", f"{held[1]} of {held[2]}" if held else "n/a",
                  delta=f"{held[1] - held[0]:+d} against v{active.made_from}" if held else None,
                  help="Saved pictures never trained on (one in five, by content hash), when this version was made.")

st.subheader("Improve the model")
st.caption("Fine-tunes the model in use on every saved picture under its final label (one in five held out), mixed "
           "with CIFAR-10 so that it does not forget. The result replaces the model in use only if it gets more of "
           "the held-out pictures right and loses at most 0.3 points on CIFAR-10; otherwise it is kept as rejected.")
person = signin.current_person()
password_needed = False
refused = refusal(person, IMPROVE) if person.sign_in else None  # asked again when a button is pressed
if not person.sign_in:
    try:
        password_needed = configured_admin_password() is not None
    except SettingsError as error:
        st.error(escape_markdown(str(error)), icon=":material/key:")
elif refused:
    st.caption(escape_markdown(refused))
if password_needed:
    st.text_input("Admin password", type="password", key="improve_password")
st.button("Improve the model", type="primary", icon=":material/model_training:", on_click=improve,
          disabled=bool(refused))
job_status()

st.subheader("Versions")
table = pd.DataFrame([numbers(version) for version in reversed(every)])
st.dataframe(table, hide_index=True, width="stretch", column_config={
    "CIFAR-10 test (flip TTA)": st.column_config.NumberColumn(format="percent"),
    "calibration error": st.column_config.NumberColumn(format="percent"),
})
if len(every) > 1:
    chart = pd.DataFrame({
        "CIFAR-10 test (flip TTA)": [version.card.get("test_accuracy_tta") for version in every],
        "held-out feedback": [held_out_share(version) for version in every],
        "calibration error": [(version.card.get("calibration") or {}).get("ece_after") for version in every],
    }, index=pd.Index([version.id for version in every], name="version"))
    st.line_chart(chart)
    choices = [version.id for version in reversed(every) if version.id != active_id]
    with st.container(horizontal=True, vertical_alignment="bottom"):
        chosen = st.selectbox("Version to use", choices, format_func=lambda number: f"version {number}")
        if password_needed:
            st.text_input("Admin password", type="password", key="activate_password")
        st.button("Use this version", on_click=make_active, args=(chosen,), disabled=bool(refused),
                  help="Every server switches to it within 10 seconds (a rollback, or a rejected version after all).")
