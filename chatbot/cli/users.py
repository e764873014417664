"""`persona-studio users ...`: the accounts people sign in to the app with.

    persona-studio users add NAME [--role user|admin] [--password-stdin]
    persona-studio users passwd NAME [--password-stdin]
    persona-studio users list
    persona-studio users set-role NAME user|admin
    persona-studio users remove NAME
    persona-studio users api-key NAME [--revoke]

Passwords are asked twice on the terminal, or read from the first line of
standard input with --password-stdin (for scripts); at least 8 characters,
stored as argon2id hashes. Once any account exists, `serve` asks everyone to
sign in; with none, the app runs as the one local user (--user), as before.

`remove` takes the account's password and role away; its conversations and
votes stay in the database (they are training data), still under its name.
`add` with the name of a user that has no password (the local user, a removed
account) makes that user an account, with what is stored under the name.

`api-key` makes a key for the OpenAI-compatible API (/v1) that acts as the
account, and prints it once on standard output (only its hash is stored);
`--revoke` deletes all of the account's keys. `remove` deletes them too.

Every subcommand takes --data-dir and --db-url (or their PERSONA_STUDIO_*
variables); none loads the model. Failures print one
`persona-studio: error: ...` line and exit with status 1.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from ..settings import Settings
from ..store import ChatStore, NotFound, StoreError
from ..store.accounts import AccountStore, check_name, check_password
from ..store.models import USER_ROLES
from .errors import CommandError
from .options import print_table, setting_options, settings


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `users` and its subcommands on the main parser's subparsers."""
    parser = subparsers.add_parser("users", help="add, list, change and remove accounts",
                                   description=__doc__.split("\n\n")[0])
    common = setting_options(group=parser)  # --db-url, --data-dir: before or after the subcommand
    commands = parser.add_subparsers(dest="users_command", required=True, metavar="COMMAND")

    add = commands.add_parser("add", parents=[common], help="create an account")
    add.add_argument("name")
    add.add_argument("--role", choices=USER_ROLES, default="user",
                     help="admin: may also edit personas and open the Feedback tab in the app; default user "
                          "(roles apply to the app only: commands such as `align` check none)")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    passwd = commands.add_parser("passwd", parents=[common], help="change an account's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    commands.add_parser("list", parents=[common], help="name, role, whether they can sign in, conversations")
    set_role = commands.add_parser("set-role", parents=[common], help="make an account a user or an admin")
    set_role.add_argument("name")
    set_role.add_argument("role", choices=USER_ROLES)
    remove = commands.add_parser("remove", parents=[common],
                                 help="stop an account from signing in; its conversations stay")
    remove.add_argument("name")
    api_key = commands.add_parser("api-key", parents=[common],
                                  help="make a key for the OpenAI-compatible API (/v1), shown once")
    api_key.add_argument("name")
    api_key.add_argument("--revoke", action="store_true", help="delete all of the account's keys instead")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run one `users` subcommand; returns the exit status."""
    handler = {"add": _add, "passwd": _passwd, "list": _list, "set-role": _set_role,
               "remove": _remove, "api-key": _api_key}[args.users_command]
    config = settings(args)
    try:
        store = _open(config)
    except (StoreError, OSError) as exc:
        raise CommandError(exc) from None
    try:
        return handler(args, AccountStore(store.engine))
    except (NotFound, ValueError) as exc:  # NotFound: no account of that name
        raise CommandError(exc) from None
    finally:
        store.close()


def _open(config: Settings) -> ChatStore:
    if not config.db_url:
        # The default SQLite file lives in the data directory; on a fresh install
        # `users add` may come before the first `serve` has made it.
        config.data_dir.mkdir(parents=True, exist_ok=True)
    return ChatStore.open(config.database_url)


def read_password(from_stdin: bool) -> str:
    """The new password: stdin's first line, or typed twice without echo. Checked for length."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise ValueError("no terminal to ask for the password on: use --password-stdin")
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise ValueError("the two passwords differ")
    return check_password(password)


def _warn_without_admin(accounts: AccountStore) -> None:
    if accounts.admin_count() == 0:
        print("warning: no account is an admin, so nobody can edit personas in the app; "
              "`persona-studio users set-role NAME admin` makes one", file=sys.stderr)


def _add(args, accounts: AccountStore) -> int:
    existing = accounts.get(check_name(args.name))
    if existing is not None and existing.can_sign_in:  # before asking for a password
        raise ValueError(f"user {args.name!r} already exists")
    account = accounts.add_user(args.name, read_password(args.password_stdin), args.role)
    print(f"Added {account.role} {account.name!r}.")
    if account.conversations:
        print(f"It owns the {account.conversations} conversation(s) already stored under that name.")
    _warn_without_admin(accounts)
    return 0


def _passwd(args, accounts: AccountStore) -> int:
    account = accounts.get(args.name)
    if account is None or not account.can_sign_in:  # before asking for a password
        raise ValueError(f"no account named {args.name!r}")
    accounts.set_password(args.name, read_password(args.password_stdin))
    print(f"Changed the password of {args.name!r}.")
    return 0


def _list(args, accounts: AccountStore) -> int:
    users = accounts.list_users()
    rows = [("NAME", "ROLE", "SIGN-IN", "CONVERSATIONS", "CREATED")]
    for a in users:
        rows.append((a.name, a.role, "yes" if a.can_sign_in else "no", str(a.conversations),
                     a.created_at.strftime("%Y-%m-%d %H:%M")))
    print_table(rows)
    if not any(a.can_sign_in for a in users):
        print("No accounts: the app runs as one local user. "
              "`persona-studio users add NAME --role admin` creates the first.")
    return 0


def _set_role(args, accounts: AccountStore) -> int:
    account = accounts.set_role(args.name, args.role)
    print(f"{account.name!r} is now {'an' if account.role == 'admin' else 'a'} {account.role}.")
    _warn_without_admin(accounts)
    return 0


def _remove(args, accounts: AccountStore) -> int:
    account = accounts.remove_user(args.name)
    print(f"Removed the account {account.name!r}; its {account.conversations} conversation(s) "
          "and votes stay in the database.")
    if accounts.has_accounts():
        _warn_without_admin(accounts)
    else:
        print("No accounts are left: the app will run as one local user again.")
    return 0


def _api_key(args, accounts: AccountStore) -> int:
    if args.revoke:
        count = accounts.revoke_api_keys(args.name)
        print(f"Revoked {count} API key(s) of {args.name!r}.")
        return 0
    key = accounts.create_api_key(args.name)
    # The key alone on stdout (KEY=$(persona-studio users api-key NAME)); the rest on stderr.
    print(f"New API key for {args.name!r}; it is shown only this once:", file=sys.stderr)
    print(key, flush=True)
    print("Use it as `Authorization: Bearer <key>` (the API key of an OpenAI client) "
          "with the app's /v1 URL.", file=sys.stderr)
    return 0
