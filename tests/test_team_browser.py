"""A team in real browsers (issue 19): two `streamlit run app.py` servers sharing one PostgreSQL + SeaweedFS store
behind HAProxy on the shipped `deploy/haproxy.cfg`, people signing in at a real OpenID Connect provider
(`oidc-provider`), each browser in Chromium. Every step waits on the page's state, never for a fixed time."""

from __future__ import annotations

import io
import zipfile
from contextlib import ExitStack

from servers import free_port
from team_servers import USERS, HAProxy, OidcProvider
from test_browser import (app_run, new_page, open_app, pictures, saved_count, streamlit_servers,
                          wait_for_run)

ALICE, BOB = "alice@example.com", "bob@example.com"
EXPORT = "/export/cifar10_feedback.zip"


def sign_in(page, url: str, email: str) -> None:
    """Open the app at url signed out, press its Sign in, sign in at the provider, and wait for the app's first run
    back on it."""
    open_app(page, url)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_label("E-mail").fill(email)  # the provider's page
    page.get_by_label("Password").fill(USERS[email])
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text(f"Signed in as {email}").wait_for(timeout=60_000)
    wait_for_run(page, 0)


def upload_and_save(page, tmp_path, name: str, color: tuple[int, int, int]) -> None:
    with app_run(page):
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
            pictures(tmp_path, (name, color)))
        page.get_by_text("1 image classified").wait_for(timeout=60_000)
    with app_run(page):
        page.get_by_role("button", name="Save 1 image").click()
        page.get_by_text("Saved 1 image").wait_for(timeout=30_000)


def server_of(page) -> str:
    """The server HAProxy's sticky cookie sends this browser to (s1, s2)."""
    return next(cookie["value"] for cookie in page.context.cookies() if cookie["name"] == "CIFAR10_SERVER")


def test_a_team_signs_in_and_works_through_haproxy_and_outlives_a_server(browser, tmp_path, postgres_server,
                                                                        s3_server):
    balancer_port = free_port()
    balancer = f"http://127.0.0.1:{balancer_port}"
    with ExitStack() as stack:
        provider = OidcProvider(redirect_uris=[f"{balancer}/oauth2callback"])
        stack.callback(provider.close)
        # Every server the same secrets, as the README says: the admins, and [auth] with one cookie secret and the
        # balancer's address. In the servers' home (~/.streamlit), one of the places Streamlit and the app read.
        home = tmp_path / "home"
        (home / ".streamlit").mkdir(parents=True)
        (home / ".streamlit" / "secrets.toml").write_text(
            f'CIFAR10_ADMINS = "{ALICE}"\n' + provider.auth_toml(f"{balancer}/oauth2callback"))
        env = {"CIFAR10_DATABASE_URL": postgres_server.database("team"),
               "CIFAR10_IMAGE_STORE": "s3://cifar10-tests/team", **s3_server.env(), "HOME": str(home)}
        first, second = stack.enter_context(streamlit_servers(env, [tmp_path / "s1.log", tmp_path / "s2.log"]))
        haproxy = HAProxy(servers=[first.address, second.address], port=balancer_port)
        stack.callback(haproxy.close)
        haproxy.wait_for("UP")

        # Signed out: the sign-in button and nothing else, and no download.
        nobody = new_page(browser)
        open_app(nobody, balancer)
        main = nobody.locator('[data-testid="stMain"]')
        main.get_by_role("button", name="Sign in").wait_for()
        assert [text.split() for text in main.get_by_role("button").all_inner_texts()] == [["login", "Sign", "in"]]
        lines = [line for line in main.inner_text().splitlines() if line.strip()]
        assert lines[0] == "CIFAR-10 image classifier" and lines[2:] == ["login", "Sign in"]  # and what this is
        assert not nobody.locator('[data-testid="stSidebar"], [data-testid="stFileUploader"]').count()
        assert nobody.request.get(f"{balancer}{EXPORT}").status == 401

        # Alice on the first server, Bob on the second: each signs in at the provider and saves.
        alice, bob = new_page(browser), new_page(browser)
        alice.context.add_cookies([haproxy.cookie(1)])
        bob.context.add_cookies([haproxy.cookie(2)])
        sign_in(alice, balancer, ALICE)
        sign_in(bob, balancer, BOB)
        assert (server_of(alice), server_of(bob)) == ("s1", "s2")
        session = alice.evaluate("window.appSessionId")  # what her page asks after a reconnection
        assert alice.request.post(f"{balancer}/session-alive", data=session).status == 204
        assert bob.request.post(f"{balancer}/session-alive", data=session).status == 404  # not on Bob's server
        assert alice.request.get(f"{balancer}/session-alive/{session}").status == 404  # a page of the last release
        upload_and_save(alice, tmp_path, "red.png", (220, 20, 20))
        open_app(bob)  # a new run on the other server sees Alice's save
        assert saved_count(bob) == "1"
        upload_and_save(bob, tmp_path, "sky.png", (40, 120, 230))
        assert saved_count(bob) == "2"
        assert bob.get_by_role("button", name="Clear database").is_disabled()  # Bob is no admin
        assert "Only an admin may clear the database" in bob.locator('[data-testid="stSidebar"]').inner_text()

        # History says who saved which, and Bob's download carries both.
        with app_run(bob):
            bob.get_by_role("link", name="History").click()
            bob.get_by_text("2 of 2 saved images match").wait_for(timeout=30_000)
        for source, person in (("red.png", ALICE), ("sky.png", BOB)):
            card = bob.locator('[data-testid="stVerticalBlock"]').filter(has_text=source).last
            assert f"saved by {person}" in card.inner_text()
        response = bob.request.get(f"{balancer}{EXPORT}")
        assert response.status == 200
        assert len(zipfile.ZipFile(io.BytesIO(response.body())).namelist()) == 3  # two images and labels.csv

        # Alice has a picture on the page, not saved, and is looking at History when her server dies.
        with app_run(alice):
            alice.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
                pictures(tmp_path, ("grass.png", (30, 160, 40))))
            alice.get_by_text("1 image classified").wait_for(timeout=60_000)
        with app_run(alice):
            alice.get_by_role("link", name="History").click()
            alice.get_by_text("2 of 2 saved images match").wait_for(timeout=30_000)
        first.process.kill()
        # Her page reconnects to the second server, which does not have her session: the page loads again there,
        # still signed in, and says plainly that the picture that was on the other page is gone.
        alice.get_by_text("1 picture on this page had not been saved and is gone").wait_for(timeout=60_000)
        wait_for_run(alice, 0)
        assert server_of(alice) == "s2"
        assert f"Signed in as {ALICE}" in alice.locator('[data-testid="stSidebar"]').inner_text()
        with app_run(alice):
            alice.get_by_role("link", name="Classify").click()
        assert saved_count(alice) == "2"  # every save, by anyone, on any server
        upload_and_save(alice, tmp_path, "grass.png", (30, 160, 40))
        assert saved_count(alice) == "3"
        haproxy.wait_for("DOWN", ["s1"])
        # The pages asked after their sessions through the balancer, whose log never holds a session's id: without
        # sign-in, an id is all it takes to resume a session.
        balancer_log = haproxy.log()
        assert "/session-alive" in balancer_log and session not in balancer_log
        # Both on one server now, each is still themselves: their own name and their own count beside the store's.
        open_app(bob, balancer)
        assert server_of(bob) == "s2"
        for page, person, own in ((alice, ALICE, "2"), (bob, BOB, "1")):
            sidebar = page.locator('[data-testid="stSidebar"]')
            assert f"Signed in as {person}" in sidebar.inner_text()
            yours = sidebar.locator('[data-testid="stMetric"]').filter(has_text="Saved by you")
            assert yours.locator('[data-testid="stMetricValue"]').inner_text() == own

        # Alice is an admin: she may clear the database, for everyone.
        with app_run(alice):
            alice.get_by_role("button", name="Clear database").click()
        with app_run(alice):
            alice.get_by_role("button", name="Yes, delete everything").click()
            alice.get_by_text("Database cleared: 3 saved images deleted.").wait_for(timeout=30_000)
        open_app(bob)
        assert saved_count(bob) == "0"
