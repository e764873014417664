"""`persona-studio align ...`: alignment jobs over the feedback store.

    persona-studio align reward --recipe alignment/recipes/reward_cpu.yaml [--persona ID]
                                [--resume RUN] [--split conversation|time]
    persona-studio align kto --recipe alignment/recipes/kto_cpu.yaml [--persona ID]
                             [--resume RUN] [--split conversation|time]
    persona-studio align runs [--kind reward]
    persona-studio align show RUN

Built so far: the reward-model and KTO jobs. PPO, evaluation and promotion come next.
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
    parser = subparsers.add_parser("align", help="alignment jobs: reward model, KTO (PPO to come)")
    commands = parser.add_subparsers(dest="align_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    for name in ("db_url", "data_dir"):
        help_text = Settings.__dataclass_fields__[name].metadata["help"]
        common.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_text)
    for kind, help_text in (("reward", "train a reward model on same-context pairs"),
                            ("kto", "train a LoRA policy with KTO on unpaired thumbs")):
        job = commands.add_parser(kind, parents=[common], help=help_text)
        job.add_argument("--recipe", type=Path, required=True, help="YAML recipe (alignment/recipes/)")
        job.add_argument("--persona", default=None, help="only feedback on this persona")
        job.add_argument("--resume", type=int, default=None, metavar="RUN", help="continue run RUN from its checkpoint")
        job.add_argument("--split", choices=("conversation", "time"), default="conversation",
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
        return _train(args.align_command, args, settings, store, runs)
    finally:
        store.close()


def _job(kind: str):
    """Recipe class, data builder, trainer, the recipe's minimum field, what it trains and on what, for ``kind``."""
    from alignment import data

    if kind == "kto":
        from alignment.kto import KTORecipe, train_kto

        return KTORecipe, data.build_kto, train_kto, "min_rows", "KTO policy", "rows"
    from alignment.reward import RewardRecipe, train_reward

    return RewardRecipe, data.build_preference, train_reward, "min_pairs", "reward model", "pairs"


def _train(kind: str, args, settings: Settings, store, runs) -> int:
    from alignment.data import DataTooSmall

    recipe_class, build, train, min_field, what, unit = _job(kind)
    try:
        recipe = recipe_class.from_yaml(args.recipe)
        split = build(store, persona=args.persona, split=args.split,
                      eval_fraction=recipe.eval_fraction, seed=recipe.seed)
        split.require(getattr(recipe, min_field), min_eval=1)
    except (ValueError, OSError, DataTooSmall) as exc:
        return _fail(exc)
    if args.resume is not None:
        try:
            previous = runs.get_run(args.resume)
        except KeyError as exc:
            return _fail(exc)
        if previous.kind != kind:
            return _fail(ValueError(f"run {previous.id} is a {previous.kind} run, not {kind}"))
        if previous.dataset_hash != split.snapshot_hash:
            print(f"note: the feedback changed since run {previous.id} started; "
                  "resuming on the data it was started with is not possible, using today's", file=sys.stderr)
        run_id, output = previous.id, Path(previous.output_dir)
    else:
        output = Path(settings.data_dir) / "runs" / f"{kind}-{datetime.now():%Y%m%d-%H%M%S}"
        run_id = runs.create_run(kind, persona_id=args.persona, config=recipe.to_dict(),
                                 dataset_hash=split.snapshot_hash, dataset_stats=split.stats,
                                 output_dir=str(output))
    print(f"run {run_id}: {what} on {len(split.train)} train / {len(split.eval)} eval {unit} "
          f"(snapshot {split.snapshot_hash[:12]}) -> {output}", file=sys.stderr)
    try:
        result = train(recipe, split.trl("train"), split.trl("eval"), output, run_store=runs,
                       run_id=run_id, resume=args.resume is not None, data_dir=settings.data_dir)
    except KeyboardInterrupt:
        print(f"interrupted: continue with `persona-studio align {kind} --recipe {args.recipe} "
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
