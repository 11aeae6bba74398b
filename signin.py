"""Sign-in, when Streamlit's secrets have an [auth] section: Streamlit's own st.login / st.user / st.logout (OpenID
Connect through Authlib), who is at a page, the page a browser gets until it is signed in, and the check of
Streamlit's signed identity cookie for the routes Streamlit does not serve itself (the /export downloads). Without
[auth], nobody signs in and every page is open, as on a personal install."""

from __future__ import annotations

import json
from typing import Mapping

import streamlit as st
from streamlit.errors import StreamlitSecretNotFoundError

from display import escape_markdown
from settings import ADMINS_ENV, CLEAR, Person, SettingsError, normal_address, refusal

TITLE = "CIFAR-10 image classifier"


def sign_in_required() -> bool:
    """Whether Streamlit's secrets (the ones st.login reads) have an [auth] section. Secrets that exist but cannot be
    read might have one: SettingsError, so that nothing is shown or downloaded until they are fixed."""
    try:
        return "auth" in st.secrets
    except StreamlitSecretNotFoundError as error:
        if getattr(error, "error_id", None) == "no-secrets-found":
            return False
        raise SettingsError(f"The secrets cannot be read ({error}), so whether people must sign in is unknown: "
                            "nothing is shown or downloaded until they are fixed.") from error


def email_of(user: Mapping) -> str:
    """The signed-in person's e-mail, as CIFAR10_ADMINS is compared (normal_address), from st.user or Streamlit's
    identity cookie; "" when nobody is signed in, when the provider gave no e-mail, or when it sends an
    email_verified claim that is not a yes (_claim: anyone could otherwise sign in as anyone). A provider that sends
    no such claim at all (Microsoft Entra ID) is taken at its word for who saved what, but makes nobody an admin
    (address_verified)."""
    email = user.get("email")
    if not user.get("is_logged_in") or not isinstance(email, str):
        return ""
    if "email_verified" in user and not _claim(user, "email_verified"):
        return ""
    return normal_address(email)


def address_verified(user: Mapping) -> bool:
    """Whether the provider vouches for the signed-in person's address: its email_verified claim is a yes, or, where
    it sends none, Microsoft Entra ID's optional xms_edov claim (the address's domain is one the tenant verified)
    is."""
    return _claim(user, "email_verified" if "email_verified" in user else "xms_edov")


def _claim(user: Mapping, name: str) -> bool:
    """Whether a yes-or-no claim is a yes: true, or the text "true" in any case (some providers send their booleans
    as texts). Anything else sent, 1 and "yes" too, is a no: no provider is known to send those, and a claim
    misread must keep people out rather than let them in."""
    value = user.get(name)
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def current_person() -> Person:
    """Who is at this page, without drawing anything (callbacks ask too). Secrets that cannot be read count as
    sign-in on with nobody signed in: everything guarded is refused."""
    try:
        required = sign_in_required()
    except SettingsError:
        return Person(sign_in=True)
    if not required:
        return Person()
    return Person(sign_in=True, email=email_of(st.user), verified=address_verified(st.user))


def signed_in_or_sign_in_page() -> Person | None:
    """Every page's first step. Returns who is at the page, or draws the sign-in page and returns None: with sign-in
    on, a browser that is not signed in gets a sign-in button and one line of what this is, nothing else."""
    person = current_person()
    if person.sign_in and not person.email:
        sign_in_page()
        return None
    return person


def sign_in_page() -> None:
    """What a browser gets until it is signed in (or while the secrets cannot be read): nothing of the store."""
    try:
        sign_in_required()
    except SettingsError as error:
        st.error(escape_markdown(str(error)), icon=":material/key:")
        return
    st.title(TITLE)
    if not st.user.get("is_logged_in"):
        st.markdown("Classifies photos as one of ten classes and keeps the team's labels. Sign in to go on.")
        if st.button("Sign in", type="primary", icon=":material/login:"):
            st.login()
        return
    st.error("You are signed in, but your sign-in provider gave no verified e-mail address, which this app needs to "
             "know who saved what. Sign out and in with another account, or ask whoever runs this app to have the "
             "provider send the e-mail (the `email` scope).", icon=":material/mail:")
    if st.button("Sign out", icon=":material/logout:"):
        st.logout()


def sidebar(person: Person) -> None:
    """Who is signed in, whether an admin, and the way out; nothing without sign-in."""
    if not person.sign_in:
        return
    admin = refusal(person, CLEAR) is None  # when not, the sidebar's Clear database says why
    with st.sidebar:
        st.caption(f"Signed in as **{escape_markdown(person.email)}**"
                   + (f" · admin ({ADMINS_ENV})" if admin else ""))
        st.button("Sign out", icon=":material/logout:", on_click=st.logout)


def cookie_email(cookies: Mapping[str, str]) -> str:
    """The e-mail of the person named by Streamlit's identity cookie in a request's cookies, checked as Streamlit's
    own server checks it when a page connects: signed with the cookie secret (itsdangerous, salted with the
    cookie's name, at most as old as the cookie lives), made for this app's address (redirect_uri's origin), and
    signed in. "" for anything else: no cookie, an unsigned or altered one, one signed with another secret."""
    from streamlit.auth_util import get_cookie_with_chunks, get_origin_from_redirect_uri
    from streamlit.web.server.server_util import get_cookie_secret
    from streamlit.web.server.starlette.starlette_app_utils import decode_signed_value
    from streamlit.web.server.starlette.starlette_server_config import USER_COOKIE_NAME

    secret = get_cookie_secret()

    def signed_cookie(name: str) -> bytes | None:
        value = cookies.get(name)
        # HTTP cookies are Latin-1: the signed bytes are recovered as Streamlit recovers them.
        return None if value is None else decode_signed_value(secret, name, value.encode("latin-1"))

    value = get_cookie_with_chunks(signed_cookie, USER_COOKIE_NAME)
    if not value:
        return ""
    try:
        user = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        return ""
    if not isinstance(user, dict) or user.get("origin") != get_origin_from_redirect_uri():
        return ""
    return email_of(user)
