"""What the app's Alignment tab shows and does, without Gradio (chatbot/ui/alignment_tab.py draws it).

For one persona: its votes (people's and SIMULATED ones apart, by day), how
much training data they make, and for every shipped recipe whether a job
could start now, or the counts it still lacks, in the words the command line
uses (``alignment.jobs.checked_split``). Jobs are queued in the store and run
by the worker process (alignment/worker.py), which is started when needed;
nothing here trains. A job's status comes with its ETA, its curves (each
kind's own metrics, from the run's logged steps) and the tail of its output.

Every caller is an admin: the tab checks the role on each request before it
calls in here.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from alignment.jobs import JOB_KINDS, JobError, checked_split, job_kind, reward_dir
from chatbot.settings import Settings
from chatbot.store.jobs import JobQueue, JobRecord
from chatbot.store.runs import RunStore

RECIPES = Path(__file__).resolve().parent / "recipes"
PROMPTS = Path(__file__).resolve().parent / "prompts"
LOG_LINES = 40
# Each kind's own curves, in the order they are drawn (the names TRL logs them under).
CURVES = {
    "reward": ("loss", "accuracy", "margin"),
    "kto": ("loss", "rewards/margins", "kl"),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins"),
    "ppo": ("objective/rlhf_reward", "objective/scores", "objective/kl", "reply/length_mean"),
}


@dataclass(frozen=True)
class Readiness:
    recipe: str  # file name under alignment/recipes/
    ready: bool
    detail: str  # "120 train / 30 eval pairs", or why not, worded as the CLI refuses


@dataclass(frozen=True)
class JobStatus:
    job: JobRecord
    eta_seconds: float | None  # None until it has made progress, or once it has finished
    curves: list[dict[str, Any]]  # rows {step, metric, value}
    log_tail: str


def recipe_kind(name: str) -> str:
    """The job kind of a recipe file: ``kto_cpu.yaml`` -> ``kto``."""
    kind = Path(name).name.split("_", 1)[0]
    if kind not in JOB_KINDS:
        raise ValueError(f"recipe {name!r} is not named after a job kind ({', '.join(JOB_KINDS)})")
    return kind


def parse_recipe(name: str, text: str):
    """The recipe ``text`` (YAML, as edited in the tab) loaded by the same loader as the CLI's --recipe;
    ValueError naming what is wrong."""
    kind = recipe_kind(name)
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{name}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{name}: a recipe is a mapping of keys to values")
    try:
        return job_kind(kind).recipe_class.from_dict(values, source=name)
    except TypeError as exc:  # a value of the wrong type reaching the dataclass
        raise ValueError(f"{name}: {exc}") from None


def eta_seconds(job: JobRecord, now) -> float | None:
    """Seconds left at the pace so far: elapsed x (1 - progress) / progress."""
    if job.status != "running" or job.started_at is None or job.progress <= 0:
        return None
    elapsed = (now - job.started_at).total_seconds()
    return max(0.0, elapsed * (1 - job.progress) / job.progress)


def curve_rows(kind: str, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Long-format rows {step, metric, value} of ``kind``'s curves from a run's logged steps."""
    rows = []
    for entry in history:
        for metric in CURVES.get(kind, ("loss",)):
            value = entry.get(metric)
            if isinstance(value, (int, float)) and "step" in entry:
                rows.append({"step": entry["step"], "metric": metric, "value": float(value)})
    return rows


def tail(path: str | None, lines: int = LOG_LINES) -> str:
    if not path or not Path(path).is_file():
        return ""
    with open(path, encoding="utf-8", errors="replace") as handle:
        # Progress bars redraw with \r: the last state of each line is what a terminal shows.
        return "".join(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\n") else line
                       for line in deque(handle, maxlen=lines))


class JobBoard:
    """The Alignment tab's data and actions over the shared store (see the module docstring)."""

    def __init__(self, store, database_url: str, data_dir: Path, personas_dir: Path | None = None,
                 start_worker: bool = True, engine_options: dict[str, Any] | None = None,
                 worker_niceness: int | None = None, poll_seconds: float = Settings.job_poll_seconds):
        """``engine_options``: the server's model settings (model, engine, dtype, ...), so that a
        simulation generates with the model the chat serves; ``worker_niceness``: the CPU priority
        the worker it starts gives up (None: the worker's default); ``poll_seconds``: how often the
        tab asks for a running job's status."""
        self.store = store
        self.queue = JobQueue(store.engine)
        self.runs = RunStore(store.engine)
        self.database_url, self.data_dir, self.personas_dir = database_url, Path(data_dir), personas_dir
        self.start_worker = start_worker
        self.engine_options = dict(engine_options or {})
        self.worker_niceness = worker_niceness
        self.poll_seconds = poll_seconds

    # -- data -------------------------------------------------------------------------

    @staticmethod
    def recipes() -> list[str]:
        return sorted(p.name for p in RECIPES.glob("*.yaml"))

    @staticmethod
    def recipe_text(name: str) -> str:
        path = RECIPES / Path(name).name  # a name from recipes(), never a path from the page
        if path.suffix != ".yaml" or not path.is_file():
            raise ValueError(f"no shipped recipe named {name!r}")
        return path.read_text(encoding="utf-8")

    def votes(self, persona: str) -> dict[str, Any]:
        """People's and simulated votes on the persona: counts, and like rate by day for each."""
        counts: Counter = Counter()
        by_day: dict[tuple[str, str], list[int]] = {}
        for vote in self.store.feedback_rows(persona_id=persona):
            if not vote.feedback.rating:
                continue
            who = "SIMULATED" if vote.feedback.simulated else "people"
            liked = vote.feedback.rating > 0
            counts[(who, liked)] += 1
            day = by_day.setdefault((vote.feedback.updated_at.date().isoformat(), who), [0, 0])
            day[0 if liked else 1] += 1
        rows = [{"day": day, "who": who, "like_rate": likes / (likes + dislikes), "votes": likes + dislikes}
                for (day, who), (likes, dislikes) in sorted(by_day.items())]
        return {"people": (counts[("people", True)], counts[("people", False)]),
                "simulated": (counts[("SIMULATED", True)], counts[("SIMULATED", False)]), "by_day": rows}

    def data_counts(self, persona: str) -> dict[str, int]:
        """Same-context pairs, KTO rows and prompts the persona's feedback makes (all parts)."""
        from alignment import data

        counts = {}
        for label, build in (("pairs", data.build_preference), ("kto_rows", data.build_kto),
                             ("prompts", data.build_prompts)):
            split = build(self.store, persona=persona)
            counts[label] = len(split.train) + len(split.eval)
        return counts

    def readiness(self, persona: str) -> list[Readiness]:
        """For every shipped recipe: could a job start on the persona's feedback now?"""
        found = []
        for name in self.recipes():
            kind = recipe_kind(name)
            try:
                recipe = parse_recipe(name, self.recipe_text(name))
                split = checked_split(kind, recipe, self.store, persona)
                if kind == "ppo":
                    reward_dir(self.runs, None, persona, [])
            except (ValueError, JobError) as exc:
                found.append(Readiness(name, False, str(exc)))
                continue
            unit = job_kind(kind).unit
            found.append(Readiness(name, True, f"{len(split.train)} train / {len(split.eval)} eval {unit}"))
        return found

    # -- jobs -------------------------------------------------------------------------

    def submit(self, recipe_name: str, recipe_text: str, persona: str, requested_by: str,
               part: str = "policy") -> int:
        """Queue a training job after the checks ``start`` would make; its id. ValueError/JobError if refused."""
        kind = recipe_kind(recipe_name)
        recipe = parse_recipe(recipe_name, recipe_text)
        checked_split(kind, recipe, self.store, persona, part)  # refused now, in the admin's words
        if kind == "ppo":
            reward_dir(self.runs, None, persona, [])
        job_id = self.queue.enqueue(kind, {"recipe": recipe.to_dict(), "part": part, "recipe_file": recipe_name},
                                    requested_by=requested_by, persona_id=persona)
        self.ensure_worker()
        return job_id

    def ensure_worker(self) -> bool:
        """Start the worker unless one runs (or this board may not start one)."""
        from alignment.worker import ensure_worker

        if not self.start_worker:
            return False
        niceness = {} if self.worker_niceness is None else {"niceness": self.worker_niceness}
        return ensure_worker(self.database_url, self.data_dir, self.personas_dir, **niceness)

    def resume_queue(self) -> bool:
        """At the server's start: orphans marked interrupted, and a worker for what is still queued."""
        self.queue.reap_orphans()
        if any(job.status == "queued" for job in self.queue.list_jobs(limit=1000)):
            return self.ensure_worker()
        return False

    def jobs(self, persona: str | None = None) -> list[JobRecord]:
        self.queue.reap_orphans()
        return self.queue.list_jobs(persona)

    def status(self, job_id: int) -> JobStatus:
        from chatbot.store.models import utcnow

        self.queue.reap_orphans()
        job = self.queue.get(job_id)
        history = []
        if job.run_id is not None and job.kind in CURVES:
            run = self.runs.get_run(job.run_id)
            history = (run.metrics or {}).get("history", [])
            if job.status == "running" and run.progress > job.progress:
                # The run records every step; the job's copy only comes with the worker's heartbeat.
                job = replace(job, progress=run.progress)
        return JobStatus(job, eta_seconds(job, utcnow()), curve_rows(job.kind, history), tail(job.log_path))

    def cancel(self, job_id: int) -> JobRecord:
        return self.queue.cancel(job_id)

    def resume(self, job_id: int, requested_by: str) -> int:
        job_id = self.queue.resume(job_id, requested_by=requested_by)
        self.ensure_worker()
        return job_id

    def simulate(self, persona: str, rule: str, requested_by: str, n: int = 16, samples: int = 4,
                 prompts_file: Path = PROMPTS / "everyday_train.txt") -> int:
        """Queue a simulation: replies generated and voted on by ``rule``, every vote marked SIMULATED.
        For demos and tests only; the job's id."""
        from chatbot.simulation import load_prompts, parse_rule

        parse_rule(rule)
        load_prompts(prompts_file)
        if n < 1 or samples < 1:
            raise ValueError("a simulation needs at least 1 prompt and 1 reply per prompt")
        request = {"rule": rule, "prompts_file": str(prompts_file), "n": n, "samples": samples,
                   "engine": self.engine_options}
        job_id = self.queue.enqueue("simulate", request, requested_by=requested_by, persona_id=persona)
        self.ensure_worker()
        return job_id

    # -- evaluate and decide ------------------------------------------------------------

    def versions(self, persona: str) -> list:
        """The persona's model versions that a policy run made, newest first."""
        return [v for v in self.store.list_versions(persona) if v.run_id is not None and v.adapter_path]

    def evaluate(self, version_id: int, requested_by: str, rule: str | None = None,
                 baseline: str | None = None, samples: int = 2, max_new_tokens: int = 64) -> int:
        """Queue an evaluation of a candidate version's run (``align evaluate``); the job's id."""
        from alignment.evaluate import POLICY_KINDS

        version = self.store.get_version(version_id)
        run = self.runs.get_run(version.run_id) if version.run_id is not None else None
        if run is None or run.kind not in POLICY_KINDS:
            raise ValueError(f"version {version_id} was not made by a policy run ({', '.join(POLICY_KINDS)})")
        if rule:
            from chatbot.simulation import parse_rule

            parse_rule(rule)  # refused now, not minutes later in the worker
        request = {"run": run.id, "baseline": baseline, "rule": rule or None, "samples": samples,
                   "max_new_tokens": max_new_tokens}
        job_id = self.queue.enqueue("evaluate", request, requested_by=requested_by,
                                    persona_id=version.persona_id or run.persona_id, run_id=run.id)
        self.ensure_worker()
        return job_id

    def evaluation(self, version_id: int) -> dict[str, Any] | None:
        """The version's latest evaluation (what ``align evaluate`` stored), with its files; None if none ran."""
        return self.store.get_version(version_id).evaluation

    def promote(self, version_id: int, by: str, force_reason: str | None = None):
        """Through the gate; ``force_reason`` forces past it (a reason is required to force)."""
        reason = (force_reason or "").strip() or None
        return self.store.promote(version_id, by=by, force=reason is not None, reason=reason)

    def rollback(self, persona: str, by: str):
        return self.store.rollback(persona, by=by)

    def promotion_history(self, persona: str) -> list[dict[str, Any]]:
        """Each promote/rollback, newest first, with people's like rate on the replies of the version
        serving before it and of the version it made serve, next to what its evaluation predicted."""
        votes = [v for v in self.store.feedback_rows(persona_id=persona)
                 if v.feedback.rating and not v.feedback.simulated]
        by_version: dict[int | None, list[int]] = {}
        for vote in votes:
            tally = by_version.setdefault(vote.message.model_version_id, [0, 0])
            tally[0 if vote.feedback.rating > 0 else 1] += 1

        def rate(version_id: int | None) -> str:
            likes, dislikes = by_version.get(version_id, (0, 0))
            return f"{likes / (likes + dislikes):.0%} of {likes + dislikes}" if likes + dislikes else "no votes"

        rows, serving = [], []
        for entry in self.store.promotion_log(persona):
            before = serving[-1] if serving else None
            if entry.action == "promote":
                serving.append(entry.version_id)
            elif serving:
                serving.pop()
            after = serving[-1] if serving else None
            evaluation = (entry.gate or {}) if entry.action == "promote" else {}
            predicted = _predicted(self.store.get_version(entry.version_id).evaluation)
            rows.append({"when": f"{entry.created_at:%Y-%m-%d %H:%M}", "action": entry.action,
                         "version": entry.version_id, "by": entry.by,
                         "forced": f"yes: {entry.reason}" if entry.forced else "no",
                         "people before": rate(before), "people after": rate(after),
                         "evaluation predicted": predicted, "gate": "passed" if evaluation.get("passed") else
                         ("-" if entry.action != "promote" else "not passed")})
        return rows[::-1]

    def canary(self, persona: str) -> dict[str, Any] | None:
        """The persona's running canary and its live figures; None when none runs."""
        running = self.store.running_canary(persona)
        if running is None:
            return None
        stats = self.store.canary_stats(running.id)
        return {"canary": running, "stats": stats}

    def start_canary(self, version_id: int, by: str, share: float, min_votes: int):
        return self.store.start_canary(version_id, by=by, share=share, min_votes=min_votes)

    def stop_canary(self, persona: str, by: str):
        return self.store.stop_canary(persona, by=by)


def _predicted(evaluation: dict[str, Any] | None) -> str:
    """What an evaluation said of the candidate: the judge's win rate and the rule's gain, with CIs."""
    if not evaluation:
        return "not evaluated"
    said = []
    if evaluation.get("win_rate"):
        win = evaluation["win_rate"]
        said.append(f"win rate {win['value']:.2f} [{win['ci'][0]:.2f}, {win['ci'][1]:.2f}]")
    if evaluation.get("rule"):
        gain = evaluation["rule"]["gain"]
        said.append(f"rule {gain['baseline']:.0%} -> {gain['candidate']:.0%}")
    return "; ".join(said) or "evaluated"
