"""Accounts: argon2 hashes, sign-in checks, roles, removal, the `users` command and Identity."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
from argon2 import PasswordHasher
from browser_helpers import free_port
from cli_helpers import run_cli
from sqlalchemy import select

from chatbot.store import ChatStore, User
from chatbot.store.accounts import AccountStore
from chatbot.ui.identity import CurrentUser, Identity, NotAllowed

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def chat_store(any_db_url):
    store = ChatStore.open(any_db_url)
    yield store
    store.close()


@pytest.fixture
def accounts(chat_store) -> AccountStore:
    return AccountStore(chat_store.engine)


def stored_hash(store: ChatStore, name: str) -> str | None:
    with store.engine.connect() as connection:
        return connection.scalar(select(User.password_hash).where(User.name == name))


def test_passwords_are_stored_as_argon2id_hashes(chat_store, accounts):
    account = accounts.add_user("alice", "correct horse", "admin")
    assert (account.name, account.role, account.can_sign_in) == ("alice", "admin", True)
    stored = stored_hash(chat_store, "alice")
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    accounts.add_user("bob", "correct horse")
    assert stored_hash(chat_store, "bob") != stored  # salted
    assert accounts.has_accounts()


def test_verify_accepts_only_the_right_password(accounts):
    alice = accounts.add_user("alice", "correct horse").id
    assert accounts.verify("alice", "correct horse") == alice
    for name, password in [("alice", "correct horsE"), ("alice", ""), ("alice", "correct horse "),
                           ("Alice", "correct horse"), ("nobody", "correct horse"), ("", "")]:
        assert accounts.verify(name, password) is None, (name, password)


def test_an_unknown_name_costs_a_hash_check_too(chat_store):
    """Otherwise the response time would tell which names have accounts."""
    checks = []

    class CountingHasher(PasswordHasher):
        def verify(self, hash, password):
            checks.append(hash)
            return super().verify(hash, password)

    accounts = AccountStore(chat_store.engine, CountingHasher())
    accounts.add_user("alice", "correct horse")
    assert accounts.verify("nobody", "correct horse") is None
    assert accounts.verify("alice", "wrong password") is None
    assert len(checks) == 2 and all(c.startswith("$argon2id$") for c in checks)


def test_a_hash_with_old_parameters_is_upgraded_on_sign_in(chat_store):
    weak = AccountStore(chat_store.engine, PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    user_id = weak.add_user("alice", "correct horse").id
    old = stored_hash(chat_store, "alice")
    current = AccountStore(chat_store.engine)
    assert current.verify("alice", "correct horse") == user_id
    new = stored_hash(chat_store, "alice")
    assert new != old and not current.hasher.check_needs_rehash(new)
    assert current.verify("alice", "correct horse") == user_id


@pytest.mark.parametrize("name, password, role, problem", [
    ("alice", "", "user", "password must not be empty"),
    ("alice", "1234567", "user", "password is too short: at least 8 characters"),
    ("", "correct horse", "user", "user name must not be empty"),
    ("  ", "correct horse", "user", "user name must not be empty"),
    (" alice", "correct horse", "user", "must not start or end with spaces"),
    ("al\nice", "correct horse", "user", "control characters"),
    ("x" * 201, "correct horse", "user", "longer than 200"),
    ("alice", "correct horse", "root", "role must be one of user, admin, not 'root'"),
])
def test_bad_accounts_are_refused_by_name(accounts, name, password, role, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        accounts.add_user(name, password, role)
    assert not accounts.has_accounts()


def test_a_name_is_taken_once(accounts):
    accounts.add_user("alice", "correct horse")
    with pytest.raises(ValueError, match="user 'alice' already exists"):
        accounts.add_user("alice", "another password")
    assert accounts.verify("alice", "correct horse") is not None


def test_roles_change_and_are_checked(accounts):
    accounts.add_user("alice", "correct horse")
    assert accounts.admin_count() == 0
    assert accounts.set_role("alice", "admin").role == "admin"
    assert accounts.admin_count() == 1
    with pytest.raises(ValueError, match="role must be one of"):
        accounts.set_role("alice", "superuser")
    with pytest.raises(ValueError, match="no account named 'bob'"):
        accounts.set_role("bob", "admin")
    accounts.set_password("alice", "new password")
    assert accounts.verify("alice", "correct horse") is None
    assert accounts.verify("alice", "new password") is not None


def test_removing_an_account_keeps_its_conversations(chat_store, accounts):
    alice = accounts.add_user("alice", "correct horse", "admin").id
    chat_store.create_conversation(alice, "pirate", "hash")
    removed = accounts.remove_user("alice")
    assert (removed.can_sign_in, removed.role, removed.conversations) == (False, "user", 1)
    assert accounts.verify("alice", "correct horse") is None
    assert not accounts.has_accounts() and accounts.admin_count() == 0
    with pytest.raises(ValueError, match="no account named 'alice'"):
        accounts.remove_user("alice")
    # Adding the name again makes the same row an account, with what is stored under it.
    again = accounts.add_user("alice", "another password")
    assert (again.id, again.conversations, again.role) == (alice, 1, "user")


def test_api_keys_act_as_their_account_and_only_their_hash_is_stored(chat_store, accounts):
    import hashlib

    from chatbot.store import ApiKey

    alice = accounts.add_user("alice", "correct horse").id
    accounts.add_user("bob", "bob password")
    key = accounts.create_api_key("alice")
    second = accounts.create_api_key("alice")
    assert key.startswith("ps-") and len(key) > 40 and key != second
    with chat_store.engine.connect() as connection:
        stored = connection.execute(select(ApiKey.user_id, ApiKey.key_hash)).all()
    assert sorted(stored) == sorted((alice, hashlib.sha256(k.encode()).hexdigest()) for k in (key, second))
    assert accounts.user_for_api_key(key).name == "alice"
    assert accounts.user_for_api_key(second).id == alice
    for wrong in ("", key[:-1], key + "x", hashlib.sha256(key.encode()).hexdigest()):
        assert accounts.user_for_api_key(wrong) is None
    with pytest.raises(ValueError, match="no account named 'carol'"):
        accounts.create_api_key("carol")
    chat_store.get_or_create_user("local")  # a user without a password gets no key
    with pytest.raises(ValueError, match="no account named 'local'"):
        accounts.create_api_key("local")

    assert accounts.revoke_api_keys("bob") == 0
    assert accounts.revoke_api_keys("alice") == 2
    assert accounts.user_for_api_key(key) is None
    # Removing an account deletes its keys: a later account under the name does not inherit them.
    third = accounts.create_api_key("alice")
    accounts.remove_user("alice")
    assert accounts.user_for_api_key(third) is None
    accounts.add_user("alice", "another password")
    assert accounts.user_for_api_key(third) is None and accounts.api_key_count("alice") == 0


def test_users_api_key_prints_the_key_once(tmp_path, users):
    assert users(tmp_path, "add", "alice", "--password-stdin", stdin="correct horse\n").returncode == 0
    done = users(tmp_path, "api-key", "alice")
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("ps-") and "\n" not in key and "shown only this once" in done.stderr
    store = ChatStore.open(f"sqlite:///{tmp_path / 'chat.db'}")
    try:
        assert AccountStore(store.engine).user_for_api_key(key).name == "alice"
    finally:
        store.close()
    done = users(tmp_path, "api-key", "alice", "--revoke")
    assert done.returncode == 0 and done.stdout.strip() == "Revoked 1 API key(s) of 'alice'."
    done = users(tmp_path, "api-key", "nobody")
    assert done.returncode == 1 and done.stderr.strip() == "persona-studio: error: no account named 'nobody'"


def test_the_local_user_can_become_an_account(chat_store, accounts):
    local = chat_store.get_or_create_user("User")
    assert not accounts.has_accounts()  # the local user has no password
    assert accounts.add_user("User", "correct horse").id == local
    assert [(a.name, a.can_sign_in) for a in accounts.list_users()] == [("User", True)]


# -- Identity: who a request is ------------------------------------------------


def test_without_accounts_everyone_is_the_local_user_with_every_right(chat_store):
    identity = Identity.for_store(chat_store, "Pat")
    assert not identity.accounts_enabled
    me = identity.current(gr.Request())
    assert me == CurrentUser(chat_store.get_or_create_user("Pat"), "Pat", "admin")
    assert identity.require_admin(None, "edit personas") == me
    assert not identity.authenticate("Pat", "anything at all")
    with pytest.raises(ValueError, match="no accounts yet"):
        Identity.for_store(chat_store, "Pat", auth="on")


def test_with_accounts_the_request_says_who_and_the_store_says_what_role(chat_store, accounts):
    alice = accounts.add_user("alice", "correct horse", "admin").id
    bob = accounts.add_user("bob", "bob password").id
    identity = Identity.for_store(chat_store, "Pat")
    assert identity.accounts_enabled and identity.local_user is None
    assert identity.authenticate("alice", "correct horse") and not identity.authenticate("alice", "nope")
    assert asyncio.run(identity.authenticate_async("alice", "correct horse"))  # what Gradio's /login calls
    assert identity.current(gr.Request(username="alice")) == CurrentUser(alice, "alice", "admin")
    assert identity.current(gr.Request(username="bob")) == CurrentUser(bob, "bob", "user")
    with pytest.raises(NotAllowed, match="Only admins can edit personas."):
        identity.require_admin(gr.Request(username="bob"), "edit personas")
    # Roles and removals apply to the next request, not the next sign-in.
    accounts.set_role("bob", "admin")
    assert identity.require_admin(gr.Request(username="bob"), "edit personas").id == bob
    accounts.remove_user("bob")
    with pytest.raises(gr.Error, match="no longer exists"):
        identity.current(gr.Request(username="bob"))
    with pytest.raises(gr.Error, match="Sign in first"):
        identity.current(gr.Request())
    assert not Identity.for_store(chat_store, "Pat", auth="off").accounts_enabled


# -- the `users` command -------------------------------------------------------


@pytest.fixture
def users():
    """`persona-studio users ARGS --data-dir DATA_DIR` with ``stdin`` as its standard input, in this process."""
    def run(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return run_cli("users", *args, "--data-dir", str(data_dir), stdin=stdin)
    return run


def test_users_command_manages_accounts(tmp_path, users):
    data = tmp_path / "fresh" / "data"  # made by the first command
    done = users(data, "add", "alice", "--role", "admin", "--password-stdin", stdin="correct horse\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Added admin 'alice'." and done.stderr == ""
    done = users(data, "add", "bob", "--password-stdin", stdin="bob password\n")
    assert done.returncode == 0 and "Added user 'bob'." in done.stdout

    listed = users(data, "list").stdout.splitlines()
    assert listed[0].split() == ["NAME", "ROLE", "SIGN-IN", "CONVERSATIONS", "CREATED"]
    assert [line.split()[:4] for line in listed[1:]] == [["alice", "admin", "yes", "0"],
                                                         ["bob", "user", "yes", "0"]]

    assert users(data, "set-role", "bob", "admin").stdout.strip() == "'bob' is now an admin."
    done = users(data, "set-role", "alice", "user")
    assert done.returncode == 0 and done.stderr == ""  # bob is still an admin: no warning
    done = users(data, "remove", "bob")
    assert done.returncode == 0 and "conversation(s) and votes stay" in done.stdout
    assert "no account is an admin" in done.stderr  # alice is only a user now

    store = ChatStore.open(f"sqlite:///{data / 'chat.db'}")
    try:
        accounts = AccountStore(store.engine)
        assert stored_hash(store, "alice").startswith("$argon2")
        assert accounts.verify("alice", "correct horse") is not None
        assert accounts.verify("bob", "bob password") is None
        assert accounts.get("alice").role == "user"
    finally:
        store.close()

    done = users(data, "passwd", "alice", "--password-stdin", stdin="a new password\n")
    assert done.returncode == 0, done.stderr
    done = users(data, "remove", "alice")
    assert "No accounts are left: the app will run as one local user again." in done.stdout


@pytest.mark.parametrize("args, stdin, problem", [
    (("add", "carol", "--password-stdin"), "short\n", "password is too short: at least 8 characters"),
    (("add", "carol", "--password-stdin"), "\n", "password must not be empty"),
    (("add", "carol"), "", "no terminal to ask for the password on: use --password-stdin"),
    (("add", "alice", "--password-stdin"), "another password\n", "user 'alice' already exists"),
    (("set-role", "nobody", "admin"), None, "no account named 'nobody'"),
    (("remove", "nobody"), None, "no account named 'nobody'"),
    (("passwd", "nobody", "--password-stdin"), "a new password\n", "no account named 'nobody'"),
])
def test_users_command_failures_are_one_line(tmp_path, args, stdin, problem, users):
    assert users(tmp_path, "add", "alice", "--password-stdin", stdin="correct horse\n").returncode == 0
    done = users(tmp_path, *args, stdin=stdin)
    assert done.returncode == 1
    assert done.stderr.strip() == f"persona-studio: error: {problem}"


def test_a_bad_role_is_refused_by_the_parser(tmp_path, users):
    done = users(tmp_path, "set-role", "alice", "root")
    assert done.returncode == 2 and "invalid choice: 'root'" in done.stderr


@pytest.mark.model
def test_serve_with_auth_on_and_no_accounts_refuses_to_start(data_dir):
    """Serving open to everyone by mistake is worse than not starting."""
    done = subprocess.run([sys.executable, "app.py", "--data-dir", str(data_dir), "--port", str(free_port()),
                           "--auth", "on"], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "persona-studio: error: --auth on, but there are no accounts yet: "
        "add one with `persona-studio users add NAME --role admin`")
