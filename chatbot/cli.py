"""The `persona-studio` command.

    persona-studio serve [--host H] [--port P] [--model M] [--db-url URL]
                         [--data-dir DIR] [--personas-dir DIR] [--dtype D]
    persona-studio chat --persona ID [--max-new-tokens N] [--seed S] "message"
    persona-studio users add|passwd|list|set-role|remove|api-key ...   (see chatbot/users.py)
    persona-studio simulate --persona ID --rule RULE --prompts FILE   (SIMULATED votes; chatbot/simulate.py)
    persona-studio models list|promote VERSION|rollback PERSONA|log PERSONA   (chatbot/models_cli.py)

Every option also reads an environment variable PERSONA_STUDIO_<NAME>
(PERSONA_STUDIO_MODEL, PERSONA_STUDIO_DB_URL, ...); a flag wins over it.
Start-up problems (a busy port, an unwritable data directory, an unreachable
database, a model that cannot load) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from dataclasses import fields
from pathlib import Path

from . import align_cli, feedback_cli, models_cli, persona_cli, simulate, users
from .settings import Settings

EXIT_STARTUP = 2
AUTH_MODES = ("auto", "on", "off")


class StartupError(Exception):
    """A problem found before serving; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-studio", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the web app")
    chat = commands.add_parser("chat", help="send one message and stream the reply to the terminal")
    for sub in (serve, chat):
        for f in fields(Settings):
            if sub is chat and f.name in ("host", "port", "session_hours"):
                continue
            flag = "--" + f.name.replace("_", "-")
            sub.add_argument(flag, dest=f.name, default=None, help=f.metadata.get("help"))
    serve.add_argument("--auth", choices=AUTH_MODES, default=None,
                       help="auto (default): ask to sign in when accounts exist; on: refuse to start "
                            "without accounts; off: run as the one local user (--user) regardless")
    chat.add_argument("--persona", required=True, help="persona id (file name without .yaml)")
    chat.add_argument("--max-new-tokens", type=int, default=None, help="reply length limit in tokens")
    chat.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed")
    chat.add_argument("message", help="the message to send")
    persona_cli.add_parser(commands)  # with its own --personas-dir, read into Settings below
    feedback_cli.add_parser(commands)  # with its own --db-url / --data-dir
    align_cli.add_parser(commands)  # with its own --db-url / --data-dir
    models_cli.add_parser(commands)  # with its own --db-url / --data-dir
    simulate.add_parser(commands)  # SIMULATED votes by a rule; with the model settings
    users.add_parser(commands)  # with its own --db-url / --data-dir
    return parser


def check_data_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"data directory {path} is not writable: {exc.strerror or exc}") from None


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {port} on {host} is already in use; "
                                   "pick another with --port") from None
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def build_service(settings: Settings):
    """Open the store, load the personas and the model: the shared services."""
    from .chat import ChatService
    from .default_model import ModelLoadError
    from .engine import EngineUnavailable, open_engine
    from .personas import PersonaError, PersonaLibrary
    from .store import ChatStore, StoreError

    try:
        store = ChatStore.open(settings.database_url)
        personas = PersonaLibrary(settings.personas_dir)
        for problem in personas.errors:
            print(f"warning: persona skipped: {problem}", file=sys.stderr)
        engine = open_engine(settings)
    except (StoreError, PersonaError, ModelLoadError, EngineUnavailable) as exc:
        raise StartupError(str(exc)) from None
    return ChatService(engine, personas, store)


def build_server(service, identity, settings: Settings, auth: str = "auto"):
    """The web app: the OpenAI-compatible API under /v1 and the Gradio app at the root, on one FastAPI app."""
    import gradio as gr
    from fastapi import FastAPI

    from .openai_api import build_router
    from .store.accounts import AccountStore
    from .ui import build_app
    from .ui.web_guard import WebGuard

    blocks = build_app(service, identity)
    server = FastAPI(title="Persona Studio", docs_url=None, redoc_url=None, openapi_url=None)
    # Before the mount: Gradio's app at "/" would otherwise answer every path.
    server.include_router(build_router(service, AccountStore(service.store.engine), settings.user, auth),
                          prefix="/v1")
    guard = WebGuard(identity) if identity.accounts_enabled else None
    if guard is not None:
        guard.install(server)  # throttled /login, /logout, origin and session checks (ui/web_guard.py)
    gr.mount_gradio_app(
        server, blocks, path="/", server_name=settings.host, server_port=settings.port, show_error=True,
        # Gradio shows its sign-in page when given an auth callable; its /login, the only caller,
        # is shadowed by the guard's. Refusing here keeps any other way in from skipping the throttle.
        auth=_refuse_unthrottled if guard is not None else None,
        auth_message="Persona Studio: sign in with your account.")
    if guard is not None:
        guard.attach(server)
    return server


def _refuse_unthrottled(username: str, password: str) -> bool:
    return False


def serve(settings: Settings, auth: str = "auto") -> None:
    import uvicorn

    check_data_dir(settings.data_dir)
    check_port(settings.host, settings.port)
    service = build_service(settings)
    try:
        from .ui.identity import Identity

        identity = Identity.for_store(service.store, settings.user, auth,
                                      session_lifetime=settings.session_hours * 3600.0)
        app = build_server(service, identity, settings, auth)
        url = f"http://{settings.host}:{settings.port}"
        print(f"Persona Studio on {url} "
              f"({service.engine.describe()}; db {settings.database_url})",
              flush=True)
        if identity.accounts_enabled:
            print(f"accounts enabled: sign in at {url}", flush=True)
        else:
            print(f"no accounts: everyone is the local user {settings.user!r} "
                  "(`persona-studio users add` creates accounts)", flush=True)
        keys = ("no keys: --auth off" if auth == "off" else
                "once accounts exist, each request needs a key from `persona-studio users api-key NAME`")
        print(f"OpenAI-compatible API at {url}/v1 (a model is a persona id; {keys})", flush=True)
        # Open event streams (a browser tab's queue) would hold a graceful shutdown forever: a few seconds, then go.
        server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                               timeout_graceful_shutdown=3))
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C it caught
            pass
    finally:
        service.close()


def chat(settings: Settings, args) -> None:
    from .chat import ChatError, params_for
    from .personas import PersonaError
    from .prompting import PromptTooLong

    check_data_dir(settings.data_dir)
    service = build_service(settings)
    try:
        session = service.new_session(service.user_id(settings.user), args.persona)
        params = params_for(session.persona, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, seed=args.seed)
        shown = ""
        for reply in service.send(session, args.message, params):
            print(reply.text[len(shown):], end="", flush=True)
            shown = reply.text
        print()
    except (ChatError, PersonaError, PromptTooLong) as exc:
        raise StartupError(str(exc)) from None
    finally:
        service.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    try:
        settings = Settings.from_sources(overrides)
        if args.command == "personas":
            return persona_cli.run(args, settings.personas_dir)
        if args.command == "feedback":
            return feedback_cli.run(args, settings)
        if args.command == "align":
            return align_cli.run(args, settings)
        if args.command == "models":
            return models_cli.run(args, settings)
        if args.command == "users":
            return users.run(args, settings)
        if args.command == "simulate":
            return simulate.run(args, settings)
        if args.command == "serve":
            serve(settings, args.auth or os.environ.get("PERSONA_STUDIO_AUTH") or "auto")
        else:
            chat(settings, args)
    except (StartupError, ValueError) as exc:
        print(f"persona-studio: error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
