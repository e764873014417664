"""Starting and running an alignment job: one lifecycle for every caller.

The command line (``persona-studio align reward|ppo|kto|dpo``) and anything
else that starts a job go through here, so a job is refused, recorded,
claimed and finished the same way whoever starts it::

    request = JobRequest("kto", recipe=KTORecipe.from_yaml(path), persona="pirate")
    job = start(request, store, runs, data_dir=data_dir)  # checked, run row created (or resumed), claimed
    result = job.run()                                      # trains; the run row follows it

``start`` refuses (``JobError``, naming what is wrong) before anything is
written: a recipe below its data minimum, a resume of a run of another kind
or of one still running, a new run into a folder that is not empty, or PPO
without a reward model to optimise against. Under ``accelerate launch`` only
the main process (RANK 0) writes to the store; the others train on the same
split into the same ``output`` folder.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from alignment.data import DataTooSmall, Split, write_train_prompts
from alignment.training import JobResult
from chatbot.store.errors import NotFound
from chatbot.store.runs import RunStore, claim

JOB_KINDS = ("reward", "ppo", "kto", "dpo")
PARTS = ("policy", "judge", "all")
SPLITS = ("conversation", "time")


class JobError(ValueError):
    """A job refused or failed for a reason its caller can show as one line."""


@dataclass(frozen=True)
class JobKind:
    """What one kind of job trains, on what, and how little data it accepts."""

    recipe_class: type
    build: Callable[..., Split]  # alignment.data builder: the store -> a train/eval split
    train: Callable[..., JobResult]
    min_field: str  # the recipe field with the least train rows it accepts
    what: str  # "KTO policy"
    unit: str  # "rows"


def job_kind(kind: str) -> JobKind:
    """The job kind ``kind`` (one of JOB_KINDS); imports only that job's trainer."""
    from alignment import data

    if kind == "ppo":
        from alignment.ppo import PPORecipe, train_ppo

        return JobKind(PPORecipe, data.build_prompts, train_ppo, "min_prompts", "PPO policy", "prompts")
    if kind == "kto":
        from alignment.kto import KTORecipe, train_kto

        return JobKind(KTORecipe, data.build_kto, train_kto, "min_rows", "KTO policy", "rows")
    if kind == "dpo":
        from alignment.dpo import DPORecipe, train_dpo

        return JobKind(DPORecipe, data.build_preference, train_dpo, "min_pairs", "DPO policy", "pairs")
    if kind == "reward":
        from alignment.reward import RewardRecipe, train_reward

        return JobKind(RewardRecipe, data.build_preference, train_reward, "min_pairs", "reward model", "pairs")
    raise JobError(f"job kind must be one of {', '.join(JOB_KINDS)}, not {kind!r}")


@dataclass(frozen=True)
class JobRequest:
    """What to train: the kind, a loaded recipe, and which feedback."""

    kind: str
    recipe: Any  # the kind's recipe dataclass (job_kind(kind).recipe_class)
    persona: str | None = None
    part: str = "policy"  # policy | judge | all: the conversation-level part of the feedback
    split: str = "conversation"  # conversation | time: how eval rows are held out
    reward_run: int | None = None  # PPO: the reward run to optimise against (default: the newest that fits)
    output: Path | None = None  # default <data_dir>/runs/<kind>-<time>
    resume: int | None = None  # continue this run from its checkpoint


@dataclass
class Job:
    """A job that passed every check, with its run row and output folder claimed (main process)."""

    request: JobRequest
    run_id: int | None  # None in a non-main accelerate process
    output: Path
    split: Split
    kind: JobKind
    runs: RunStore | None  # None in a non-main accelerate process: only RANK 0 writes
    data_dir: Path
    train: Callable[..., JobResult]
    notes: list[str] = field(default_factory=list)  # warnings the caller shows (changed data, judge-part reward)

    def describe(self) -> str:
        """One line: the run, what it trains, on how much data, where."""
        return (f"run {self.run_id}: {self.kind.what} on {len(self.split.train)} train / {len(self.split.eval)} "
                f"eval {self.kind.unit} (snapshot {self.split.snapshot_hash[:12]}) -> {self.output}")

    def run(self, cancelled: Callable[[], bool] | None = None) -> JobResult:
        """Train. A refusal found once training has begun (JobError) marks the run failed;
        any other exception leaves it to the trainer's own bookkeeping (alignment.training.run_tracked).

        ``cancelled``: asked after every step; once it is true the job writes a
        checkpoint and raises alignment.training.JobCancelled (the run is then
        interrupted, and resumes from that checkpoint).
        """
        try:
            return self.train(self.request.recipe, self.split.trl("train"), self.split.trl("eval"), self.output,
                              run_store=self.runs, run_id=self.run_id, resume=self.request.resume is not None,
                              data_dir=self.data_dir, cancelled=cancelled)
        except ValueError as exc:
            if self.runs is not None and self.runs.get_run(self.run_id).status in ("queued", "running"):
                self.runs.set_status(self.run_id, "failed", str(exc))  # refused before training started
            raise JobError(str(exc)) from None


def checked_split(kind: str, recipe: Any, store: Any, persona: str | None, part: str = "policy",
                  split: str = "conversation") -> Split:
    """The data a ``kind`` job with ``recipe`` would train on; JobError saying the counts it lacks."""
    job = job_kind(kind)
    try:
        data = job.build(store, persona=persona, split=split, part=part, eval_fraction=recipe.eval_fraction,
                         seed=recipe.seed)
        return data.require(getattr(recipe, job.min_field), min_eval=1)
    except (ValueError, DataTooSmall) as exc:
        raise JobError(str(exc)) from None


def main_process() -> bool:
    """Whether this is the process that writes to the store: ``accelerate launch`` sets RANK per process."""
    return int(os.environ.get("RANK", "0")) == 0


def start(request: JobRequest, store: Any, runs: RunStore, data_dir: Path) -> Job:
    """Check ``request`` against the store, then create (or resume) its run and claim its folder.

    JobError before anything is written when the job cannot run.
    """
    kind = job_kind(request.kind)
    if not isinstance(request.recipe, kind.recipe_class):
        raise JobError(f"a {request.kind} job needs a {kind.recipe_class.__name__}, "
                       f"not a {type(request.recipe).__name__}")
    if request.part not in PARTS:
        raise JobError(f"part must be one of {', '.join(PARTS)}, not {request.part!r}")
    if request.split not in SPLITS:
        raise JobError(f"split must be one of {', '.join(SPLITS)}, not {request.split!r}")
    recipe, notes = request.recipe, []
    split = checked_split(request.kind, recipe, store, request.persona, request.part, request.split)
    train = kind.train
    if request.kind == "ppo":
        train = functools.partial(train, reward_dir=reward_dir(runs, request.reward_run, request.persona, notes))
    writer = main_process()
    if not writer and request.output is None:
        raise JobError("with several accelerate processes, give every process the same output folder (--output DIR)")
    if request.resume is not None:
        try:
            previous = runs.resumable(request.resume, request.kind, check_process=writer)
        except (NotFound, ValueError) as exc:
            raise JobError(str(exc)) from None
        if previous.dataset_hash != split.snapshot_hash:
            notes.append(f"the feedback changed since run {previous.id} started; resuming on the data it was "
                         "started with is not possible, using today's")
        run_id, output = previous.id, Path(previous.output_dir)
    elif not writer:
        run_id, output = None, request.output
    else:
        output = request.output or Path(data_dir) / "runs" / f"{request.kind}-{datetime.now():%Y%m%d-%H%M%S}"
        if output.exists() and any(output.iterdir()):
            raise JobError(f"{output} is not empty: a new run needs a new folder "
                           "(or continue the run that used it with --resume RUN)")
        run_id = runs.create_run(request.kind, persona_id=request.persona, config=recipe.to_dict(),
                                 dataset_hash=split.snapshot_hash, dataset_stats=split.stats, output_dir=str(output))
    if writer:
        claim(output)
        write_train_prompts(output, split.train)
    return Job(request, run_id, output, split, kind, runs if writer else None, Path(data_dir), train, notes)


def reward_dir(runs: RunStore, reward_run: int | None, persona: str | None, notes: list[str]) -> Path:
    """The output folder of the reward run PPO optimises against: the one named, or the newest that fits.

    A judge-part reward model is kept for judging: optimising against it would
    leave no independent judge, so it is never picked by default, and naming
    it adds a warning to ``notes``.
    """
    if reward_run is not None:
        try:
            run = runs.get_run(reward_run)
        except NotFound as exc:
            raise JobError(str(exc)) from None
        if run.kind != "reward" or run.status != "succeeded":
            raise JobError(f"--reward-run {reward_run} is a {run.status} {run.kind} run; "
                           "it must be a succeeded reward run")
        if (run.dataset_stats or {}).get("part") == "judge":
            notes.append(f"reward run {reward_run} was trained as a judge (--part judge); optimised against, "
                         "it can no longer judge this policy")
        return Path(run.output_dir)
    for run in runs.list_runs("reward"):
        if run.status == "succeeded" and run.persona_id == persona and \
                (run.dataset_stats or {}).get("part") != "judge":
            return Path(run.output_dir)
    raise JobError(f"no succeeded reward run for persona {persona or '(all personas)'} outside the judge part: "
                   "train one with `persona-studio align reward`, or name one with --reward-run")
