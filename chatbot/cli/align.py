"""`persona-studio align ...`: alignment jobs over the feedback store.

    persona-studio align reward --recipe alignment/recipes/reward_cpu.yaml [--persona ID]
                                [--resume RUN] [--split conversation|time] [--part P]
    persona-studio align kto --recipe alignment/recipes/kto_cpu.yaml [--persona ID]
                             [--resume RUN] [--split conversation|time] [--part P]
    persona-studio align dpo --recipe alignment/recipes/dpo_cpu.yaml [--persona ID]
                             [--resume RUN] [--split conversation|time] [--part P]
    persona-studio align ppo --recipe alignment/recipes/ppo_cpu.yaml [--persona ID] [--reward-run RUN]
                             [--resume RUN] [--split conversation|time] [--part P]
    persona-studio align runs [--kind reward]
    persona-studio align show RUN
    persona-studio align evaluate RUN [--baseline VERSION|base] [--judge RUN] [--prompts FILE]
                                      [--samples K] [--max-new-tokens N] [--rule RULE] [--seed S]

The jobs and the evaluation themselves live in alignment/ (this module only
parses, opens the store and reports); `align evaluate` is alignment/evaluate.py.

Every job also takes ``--output DIR`` (default ``<data-dir>/runs/<kind>-<time>``),
which ``accelerate launch`` with several processes needs so that all of them
write to one folder; only the main process (RANK 0) writes to the store.

Every job takes ``--part policy|judge|all`` (default policy): the
conversation-level part of the feedback it trains on. A judge reward model
(``align reward --part judge``) never shares a conversation with the policies
and reward models trained on the policy part, so ``align evaluate`` can use
it as an independent judge.

Each job writes ``train_prompts.json`` (fingerprints of its train prompts and
the ids of its train conversations, so an evaluation can leave the prompts out
and check a judge's independence) and ``job.json`` (the process running it, so
a run whose process was killed is reported as interrupted, not running).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alignment.evaluate import POLICY_KINDS, EvalOptions

from ..settings import Settings
from ..store.errors import NotFound
from .errors import CommandError
from .options import open_store, setting_options, settings


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("align", help="alignment jobs: reward model, PPO, KTO, DPO; runs; evaluation")
    commands = parser.add_subparsers(dest="align_command", required=True)
    common = setting_options()  # --db-url, --data-dir
    for kind, help_text in (("reward", "train a reward model on same-context pairs"),
                            ("ppo", "train a LoRA policy with PPO against a reward model"),
                            ("kto", "train a LoRA policy with KTO on unpaired thumbs"),
                            ("dpo", "train a LoRA policy with DPO on same-context pairs")):
        job = commands.add_parser(kind, parents=[common], help=help_text)
        if kind == "ppo":
            job.add_argument("--reward-run", type=int, default=None, metavar="RUN",
                             help="the reward run to optimise against (default: the newest succeeded one "
                                  "for --persona)")
        job.add_argument("--output", type=Path, default=None, metavar="DIR",
                         help="run folder (default: <data-dir>/runs/<kind>-<time>); required with several "
                              "accelerate processes")
        job.add_argument("--recipe", type=Path, required=True, help="YAML recipe (alignment/recipes/)")
        job.add_argument("--persona", default=None, help="only feedback on this persona")
        job.add_argument("--resume", type=int, default=None, metavar="RUN", help="continue run RUN from its checkpoint")
        job.add_argument("--part", choices=("policy", "judge", "all"), default="policy",
                         help="the conversations to train on: policy (default; policies and the reward model PPO "
                              "optimises against), judge (a reward model that judges their candidates "
                              "independently), or all")
        job.add_argument("--split", choices=("conversation", "time"), default="conversation",
                         help="hold out whole conversations (default) or the newest ones")
    runs = commands.add_parser("runs", parents=[common], help="list alignment runs, newest first")
    runs.add_argument("--kind", default=None, help="only runs of this kind")
    show = commands.add_parser("show", parents=[common], help="one run's config, data, status and metrics")
    show.add_argument("run", type=int)
    _evaluate_arguments(commands.add_parser(
        "evaluate", parents=[common], help="a policy run's candidate vs a baseline on held-out prompts, and the gate"))
    return parser


def run(args: argparse.Namespace) -> int:
    from ..store.runs import RunStore

    config = settings(args)
    store = open_store(config.database_url)
    try:
        runs = RunStore(store.engine)
        runs.reap_stale()  # a run whose process died (SIGKILL, power loss) is not "running"
        if args.align_command == "runs":
            for r in runs.list_runs(args.kind):
                print(f"{r.id:>4}  {r.kind:<7} {r.status:<11} {r.progress:>4.0%}  {r.persona_id or '-':<16} "
                      f"{r.created_at:%Y-%m-%d %H:%M}  {r.output_dir or ''}")
            return 0
        if args.align_command == "show":
            try:
                record = runs.get_run(args.run)
            except NotFound as exc:
                raise CommandError(exc) from None
            print(json.dumps({k: v.isoformat() if hasattr(v, "isoformat") else v
                              for k, v in record.__dict__.items()}, indent=2, default=str))
            return 0
        if args.align_command == "evaluate":
            return _evaluate(args, config, store)
        return _train(args.align_command, args, config, store, runs)
    finally:
        store.close()


def _train(kind: str, args, config: Settings, store, runs) -> int:
    from alignment.jobs import JobError, JobRequest, job_kind, start

    try:
        recipe = job_kind(kind).recipe_class.from_yaml(args.recipe)
        request = JobRequest(kind, recipe, persona=args.persona, part=args.part, split=args.split,
                             reward_run=getattr(args, "reward_run", None), output=args.output, resume=args.resume)
        job = start(request, store, runs, data_dir=Path(config.data_dir))
    except (ValueError, OSError) as exc:  # JobError is a ValueError, as are recipe errors
        raise CommandError(exc) from None
    for note in job.notes:
        print(f"note: {note}", file=sys.stderr)
    if job.runs is not None:
        print(job.describe(), file=sys.stderr)
    try:
        result = job.run()
    except KeyboardInterrupt:
        print(f"interrupted: continue with `persona-studio align {kind} --recipe {args.recipe} "
              f"--resume {job.run_id}`", file=sys.stderr)
        return 130
    except JobError as exc:
        raise CommandError(exc) from None
    if job.runs is not None:
        # One JSON line last on stdout (the trainer logs above it), for scripts.
        print(json.dumps({"run": job.run_id, "version": result.version_id, "adapter": str(result.adapter_dir),
                          "metrics": result.metrics}, default=str))
    return 0


# -- align evaluate -----------------------------------------------------------


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `persona-studio align evaluate` (besides --db-url / --data-dir)."""
    parser.add_argument("run", type=int, help=f"the policy run ({', '.join(POLICY_KINDS)}) whose candidate is evaluated")
    parser.add_argument("--baseline", default=None, metavar="VERSION|base",
                        help="compare with this model version, or 'base' (no adapter); "
                             "default: what serves the persona now")
    parser.add_argument("--judge", type=int, default=None, metavar="RUN",
                        help="reward run that scores the replies (default: the newest succeeded one for the persona)")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="one user message per line instead of the run's held-out feedback prompts")
    parser.add_argument("--samples", type=int, default=2, metavar="K", help="replies per prompt and model (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="reply length cap (default 64)")
    parser.add_argument("--rule", default=None,
                        help="also report how often a simulate rule likes the replies: short[:N], question, "
                             "contains:WORD")
    parser.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    parser.add_argument("--batch", type=int, default=EvalOptions.batch, metavar="N",
                        help=f"prompts in flight at once, decoded together (default {EvalOptions.batch}); "
                             "the replies depend on --seed only")
    parser.add_argument("--personas-dir", dest="personas_dir", default=None,
                        help="folder of persona YAML files (for sampling settings and --prompts)")


def _evaluate(args, config: Settings, store) -> int:
    """`persona-studio align evaluate`: 0 when the evaluation ran (whatever the gate says), 1 on an error."""
    from alignment.evaluate import evaluate
    from alignment.gate import failed_checks

    from ..personas import PersonaLibrary

    options = EvalOptions(baseline=args.baseline, judge=args.judge, prompts_file=args.prompts, samples=args.samples,
                          max_new_tokens=args.max_new_tokens, rule=args.rule, seed=args.seed, batch=args.batch)
    try:
        personas = PersonaLibrary(config.personas_dir)
        evaluation = evaluate(store, args.run, options, personas=personas, data_dir=config.data_dir,
                              user_name=config.user)
    except (ValueError, OSError) as exc:  # EvaluationError is a ValueError, as are bad rules and prompt files
        raise CommandError(exc) from None
    gate = evaluation["gate"]
    cand, base = evaluation["metrics"]["candidate"], evaluation["metrics"]["baseline"]
    win, judge, rule = evaluation["win_rate"], evaluation["judge"], evaluation["rule"]
    judged = []
    if win is not None:
        judged.append(f"win rate {win['value']:.2f} (95% CI {win['ci'][0]:.2f}-{win['ci'][1]:.2f}) by reward run "
                      f"{judge['run']}" + ("" if judge["independent"] else ", NOT independent"))
    if rule is not None:
        gain = rule["gain"]
        judged.append(f"rule {rule['spec']} {gain['baseline']:.2f} -> {gain['candidate']:.2f} "
                      f"(gain 95% CI {gain['ci'][0]:+.2f} to {gain['ci'][1]:+.2f})")
    print(f"run {evaluation['run']}: {evaluation['candidate']['label']} vs {evaluation['baseline']['label']} on "
          f"{evaluation['prompts']['used']} prompts: {'; '.join(judged)}; gate {'PASSED' if gate['passed'] else 'FAILED'}",
          file=sys.stderr)
    if judge is not None and not judge["independent"]:
        print(f"  judge: {judge['why']}", file=sys.stderr)
    for line in failed_checks(gate):
        print(f"  failed: {line}", file=sys.stderr)
    summary = {
        "run": evaluation["run"], "version": evaluation["candidate"]["version"],
        "baseline": evaluation["baseline"]["label"], "judge": judge and judge["run"],
        "judge_independent": judge and judge["independent"],
        "prompts": evaluation["prompts"]["used"], "win_rate": win and win["value"], "win_rate_ci": win and win["ci"],
        "rule_gain": rule and rule["gain"],
        "reward": {"candidate": cand["reward_mean"], "baseline": base["reward_mean"]},
        "kl": cand["kl_mean"], "rule_rate": {"candidate": cand["rule_rate"], "baseline": base["rule_rate"]},
        "gate_passed": gate["passed"], "failed_checks": [c["name"] for c in gate["checks"] if not c["passed"]],
        "report": evaluation["files"]["report"], "evaluation": evaluation["files"]["evaluation"],
    }
    print(json.dumps(summary))
    return 0
