"""`persona-studio feedback export|stats`: the feedback store as training data and numbers.

    persona-studio feedback export --format jsonl|preference|kto [--persona ID]
                                   [--since DATE] [--model-version V] [--out FILE]
    persona-studio feedback stats [--persona ID] [--since DATE] [--model-version V]

Opens only the database (`--db-url` / `--data-dir`), never the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..feedback_export import FORMATS, export_rows, like_rates
from .options import open_store, print_table, setting_options, settings


def _date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date like 2026-11-28, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("feedback", help="export feedback as training data, or show like rates")
    commands = parser.add_subparsers(dest="feedback_command", required=True)
    common = setting_options()  # --db-url, --data-dir
    common.add_argument("--persona", default=None, help="only replies of this persona id")
    common.add_argument("--since", type=_date, default=None, help="only votes cast or changed since this date")
    common.add_argument("--model-version", type=int, default=None, help="only replies of this model version id")
    export = commands.add_parser("export", parents=[common], help="write feedback as JSON Lines")
    export.add_argument("--format", choices=FORMATS, default="jsonl",
                        help="jsonl: everything; preference: TRL chosen/rejected pairs; "
                             "kto: TRL prompt/completion/label")
    export.add_argument("--out", type=Path, default=None, help="file to write (default: stdout)")
    commands.add_parser("stats", parents=[common], help="like rates per persona and model version")
    return parser


def run(args: argparse.Namespace) -> int:
    store = open_store(settings(args).database_url)
    try:
        votes = store.feedback_rows(args.persona, args.since, args.model_version)
        if args.feedback_command == "export":
            return _export(votes, args)
        return _stats(votes)
    finally:
        store.close()


def _export(votes, args) -> int:
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    count = 0
    try:
        for row in export_rows(votes, args.format):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    finally:
        if args.out:
            out.close()
    print(f"{count} {args.format} rows from {len(votes)} votes" + (f" -> {args.out}" if args.out else ""),
          file=sys.stderr)
    return 0


def _stats(votes) -> int:
    rows = [("PERSONA", "MODEL", "LIKES", "DISLIKES", "LIKE RATE")]
    for r in like_rates(votes):
        rows.append((r.persona_id or "-", r.model, str(r.likes), str(r.dislikes),
                     "-" if r.rate is None else f"{r.rate:.0%}"))
    print_table(rows)
    if len(rows) == 1:
        print("no votes yet")
    return 0
