"""Accounts: users who sign in with a password, and their roles.

An account is a row of ``users`` with a ``password_hash`` (argon2id, through
argon2-cffi's ``PasswordHasher``). Rows without one are users who cannot sign
in: the one local user of an app run without accounts, and removed accounts.

Removing an account keeps its conversations, messages and votes: they are the
training data the product learns from, and other rows (feedback events,
model-version metrics) refer to them. The row stays under its name with no
password and the role ``user``, so the person can no longer sign in and holds
no rights. Adding an account under a name that has no password (the former
local user, a removed account) gives that row a password: the new account
owns what is stored under the name. The CLI says so when it happens.

Passwords are hashed outside any database transaction (argon2 is slow on
purpose; SQLite's write lock should not wait on it).

API keys let programs (the OpenAI-compatible API, chatbot/openai_api.py) act
as an account: 32 random bytes, shown once when made; only their SHA-256 is
stored (a key that random needs no slow hash). A key works while its account
can sign in; removing the account deletes its keys, so a later account under
the same name does not inherit them.

Each account has a *session epoch*. Changing its password, removing it and
adding an account over a password-less name raise it; the web app honours a
sign-in only while the epoch it began under is current (chatbot/ui/sessions.py),
so those changes, made by the CLI in another process, sign the person out
everywhere.
"""

from __future__ import annotations

import hashlib
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from chatbot.store.base import StoreBase
from chatbot.store.errors import NotFound
from chatbot.store.models import USER_ROLES, ApiKey, Conversation, User

MIN_PASSWORD_LENGTH = 8
MAX_NAME_LENGTH = 200  # the column's length
API_KEY_PREFIX = "ps-"  # tells a Persona Studio key apart in a config file


@dataclass(frozen=True)
class Account:
    """A user row as the account commands show it."""

    id: int
    name: str
    role: str
    can_sign_in: bool  # has a password
    conversations: int
    created_at: datetime


def check_name(name: str) -> str:
    """The name as stored; ValueError if it could never be signed in with.

    Gradio's login form strips the user name, so surrounding spaces would lock
    the account out; control characters cannot be typed into it.
    """
    if not name or not name.strip():
        raise ValueError("user name must not be empty")
    if name != name.strip():
        raise ValueError(f"user name {name!r} must not start or end with spaces")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"user name is longer than {MAX_NAME_LENGTH} characters")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise ValueError(f"user name {name!r} contains control characters")
    return name


def check_role(role: str) -> str:
    if role not in USER_ROLES:
        raise ValueError(f"role must be one of {', '.join(USER_ROLES)}, not {role!r}")
    return role


def check_password(password: str) -> str:
    if not password:
        raise ValueError("password must not be empty")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password is too short: at least {MIN_PASSWORD_LENGTH} characters")
    return password


class AccountStore(StoreBase):
    """Add, list, change and remove accounts; check passwords.

    Shares the chat store's engine: ``AccountStore(chat_store.engine)``.
    Sessions and retried writes come from StoreBase (store/base.py). A name
    with no account (no such user, or one without a password) is NotFound.
    """

    def __init__(self, engine: Engine, hasher: PasswordHasher | None = None) -> None:
        super().__init__(engine)
        self.hasher = hasher or PasswordHasher()
        self._dummy_hash: str | None = None

    # -- queries ----------------------------------------------------------

    def has_accounts(self) -> bool:
        """Whether anyone can sign in: if so, the app asks everyone to."""
        with self.read_session() as session:
            found = session.scalar(select(User.id).where(User.password_hash.is_not(None)).limit(1))
            return found is not None

    def list_users(self) -> list[Account]:
        """Every user row, accounts and password-less ones, by name."""
        counts = (
            select(Conversation.user_id, func.count(Conversation.id).label("n"))
            .group_by(Conversation.user_id)
            .subquery()
        )
        with self.read_session() as session:
            rows = session.execute(
                select(User, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.user_id == User.id)
                .order_by(User.name)
            ).all()
            return [_account(user, n) for user, n in rows]

    def get(self, name: str) -> Account | None:
        """The user called ``name`` (any kind), or None."""
        with self.read_session() as session:
            user = session.scalar(select(User).where(User.name == name))
            if user is None:
                return None
            n = session.scalar(select(func.count(Conversation.id)).where(Conversation.user_id == user.id))
            return _account(user, n or 0)

    def admin_count(self) -> int:
        """Accounts (that can sign in) with the admin role."""
        with self.read_session() as session:
            return session.scalar(
                select(func.count(User.id)).where(User.role == "admin", User.password_hash.is_not(None))
            ) or 0

    def session_epoch(self, name: str) -> int | None:
        """The account's current session epoch (module docstring); None if ``name`` cannot sign in."""
        with self.read_session() as session:
            return session.scalar(
                select(User.session_epoch).where(User.name == name, User.password_hash.is_not(None))
            )

    # -- changes ------------------------------------------------------------

    def add_user(self, name: str, password: str, role: str = "user") -> Account:
        """Create an account; ValueError naming the problem if it cannot be.

        A name that exists without a password becomes an account and keeps
        what is stored under it (see the module docstring); a name that
        already has an account is refused.
        """
        check_name(name)
        check_role(role)
        password_hash = self.hasher.hash(check_password(password))

        def work(session: Session) -> None:
            user = session.scalar(select(User).where(User.name == name))
            if user is None:
                session.add(User(name=name, role=role, password_hash=password_hash))
            elif user.password_hash is not None:
                raise ValueError(f"user {name!r} already exists")
            else:
                user.role = role
                user.password_hash = password_hash
                user.session_epoch += 1  # whoever held the name before is signed out

        try:
            # The same name added at the same moment by someone else: write runs work again, which refuses it.
            self.write(work)
        except IntegrityError:  # the name's unique key, should it still be violated
            raise ValueError(f"user {name!r} already exists") from None
        return self._must_get(name)

    def set_password(self, name: str, password: str) -> None:
        """Change an account's password; NotFound if there is no such account."""
        password_hash = self.hasher.hash(check_password(password))

        def work(session: Session) -> None:
            user = self._account_row(session, name)
            user.password_hash = password_hash
            user.session_epoch += 1  # sessions signed in with the old password end

        self.write(work)

    def set_role(self, name: str, role: str) -> Account:
        check_role(role)

        def work(session: Session) -> None:
            self._account_row(session, name).role = role

        self.write(work)
        return self._must_get(name)

    def remove_user(self, name: str) -> Account:
        """Take away an account's password and rights; its data stays (module docstring)."""

        def work(session: Session) -> None:
            user = self._account_row(session, name)
            user.password_hash = None
            user.role = "user"
            user.session_epoch += 1
            session.execute(delete(ApiKey).where(ApiKey.user_id == user.id))

        self.write(work)
        return self._must_get(name)

    # -- API keys ---------------------------------------------------------------

    def create_api_key(self, name: str) -> str:
        """A new key for the account ``name``, returned once (only its hash is stored).

        NotFound if there is no such account. An account may hold several keys.
        """
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)

        def work(session: Session) -> None:
            user = self._account_row(session, name)
            session.add(ApiKey(user_id=user.id, key_hash=hash_api_key(key)))

        self.write(work)
        return key

    def revoke_api_keys(self, name: str) -> int:
        """Delete every key of the account ``name``; how many there were. NotFound if no such account."""

        def work(session: Session) -> int:
            user = self._account_row(session, name)
            return session.execute(delete(ApiKey).where(ApiKey.user_id == user.id)).rowcount

        return self.write(work)

    def api_key_count(self, name: str) -> int:
        """How many keys the user ``name`` holds (0 for an unknown name)."""
        with self.read_session() as session:
            return session.scalar(
                select(func.count(ApiKey.id)).join(User, User.id == ApiKey.user_id).where(User.name == name)
            ) or 0

    def user_for_api_key(self, key: str) -> Account | None:
        """The account ``key`` belongs to, if it can still sign in; None for any other key."""
        if not key:
            return None
        with self.read_session() as session:
            name = session.scalar(
                select(User.name).join(ApiKey, ApiKey.user_id == User.id).where(
                    ApiKey.key_hash == hash_api_key(key), User.password_hash.is_not(None)
                )
            )
        return None if name is None else self.get(name)

    # -- signing in -----------------------------------------------------------

    def verify(self, name: str, password: str) -> int | None:
        """The account's user id if ``password`` is its password, else None.

        An unknown name costs as much as a wrong password (a hash is checked
        either way), so response times do not tell which names exist. A hash
        made with older parameters is replaced on a successful sign-in.
        """
        with self.read_session() as session:
            row = session.execute(
                select(User.id, User.password_hash).where(
                    User.name == name, User.password_hash.is_not(None)
                )
            ).first()
        stored = row.password_hash if row is not None else self._dummy()
        try:
            self.hasher.verify(stored, password or "")
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if row is None:  # cannot happen: nobody knows the dummy's password
            return None
        if self.hasher.check_needs_rehash(stored):
            self._rehash(row.id, stored, password)
        return row.id

    # -- helpers ----------------------------------------------------------------

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            # A random password nobody knows, hashed with the same parameters.
            self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(24))
        return self._dummy_hash

    def _rehash(self, user_id: int, old_hash: str, password: str) -> None:
        new_hash = self.hasher.hash(password)

        def work(session: Session) -> None:
            user = session.get(User, user_id)
            # Only if nobody changed the password meanwhile.
            if user is not None and user.password_hash == old_hash:
                user.password_hash = new_hash

        self.write(work)

    @staticmethod
    def _account_row(session: Session, name: str) -> User:
        user = session.scalar(select(User).where(User.name == name))
        if user is None or user.password_hash is None:
            raise NotFound(f"no account named {name!r}")
        return user

    def _must_get(self, name: str) -> Account:
        account = self.get(name)
        assert account is not None
        return account


def hash_api_key(key: str) -> str:
    """What is stored of an API key: its SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _account(user: User, conversations: int) -> Account:
    return Account(id=user.id, name=user.name, role=user.role,
                   can_sign_in=user.password_hash is not None,
                   conversations=int(conversations), created_at=user.created_at)
