"""`persona-studio models ...`: model versions, promotion through the gate, rollback.

    persona-studio models list [--persona ID] [--json]
    persona-studio models promote VERSION [--persona ID] [--force --reason TEXT] [--by NAME]
    persona-studio models rollback PERSONA [--by NAME]
    persona-studio models log PERSONA

A promoted version serves its persona in the running app from the next reply
on (the app asks the store for every reply); rollback puts back whatever
served before it. Promotion needs a passed gate from `persona-studio align
evaluate RUN`; `--force --reason TEXT` overrides a missing or failed gate and
is recorded. `--by` defaults to the OS user. Opens only the database
(`--db-url` / `--data-dir`), never the model. Errors: one line, exit 1.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from .cli_errors import fail
from .settings import Settings


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("models", help="model versions: list, promote to serve a persona, roll back")
    commands = parser.add_subparsers(dest="models_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    for name in ("db_url", "data_dir"):
        help_text = Settings.__dataclass_fields__[name].metadata["help"]
        common.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_text)
    by = argparse.ArgumentParser(add_help=False)
    by.add_argument("--by", default=None, help="who is doing this, for the log (default: the OS user)")

    listing = commands.add_parser("list", parents=[common], help="model versions, newest first")
    listing.add_argument("--persona", default=None, help="only this persona's versions and those promoted for it")
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    promote = commands.add_parser("promote", parents=[common, by],
                                  help="make a version serve its persona (needs a passed evaluation gate)")
    promote.add_argument("version", type=int, help="model version id (see `models list`)")
    promote.add_argument("--persona", default=None,
                         help="the persona to serve; required for a version trained without one")
    promote.add_argument("--force", action="store_true", help="promote past a missing or failed gate")
    promote.add_argument("--reason", default=None, help="why (required with --force; recorded)")
    rollback = commands.add_parser("rollback", parents=[common, by],
                                   help="take a persona's serving version off; what served before serves again")
    rollback.add_argument("persona", help="persona id")
    log = commands.add_parser("log", parents=[common], help="a persona's promotions and rollbacks, oldest first")
    log.add_argument("persona", help="persona id")
    return parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    from .store import ChatStore, PromotionRefused, StoreError

    try:
        store = ChatStore.open(settings.database_url)
    except StoreError as exc:
        return fail(exc)
    try:
        command = args.models_command
        if command == "list":
            return _list(store, args.persona, args.json)
        if command == "log":
            return _log(store, args.persona)
        who = args.by or getpass.getuser()
        if command == "promote":
            change = store.promote(args.version, by=who, force=args.force, reason=args.reason,
                                   persona_id=args.persona)
            _warn_unknown_persona(change.entry.persona_id, settings.personas_dir)
        else:
            change = store.rollback(args.persona, by=who)
        print(_describe(change))
        return 0
    except (PromotionRefused, KeyError, StoreError) as exc:
        return fail(exc)
    finally:
        store.close()


def _served(version) -> str:
    return f"version {version.id}" if version is not None else "the persona file's own adapter or the base model"


def _describe(change) -> str:
    entry, persona = change.entry, change.entry.persona_id
    if entry.action == "promote":
        text = f"version {entry.version_id} now serves persona {persona} (was {_served(change.previous)})"
        if entry.forced:
            text += f"; forced past its gate: {entry.reason}"
    else:
        text = f"rolled back version {entry.version_id}: {_served(change.serving)} serves persona {persona} again"
    return text + "; the running app uses it from its next reply"


def _warn_unknown_persona(persona_id: str, personas_dir: Path) -> None:
    if not (Path(personas_dir) / f"{persona_id}.yaml").is_file():
        print(f"warning: there is no persona file {persona_id}.yaml in {personas_dir}; the promotion is recorded "
              "and takes effect for an app whose personas folder has it", file=sys.stderr)


def _win_rate(evaluation: dict[str, Any] | None) -> str:
    """"60% [56-64]" from `align evaluate`'s win rate ({"value", "ci"}, or a bare number)."""
    win = (evaluation or {}).get("win_rate")
    value = win.get("value") if isinstance(win, dict) else win
    if not isinstance(value, (int, float)):
        return "-"
    text = f"{value:.0%}"
    ci = win.get("ci") if isinstance(win, dict) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        text += f" [{ci[0] * 100:.0f}-{ci[1] * 100:.0f}]"
    return text


def _verdict(version) -> str:
    gate = version.gate
    if gate is None:
        return "not evaluated"
    return "passed" if gate.get("passed") is True else "FAILED"


def _list(store, persona: str | None, as_json: bool) -> int:
    from .store.versions import run_kinds

    versions = store.list_versions(persona)
    kinds = run_kinds(store, {v.run_id for v in versions if v.run_id is not None})
    rows = [{
        "id": v.id, "persona": v.persona_id, "status": v.status, "run_kind": kinds.get(v.run_id),
        "run_id": v.run_id, "base_model": v.base_model, "adapter_path": v.adapter_path,
        "win_rate": _win_rate(v.evaluation), "gate": _verdict(v), "created_at": v.created_at.isoformat(),
    } for v in versions]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("id", "persona", "status", "kind", "win rate", "gate", "created", "base", "adapter")
    _print_table([header] + [(
        str(r["id"]), r["persona"] or "-", r["status"], r["run_kind"] or "-", r["win_rate"], r["gate"],
        f"{v.created_at:%Y-%m-%d %H:%M}", r["base_model"], r["adapter_path"] or "-",
    ) for r, v in zip(rows, versions, strict=True)])
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one (a path, a note) is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
              .rstrip())


def _log(store, persona: str) -> int:
    entries = store.promotion_log(persona)
    if not entries:
        print(f"no promotions for persona {persona}: it uses its persona file's adapter (or the base model)",
              file=sys.stderr)
        return 0
    rows = [("when", "by", "action", "version", "note")]
    for e in entries:
        if e.forced:
            note = f"FORCED past its gate: {e.reason}"
        elif e.action == "promote" and e.gate is None:
            note = "not evaluated"
        else:
            note = e.reason or ""
        rows.append((f"{e.created_at:%Y-%m-%d %H:%M}", e.by, e.action, str(e.version_id), note))
    _print_table(rows)
    return 0
