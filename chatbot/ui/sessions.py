"""Signed-in sessions: the cookie tokens Gradio checks on every request, with expiry and revocation.

Gradio keeps its sign-ins in ``app.tokens``, a dict from the cookie's token to
the user name, and every route asks ``app.tokens.get(token)`` who is asking.
A plain dict never forgets: a token outlived a password change, a removal
(and a new account under the same name), and had no end. ``SessionTokens``
takes the dict's place (see web_guard.py) and answers only for a session
that is still valid:

- it is younger than its lifetime (7 days unless configured);
- its account can still sign in, with the same *session epoch* as when the
  session began. ``users passwd`` and ``users remove`` run in another
  process (the CLI) and raise the epoch in the database, so the server reads
  it on each request rather than being told.

Sessions live in memory, as Gradio's did: restarting the server signs
everyone out. The clock is injectable for tests.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass

from ..store.accounts import AccountStore

DEFAULT_LIFETIME = 7 * 24 * 3600.0  # seconds


@dataclass(frozen=True)
class _Session:
    name: str
    epoch: int | None  # the account's session epoch when it began (None: not an account then)
    expires_at: float


class SessionTokens(MutableMapping[str, str]):
    """token -> user name, for the sessions still valid (module docstring); what Gradio uses as ``app.tokens``."""

    def __init__(self, accounts: AccountStore, lifetime: float = DEFAULT_LIFETIME,
                 clock: Callable[[], float] = time.time) -> None:
        if lifetime <= 0:
            raise ValueError(f"a session lifetime must be positive, not {lifetime}")
        self.accounts = accounts
        self.lifetime = lifetime
        self._clock = clock
        self._sessions: dict[str, _Session] = {}

    def start(self, name: str, epoch: int | None) -> str:
        """A new session for ``name``, as of its session ``epoch`` (read before its password was checked).

        Reading the epoch before the check means a password changed during the
        check leaves this session already revoked.
        """
        self._drop_expired()
        token = secrets.token_urlsafe(32)
        self._sessions[token] = _Session(name, epoch, self._clock() + self.lifetime)
        return token

    def end(self, token: str | None) -> None:
        """Sign this one session out (the person's other sessions stay)."""
        if token is not None:
            self._sessions.pop(token, None)

    # -- the mapping Gradio uses --------------------------------------------------

    def __getitem__(self, token: str) -> str:
        session = self._sessions[token]
        if not self._valid(session):
            self._sessions.pop(token, None)
            raise KeyError(token)
        return session.name

    def __setitem__(self, token: str, name: str) -> None:
        # Only Gradio's own /login would do this, and web_guard.py shadows it; should
        # it happen anyway, the session is bound to the account's current epoch.
        self._sessions[token] = _Session(name, self.accounts.session_epoch(name), self._clock() + self.lifetime)

    def __delitem__(self, token: str) -> None:
        del self._sessions[token]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._sessions))

    def __len__(self) -> int:
        return len(self._sessions)

    # -- helpers -------------------------------------------------------------------

    def _valid(self, session: _Session) -> bool:
        if self._clock() >= session.expires_at or session.epoch is None:
            return False
        return self.accounts.session_epoch(session.name) == session.epoch

    def _drop_expired(self) -> None:
        now = self._clock()
        for token in [t for t, s in self._sessions.items() if now >= s.expires_at]:
            del self._sessions[token]
