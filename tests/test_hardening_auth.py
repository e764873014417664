"""Sign-in hardening, through real HTTP against the real app: throttling, session expiry and revocation, cross-site checks.

The app is what `serve` runs (cli/serve.py build_server) over a real SQLite file, with
FakeEngine (tests/fake_engine.py: no model; nothing here asks for a reply)
and a fake clock handed to the throttle and the sessions. Requests go through
the FastAPI test client, or httpx's ASGI transport where many must run at
once; each client has its own address. Account changes are made with the
`persona-studio users` command in another process, as an operator would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest
from argon2 import PasswordHasher
from cli_helpers import run_cli
from fake_engine import FakeEngine
from fastapi.testclient import TestClient

from chatbot.chat import ChatService
from chatbot.cli.serve import build_server
from chatbot.personas import PersonaLibrary
from chatbot.settings import Settings
from chatbot.store import ChatStore
from chatbot.store.accounts import AccountStore
from chatbot.ui.identity import Identity
from chatbot.ui.sessions import SessionTokens
from chatbot.ui.throttle import Backoff, SignInThrottle

REPO = Path(__file__).resolve().parent.parent
ALICE = ("alice", "alice-password")
BOB = ("bob", "bob-password")
LIFETIME = 3600.0
HERE = "http://testserver"  # the test client's Host is "testserver"
EVIL = "https://evil.example"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class CountingHasher(PasswordHasher):
    """The real argon2 hasher, counting the password checks it makes."""

    checks = 0

    def verify(self, hash, password):  # noqa: A002 - argon2's own parameter name
        type(self).checks += 1
        return super().verify(hash, password)


class App:
    """The app with accounts alice (admin) and bob, on a SQLite file, with a fake clock."""

    def __init__(self, tmp_path: Path) -> None:
        self.db_url = f"sqlite:///{tmp_path / 'chat.db'}"
        self.store = ChatStore.open(self.db_url)
        CountingHasher.checks = 0
        self.accounts = AccountStore(self.store.engine, hasher=CountingHasher())
        self.accounts.add_user(*ALICE, role="admin")
        self.accounts.add_user(*BOB)
        self.clock = FakeClock()
        self.identity = Identity(self.accounts, None, throttle=SignInThrottle(clock=self.clock),
                                 sessions=SessionTokens(self.accounts, LIFETIME, clock=self.clock))
        service = ChatService(FakeEngine(), PersonaLibrary(REPO / "personas"), self.store)
        self.server = build_server(service, self.identity, Settings(data_dir=tmp_path))

    def client(self, address: str = "198.51.100.1") -> TestClient:
        return TestClient(self.server, client=(address, 50000))

    def users(self, *args: str, password: str | None = None) -> None:
        """`persona-studio users ...` on the same database, through its own store connections."""
        done = run_cli("users", *args, "--db-url", self.db_url, stdin=None if password is None else password + "\n")
        assert done.returncode == 0, done.stderr


@pytest.fixture
def app(tmp_path):
    built = App(tmp_path)
    yield built
    built.store.close()


def sign_in(client: TestClient, name: str, password: str, **headers) -> httpx.Response:
    return client.post("/login", data={"username": name, "password": password}, headers=headers)


def signed_out_everywhere(client: TestClient) -> bool:
    """Every way in treats the client as signed out: the page, /config, the queue, other Gradio routes."""
    page = client.get("/")
    return (page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")
            and client.get("/config").status_code == 401
            and client.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"}
                            ).status_code == 401
            # A Gradio route that checks no sign-in itself.
            and client.post("/gradio_api/cancel", json={"session_hash": "x", "fn_index": 0, "event_id": "x"}
                            ).status_code == 401
            and client.get("/gradio_api/info").status_code == 401)


def signed_in_as(client: TestClient, name: str) -> bool:
    config = client.get("/config")
    return config.status_code == 200 and config.json()["username"] == name


# -- 1. throttling ---------------------------------------------------------------------------


def test_wrong_passwords_make_the_next_try_wait_without_locking_out_other_addresses(app, caplog):
    guesser = app.client("203.0.113.7")
    caplog.set_level(logging.INFO, logger="chatbot.ui")
    for n in range(5):
        assert sign_in(guesser, "alice", f"guess-{n}").status_code == 400
    checks = CountingHasher.checks
    # Now even the right password is refused from there, at once and without a hash check.
    refused = sign_in(guesser, *ALICE)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert "access-token" not in refused.headers.get("set-cookie", "")
    assert CountingHasher.checks == checks
    # alice, signing in from her own address, is not locked out.
    alice = app.client("192.0.2.10")
    assert sign_in(alice, *ALICE).status_code == 200 and signed_in_as(alice, "alice")
    # Once the wait is over, one more try is allowed; each failure doubles the wait.
    app.clock.now += int(refused.headers["Retry-After"])
    assert sign_in(guesser, "alice", "guess-5").status_code == 400
    assert int(sign_in(guesser, *ALICE).headers["Retry-After"]) == 2
    app.clock.now += 2
    assert sign_in(guesser, *ALICE).status_code == 200

    failures = [r for r in caplog.records if r.levelno == logging.WARNING and "failed sign-in" in r.getMessage()]
    assert len(failures) == 6
    assert all("'alice'" in r.getMessage() and "203.0.113.7" in r.getMessage() for r in failures)
    assert not any(secret in r.getMessage() for r in caplog.records
                   for secret in ("guess-", ALICE[1]))


def test_a_flood_from_one_address_is_refused_before_argon2_and_does_not_hold_up_others(app):
    async def flood() -> tuple[list[int], httpx.Response, float]:
        def client(address: str) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app.server, client=(address, 50000))
            return httpx.AsyncClient(transport=transport, base_url=HERE)

        async with client("203.0.113.7") as attacker, client("192.0.2.10") as alice:
            form = {"username": "alice", "password": "wrong-password"}
            guesses = [attacker.post("/login", data=form) for _ in range(150)]
            started = time.monotonic()
            answers = await asyncio.gather(*guesses, alice.post("/login", data=dict(zip(
                ("username", "password"), ALICE, strict=True))))
            return [a.status_code for a in answers[:-1]], answers[-1], time.monotonic() - started

    statuses, alices, seconds = asyncio.run(flood())
    assert alices.status_code == 200
    assert statuses.count(400) == 5 and statuses.count(429) == 145
    # Six argon2 checks in all (about 2 s on 2 cores), not 151 (~20 s): alice waited at most for those.
    assert CountingHasher.checks == 6, CountingHasher.checks
    assert seconds < 15


def test_the_throttle_doubles_up_to_a_cap_forgets_quiet_addresses_and_stays_small():
    clock = FakeClock()
    throttle = SignInThrottle(per_pair=Backoff(free=2, first=1, cap=8), per_address=Backoff(free=4, first=1, cap=8),
                              forget_after=60, max_entries=10, clock=clock)
    waits = []
    for _ in range(8):
        assert throttle.admit("alice", "a") == 0
        waits.append(throttle.finished("alice", "a", succeeded=False))
        clock.now += waits[-1]
    assert waits == [0, 1, 2, 4, 8, 8, 8, 8]
    # A try still being checked counts as failed: a burst is cut short before any answer.
    assert throttle.admit("bob", "c") == 0 and throttle.admit("bob", "c") == 0
    assert throttle.admit("bob", "c") == 1
    # The right password clears the account's count at that address (gina), not the address's.
    for name in ("carol", "dave", "erin"):  # 3 failures from b; its 4th will cost a wait
        assert throttle.admit(name, "b") == 0
        assert throttle.finished(name, "b", succeeded=False) == 0
    assert throttle.admit("bob", "b") == 0
    assert throttle.finished("bob", "b", succeeded=True) == 0
    assert throttle.admit("frank", "b") == 0
    assert throttle.finished("frank", "b", succeeded=False) == 1
    for _ in range(2):
        assert throttle.admit("gina", "d") == 0
    throttle.finished("gina", "d", succeeded=False)
    assert throttle.finished("gina", "d", succeeded=False) == 1
    clock.now += 1
    assert throttle.admit("gina", "d") == 0
    throttle.finished("gina", "d", succeeded=True)
    assert throttle.admit("gina", "d") == 0
    assert throttle.finished("gina", "d", succeeded=False) == 0  # counting from 0 again, not 3
    clock.now += 30
    assert throttle.admit("bob", "a") == 0
    throttle.finished("bob", "a", succeeded=True)  # a success does not keep a's failures alive
    clock.now += 31  # a minute without failures: alice's 8 at a are forgotten
    assert throttle.admit("alice", "a") == 0
    assert throttle.finished("alice", "a", succeeded=False) == 0
    for n in range(30):  # made-up names do not grow it without bound
        throttle.admit(f"name-{n}", f"address-{n}")
    assert len(throttle._counters) <= 10


# -- 2. sessions end: expiry, password change, removal -----------------------------------


def test_a_password_change_signs_out_every_session_of_the_account(app):
    laptop, phone, bobs = app.client(), app.client("192.0.2.20"), app.client("192.0.2.30")
    for client in (laptop, phone):
        assert sign_in(client, *ALICE).status_code == 200 and signed_in_as(client, "alice")
    assert sign_in(bobs, *BOB).status_code == 200

    app.users("passwd", "alice", "--password-stdin", password="a-new-password")
    assert signed_out_everywhere(laptop) and signed_out_everywhere(phone)
    assert signed_in_as(bobs, "bob")  # other accounts are untouched
    assert sign_in(laptop, *ALICE).status_code == 400
    assert sign_in(laptop, "alice", "a-new-password").status_code == 200 and signed_in_as(laptop, "alice")


def test_a_removed_persons_cookie_stays_dead_when_the_name_is_given_to_someone_else(app):
    old_bob = app.client()
    assert sign_in(old_bob, *BOB).status_code == 200 and signed_in_as(old_bob, "bob")
    app.users("remove", "bob")
    assert signed_out_everywhere(old_bob)
    app.users("add", "bob", "--password-stdin", password="new-bobs-password")
    assert signed_out_everywhere(old_bob)
    new_bob = app.client("192.0.2.40")
    assert sign_in(new_bob, "bob", "new-bobs-password").status_code == 200 and signed_in_as(new_bob, "bob")


def test_sessions_expire(app):
    client = app.client()
    assert sign_in(client, *ALICE).status_code == 200
    app.clock.now += LIFETIME - 1
    assert signed_in_as(client, "alice")
    app.clock.now += 1
    assert signed_out_everywhere(client)
    assert len(app.identity.sessions) == 0  # and forgotten


def test_the_default_session_lifetime_is_a_week_and_configurable(tmp_path):
    store = ChatStore.open(f"sqlite:///{tmp_path / 'chat.db'}")
    try:
        AccountStore(store.engine).add_user(*ALICE)
        assert Identity.for_store(store, "User").sessions.lifetime == 7 * 24 * 3600
        assert Settings.from_sources(environ={"PERSONA_STUDIO_SESSION_HOURS": "12"}).session_hours == 12
        assert Identity.for_store(store, "User", session_lifetime=12 * 3600).sessions.lifetime == 12 * 3600
    finally:
        store.close()


# -- 3. cross-site requests ----------------------------------------------------------------------


def test_sign_in_from_another_site_is_refused(app):
    client = app.client()
    for headers in ({"Origin": EVIL}, {"Origin": "null"}, {"Referer": EVIL + "/page"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://testserver:8080"}):
        refused = sign_in(client, *ALICE, **headers)
        assert refused.status_code == 403, headers
        assert "access-token" not in refused.headers.get("set-cookie", "")
    assert CountingHasher.checks == 0  # refused before any password was looked at
    # The app's own sign-in page, and programs (no browser headers), are welcome.
    assert sign_in(client, *ALICE, Origin=HERE, **{"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert sign_in(app.client(), *ALICE).status_code == 200


def test_other_state_changes_from_another_site_are_refused(app):
    client = app.client()
    assert sign_in(client, *ALICE).status_code == 200
    joined = client.post("/gradio_api/queue/join", headers={"Origin": EVIL},
                         json={"data": [], "fn_index": 0, "session_hash": "x"})
    assert joined.status_code == 403


def test_sign_out_ends_only_this_session_and_only_when_the_app_asks(app):
    laptop, phone = app.client(), app.client("192.0.2.20")
    for client in (laptop, phone):
        assert sign_in(client, *ALICE).status_code == 200

    # A page on another site links or posts to /logout: nothing happens.
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Referer": EVIL + "/"}, {}):
        asked = laptop.get("/logout", headers=headers, follow_redirects=False)
        assert asked.status_code == 200 and "<form method=post" in asked.text  # a button to confirm
        assert asked.headers["X-Frame-Options"] == "DENY"
    assert laptop.post("/logout", headers={"Origin": EVIL}).status_code == 403
    assert signed_in_as(laptop, "alice") and signed_in_as(phone, "alice")

    # The "Sign out" link of the app's own page (a same-origin GET) ends the laptop's session only.
    out = laptop.get("/logout", headers={"Sec-Fetch-Site": "same-origin"}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] in (HERE, HERE + "/")
    assert signed_out_everywhere(laptop)
    assert signed_in_as(phone, "alice")
    # The confirmation button's POST works too.
    assert phone.post("/logout", headers={"Origin": HERE}, follow_redirects=False).status_code == 303
    assert signed_out_everywhere(phone)


def test_every_gradio_route_but_the_sign_in_page_needs_a_valid_session(app):
    anonymous = app.client()
    assert signed_out_everywhere(anonymous)
    assert anonymous.get("/theme.css").status_code == 200  # what the sign-in page itself loads
    alice = app.client()
    assert sign_in(alice, *ALICE).status_code == 200
    assert alice.get("/gradio_api/info").status_code == 200
    app.users("remove", "alice")
    assert signed_out_everywhere(alice)


def test_the_v1_api_still_takes_its_keys_from_anywhere(app):
    key = app.accounts.create_api_key("alice")
    models = app.client().get("/v1/models", headers={"Authorization": f"Bearer {key}", "Origin": EVIL})
    assert models.status_code == 200 and models.json()["data"]
    assert app.client().get("/v1/models").status_code == 401
