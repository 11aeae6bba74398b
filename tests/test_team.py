"""A team that signs in (issue 19): with an [auth] section in the secrets every page needs a signed-in person, each
record keeps who saved it and who last labelled it, and admins are named in CIFAR10_ADMINS. Through AppTest, which
plays a signed-in person (`AppTest.user`); the data parts on both backends. The real provider and browsers are in
the browser tests."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

import settings
import signin
from conftest import ROOT, export, run_coroutine, shown
from db import SettingsError
from test_app import BLUE, GREEN, RED, click, label_box, reader, sidebar_metrics, upload  # noqa: F401 (a fixture)
from test_db import prediction, sqlite_file_at_version

ALICE, BOB = "alice@example.com", "bob@example.com"
# What `.streamlit/secrets.toml` holds for sign-in; nothing here is ever contacted (AppTest does not sign in).
AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "a-test-cookie-secret-of-32-chars!",
        "client_id": "cifar10", "client_secret": "not-used",
        "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration"}


@pytest.fixture
def alice_is_the_admin(monkeypatch):
    """Admins as people write them: any case, spaces around the commas. Named after the store's fixture, which
    unsets CIFAR10_ADMINS with the other store variables."""
    monkeypatch.setenv("CIFAR10_ADMINS", " Alice@Example.com ,carol@example.com")


def open_page(user: dict, page: str = "app.py") -> AppTest:
    """A page of the app, with sign-in configured, for this `st.user`."""
    app = AppTest.from_file(str(ROOT / page), default_timeout=120)
    app.secrets = {"auth": dict(AUTH)}
    app.user = user
    app.run()
    assert not app.exception
    return app


def signed_in(email: str, page: str = "app.py") -> AppTest:
    return open_page({"is_logged_in": True, "email": email, "email_verified": True, "name": email.split("@")[0]}, page)


def page_words(app: AppTest) -> list[str]:
    kinds = ("title", "header", "subheader", "markdown", "caption", "text", "error", "warning", "info", "success")
    return [shown(str(element.value)) for kind in kinds for element in app.get(kind)]


def test_a_signed_out_browser_sees_only_the_sign_in_button(store_env):
    for page in ("app.py", "pages/1_History.py"):
        app = open_page({"is_logged_in": False}, page)
        assert [button.label for button in app.button] == ["Sign in"], page
        assert not any(app.sidebar.get(kind) for kind in ("header", "metric", "button", "image", "caption"))
        assert not app.get("file_uploader") and not app.get("text_area") and not app.get("link_button")
        assert len(page_words(app)) <= 2, page_words(app)  # the title and one line of what this is
    # Signed in without an e-mail the provider vouches for: told so, with only the way out. A "no" sent another
    # way is a no too, never the no-claim case (which signs in).
    for unverified in (False, "0"):
        app = open_page({"is_logged_in": True, "email": ALICE, "email_verified": unverified})
        assert [button.label for button in app.button] == ["Sign out"] and "e-mail" in app.error[0].value
        assert not app.get("file_uploader")


def test_who_saved_and_who_relabelled_is_kept_shown_filtered_and_counted(backend, reader, alice_is_the_admin):
    alice = signed_in(ALICE)
    assert "Signed in as" in shown(" ".join(c.value for c in alice.sidebar.caption)) and ALICE in shown(
        " ".join(c.value for c in alice.sidebar.caption))
    upload(alice, [("red.png", RED, "image/png"), ("blue.jpg", BLUE, "image/jpeg")])
    alice_red = label_box(alice, "red.png").value
    click(alice, "Save 2 images")
    long_ago = "2020-01-02T03:04:05+00:00"  # Alice's red, as if saved long before Bob corrects it
    with reader.database.transaction(write=True) as cursor:
        cursor.execute("UPDATE predictions SET created_at = ?, labelled_at = ? WHERE source = 'red.png'",
                       (long_ago, long_ago))

    bob = signed_in(BOB)
    upload(bob, [("green.png", GREEN, "image/png"), ("red.png", RED, "image/png")])
    bob_red = "truck" if alice_red != "truck" else "ship"
    label_box(bob, "red.png").set_value(bob_red)
    bob.run()
    click(bob, "Save 2 images")
    assert "updated the label of 1 image" in shown(bob.success[0].value)
    records = {record.source: record for record in reader.list_predictions()}
    assert {source: (r.saved_by, r.labelled_by) for source, r in records.items()} == {
        "red.png": (ALICE, BOB), "blue.jpg": (ALICE, ALICE), "green.png": (BOB, BOB)}
    assert records["blue.jpg"].labelled_at == records["blue.jpg"].created_at
    # Bob's correction is dated when he made it, after Alice saved blue; the record keeps when it was saved.
    assert long_ago < records["blue.jpg"].created_at <= records["red.png"].labelled_at
    assert records["red.png"].created_at == long_ago
    metrics = sidebar_metrics(bob)
    green_right = records["green.png"].is_correct
    assert metrics["Saved images"] == "3" and metrics["Saved by you"] == "1"
    assert metrics["Model accuracy on yours"] == ("100.0%" if green_right else "0.0%")

    history = signed_in(ALICE, "pages/1_History.py")
    captions = " ".join(shown(caption.value) for caption in history.caption)
    assert f"saved by {ALICE}" in captions and f"saved by {BOB}" in captions and f"label by {BOB}" in captions
    [people] = [box for box in history.multiselect if box.label == "Saved or labelled by"]
    assert people.options == [ALICE, BOB]
    people.set_value([BOB])
    history.run()
    assert "2 of 3 saved images match" in history.caption[0].value  # green (saved) and red (relabelled) by Bob

    click(bob, "Undo last change")  # Bob's relabel, taken back: Alice's label and her name with it
    red = {record.source: record for record in reader.list_predictions()}["red.png"]
    assert (red.final_label, red.labelled_by, red.labelled_at) == (alice_red, ALICE, long_ago)


def test_only_admins_clear_the_database_or_delete_what_others_saved(store_env, alice_is_the_admin, monkeypatch):
    from db import Store

    store = Store.from_env()
    alice = signed_in(ALICE)
    upload(alice, [("red.png", RED, "image/png")])
    click(alice, "Save 1 image")
    bob = signed_in(BOB)
    upload(bob, [("blue.jpg", BLUE, "image/jpeg")])
    click(bob, "Save 1 image")

    [clear] = [button for button in bob.sidebar.button if button.label == "Clear database"]
    assert clear.disabled and any("Only an admin may clear the database" in shown(c.value) for c in bob.sidebar.caption)
    history = signed_in(BOB, "pages/1_History.py")
    owners = {record.id: record.saved_by for record in store.list_predictions()}
    [alices] = [record_id for record_id, owner in owners.items() if owner == ALICE]
    [bobs] = [record_id for record_id, owner in owners.items() if owner == BOB]
    assert history.button(key=f"delete-{alices}").disabled and not history.button(key=f"delete-{bobs}").disabled

    # Each action asks again when it runs, not only when the page is drawn: Bob, an admin a moment ago, is refused.
    monkeypatch.setenv("CIFAR10_ADMINS", f"{ALICE},{BOB}")
    bob.run()
    history.run()
    click(bob, "Clear database")
    history.button(key=f"delete-{alices}").click()
    monkeypatch.setenv("CIFAR10_ADMINS", " ALICE@example.COM ")
    click(bob, "Yes, delete everything")
    assert "Only an admin may clear the database" in shown(bob.error[0].value) and store.count() == 2
    history.run()
    assert f"saved by {ALICE}" in shown(history.error[0].value) and store.count() == 2
    assert store.delete_predictions([alices], saved_by=BOB) is None and store.count() == 2  # the store's own check
    history.button(key=f"delete-{bobs}").click()  # one's own, always
    history.run()
    assert history.success and [record.saved_by for record in store.list_predictions()] == [ALICE]

    alice.run()
    click(alice, "Clear database")
    click(alice, "Yes, delete everything")
    assert "Database cleared" in alice.success[0].value and store.count() == 0
    store.close()


def test_admins_are_named_in_the_environment_or_the_secrets_and_fail_closed(tmp_path, alice_is_the_admin, monkeypatch):
    secrets = tmp_path / "secrets.toml"
    monkeypatch.setattr(settings, "SECRETS_FILES", (secrets,))
    assert settings.configured_admins() == {ALICE, "carol@example.com"}  # from the environment
    monkeypatch.delenv("CIFAR10_ADMINS")
    assert settings.configured_admins() == frozenset()
    secrets.write_text('CIFAR10_ADMINS = "  BOB@example.com,, "\n[auth]\nclient_id = "x"\n')
    assert settings.configured_admins() == {BOB}
    bob, nobody = settings.Person(sign_in=True, email=BOB, verified=True), settings.Person(sign_in=True)
    assert settings.refusal(bob, settings.CLEAR) is None and "Sign in" in settings.refusal(nobody, settings.CLEAR)
    for broken in ('CIFAR10_ADMINS = bob@example.com\n', '[auth]\nCIFAR10_ADMINS = "bob@example.com"\n',
                   "CIFAR10_ADMINS = 1\n"):
        secrets.write_text(broken)
        with pytest.raises(SettingsError, match="CIFAR10_ADMINS|cannot be read"):
            settings.configured_admins()
        assert str(secrets) in settings.refusal(bob, settings.CLEAR)  # refused, saying why
        assert settings.refusal(bob, settings.DELETE, owner=BOB) is None  # one's own needs no admin


def test_a_provider_that_sends_no_email_verified_signs_people_in_but_names_no_admin(store_env, alice_is_the_admin):
    """Issue 27.7: Microsoft Entra ID sends no email_verified claim. Its people sign in, save, relabel and delete
    what they saved under the address it gives; being an admin by name needs an address the provider vouches for
    (another tenant's admin can give an account anyone's address), and the page says why, and how to get there."""
    from db import Store

    store = Store.from_env()
    store.save_predictions([prediction("bob's")], by=BOB)
    entra = {"is_logged_in": True, "email": ALICE, "name": "Alice"}
    alice = open_page(entra)
    captions = shown(" ".join(caption.value for caption in alice.sidebar.caption))
    assert f"Signed in as **{ALICE}**" in captions and "admin (CIFAR10_ADMINS)" not in captions
    [clear] = [button for button in alice.sidebar.button if button.label == "Clear database"]
    assert clear.disabled and "email_verified" in captions and "xms_edov" in captions
    upload(alice, [("red.png", RED, "image/png")])
    click(alice, "Save 1 image")
    assert {record.source: record.saved_by for record in store.list_predictions()} == {"red.png": ALICE,
                                                                                        "bob's.png": BOB}
    history = open_page(entra, "pages/1_History.py")
    owners = {record.saved_by: record.id for record in store.list_predictions()}
    assert history.button(key=f"delete-{owners[BOB]}").disabled
    history.button(key=f"delete-{owners[ALICE]}").click()
    history.run()
    assert history.success and store.count() == 1
    entra_vouching = open_page(entra | {"xms_edov": True})  # Entra's optional claim: the tenant verified the domain
    captions = shown(" ".join(caption.value for caption in entra_vouching.sidebar.caption))
    assert "admin (CIFAR10_ADMINS)" in captions
    store.close()


@pytest.mark.parametrize("claims, email, verified", [
    ({}, ALICE, False),
    ({"email_verified": True}, ALICE, True),
    ({"email_verified": "true"}, ALICE, True),  # some providers send their yes and no as texts
    ({"email_verified": "False"}, "", False),
    ({"email_verified": False, "xms_edov": True}, "", False),
    ({"xms_edov": True}, ALICE, True),
    ({"xms_edov": "true"}, ALICE, True),
    ({"xms_edov": False}, ALICE, False),
    ({"email_verified": " TRUE "}, ALICE, True),
    # Sent, but not a recognisable yes: an unverified address, never "no claim" (issue 27, review). Only true and
    # "true" are a yes; 1 and "yes" are a no too, as no provider is known to send them and a misread no must not
    # sign anyone in.
    ({"email_verified": 0}, "", False),
    ({"email_verified": "0"}, "", False),
    ({"email_verified": "no"}, "", False),
    ({"email_verified": [False]}, "", False),
    ({"email_verified": None}, "", False),
    ({"email_verified": ""}, "", False),
    ({"email_verified": "yes"}, "", False),
    ({"email_verified": 1}, "", False),
    ({"email_verified": "1"}, "", False),
    ({"email_verified": [True]}, "", False),
    ({"email_verified": 0, "xms_edov": True}, "", False),
    ({"xms_edov": 1}, ALICE, False),
    ({"xms_edov": "yes"}, ALICE, False),
], ids=["no claim", "verified", "verified as text", "not verified as text", "not verified, domain verified",
        "domain verified (Entra)", "domain verified as text", "domain not verified", "verified as text in capitals",
        "0", "'0'", "'no'", "[False]", "null", "empty text", "'yes'", "1", "'1'", "[True]", "0, domain verified",
        "domain verified as 1", "domain verified as 'yes'"])
def test_who_is_signed_in_and_whether_the_provider_vouches_for_the_address(claims, email, verified):
    user = {"is_logged_in": True, "email": " Alice@Example.com ", **claims}
    assert (signin.email_of(user), signin.address_verified(user)) == (email, verified)


@pytest.mark.parametrize("configured, sent", [
    ("Zoë@Bu\u0308cher.example", "zo\u00eb@b\u00fccher.example"),  # decomposed and capitals; composed
    ("zo\u00eb@b\u00fccher.example", "ZOE\u0308@BU\u0308CHER.EXAMPLE"),
    ("\u00c5sa@example.com", "A\u030asa@Example.COM"),
], ids=["configured decomposed", "sent decomposed", "a capital with a ring"])
def test_an_admin_written_in_another_unicode_form_or_case_is_the_same_person(monkeypatch, configured, sent):
    """An address typed on one keyboard and sent by a provider in another Unicode form (NFC and NFD look the same)
    or case names the same admin: both sides are compared in NFC, lowercased."""
    monkeypatch.setenv("CIFAR10_ADMINS", f"{configured}, {BOB}")
    user = {"is_logged_in": True, "email": sent, "email_verified": True}
    person = settings.Person(sign_in=True, email=signin.email_of(user), verified=signin.address_verified(user))
    assert settings.refusal(person, settings.CLEAR) is None
    assert person.email in settings.configured_admins()


def test_history_filtered_to_someone_whose_last_record_was_deleted_says_so(store_env):
    """Issue 27.7: the filter lost the person with their last record, and History showed everyone's, silently."""
    from db import Store

    store = Store.from_env()
    store.save_predictions([prediction("alice's")], by=ALICE)
    store.save_predictions([prediction("bob's")], by=BOB)
    history = signed_in(BOB, "pages/1_History.py")
    [people] = [box for box in history.multiselect if box.label == "Saved or labelled by"]
    people.set_value([BOB])
    history.run()
    assert "1 of 2 saved images match" in " ".join(caption.value for caption in history.caption)
    [bobs] = [record.id for record in store.list_predictions() if record.saved_by == BOB]
    history.button(key=f"delete-{bobs}").click()
    history.run()
    [people] = [box for box in history.multiselect if box.label == "Saved or labelled by"]
    assert people.value == [BOB]
    assert "0 of 1 saved images match" in " ".join(caption.value for caption in history.caption)
    assert any(BOB in shown(info.value) and "any more" in info.value for info in history.info)
    [undo] = [button for button in history.button if button.label.startswith("Undo")]
    undo.click()
    history.run()
    assert "1 of 2 saved images match" in " ".join(caption.value for caption in history.caption)
    assert not any(BOB in shown(info.value) for info in history.info)
    store.close()


def test_records_saved_before_have_no_one_named(tmp_path):
    """Migration 7 adds the columns to a database that has records: they stay empty, nobody is made up."""
    from database_sqlite import SQLiteDatabase
    from images_folder import FolderImages
    from store import Store

    path = sqlite_file_at_version(
        tmp_path / "old.db", 6,
        "INSERT INTO predictions (id, content_hash, image_file, source, predicted_label, confidence, final_label, "
        "is_correct, created_at) VALUES (1, 'abc', 'abc.png', 'old.png', 'cat', 0.5, 'cat', 1, '2025-01-01T00:00:00+00:00')")
    store = Store(SQLiteDatabase(path), FolderImages(tmp_path / "images"))
    [old] = store.list_predictions()
    assert (old.source, old.saved_by, old.labelled_by, old.labelled_at) == ("old.png", "", "", "")
    store.close()


# ---------------------------------------------------------------- the /export route

@pytest.fixture
def streamlit_secrets(tmp_path):
    """Streamlit's own secrets (what st.login, its cookie signing and the server read) from a file of the test's."""
    from streamlit import config
    from streamlit.runtime.secrets import secrets_singleton

    path = tmp_path / "streamlit-secrets.toml"
    path.write_text("[auth]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in AUTH.items()))
    before = config.get_option("secrets.files")
    config.set_option("secrets.files", [str(path)])
    secrets_singleton._reset()
    yield path
    config.set_option("secrets.files", before)
    secrets_singleton._reset()


def identity_cookies(user: dict) -> dict[str, str]:
    """The cookies Streamlit's own OAuth callback sets for this user (its _set_auth_cookie, signed with the secrets'
    cookie_secret), as a browser sends them back."""
    from starlette.responses import Response
    from streamlit.web.server.starlette import starlette_auth_routes

    response = Response()
    run_coroutine(starlette_auth_routes._set_auth_cookie(response, user, {"id_token": "x"}))
    cookies = {}
    for name, value in response.raw_headers:
        if name == b"set-cookie":
            pair = value.decode("latin-1").split(";")[0]
            if "=" in pair and not pair.endswith("="):
                key, _, cookie = pair.partition("=")
                cookies[key] = cookie.strip('"')
    return cookies


def test_the_export_route_answers_only_a_cookie_streamlit_signed(store_env, streamlit_secrets):
    origin = "http://localhost:8501"
    signed = identity_cookies({"email": ALICE, "origin": origin, "is_logged_in": True, "provider": "default"})
    assert export("cifar10_feedback.csv", signed)[0] == 200
    assert export("cifar10_feedback.csv", {})[0] == 401
    unsigned = json.dumps({"email": ALICE, "origin": origin, "is_logged_in": True})
    assert export("cifar10_feedback.csv", {"_streamlit_user": unsigned})[0] == 401
    tampered = dict(signed, _streamlit_user=signed["_streamlit_user"].replace("Ii", "Ij", 1)[:-2] + "xx")
    assert export("cifar10_feedback.csv", tampered)[0] == 401
    streamlit_secrets.write_text(streamlit_secrets.read_text().replace(AUTH["cookie_secret"], "another-secret-" * 3))
    from streamlit.runtime.secrets import secrets_singleton

    secrets_singleton._reset()
    forged = identity_cookies({"email": ALICE, "origin": origin, "is_logged_in": True, "provider": "default"})
    streamlit_secrets.write_text(streamlit_secrets.read_text().replace("another-secret-" * 3, AUTH["cookie_secret"]))
    secrets_singleton._reset()
    assert export("cifar10_feedback.csv", forged)[0] == 401  # signed, but with another secret
    other_app = identity_cookies({"email": ALICE, "origin": "http://elsewhere:8501", "is_logged_in": True})
    assert export("cifar10_feedback.csv", other_app)[0] == 401  # signed for another address
    status, body = export("cifar10_feedback.csv", signed)
    assert status == 200 and body.startswith(b"id,source")
