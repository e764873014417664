"""Who is asking: the signed-in account, or the one local user of an app without accounts.

Handlers ask per request, never at build time: the Blocks are built once and
shared by everyone. Add a ``request: gr.Request`` parameter to the handler
(Gradio fills it in; clients cannot) and call ``identity.current(request)``.

With accounts, Gradio's login page has put the name in ``request.username``;
the role and id are read from the database on every call, so
``persona-studio users set-role`` and ``users remove`` take effect at once,
even for someone already signed in. Without accounts, everyone is the local
user, who may do everything (it is their machine), as before accounts existed.

Signing in goes through ``sign_in``: the throttle (throttle.py) answers
repeated failures before any slow password check, each failure is logged,
and a success starts a session in ``sessions`` (sessions.py), which expires
and is revoked by a password change or removal. web_guard.py puts both on
the web app.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import gradio as gr

from ..store import ChatStore
from ..store.accounts import MAX_NAME_LENGTH, AccountStore
from . import notices
from .sessions import DEFAULT_LIFETIME, SessionTokens
from .throttle import SignInThrottle

log = logging.getLogger(__name__)

# argon2 is slow and memory-hungry on purpose (about 0.3 s and 64 MiB per check
# on 2 cores): check at most this many passwords at once.
CONCURRENT_SIGN_INS = 2


@dataclass(frozen=True)
class CurrentUser:
    id: int
    name: str  # also what {{user}} in a persona becomes
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class NotAllowed(Exception):
    """The current user may not do this; the message says what only admins may do."""


@dataclass(frozen=True)
class SignIn:
    """What ``Identity.sign_in`` decided: a session token, or why not."""

    token: str | None = None  # set when signed in
    retry_after: float = 0.0  # > 0: refused unchecked, too many failures; try again in this many seconds


class Identity:
    """Resolves ``gr.Request`` -> CurrentUser in one of two modes (see the module docstring)."""

    def __init__(self, accounts: AccountStore | None, local: CurrentUser | None, *,
                 throttle: SignInThrottle | None = None, sessions: SessionTokens | None = None) -> None:
        """``throttle`` and ``sessions`` (with accounts only): made with their defaults when not given."""
        if (accounts is None) == (local is None):
            raise ValueError("give either accounts or a local user")
        self.accounts = accounts
        self._local = local
        self._sign_in_slots = asyncio.Semaphore(CONCURRENT_SIGN_INS)
        self.throttle = SignInThrottle() if throttle is None else throttle
        if sessions is None and accounts is not None:
            sessions = SessionTokens(accounts)  # (not `sessions or ...`: an empty one is falsy)
        self.sessions = sessions

    @classmethod
    def local(cls, store: ChatStore, name: str) -> Identity:
        """Everyone is the user ``name`` (created if new), with every right."""
        return cls.local_as(store.get_or_create_user(name), name)

    @classmethod
    def local_as(cls, user_id: int, name: str) -> Identity:
        """Everyone is the existing user ``user_id`` called ``name``, with every right."""
        return cls(None, CurrentUser(user_id, name, "admin"))

    @classmethod
    def with_accounts(cls, store: ChatStore, session_lifetime: float = DEFAULT_LIFETIME) -> Identity:
        accounts = AccountStore(store.engine)
        return cls(accounts, None, sessions=SessionTokens(accounts, session_lifetime))

    @classmethod
    def for_store(cls, store: ChatStore, local_name: str, auth: str = "auto",
                  session_lifetime: float = DEFAULT_LIFETIME) -> Identity:
        """``auth``: "auto" = accounts if any exist; "on" = accounts, which must exist; "off" = local.

        ValueError for "on" without accounts: serving open to everyone by
        mistake is worse than not starting. ``session_lifetime``: seconds a sign-in lasts.
        """
        if auth not in ("auto", "on", "off"):
            raise ValueError(f"auth must be auto, on or off, not {auth!r}")
        if auth == "off":
            return cls.local(store, local_name)
        if AccountStore(store.engine).has_accounts():
            return cls.with_accounts(store, session_lifetime)
        if auth == "on":
            raise ValueError("--auth on, but there are no accounts yet: "
                             "add one with `persona-studio users add NAME --role admin`")
        return cls.local(store, local_name)

    @property
    def accounts_enabled(self) -> bool:
        return self.accounts is not None

    @property
    def local_user(self) -> CurrentUser | None:
        """The local user without accounts; None with accounts."""
        return self._local

    def authenticate(self, username: str, password: str) -> bool:
        """Is this a valid sign-in? (Blocks for the length of a hash check.)"""
        return self.accounts is not None and self.accounts.verify(username, password) is not None

    async def authenticate_async(self, username: str, password: str) -> bool:
        """Gradio's ``launch(auth=...)`` callable.

        Gradio awaits a coroutine function but calls a plain one on its event
        loop, where a hash check would stall every streaming reply; so the
        check runs in a worker thread, a few at a time.
        """
        async with self._sign_in_slots:
            return await asyncio.to_thread(self.authenticate, username, password)

    async def sign_in(self, username: str, password: str, address: str) -> SignIn:
        """Check a sign-in from the client ``address``; a new session if right.

        Throttled tries are refused before the slow hash check; every failure
        is logged with the account name and address (never the password).
        """
        if self.accounts is None or self.sessions is None:
            return SignIn()
        # No account has a longer name; a made-up megabyte must not fill the throttle or the log.
        name = username[:MAX_NAME_LENGTH + 1]
        wait = self.throttle.admit(name, address)
        if wait > 0:
            log.info("sign-in to %r from %s refused unchecked: too many failures, %.0f s to wait",
                     name, address, wait)
            return SignIn(retry_after=wait)
        ok, epoch = False, None
        try:
            # Read before the check: a password changed during it leaves the session revoked.
            epoch = await asyncio.to_thread(self.accounts.session_epoch, name)
            # Checked even for an unknown name: answer times must not tell which names exist.
            ok = await self.authenticate_async(name, password) and epoch is not None
        finally:  # also when the client went away mid-check: it counts as a failure
            wait = self.throttle.finished(name, address, ok)
        if not ok:
            log.warning("failed sign-in to %r from %s%s", name, address,
                        f"; next try from there in {wait:.0f} s" if wait > 0 else "")
            return SignIn()
        return SignIn(token=self.sessions.start(name, epoch))

    def current(self, request: gr.Request | None) -> CurrentUser:
        """The user making ``request``; gr.Error if they are not (or no longer) signed in."""
        if self._local is not None:
            return self._local
        assert self.accounts is not None
        username = getattr(request, "username", None)
        if not username:
            raise notices.error("Sign in first.")
        account = self.accounts.get(username)
        if account is None or not account.can_sign_in:
            raise notices.error("This account no longer exists; sign in again.")
        return CurrentUser(account.id, account.name, account.role)

    def require_admin(self, request: gr.Request | None, action: str) -> CurrentUser:
        """The current user if an admin; NotAllowed("only admins can <action>") otherwise."""
        user = self.current(request)
        if not user.is_admin:
            raise NotAllowed(f"Only admins can {action}.")
        return user
