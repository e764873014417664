"""`persona-studio jobs ...`: the job queue (chatbot/store/jobs.py) and its worker (alignment/worker.py).

    persona-studio jobs submit reward|ppo|kto|dpo --recipe FILE [--persona ID] [--part P] [--split S]
                               [--reward-run RUN]
    persona-studio jobs list [--persona ID]
    persona-studio jobs show JOB            what was asked, status, progress, result or error
    persona-studio jobs log JOB [--lines N] the tail of its output
    persona-studio jobs cancel JOB          a queued job at once; a running one checkpoints, then stops
    persona-studio jobs resume JOB          queue an interrupted or cancelled job again (from its checkpoint)
    persona-studio jobs worker [--once] [--idle-exit S] [--nice N]   run queued jobs, one at a time

The app's Alignment tab queues jobs the same way; `serve` starts a worker
when there is work and none is running. `align reward|ppo|kto|dpo` still run
a job in the terminal, without the queue.
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from pathlib import Path

from ..store.errors import NotFound
from .errors import CommandError
from .options import open_store, print_table, setting_options, settings

TRAINING = ("reward", "ppo", "kto", "dpo")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("jobs", help="the job queue: submit, list, show, log, cancel, resume; the worker")
    commands = parser.add_subparsers(dest="jobs_command", required=True)
    common = setting_options()  # --db-url, --data-dir
    submit = commands.add_parser("submit", parents=[common], help="queue a training job for the worker")
    submit.add_argument("kind", choices=TRAINING)
    submit.add_argument("--recipe", type=Path, required=True, help="YAML recipe (alignment/recipes/)")
    submit.add_argument("--persona", default=None, help="only feedback on this persona")
    submit.add_argument("--part", choices=("policy", "judge", "all"), default="policy",
                        help="the conversations to train on (see `align reward --help`)")
    submit.add_argument("--split", choices=("conversation", "time"), default="conversation")
    submit.add_argument("--reward-run", type=int, default=None, metavar="RUN", help="ppo: the reward run")
    submit.add_argument("--by", default=None, help="who asks (default: --user)")
    listing = commands.add_parser("list", parents=[common], help="jobs, newest first")
    listing.add_argument("--persona", default=None)
    for name, help_text in (("show", "one job: request, status, progress, result or error"),
                            ("cancel", "cancel a job: a running one writes a checkpoint, then stops"),
                            ("resume", "queue an interrupted or cancelled job again")):
        command = commands.add_parser(name, parents=[common], help=help_text)
        command.add_argument("job", type=int)
    log = commands.add_parser("log", parents=[common], help="the tail of a job's output")
    log.add_argument("job", type=int)
    log.add_argument("--lines", type=int, default=40, metavar="N")
    worker = commands.add_parser("worker", parents=[setting_options(("db_url", "data_dir", "personas_dir"))],
                                 help="run queued jobs one at a time (serve starts one when needed)")
    worker.add_argument("--once", action="store_true", help="run at most one job, then exit")
    worker.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                        help="exit after this long with nothing queued (default: never)")
    worker.add_argument("--nice", type=int, default=0, metavar="N",
                        help="lower the worker's CPU priority by N, so that chats go first (serve starts "
                             "its worker with 10; default 0)")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..store.jobs import JobQueue

    config = settings(args)
    store = open_store(config.database_url)
    try:
        queue = JobQueue(store.engine)
        if args.jobs_command == "worker":
            return _worker(args, config, store)
        queue.reap_orphans()
        try:
            return _COMMANDS[args.jobs_command](args, config, queue)
        except (NotFound, ValueError, OSError) as exc:
            raise CommandError(exc) from None
    finally:
        store.close()


def _submit(args, config, queue) -> int:
    from alignment.jobs import job_kind

    recipe = job_kind(args.kind).recipe_class.from_yaml(args.recipe)  # refused here, not in the worker
    request = {"recipe": recipe.to_dict(), "part": args.part, "split": args.split, "reward_run": args.reward_run}
    job_id = queue.enqueue(args.kind, request, requested_by=args.by or config.user, persona_id=args.persona)
    print(json.dumps({"job": job_id}))
    return 0


def _list(args, config, queue) -> int:
    rows = [("job", "kind", "status", "progress", "persona", "run", "asked", "by")]
    for job in queue.list_jobs(args.persona):
        rows.append((str(job.id), job.kind, job.status, f"{job.progress:.0%}", job.persona_id or "-",
                     str(job.run_id or "-"), f"{job.created_at:%Y-%m-%d %H:%M}", job.requested_by))
    print_table(rows)
    return 0


def _show(args, config, queue) -> int:
    job = queue.get(args.job)
    print(json.dumps({k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in job.__dict__.items()},
                     indent=2, default=str))
    return 0


def _log(args, config, queue) -> int:
    job = queue.get(args.job)
    if not job.log_path or not Path(job.log_path).exists():
        raise CommandError(f"job {job.id} has no output yet ({job.status})")
    with open(job.log_path, encoding="utf-8", errors="replace") as handle:
        print("".join(deque(handle, maxlen=max(1, args.lines))), end="")
    return 0


def _cancel(args, config, queue) -> int:
    job = queue.cancel(args.job)
    print(f"job {job.id}: " + ("cancelled" if job.status == "cancelled" else
                               "asked to stop; it writes a checkpoint at the end of its step"))
    return 0


def _resume(args, config, queue) -> int:
    job_id = queue.resume(args.job, requested_by=config.user)
    print(json.dumps({"job": job_id, "resumes": args.job}))
    return 0


def _worker(args, config, store) -> int:
    from alignment.worker import WorkerBusy, run_worker, yield_cpu

    yield_cpu(args.nice)
    try:
        ran = run_worker(store, Path(config.data_dir), config.personas_dir, once=args.once,
                         idle_exit=args.idle_exit)
    except WorkerBusy as exc:
        raise CommandError(exc) from None
    print(f"worker: ran {ran} job(s)")
    return 0


_COMMANDS = {"submit": _submit, "list": _list, "show": _show, "log": _log, "cancel": _cancel, "resume": _resume}
