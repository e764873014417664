"""`persona-studio models ...`: model versions, promotion through the gate, rollback.

    persona-studio models list [--persona ID] [--json]
    persona-studio models promote VERSION [--persona ID] [--force --reason TEXT] [--require-ab] [--by NAME]
    persona-studio models rollback PERSONA [--by NAME]
    persona-studio models log PERSONA
    persona-studio models canary VERSION [--share 0.2] [--persona ID] [--min-votes 100] [--include-simulated]
                                         [--by NAME]
    persona-studio models canary-status PERSONA [--include-simulated] [--json]
    persona-studio models canary-stop PERSONA [--by NAME]

A promoted version serves its persona in the running app from the next reply
on (the app asks the store for every reply); rollback puts back whatever
served before it. Promotion needs a passed gate from `persona-studio align
evaluate RUN`; `--force --reason TEXT` overrides a missing or failed gate and
is recorded. A canary serves a version to a share of the persona's new
conversations (an A/B on people's thumbs, see store/canary.py); an A/B that
shows it significantly better also gets it past the gate, and
`--require-ab` refuses a promotion without a sufficient A/B that is not
significantly worse. `--by` defaults to the OS user. Opens only the database
(`--db-url` / `--data-dir`), never the model. Errors: one line, exit 1 (chatbot/cli/errors.py).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from .errors import CommandError
from .options import open_store, print_table, setting_options, settings


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("models", help="model versions: list, promote to serve a persona, roll back")
    commands = parser.add_subparsers(dest="models_command", required=True)
    common = setting_options()  # --db-url, --data-dir
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
    promote.add_argument("--require-ab", action="store_true",
                         help="refuse unless the version's canary reached its minimum votes in both arms and is "
                              "not significantly worse than what serves now")
    rollback = commands.add_parser("rollback", parents=[common, by],
                                   help="take a persona's serving version off; what served before serves again")
    rollback.add_argument("persona", help="persona id")
    log = commands.add_parser("log", parents=[common],
                              help="a persona's promotions, rollbacks and canaries, oldest first")
    log.add_argument("persona", help="persona id")

    canary = commands.add_parser("canary", parents=[common, by],
                                 help="A/B a version on people's thumbs: it serves a share of the persona's new "
                                      "conversations")
    canary.add_argument("version", type=int, help="model version id (see `models list`)")
    canary.add_argument("--share", type=float, default=0.2,
                        help="the share of new conversations the version gets (default 0.2)")
    canary.add_argument("--persona", default=None,
                        help="the persona; required for a version trained without one")
    canary.add_argument("--min-votes", type=int, default=100,
                        help="votes per arm before anything is decided (default 100)")
    canary.add_argument("--include-simulated", action="store_true",
                        help="count `simulate`'s votes in its decisions (demos and tests only)")
    status = commands.add_parser("canary-status", parents=[common],
                                 help="a persona's canary: both arms' like rates and their difference with a 95%% CI")
    status.add_argument("persona", help="persona id")
    status.add_argument("--include-simulated", action="store_true",
                        help="count simulated votes too (a canary started with --include-simulated always does)")
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    stop = commands.add_parser("canary-stop", parents=[common, by],
                               help="end a persona's running canary; the control serves everyone again")
    stop.add_argument("persona", help="persona id")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..store import NotFound, PromotionRefused, StoreError

    config = settings(args)
    store = open_store(config.database_url)
    try:
        command = args.models_command
        if command == "list":
            return _list(store, args.persona, args.json)
        if command == "log":
            return _log(store, args.persona)
        if command == "canary-status":
            return _canary_status(store, args.persona, args.include_simulated, args.json)
        who = args.by or getpass.getuser()
        if command == "canary":
            return _canary_start(store, args, who, config.personas_dir)
        if command == "canary-stop":
            ended = store.stop_canary(args.persona, by=who)
            print(f"canary {ended.id} ended ({ended.outcome}): {_served_by_control(ended)} serves persona "
                  f"{ended.persona_id} again; the running app uses it from its next reply")
            return 0
        if command == "promote":
            change = store.promote(args.version, by=who, force=args.force, reason=args.reason,
                                   persona_id=args.persona, require_ab=args.require_ab)
            _warn_unknown_persona(change.entry.persona_id, config.personas_dir)
        else:
            change = store.rollback(args.persona, by=who)
        print(_describe(change))
        return 0
    except (PromotionRefused, NotFound, StoreError) as exc:
        raise CommandError(exc) from None
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
        if entry.ab is not None:
            text += f"; A/B (canary {entry.ab['canary']}): {entry.ab['verdict']}"
    else:
        text = f"rolled back version {entry.version_id}: {_served(change.serving)} serves persona {persona} again"
    if change.ended_canary is not None:
        text += f"; canary {change.ended_canary.id} ended ({change.ended_canary.outcome})"
    return text + "; the running app uses it from its next reply"


def _served_by_control(canary) -> str:
    return _served(None) if canary.control_id is None else f"version {canary.control_id}"


def _canary_start(store, args, who: str, personas_dir: Path) -> int:
    started = store.start_canary(args.version, by=who, share=args.share, min_votes=args.min_votes,
                                 persona_id=args.persona, include_simulated=args.include_simulated)
    _warn_unknown_persona(started.persona_id, personas_dir)
    verdict = _verdict(store.get_version(started.candidate_id))
    if verdict != "passed":
        print(f"warning: version {started.candidate_id}'s offline gate: {verdict}; promoting it will need an A/B "
              "that shows it significantly better, or --force --reason TEXT", file=sys.stderr)
    votes = "people's and simulated votes" if started.include_simulated else "people's votes only"
    print(f"canary {started.id}: version {started.candidate_id} serves {started.share:.0%} of persona "
          f"{started.persona_id}'s new conversations; the control ({_served_by_control(started)}) the rest; "
          f"conversations already started keep what they have; at least {started.min_votes} votes per arm "
          f"({votes}) before any decision; `persona-studio models canary-status {started.persona_id}` "
          "shows the like rates")
    return 0


def _rate(arm) -> str:
    return "-" if arm.like_rate is None else f"{arm.like_rate:.1%}"


def _canary_status(store, persona: str, include_simulated: bool, as_json: bool) -> int:
    from ..store import CanaryRefused

    history = store.canaries(persona)
    if not history:
        raise CanaryRefused(f"no canary for persona {persona}: start one with `persona-studio models canary VERSION`")
    canary = history[-1]
    figures = store.canary_stats(canary.id, include_simulated)
    if as_json:
        data = figures.to_dict()
        ended_at = canary.ended_at.isoformat() if canary.ended_at is not None else None
        data.update(persona=persona, running=canary.running, started_by=canary.started_by,
                    started_at=canary.started_at.isoformat(), ended_at=ended_at, ended_by=canary.ended_by,
                    outcome=canary.outcome, decisions_count_simulated=canary.include_simulated)
        print(json.dumps(data, indent=2))
        return 0
    state = ("running" if canary.running else
             f"ended {canary.ended_at:%Y-%m-%d %H:%M} by {canary.ended_by}: {canary.outcome}")
    print(f"canary {canary.id} for persona {persona}: version {canary.candidate_id} on {canary.share:.0%} of new "
          f"conversations vs {_served_by_control(canary)} (control); started {canary.started_at:%Y-%m-%d %H:%M} "
          f"by {canary.started_by}; {state}")
    print("votes counted: " + ("people's and simulated" if figures.include_simulated else
                               "people's only (--include-simulated counts simulated ones too)"))
    rows = [("arm", "version", "conversations", "voted", "votes", "liked", "like rate")]
    for arm in (figures.control, figures.candidate):
        rows.append((arm.arm, "-" if arm.version_id is None else str(arm.version_id), str(arm.assigned),
                     str(arm.conversations), str(arm.votes), str(arm.liked), _rate(arm)))
    print_table(rows)
    if figures.difference is None:
        print("difference (candidate - control): n/a (an arm has no votes yet)")
    elif figures.ci is None:
        print(f"difference (candidate - control): {figures.difference * 100:+.1f} points; no 95% CI yet "
              "(each arm needs votes in two conversations)")
    else:
        print(f"difference (candidate - control): {figures.difference * 100:+.1f} points, 95% CI "
              f"[{figures.ci[0] * 100:+.1f}, {figures.ci[1] * 100:+.1f}] (conversations as the unit)")
    reached = "reached" if figures.min_votes_reached else "not reached"
    print(f"minimum sample: {canary.min_votes} votes per arm: {reached} (control {figures.control.votes}, "
          f"candidate {figures.candidate.votes})")
    print(f"verdict: {figures.verdict}")
    decisions = "people's and simulated votes" if canary.include_simulated else "people's votes only"
    print(f"decisions (auto-rollback, promote) count {decisions}")
    return 0


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
    from ..store.versions import run_kinds

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
    print_table([header] + [(
        str(r["id"]), r["persona"] or "-", r["status"], r["run_kind"] or "-", r["win_rate"], r["gate"],
        f"{v.created_at:%Y-%m-%d %H:%M}", r["base_model"], r["adapter_path"] or "-",
    ) for r, v in zip(rows, versions, strict=True)])
    return 0


def _log(store, persona: str) -> int:
    entries = store.promotion_log(persona)
    canaries = store.canaries(persona)
    if not entries and not canaries:
        print(f"no promotions for persona {persona}: it uses its persona file's adapter (or the base model)",
              file=sys.stderr)
        return 0
    events = []  # (when, order, row): promotions and canary starts and ends, by time
    for e in entries:
        if e.forced:
            note = f"FORCED past its gate: {e.reason}"
        elif e.action == "promote" and e.gate is None:
            note = "not evaluated"
        else:
            note = e.reason or ""
        if e.action == "promote" and e.ab is not None:
            ab = f"A/B canary {e.ab['canary']}: {e.ab['verdict']}, {e.ab['summary']}"
            if not e.forced and not (e.gate is not None and e.gate.get("passed") is True):
                ab += " (promoted on its A/B: the gate did not pass)"
            note = f"{note}; {ab}" if note else ab
        events.append((e.created_at, 1, (e.by, e.action, str(e.version_id), note)))
    for c in canaries:
        votes = ", simulated votes count" if c.include_simulated else ""
        events.append((c.started_at, 0, (c.started_by, "canary", str(c.candidate_id),
                                         f"canary {c.id}: {c.share:.0%} of new conversations, min "
                                         f"{c.min_votes} votes per arm{votes}")))
        if c.ended_at is not None:
            events.append((c.ended_at, 2, (c.ended_by or "", "canary-end", str(c.candidate_id),
                                           f"canary {c.id}: {c.outcome}")))
    rows = [("when", "by", "action", "version", "note")]
    for when, _, row in sorted(events, key=lambda event: event[:2]):
        rows.append((f"{when:%Y-%m-%d %H:%M}", *row))
    print_table(rows)
    return 0
