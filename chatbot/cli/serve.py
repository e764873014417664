"""`persona-studio serve`: the web app (Gradio at the root) and the OpenAI-compatible API (/v1) on one server.

Start-up problems (a busy port, an unwritable data directory, an unreachable
database, a model that cannot load, `--auth on` without accounts) are
StartupErrors: one line, exit status 2, before anything listens.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
from pathlib import Path

from ..settings import Settings
from ..startup import StartupError, build_service, check_data_dir
from .options import add_settings, settings

AUTH_MODES = ("auto", "on", "off")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="run the web app")
    add_settings(parser)
    parser.add_argument("--auth", choices=AUTH_MODES, default=None,
                        help="auto (default): ask to sign in when accounts exist; on: refuse to start "
                             "without accounts; off: run as the one local user (--user) regardless")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        serve(settings(args), args.auth or os.environ.get("PERSONA_STUDIO_AUTH") or "auto")
    except ValueError as exc:  # e.g. --auth on without accounts: serving open to everyone would be worse
        raise StartupError(str(exc)) from None
    return 0


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {port} on {host} is already in use; "
                                   "pick another with --port") from None
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def build_server(service, identity, settings: Settings, auth: str = "auto"):
    """The web app: the OpenAI-compatible API under /v1 and the Gradio app at the root, on one FastAPI app."""
    import gradio as gr
    from fastapi import FastAPI

    from ..openai_api import build_router
    from ..store.accounts import AccountStore
    from ..ui import build_app
    from ..ui.web_guard import WebGuard

    from alignment.board import JobBoard

    engine_options = {name: getattr(settings, name) for name in ("model", "engine", "engine_url", "dtype",
                                                                  "context_tokens")}
    board = JobBoard(service.store, settings.database_url, Path(settings.data_dir), settings.personas_dir,
                     engine_options=engine_options, worker_niceness=settings.worker_nice,
                     poll_seconds=settings.job_poll_seconds)
    board.resume_queue()  # a restart picks up what was queued: the worker starts if there is work
    blocks = build_app(service, identity, board)
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
    if not 0 <= settings.worker_nice <= 19:
        raise StartupError(f"--worker-nice {settings.worker_nice}: give 0 to 19 (how much CPU priority "
                           "the job worker gives up)")
    if not 0.1 <= settings.job_poll_seconds <= 60:
        raise StartupError(f"--job-poll-seconds {settings.job_poll_seconds:g}: give 0.1 to 60 (how often the "
                           "Alignment tab refreshes a running job)")
    service = build_service(settings)
    try:
        from ..ui.identity import Identity

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
