"""`persona-studio align ...`: alignment jobs over the feedback store.

    persona-studio align reward --recipe alignment/recipes/reward_cpu.yaml [--persona ID]
                                [--resume RUN] [--split conversation|time]
    persona-studio align runs [--kind reward]
    persona-studio align show RUN

Built so far: the reward-model job. PPO, KTO, evaluation and promotion come next.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from .settings import Settings

EXIT_FAILED = 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("align", help="alignment jobs: reward model (PPO and KTO to come)")
    commands = parser.add_subparsers(dest="align_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    for name in ("db_url", "data_dir"):
        help_text = Settings.__dataclass_fields__[name].metadata["help"]
        common.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_text)
    reward = commands.add_parser("reward", parents=[common], help="train a reward model on same-context pairs")
    reward.add_argument("--recipe", type=Path, required=True, help="YAML recipe (alignment/recipes/)")
    reward.add_argument("--persona", default=None, help="only feedback on this persona")
    reward.add_argument("--resume", type=int, default=None, metavar="RUN", help="continue run RUN from its checkpoint")
    reward.add_argument("--split", choices=("conversation", "time"), default="conversation",
                        help="hold out whole conversations (default) or the newest ones")
    runs = commands.add_parser("runs", parents=[common], help="list alignment runs, newest first")
    runs.add_argument("--kind", default=None, help="only runs of this kind")
    show = commands.add_parser("show", parents=[common], help="one run's config, data, status and metrics")
    show.add_argument("run", type=int)
    return parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    from alignment.jobs import RunStore

    from .store import ChatStore, StoreError

    try:
        store = ChatStore.open(settings.database_url)
    except StoreError as exc:
        return _fail(exc)
    try:
        runs = RunStore(store.engine)
        if args.align_command == "runs":
            for r in runs.list_runs(args.kind):
                print(f"{r.id:>4}  {r.kind:<7} {r.status:<11} {r.progress:>4.0%}  {r.persona_id or '-':<16} "
                      f"{r.created_at:%Y-%m-%d %H:%M}  {r.output_dir or ''}")
            return 0
        if args.align_command == "show":
            try:
                record = runs.get_run(args.run)
            except KeyError as exc:
                return _fail(exc)
            print(json.dumps({k: v.isoformat() if hasattr(v, "isoformat") else v
                              for k, v in record.__dict__.items()}, indent=2, default=str))
            return 0
        return _reward(args, settings, store, runs)
    finally:
        store.close()


def _reward(args, settings: Settings, store, runs) -> int:
    from alignment.data import DataTooSmall, build_preference
    from alignment.reward import RewardRecipe, train_reward

    try:
        recipe = RewardRecipe.from_yaml(args.recipe)
        split = build_preference(store, persona=args.persona, split=args.split,
                                 eval_fraction=recipe.eval_fraction, seed=recipe.seed)
        split.require(recipe.min_pairs, min_eval=1)
    except (ValueError, OSError, DataTooSmall) as exc:
        return _fail(exc)
    if args.resume is not None:
        try:
            previous = runs.get_run(args.resume)
        except KeyError as exc:
            return _fail(exc)
        if previous.dataset_hash != split.snapshot_hash:
            print(f"note: the feedback changed since run {previous.id} started; "
                  "resuming on the data it was started with is not possible, using today's", file=sys.stderr)
        run_id, output = previous.id, Path(previous.output_dir)
    else:
        output = Path(settings.data_dir) / "runs" / f"reward-{datetime.now():%Y%m%d-%H%M%S}"
        run_id = runs.create_run("reward", persona_id=args.persona, config=recipe.to_dict(),
                                 dataset_hash=split.snapshot_hash, dataset_stats=split.stats,
                                 output_dir=str(output))
    print(f"run {run_id}: reward model on {len(split.train)} train / {len(split.eval)} eval pairs "
          f"(snapshot {split.snapshot_hash[:12]}) -> {output}", file=sys.stderr)
    try:
        result = train_reward(recipe, split.trl("train"), split.trl("eval"), output, run_store=runs,
                              run_id=run_id, resume=args.resume is not None, data_dir=settings.data_dir)
    except KeyboardInterrupt:
        print(f"interrupted: continue with `persona-studio align reward --recipe {args.recipe} "
              f"--resume {run_id}`", file=sys.stderr)
        return 130
    except ValueError as exc:
        return _fail(exc)
    # One JSON line last on stdout (the trainer logs above it), for scripts.
    print(json.dumps({"run": run_id, "version": result.version_id, "adapter": str(result.adapter_dir),
                      "metrics": result.metrics}))
    return 0


def _fail(exc: BaseException) -> int:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"persona-studio: error: {message}", file=sys.stderr)
    return EXIT_FAILED
