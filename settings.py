"""The settings that choose the store and guard it: where records and images live, and the admin password.
Every setting that cannot be used as written is a SettingsError naming it and what is wrong, never a password."""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from records import SettingsError

ROOT = Path(__file__).resolve().parent
DB_PATH_ENV = "CIFAR10_DB_PATH"
DATABASE_URL_ENV = "CIFAR10_DATABASE_URL"
IMAGE_DIR_ENV = "CIFAR10_IMAGE_DIR"
IMAGE_STORE_ENV = "CIFAR10_IMAGE_STORE"
ADMIN_PASSWORD_ENV = "CIFAR10_ADMIN_PASSWORD"
# Both next to app.py, whatever the working directory: a server started elsewhere finds the same store.
DEFAULT_DB_PATH = ROOT / "image_classification.db"
DEFAULT_IMAGE_DIR = ROOT / "temp_images"
# The secrets files the admin password is read from when it is not in the environment, first one wins; None:
# those Streamlit reads by default (secrets_files()). Tests set their own.
SECRETS_FILES: tuple[Path, ...] | None = None


def secrets_files() -> tuple[Path, ...]:
    """SECRETS_FILES, else the secrets.toml files Streamlit reads by default, the one that wins first: the app's
    folder's (Streamlit's script-level file), the working directory's, the user's (~/.streamlit). Computed on
    each call, as the working directory can change; Streamlit is not imported (the data layer runs without it)."""
    if SECRETS_FILES is not None:
        return SECRETS_FILES
    folders = [ROOT]
    for where in (Path.cwd, Path.home):
        try:
            folders.append(where())
        except (OSError, RuntimeError):  # a working directory since deleted; no home directory
            continue
    return tuple(dict.fromkeys(Path(os.path.abspath(folder / ".streamlit" / "secrets.toml")) for folder in folders))


def configured_admin_password() -> str | None:
    """CIFAR10_ADMIN_PASSWORD from the environment (empty: unset), else from the top level of a secrets file
    (secrets_files()); None when none sets it. Files are read on every check, so a fixed one counts without a
    restart.

    Fails closed: a secrets file that cannot be read or parsed, that sets the password under a [section] (where
    it is not read), or to anything but a non-empty text (0, false, "", []), raises SettingsError; taken as "no
    password", a wrong one would delete everything."""
    if os.environ.get(ADMIN_PASSWORD_ENV):
        return os.environ[ADMIN_PASSWORD_ENV]
    import tomllib

    found = None
    for secrets in secrets_files():
        try:
            settings = tomllib.loads(secrets.read_bytes().decode())
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, ValueError) as error:  # unreadable, not UTF-8, not TOML (tomllib quotes at most a key or one character)
            reason = error.strerror if isinstance(error, OSError) else str(error)
            raise SettingsError(f"The secrets file {secrets} cannot be read ({reason}), so the admin password is "
                                "unknown: deleting and importing are refused until it is fixed (a text value "
                                f'needs quotes: {ADMIN_PASSWORD_ENV} = "...").') from error
        section = _section_setting(settings, ADMIN_PASSWORD_ENV)
        if section:
            raise SettingsError(f"The secrets file {secrets} sets {ADMIN_PASSWORD_ENV} under [{section}], where it "
                                "is not read: deleting and importing are refused until it is moved to the top of "
                                "the file, above every [section].")
        if ADMIN_PASSWORD_ENV in settings:
            value = settings[ADMIN_PASSWORD_ENV]
            if not isinstance(value, str) or not value:
                raise SettingsError(f"The secrets file {secrets} sets {ADMIN_PASSWORD_ENV} to something other than "
                                    "a password: it must be a quoted non-empty text "
                                    f'({ADMIN_PASSWORD_ENV} = "..."). Deleting and importing are refused until it '
                                    "is fixed (remove the line for no password).")
            found = found or value
    return found


def _section_setting(table: dict, key: str, within: str = "") -> str | None:
    """The [section] (dotted, at any depth) of a parsed TOML file under which `key` is set, if any."""
    for name, value in table.items():
        section = f"{within}.{name}" if within else name
        for nested in value if isinstance(value, list) else [value]:  # [[name]] is a list of sections
            if isinstance(nested, dict):
                if key in nested:
                    return section
                deeper = _section_setting(nested, key, section)
                if deeper:
                    return deeper
    return None


def split_url(setting: str, url: str, schemes: tuple[str, ...], form: str) -> SplitResult:
    """The URL set in `setting`, in parts; SettingsError saying what is wrong when it is not of `form` (a user
    and password belong in it only when `form` shows one, user:password@). The message never repeats the URL: it
    may hold a password, which a malformed URL leaves anywhere."""
    credentials = "@" in form
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (reading it raises ValueError unless it is a number from 0 to 65535)
    except ValueError:
        problem = "its host or port cannot be read"
    else:
        if parts.scheme not in schemes or not url.startswith(f"{parts.scheme}://"):
            problem = f"it does not start with {schemes[0]}://"
        elif "@" in url[len(f"{parts.scheme}://{parts.netloc}"):]:  # the host ended early, inside a password
            problem = "an @ comes after the host"
        elif parts.netloc.count("@") > 1:  # Python ends the password at the last @, libpq at the first
            problem = "it has more than one @ before the host"
        elif "@" in parts.netloc and not credentials:
            problem = "it holds a user or password (before an @), which does not belong there"
        else:
            return parts
    if credentials:
        hint = (" A user or password containing / ? # or @ must be percent-encoded (%2F, %3F, %23, %40)."
                if "@" in url else "")
    else:
        hint = " Credentials go in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY." if "@" in url else ""
    raise SettingsError(f"{setting} is not of the form {form}: {problem}.{hint}")


def admin_refusal(given: str) -> str | None:
    """Why Clear database, Delete or import is refused with this password: the configured one cannot be known
    (a broken setting, named), or this one is wrong. None: allowed."""
    try:
        allowed = admin_password_ok(given)
    except SettingsError as error:
        return str(error)
    return None if allowed else "Wrong admin password."


def admin_password_ok(given: str) -> bool:
    """No password configured: a personal install, everything allowed. Otherwise a constant-time compare.
    Raises SettingsError while the configured password cannot be known."""
    configured = configured_admin_password()
    if not configured:
        return True
    return hmac.compare_digest(given.encode(), configured.encode())


def passwords_in(parts: SplitResult) -> set[str]:
    """A database URL's password (user:password@ or ?password=) in each form an error may quote: as written and
    decoded."""
    pairs = (pair.partition("=") for pair in parts.query.split("&"))
    written = [parts.password or "", *(value for key, _, value in pairs if unquote(key) == "password")]
    return {form for password in written for form in (password, unquote(password)) if form}
