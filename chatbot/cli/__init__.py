"""The `persona-studio` command.

    persona-studio serve [--host H] [--port P] [--model M] [--db-url URL] [--auth auto|on|off] ...
    persona-studio chat --persona ID [--max-new-tokens N] [--seed S] "message"
    persona-studio personas list|validate|new|import|export ...
    persona-studio feedback export|stats ...
    persona-studio align reward|ppo|kto|dpo|runs|show|evaluate ...
    persona-studio jobs submit|list|show|log|cancel|resume|worker ...   (the job queue and its worker)
    persona-studio models list|promote|rollback|log|canary|canary-status|canary-stop ...
    persona-studio simulate --persona ID --rule RULE --prompts FILE   (SIMULATED votes)
    persona-studio users add|passwd|list|set-role|remove|api-key ...

Every option named after a setting also reads an environment variable
PERSONA_STUDIO_<NAME> (PERSONA_STUDIO_MODEL, PERSONA_STUDIO_DB_URL, ...); a
flag wins over it. A failure prints one `persona-studio: error: ...` line on
stderr: exit status 1, or 2 for a start-up problem (a busy port, an
unwritable data directory, an unreachable database, a model that cannot
load). docs/cli.md lists every command and option (`make cli-docs`).

Each command group is a module of this package with ``add_parser(subparsers)``
and ``run(args) -> int``; ``COMMANDS`` maps the command names to them.
"""

from __future__ import annotations

import argparse
from types import ModuleType

from . import align, chat, feedback, jobs, models, personas, serve, simulate, users
from .errors import FAILURES, report

# In the order `persona-studio --help` lists them.
COMMANDS: dict[str, ModuleType] = {
    "serve": serve, "chat": chat, "personas": personas, "feedback": feedback, "align": align,
    "jobs": jobs, "models": models, "simulate": simulate, "users": users,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-studio", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        added = module.add_parser(subparsers)
        assert added.prog.endswith(" " + name), f"{module.__name__} registered {added.prog!r}, not {name!r}"
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (argparse exits with 2 on a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except FAILURES as exc:  # the one place a failure becomes `persona-studio: error: ...` and a status
        return report(exc)
    except KeyboardInterrupt:
        return 130
