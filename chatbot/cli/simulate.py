"""`persona-studio simulate`: SIMULATED feedback, votes cast by a declared rule through the real chat path.

    persona-studio simulate --persona ID --rule RULE --prompts FILE [--n N] [--samples K]
                            [--max-new-tokens M] [--seed S] [--data-dir DIR] [--db-url URL] [--model M]
    persona-studio simulate --persona ID --rule RULE --rerate [--data-dir DIR] [--db-url URL]

The rules and the run are chatbot/simulation.py (alignment/evaluate.py uses
the rules too). A bad rule or prompt file is an error (exit 1); a store or a
model that cannot be opened, or an unknown persona, a start-up error (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..settings import Settings
from ..simulation import BANNER, RULE_SPECS, SIMULATOR_USER, load_prompts, parse_rule, rerate, simulate
from ..startup import StartupError, build_service, check_data_dir
from .errors import EXIT_FAILED, CommandError
from .options import add_settings, settings



def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate", help="SIMULATED feedback: rate replies by a rule, for demos, tests and benchmarks",
        description="Sends prompts through the real chat path and rates every reply by a declared "
                    "rule. The votes are marked simulated: they are not people's opinions.")
    add_settings(parser, skip=("host", "port", "user", "worker_nice", "job_poll_seconds"))  # no server; the votes are the simulator's
    parser.add_argument("--persona", required=True, help="persona id (file name without .yaml)")
    parser.add_argument("--rule", required=True, help=RULE_SPECS + " (short: 40 words)")
    parser.add_argument("--prompts", type=Path, default=None, help="file with one prompt per line")
    parser.add_argument("--rerate", action="store_true",
                        help="generate nothing: vote again by --rule on every reply the simulator rated "
                             "for --persona")
    parser.add_argument("--n", type=int, default=None, help="prompts to send (default: each prompt once)")
    parser.add_argument("--samples", type=int, default=4,
                        help="replies per prompt, sampled together; siblings as Retry makes them")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="reply length limit in tokens")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed (prompt i's reply k uses seed + i x samples + k)")
    return parser


def run(args: argparse.Namespace) -> int:
    config = settings(args)
    try:
        rule = parse_rule(args.rule)
        if args.rerate:
            return _rerate(args, config, rule)
        if args.prompts is None:
            raise ValueError("--prompts FILE is needed (or --rerate to vote again on replies already rated)")
        prompts = load_prompts(args.prompts)
    except ValueError as exc:
        raise CommandError(exc) from None
    try:
        return _simulate(args, config, rule, prompts)
    except ValueError as exc:  # --n 0 and the like, found once the model is loaded
        raise StartupError(str(exc)) from None


def _simulate(args: argparse.Namespace, config: Settings, rule, prompts: list[str]) -> int:
    from ..chat import params_for
    from ..personas import PersonaError

    n = args.n or len(prompts)
    check_data_dir(config.data_dir)
    service = build_service(config)
    try:
        try:
            persona = service.personas.get(args.persona)
        except (KeyError, PersonaError) as exc:
            raise StartupError(str(exc)) from None
        params = params_for(persona, max_new_tokens=args.max_new_tokens, seed=args.seed)
        print(f"{BANNER}: persona {args.persona}, rule {args.rule!r} ({rule.describe()}), "
              f"{n} prompts x {args.samples} replies, user {SIMULATOR_USER!r}; "
              f"votes are stored marked simulated", flush=True)
        if params.temperature == 0 and args.samples > 1:
            print("SIMULATED: warning: the persona decodes greedily (temperature 0), "
                  "so regenerations repeat the same reply", flush=True)
        report = simulate(service, args.persona, rule, prompts, n, args.samples, params,
                          progress=lambda line: print(line, flush=True))
    finally:
        service.close()
    print(report.summary(), flush=True)
    for problem in report.failed:
        print(f"SIMULATED: failed: {problem}", file=sys.stderr)
    # Every prompt failed: each failure is already on stderr, so the status alone says it.
    return 0 if report.replies else EXIT_FAILED


def _rerate(args: argparse.Namespace, config: Settings, rule) -> int:
    from ..store import ChatStore, StoreError

    try:
        store = ChatStore.open(config.database_url)
    except StoreError as exc:
        raise ValueError(str(exc)) from None
    try:
        report = rerate(store, args.persona, rule)
    finally:
        store.close()
    if not report.replies:
        raise ValueError(f"the simulator has rated no reply of persona {args.persona} yet: run simulate first")
    print(f"{BANNER}: re-rated by rule {args.rule!r}", flush=True)
    print(report.summary(), flush=True)
    return 0
