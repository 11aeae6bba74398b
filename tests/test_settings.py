"""Settings written wrong: a visible error that names the setting (or file) and never shows a password, never an
exception page; and while the admin password cannot be known, nothing can be deleted or imported."""

from __future__ import annotations

import json
import unicodedata

import hypothesis
import pytest
from hypothesis import strategies
from streamlit.testing.v1 import AppTest

import db
import settings
import signin
from conftest import shown, use_store
from db import SettingsError, Store, StoreError
from test_app import RED, click, rows, start_app, start_history, upload
from test_archive import good_members, make_zip, manifest_for, run_cli
from test_db import prediction
from test_team import ALICE, BOB, signed_in

PASSWORD = "team-s3cret"
GOOD_SECRETS = f'CIFAR10_ADMIN_PASSWORD = "{PASSWORD}"\n'
# Each of these once meant "no password", so a wrong one deleted everything.
UNREADABLE_SECRETS = {
    "unquoted": f"CIFAR10_ADMIN_PASSWORD = {PASSWORD}\n",
    "in a section": f'[admin]\nCIFAR10_ADMIN_PASSWORD = "{PASSWORD}"\n',
}


@pytest.fixture
def secrets_file(tmp_path, monkeypatch):
    """The one secrets file the app reads: in tmp_path, never the repository's or the user's."""
    path = tmp_path / "secrets.toml"
    monkeypatch.setattr(settings, "SECRETS_FILES", (path,))
    monkeypatch.delenv("CIFAR10_ADMIN_PASSWORD", raising=False)
    return path


def page_text(app: AppTest) -> str:
    """All the words a page shows, so a test can check that no password is among them."""
    kinds = ("title", "header", "markdown", "caption", "text", "error", "warning", "info", "success", "exception")
    return shown(" ".join(str(element.value) for kind in kinds for element in app.get(kind)))


# ---------------------------------------------------------------- the admin password fails closed

@pytest.mark.parametrize("content, named", [
    (UNREADABLE_SECRETS["unquoted"], "line 1"),
    (UNREADABLE_SECRETS["in a section"], "[admin]"),
    (f'[server.team]\nCIFAR10_ADMIN_PASSWORD = "{PASSWORD}"\n', "[server.team]"),
], ids=["unquoted", "in a section", "in a nested section"])
def test_a_password_that_cannot_be_read_is_an_error_not_no_password(secrets_file, content, named):
    secrets_file.write_text(content)
    for check in (db.configured_admin_password, lambda: db.admin_password_ok("guess")):
        with pytest.raises(SettingsError) as caught:
            check()
        assert str(secrets_file) in str(caught.value) and named in str(caught.value)
        assert "s3cret" not in str(caught.value)
    secrets_file.write_text(GOOD_SECRETS + "[admin]\nnote = 1\n")  # fixed: counts at once, no restart
    assert db.configured_admin_password() == PASSWORD


def test_a_secrets_file_that_cannot_be_read_is_an_error(secrets_file):
    secrets_file.mkdir()
    with pytest.raises(SettingsError, match="cannot be read") as caught:
        db.configured_admin_password()
    assert str(secrets_file) in str(caught.value)


@pytest.mark.parametrize("value", ["0", "987654", "false", '""', "[]", '["s3cret"]', "{ word = 1 }"],
                         ids=["zero", "number", "false", "empty text", "empty list", "list", "table"])
def test_a_password_that_is_not_a_non_empty_text_is_an_error(secrets_file, value):
    """Issue 15.4: CIFAR10_ADMIN_PASSWORD = 0, false, "" or [] meant "no password": a wrong one deleted everything."""
    secrets_file.write_text(f"CIFAR10_ADMIN_PASSWORD = {value}\n")
    for check in (db.configured_admin_password, lambda: db.admin_password_ok("wrong")):
        with pytest.raises(SettingsError) as caught:
            check()
        message = str(caught.value)
        assert str(secrets_file) in message and "CIFAR10_ADMIN_PASSWORD" in message and "quoted" in message
        assert "987654" not in message and "s3cret" not in message


def test_an_empty_environment_variable_is_no_password(secrets_file, monkeypatch):
    monkeypatch.setenv("CIFAR10_ADMIN_PASSWORD", "")
    assert db.configured_admin_password() is None
    secrets_file.write_text(GOOD_SECRETS)  # and the files are read as when it is unset
    assert db.configured_admin_password() == PASSWORD and not db.admin_password_ok("wrong")


@pytest.fixture
def default_secrets(tmp_path, monkeypatch):
    """The secrets files as the app finds them by default, none of them the real ones: the project's (db.ROOT),
    the user's (HOME) and the working directory's. Returns a function that writes a password into one of them."""
    places = {"project": tmp_path / "project", "home": tmp_path / "home", "cwd": tmp_path / "cwd",
              "elsewhere": tmp_path / "elsewhere"}
    for folder in places.values():
        (folder / ".streamlit").mkdir(parents=True)
    monkeypatch.setattr(settings, "ROOT", places["project"])
    monkeypatch.setenv("HOME", str(places["home"]))
    monkeypatch.delenv("CIFAR10_ADMIN_PASSWORD", raising=False)
    monkeypatch.chdir(places["cwd"])

    def write(place: str, password: str) -> None:
        (places[place] / ".streamlit" / "secrets.toml").write_text(f'CIFAR10_ADMIN_PASSWORD = "{password}"\n')

    write.places = places
    return write


def test_the_secrets_files_streamlit_reads_are_read(default_secrets, monkeypatch):
    """Issue 15.4: a password in the working directory's .streamlit/secrets.toml, which Streamlit reads, was
    ignored, so any password deleted everything. Streamlit's order counts: the script's folder (here the project's)
    over the working directory's over the user's; the working directory is the one at each check."""
    assert db.configured_admin_password() is None
    default_secrets("cwd", "from-cwd")
    assert db.configured_admin_password() == "from-cwd" and not db.admin_password_ok("wrong")
    default_secrets("home", "from-home")
    assert db.configured_admin_password() == "from-cwd"
    monkeypatch.chdir(default_secrets.places["elsewhere"])
    assert db.configured_admin_password() == "from-home"
    default_secrets("project", "from-project")
    assert db.configured_admin_password() == "from-project"


def test_a_broken_secrets_file_in_the_working_directory_is_an_error(default_secrets):
    secrets = default_secrets.places["cwd"] / ".streamlit" / "secrets.toml"
    secrets.write_text(UNREADABLE_SECRETS["unquoted"])
    with pytest.raises(SettingsError) as caught:
        db.admin_password_ok("wrong")
    assert str(secrets) in str(caught.value) and "s3cret" not in str(caught.value)


@pytest.mark.parametrize("content", UNREADABLE_SECRETS.values(), ids=UNREADABLE_SECRETS)
def test_clear_database_is_refused_while_the_password_cannot_be_read(store_env, secrets_file, content):
    db_path, _ = store_env
    secrets_file.write_text(content)
    app = start_app()
    upload(app, [("red.png", RED, "image/png")])
    click(app, "Save")
    [error] = app.sidebar.error
    assert str(secrets_file) in shown(error.value) and "s3cret" not in page_text(app)
    assert [button.disabled for button in app.sidebar.button if button.label == "Clear database"] == [True]
    secrets_file.write_text(GOOD_SECRETS)
    app.run()
    click(app, "Clear database")
    secrets_file.write_text(content)  # broken while the confirmation is open
    click(app, "Yes, delete everything")
    assert any(str(secrets_file) in shown(error.value) for error in app.error)
    assert len(rows(db_path)) == 1


@pytest.mark.parametrize("content", UNREADABLE_SECRETS.values(), ids=UNREADABLE_SECRETS)
def test_history_delete_is_refused_while_the_password_cannot_be_read(store_env, secrets_file, content):
    db_path, _ = store_env
    app = start_app()
    upload(app, [("red.png", RED, "image/png")])
    click(app, "Save")
    secrets_file.write_text(content)
    history = start_history()
    assert any(str(secrets_file) in shown(error.value) for error in history.error)
    assert "s3cret" not in page_text(history)
    delete_buttons = [button for button in history.button if button.key and button.key.startswith("delete-")]
    assert [button.disabled for button in delete_buttons] == [True]
    secrets_file.write_text(GOOD_SECRETS)
    history.run()
    secrets_file.write_text(content)  # broken between showing the page and the click
    history.button(key=delete_buttons[0].key).click()
    history.run()
    assert not history.exception and len(rows(db_path)) == 1
    assert any("Nothing was deleted" in error.value for error in history.error)


def test_import_is_refused_while_the_password_cannot_be_read(store_env, tmp_path):
    home = tmp_path / "home"
    (home / ".streamlit").mkdir(parents=True)
    (home / ".streamlit" / "secrets.toml").write_text(UNREADABLE_SECRETS["unquoted"])
    members = good_members(3)
    path = make_zip(tmp_path / "a.zip", {**members, "labels.csv": manifest_for(members)})
    refused = run_cli("import", str(path), stdin="guess\n", env={"HOME": str(home)})
    assert refused.returncode == 1 and "secrets.toml" in refused.stderr and "s3cret" not in refused.stderr
    assert "Traceback" not in refused.stderr and Store.from_env().count() == 0


# ---------------------------------------------------------------- settings never show secrets nor crash

# (environment, the setting the error must name); every password here contains "s3cr".
BAD_SETTINGS = {
    "database URL without //": ({"CIFAR10_DATABASE_URL": "postgresql:postgres:s3cr/et@127.0.0.1:9/db"},
                                "CIFAR10_DATABASE_URL"),
    "/ in the password": ({"CIFAR10_DATABASE_URL": "postgresql://postgres:s3cr/et@127.0.0.1:9/db"},
                          "CIFAR10_DATABASE_URL"),
    "/ in a password read as a port": ({"CIFAR10_DATABASE_URL": "postgresql://postgres:12/s3cret@127.0.0.1:9/db"},
                                       "CIFAR10_DATABASE_URL"),
    "port out of range": ({"CIFAR10_DATABASE_URL": "postgresql://postgres:s3cret@127.0.0.1:99999/db"},
                          "CIFAR10_DATABASE_URL"),
    "unclosed IPv6 host": ({"CIFAR10_DATABASE_URL": "postgresql://postgres:s3cret@[::1:9/db"}, "CIFAR10_DATABASE_URL"),
    "keyword string": ({"CIFAR10_DATABASE_URL": "host=127.0.0.1 port=9 password=s3cret"}, "CIFAR10_DATABASE_URL"),
    "endpoint without http://": ({"CIFAR10_IMAGE_STORE": "s3://cifar10/images", "AWS_ENDPOINT_URL": "127.0.0.1:9"},
                                 "AWS_ENDPOINT_URL"),
    "credentials in the image store": ({"CIFAR10_IMAGE_STORE": "s3://team:s3cret@cifar10/images"},
                                       "CIFAR10_IMAGE_STORE"),
    "unclosed IPv6 image store": ({"CIFAR10_IMAGE_STORE": "s3://[cifar10/images"}, "CIFAR10_IMAGE_STORE"),
    # Python reads the last @ as the end of the password, libpq the first: libpq's error quoted the rest.
    "@ in the password": ({"CIFAR10_DATABASE_URL": "postgresql://postgres:ab@s3cret@127.0.0.1:9/db"},
                          "CIFAR10_DATABASE_URL"),
    "credentials in the endpoint": ({"CIFAR10_IMAGE_STORE": "s3://cifar10/images",
                                     "AWS_ENDPOINT_URL": "http://team:s3cret@127.0.0.1:9"}, "AWS_ENDPOINT_URL"),
}


@pytest.fixture(params=BAD_SETTINGS.values(), ids=BAD_SETTINGS)
def bad_setting(request, tmp_path, monkeypatch) -> str:
    """A store configured with one malformed setting (SQLite and a folder for the rest); returns its name."""
    env, setting = request.param
    use_store(monkeypatch, {"CIFAR10_DB_PATH": str(tmp_path / "feedback.db"),
                            "CIFAR10_IMAGE_DIR": str(tmp_path / "images"), **env})
    return setting


def test_a_malformed_setting_is_named_with_no_password(bad_setting):
    with pytest.raises(SettingsError) as caught:
        Store.from_env()
    assert bad_setting in str(caught.value) and "s3cr" not in str(caught.value)


def test_psycopg_errors_that_repeat_the_url_have_the_password_masked(monkeypatch, tmp_path):
    # libpq rejects this percent-encoding before connecting, quoting the password as written.
    use_store(monkeypatch, {"CIFAR10_DATABASE_URL": "postgresql://postgres:s3%zzcret@127.0.0.1:9/db",
                            "CIFAR10_IMAGE_DIR": str(tmp_path / "images")})
    with pytest.raises(StoreError) as caught:
        Store.from_env()
    assert "CIFAR10_DATABASE_URL" in str(caught.value) and "percent-encoded" in str(caught.value)
    assert "zzcret" not in str(caught.value)


def test_every_page_shows_a_malformed_setting_without_the_password(bad_setting):
    app = start_app()
    [error] = app.sidebar.error
    assert bad_setting in shown(error.value) and "s3cr" not in page_text(app)
    history = start_history()
    [error] = history.error
    assert bad_setting in shown(error.value) and "s3cr" not in page_text(history)


@pytest.mark.parametrize("case", ["database URL without //", "/ in the password", "endpoint without http://",
                                  "@ in the password", "credentials in the endpoint",
                                  "credentials in the image store"])
def test_the_command_line_names_a_malformed_setting_without_the_password(case, tmp_path, monkeypatch):
    env, setting = BAD_SETTINGS[case]
    use_store(monkeypatch, {"CIFAR10_DB_PATH": str(tmp_path / "feedback.db"), **env})
    result = run_cli("export", str(tmp_path / "x.zip"))
    assert result.returncode == 1 and setting in result.stderr
    assert "s3cr" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("setting, url, advice", [
    ("CIFAR10_DATABASE_URL", "postgresql://alice-user:abc@TopSecretPart@127.0.0.1:1/db", "%40"),
    ("AWS_ENDPOINT_URL", "http://alice-user:TopSecretPart@127.0.0.1:1", "AWS_SECRET_ACCESS_KEY"),
    ("AWS_ENDPOINT_URL", "http://TopSecretPart@127.0.0.1:1", "AWS_SECRET_ACCESS_KEY"),
    ("CIFAR10_IMAGE_STORE", "s3://alice-user:TopSecretPart@cifar10/images", "AWS_SECRET_ACCESS_KEY"),
], ids=["two @ in the database URL", "user and password in the endpoint", "key in the endpoint",
        "user and password in the image store"])
def test_a_url_with_credentials_where_they_cannot_be_read_repeats_none_of_them(tmp_path, monkeypatch, setting, url,
                                                                                 advice):
    """Issue 15.6: postgresql://user:abc@Top@host showed "failed to resolve host 'Top@host'", and an endpoint's
    key:secret@ was shown in every object store error. Neither repeats any part of what comes before the @."""
    env = {"CIFAR10_DB_PATH": str(tmp_path / "feedback.db"), setting: url}
    if setting == "AWS_ENDPOINT_URL":
        env["CIFAR10_IMAGE_STORE"] = "s3://cifar10/images"
    use_store(monkeypatch, env)
    with pytest.raises(SettingsError) as caught:
        Store.from_env()
    message = str(caught.value)
    assert setting in message and advice in message
    assert not any(part in message for part in ("alice", "abc", "TopSecret"))


# ---------------------------------------------------------------- the admins, however they are written

ADMIN_LISTS = {
    "commas": " alice@example.com , Bob@Example.com",
    "semicolons": "alice@example.com;bob@example.com;",
    "spaces": "alice@example.com  bob@example.com",
    "new lines": "alice@example.com\r\nbob@example.com\n",
    "a TOML list": '["alice@example.com", "bob@example.com"]',
    "a TOML list in single quotes": "['alice@example.com','bob@example.com']",
    # Invisible or decorating characters around an address, where a person sees only the address (issue 27, review).
    "a byte-order mark (a .env saved by Notepad)": "\ufeffalice@example.com,bob@example.com",
    "zero-width characters (pasted from a chat)": "\u200balice@example.com\u200b, \u2060bob@example.com\u200d",
    "no-break spaces": "alice@example.com,\u00a0bob@example.com\u00a0",
    "backticks (pasted from Markdown)": "`alice@example.com`, `bob@example.com`",
}


@pytest.fixture
def no_admins(secrets_file, monkeypatch):
    """No CIFAR10_ADMINS in the environment, and the one secrets file the app reads, empty."""
    monkeypatch.delenv("CIFAR10_ADMINS", raising=False)
    return secrets_file


@pytest.mark.parametrize("value", ADMIN_LISTS.values(), ids=ADMIN_LISTS)
def test_admins_separated_the_common_ways_are_all_admins(no_admins, monkeypatch, value):
    """Issue 27.5: admins separated by anything but commas made nobody an admin, without a word."""
    monkeypatch.setenv("CIFAR10_ADMINS", value)
    assert settings.configured_admins() == {ALICE, BOB}
    monkeypatch.delenv("CIFAR10_ADMINS")
    no_admins.write_text(f"CIFAR10_ADMINS = {json.dumps(value)}\n")  # the same text in the secrets file
    assert settings.configured_admins() == {ALICE, BOB}
    no_admins.write_text('CIFAR10_ADMINS = ["alice@example.com; bob@example.com"]\n')  # a TOML list of such texts
    assert settings.configured_admins() == {ALICE, BOB}


ADDRESSES = strategies.from_regex(r"[A-Za-z0-9äÜ._%+-]{1,12}@[A-Za-z0-9äÜ]([A-Za-z0-9äÜ-]{0,10}[A-Za-z0-9äÜ])?"
                                  r"(\.[A-Za-z]{2,6}){0,2}", fullmatch=True)
# What may be around an address that a person does not see, or sees as decoration: a byte-order mark, a zero-width
# space, backticks.
AROUND = strategies.text("\ufeff\u200b`", max_size=2)


@hypothesis.settings(max_examples=200, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(strategies.lists(ADDRESSES, min_size=1, max_size=5), strategies.data())
def test_admins_separated_by_any_mix_of_separators_are_exactly_those_named(no_admins, addresses, data):
    text = "".join(data.draw(AROUND) + address + data.draw(AROUND)
                   + data.draw(strategies.text(",; \t\r\n", min_size=1, max_size=4)) for address in addresses)
    if data.draw(strategies.booleans()):  # pasted as a TOML list
        text = "[" + ", ".join(json.dumps(address, ensure_ascii=False) for address in addresses) + "]"
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("CIFAR10_ADMINS", text)
        assert settings.configured_admins() == {address.lower() for address in addresses}


@hypothesis.settings(max_examples=300, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(*[strategies.text(strategies.characters(exclude_categories=["Cs"], exclude_characters="\0"),
                                     max_size=6)] * 3)  # all an environment variable can hold
def test_an_admin_accepted_is_one_an_address_can_match_and_a_refusal_is_short(no_admins, before, inside, after):
    """Whatever is written around or inside an address, each admin accepted is one that a provider's address
    matches as it arrives (signin.email_of), with nothing invisible in it; anything else is a short SettingsError,
    never an entry that silently makes nobody an admin."""
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("CIFAR10_ADMINS", f"{before}alice{inside}@example.com{after}, bob@example.com")
        try:
            admins = settings.configured_admins()
        except SettingsError as error:
            assert len(str(error)) < 600
            return
    for admin in admins:
        assert signin.email_of({"is_logged_in": True, "email": admin, "email_verified": True}) == admin
        assert admin.isprintable() and not any(unicodedata.category(character) == "Cf" for character in admin)
        domain = admin.rpartition("@")[2]
        assert all(label and label[0] != "-" and label[-1] != "-" for label in domain.split(".")), admin


@pytest.mark.parametrize("value, named", [
    ("alice@example.com, bob", "'bob', which is not"),
    ("Alice Smith <alice@example.com>", "'Alice', 'Smith', '<alice@example.com>', which are not"),
    ("alice@example.com; mailto:bob@example.com", "'mailto:bob@example.com'"),
    ("alice@example.com,@example.com", "'@example.com'"),
    ("alice@example.com bob@example.com@", "'bob@example.com@'"),
    # Each of these once matched nobody's address, silently (issue 27, review).
    ("alice@example.com, bob@example.com.", "'bob@example.com.'"),
    ("Admins: alice@example.com and bob@example.com.", "'Admins:', 'and', 'bob@example.com.', which are not"),
    ("alice@example.com,bob@example..com", "'bob@example..com'"),
    ("alice@example.com,bob@-example.com", "'bob@-example.com'"),
    ("alice@example.com,bob@example.com!", "'bob@example.com!'"),
    ("alice@example.com,bob\u200b@example.com", "'bob\\u200b@example.com'"),  # shown, not invisible
    ("alice@example.com,bob@exa\x01mple.com", "'bob@exa\\x01mple.com'"),
], ids=["a name", "a name and address", "a mailto link", "no name", "two @", "a full stop after the domain",
        "a sentence", "an empty domain label", "a domain label starting with a hyphen", "punctuation after the domain",
        "an invisible character inside", "a control character inside"])
def test_an_admin_that_is_not_an_e_mail_address_is_named_and_nobody_is_an_admin(no_admins, monkeypatch, value, named):
    monkeypatch.setenv("CIFAR10_ADMINS", value)
    with pytest.raises(SettingsError) as caught:
        settings.configured_admins()
    assert f"CIFAR10_ADMINS in the environment names {named}" in str(caught.value)
    alice = settings.Person(sign_in=True, email=ALICE, verified=True)
    assert named in settings.refusal(alice, settings.CLEAR)  # refused, saying why
    monkeypatch.delenv("CIFAR10_ADMINS")
    no_admins.write_text(f"CIFAR10_ADMINS = {json.dumps(value.split(','))}\n")
    with pytest.raises(SettingsError) as caught:
        settings.configured_admins()
    assert f"CIFAR10_ADMINS in the secrets file {no_admins} names {named}" in str(caught.value)


def test_a_long_wrong_setting_quotes_a_few_short_entries_and_counts_the_rest(no_admins, monkeypatch):
    """A wrong CIFAR10_ADMINS is shown to every signed-in person, beside the buttons: 2,000 wrong entries once made
    a 108 KB message quoting each of them."""
    wrong = ",".join(f"not-{n:04}" + "x" * 200 for n in range(2000))
    monkeypatch.setenv("CIFAR10_ADMINS", f"alice@example.com,{wrong}")
    with pytest.raises(SettingsError) as caught:
        settings.configured_admins()
    message = str(caught.value)
    assert "names 'not-0000xxx" in message and "'not-0002xxx" in message and "not-0003" not in message
    assert "and 1997 more, which are not e-mail addresses" in message and len(message) < 600, message
    monkeypatch.setenv("CIFAR10_ADMINS", "alice@example.com " + "y" * 100_000)  # one very long entry
    with pytest.raises(SettingsError) as caught:
        settings.configured_admins()
    assert "names 'yyy" in str(caught.value) and "which is not an e-mail address" in str(caught.value)
    assert len(str(caught.value)) < 400


def test_the_pages_name_an_admin_that_is_not_an_e_mail_address(store_env, monkeypatch):
    Store.from_env().save_predictions([prediction("a")], by=ALICE)
    monkeypatch.setenv("CIFAR10_ADMINS", "alice@example.com; bob")
    alice = signed_in(ALICE)
    [clear] = [button for button in alice.sidebar.button if button.label == "Clear database"]
    assert clear.disabled and any("names 'bob'" in shown(caption.value) for caption in alice.sidebar.caption)
    assert "admin (CIFAR10_ADMINS)" not in shown(" ".join(caption.value for caption in alice.sidebar.caption))
    history = signed_in(ALICE, "pages/1_History.py")
    assert any("CIFAR10_ADMINS in the environment names 'bob'" in shown(caption.value) for caption in history.caption)
