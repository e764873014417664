"""`persona-studio chat`: send one message to a persona and stream the reply to the terminal.

The conversation is stored like one from the app (as the --user). Every
failure here, from opening the model to the persona refusing the message, is a
start-up problem for a one-shot command: one line, exit status 2.
"""

from __future__ import annotations

import argparse

from ..startup import StartupError, build_service, check_data_dir
from .options import add_settings, settings


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chat", help="send one message and stream the reply to the terminal")
    add_settings(parser, skip=("host", "port", "session_hours", "worker_nice", "job_poll_seconds"))  # no server here
    parser.add_argument("--persona", required=True, help="persona id (file name without .yaml)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="reply length limit in tokens")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("message", help="the message to send")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..chat import ChatError
    from ..personas import PersonaError
    from ..prompting import PromptTooLong

    try:
        _chat(args)
    except (ChatError, PersonaError, PromptTooLong, ValueError) as exc:
        raise StartupError(str(exc)) from None
    return 0


def _chat(args: argparse.Namespace) -> None:
    from ..chat import params_for

    config = settings(args)
    check_data_dir(config.data_dir)
    service = build_service(config)
    try:
        session = service.new_session(service.user_id(config.user), args.persona)
        params = params_for(session.persona, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, seed=args.seed)
        shown = ""
        for reply in service.send(session, args.message, params):
            print(reply.text[len(shown):], end="", flush=True)
            shown = reply.text
        print()
    finally:
        service.close()
