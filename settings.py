"""The settings that choose the store and guard it: where records and images live, the admin password, the admins by
name when people sign in, and who may do what. Every setting that cannot be used as written is a SettingsError
naming it and what is wrong, never a password."""

from __future__ import annotations

import hmac
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from records import SettingsError

ROOT = Path(__file__).resolve().parent
DB_PATH_ENV = "CIFAR10_DB_PATH"
DATABASE_URL_ENV = "CIFAR10_DATABASE_URL"
IMAGE_DIR_ENV = "CIFAR10_IMAGE_DIR"
IMAGE_STORE_ENV = "CIFAR10_IMAGE_STORE"
ADMIN_PASSWORD_ENV = "CIFAR10_ADMIN_PASSWORD"
ADMINS_ENV = "CIFAR10_ADMINS"
# What may separate the admins' addresses; what is taken off around each, being what a person does not see or reads
# as decoration (a TOML list's brackets and quotes, Markdown's backticks, the byte-order mark of a .env saved by
# Notepad, the zero-width characters of a chat); and what one is: a name with no space, quote, bracket or separator,
# one @, and a domain of dot-separated labels (letters and digits, hyphens inside; no empty label, no full stop at
# the end), so that "Ana <ana@example.com>", a stray word or a sentence's full stop is named, not compared with
# anyone's address. Anything invisible left inside (isprintable) is named too: it would match nobody, unseen.
ADMIN_SEPARATORS = re.compile(r"[\s,;]+")
ADMIN_WRAPPING = "[]\"'`\ufeff\u200b\u200c\u200d\u2060\u00ad\u200e\u200f"
EMAIL_ADDRESS = re.compile(r"[^@\s\"'<>()\[\],;:]+@(?P<domain>[^@\s.]+(?:\.[^@\s.]+)*)")
# How many wrong admins a SettingsError quotes, and how much of each: it is shown to everyone signed in.
QUOTED_ENTRIES, QUOTED_LENGTH = 3, 60
# Both next to app.py, whatever the working directory: a server started elsewhere finds the same store.
DEFAULT_DB_PATH = ROOT / "image_classification.db"
DEFAULT_IMAGE_DIR = ROOT / "temp_images"
# The weights the app ships (with their model card and novelty bank beside them): version 1 of a new store.
SHIPPED_WEIGHTS = ROOT / "models" / "resnet18_cifar10.pt"
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
    return _secrets_setting(ADMIN_PASSWORD_ENV, "the admin password is unknown", "deleting and importing are refused",
                            lambda value: isinstance(value, str) and bool(value), "a password: it must be a quoted "
                            f'non-empty text ({ADMIN_PASSWORD_ENV} = "...")', "remove the line for no password")[0]


def configured_admins() -> frozenset[str]:
    """CIFAR10_ADMINS, the e-mail addresses of the admins when sign-in is on: from the environment (empty: unset),
    else from the top level of a secrets file (a text, or a list of texts); separated by commas, semicolons, spaces
    or new lines (a TOML list pasted into the environment reads too); compared as normal_address compares. Read on
    every check, like the password, and failing closed like it: an entry that is not an e-mail address, or a
    secrets file that cannot be read or sets it under a [section] or to something else, raises SettingsError naming
    it (taken as "no admins" or "the old admins", a wrong one would let the wrong people delete, or nobody without a
    word)."""
    def valid(value) -> bool:
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(name, str) for name in value))

    refused = "clearing the database and deleting records others saved are refused"
    value, where = os.environ.get(ADMINS_ENV), "in the environment"
    if not value:
        value, secrets = _secrets_setting(
            ADMINS_ENV, "the admins are unknown", refused, valid, 'e-mail addresses: it must be a quoted text '
            '(CIFAR10_ADMINS = "ana@example.com, bo@example.com")', "remove the line for no admins")
        where = f"in the secrets file {secrets}"
    texts = [value] if isinstance(value, str) else value or []
    entries = [entry for text in texts
               for entry in (part.strip(ADMIN_WRAPPING) for part in ADMIN_SEPARATORS.split(text)) if entry]
    wrong = [entry for entry in entries if not _is_email_address(entry)]
    if wrong:
        quoted = ", ".join(_quoted(entry) for entry in wrong[:QUOTED_ENTRIES])
        more = f" and {len(wrong) - QUOTED_ENTRIES} more" if len(wrong) > QUOTED_ENTRIES else ""
        which = "which is not an e-mail address" if len(wrong) == 1 else "which are not e-mail addresses"
        raise SettingsError(f"{ADMINS_ENV} {where} names {quoted}{more}, {which}: {refused} until it is fixed "
                            "(addresses separated by commas: ana@example.com, bo@example.com).")
    return frozenset(normal_address(entry) for entry in entries)


def normal_address(address: str) -> str:
    """An e-mail address as admins and signed-in people are compared: without surrounding spaces or case, and in
    one Unicode form (NFC), since "ü" typed as one character or as "u" and a combining mark looks the same. Not
    casefold: it makes "ß" "ss", another address."""
    return unicodedata.normalize("NFC", address.strip().lower())


def _is_email_address(entry: str) -> bool:
    """Whether `entry` has the shape of EMAIL_ADDRESS, with nothing invisible in it and a domain whose labels are
    letters, digits and combining marks (a "ü" may be written as "u" and one), with hyphens only inside."""
    shape = EMAIL_ADDRESS.fullmatch(entry)
    return bool(shape) and entry.isprintable() and all(
        label[0] != "-" and label[-1] != "-"
        and all(c == "-" or c.isalnum() or unicodedata.category(c).startswith("M") for c in label)
        for label in shape["domain"].split("."))


def _quoted(entry: str) -> str:
    """A wrong entry as a SettingsError quotes it: cut to about QUOTED_LENGTH characters, and what cannot be seen
    written as its escape (\\u200b), so that the reader sees what is wrong."""
    cut = entry if len(entry) <= QUOTED_LENGTH else entry[:QUOTED_LENGTH - 1] + "…"
    return "'" + "".join(c if c.isprintable() else ascii(c)[1:-1] for c in cut) + "'"


def _secrets_setting(setting: str, unknown: str, refused: str, valid, form: str,
                     remedy: str) -> tuple[object, Path | None]:
    """The value of `setting` at the top level of the first secrets file that sets it (secrets_files()), and that
    file; (None, None) when none does. SettingsError, saying that it is `unknown` and so `refused`, when a file
    cannot be read, sets it under a [section] or to a value that is not `valid` (`form` says what it must be);
    never quoting a value."""
    import tomllib

    found, where = None, None
    for secrets in secrets_files():
        try:
            settings = tomllib.loads(secrets.read_bytes().decode())
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, ValueError) as error:  # unreadable, not UTF-8, not TOML (tomllib quotes at most a key or one character)
            reason = error.strerror if isinstance(error, OSError) else str(error)
            raise SettingsError(f"The secrets file {secrets} cannot be read ({reason}), so {unknown}: {refused} until "
                                f'it is fixed (a text value needs quotes: {setting} = "...").') from error
        section = _section_setting(settings, setting)
        if section:
            raise SettingsError(f"The secrets file {secrets} sets {setting} under [{section}], where it is not read: "
                                f"{refused} until it is moved to the top of the file, above every [section].")
        if setting in settings:
            if not valid(settings[setting]):
                raise SettingsError(f"The secrets file {secrets} sets {setting} to something other than {form}. "
                                    f"{refused[0].upper() + refused[1:]} until it is fixed ({remedy}).")
            if found is None:
                found, where = settings[setting], secrets
    return found, where


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


@dataclass(frozen=True)
class Person:
    """Who acts. With sign-in on (an [auth] section in the secrets): the signed-in person's e-mail, lowercased, or ""
    while nobody usable is signed in. With it off: nobody by name, and the admin password guards instead."""

    sign_in: bool = False
    email: str = ""
    # Whether the sign-in provider vouches for that address (signin.address_verified): being an admin by name needs
    # it, as an address nobody vouches for may be one that whoever runs some directory typed in (Microsoft Entra ID
    # sends no email_verified claim; another tenant's admin can give an account anyone's address).
    verified: bool = False


# What only some may do (words that finish "Only an admin may ..."); DELETE is of records saved by others.
CLEAR = "clear the database"
DELETE = "delete records saved by others"
IMPROVE = "fine-tune the model or choose the one in use"


def refusal(person: Person, action: str, password: str = "", owner: str | None = None) -> str | None:
    """Why `person` may not do `action` (CLEAR, or DELETE of a record `owner` saved; owner None: of any record not
    theirs); None: allowed. Without sign-in, the admin password decides (admin_refusal). With it, anyone
    signed in deletes what they saved themselves, and the rest is for the admins named in CIFAR10_ADMINS whose
    address the provider vouches for, refused while they cannot be known (a broken setting)."""
    if not person.sign_in:
        return admin_refusal(password)
    if not person.email:
        return "Sign in first."
    if action == DELETE and owner is not None and owner == person.email:
        return None
    try:
        admins = configured_admins()
    except SettingsError as error:
        return str(error)
    if person.email in admins:
        if person.verified:
            return None
        return (f"Only an admin may {action}: {ADMINS_ENV} names you, {person.email}, but your sign-in provider did "
                "not say that this address is verified (its email_verified claim), which an admin needs. On Microsoft "
                "Entra ID, add the optional claim xms_edov to the app's ID token.")
    if action == DELETE and owner is not None:
        whose = f"by {owner}" if owner else "before people signed in"
        return f"Only an admin may {action}: this one was saved {whose}, and you are {person.email}."
    return f"Only an admin may {action}; admins are named in {ADMINS_ENV}, and you are {person.email}."


def passwords_in(parts: SplitResult) -> set[str]:
    """A database URL's password (user:password@ or ?password=) in each form an error may quote: as written and
    decoded."""
    pairs = (pair.partition("=") for pair in parts.query.split("&"))
    written = [parts.password or "", *(value for key, _, value in pairs if unquote(key) == "password")]
    return {form for password in written for form in (password, unquote(password)) if form}
