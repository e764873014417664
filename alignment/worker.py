"""The worker: runs queued jobs (chatbot/store/jobs.py) one at a time, in a process of its own.

    persona-studio jobs worker [--once] [--idle-exit SECONDS]

Training, evaluating and simulating take minutes to hours of CPU; none of it
runs in the web server's process, so chatting stays responsive and a job
survives a closed browser or a restarted server. The loop:

1. mark jobs whose worker died interrupted (``JobQueue.reap_orphans``);
2. claim the oldest queued job (one running job at a time, store-wide);
3. run it with its output (progress bars, warnings, tracebacks) in
   ``<data_dir>/jobs/<id>.log``, saying every few seconds that it is alive
   and how far it got; a cancel asked for meanwhile makes a training job write
   a checkpoint and stop, and its run resumes from there;
4. record the result or the error.

One worker per data directory (a lock file, ``worker.lock``): a second one
started by accident exits at once. ``ensure_worker`` starts one, detached,
when none is running: ``serve`` calls it when a job is queued and at start-up
(to pick up what a restart left queued).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from chatbot.store.jobs import HEARTBEAT_SECONDS, TRAINING_KINDS, JobQueue, JobRecord

log = logging.getLogger(__name__)

LOCK_FILE = "worker.lock"
# How far the worker a server starts steps back for the chat (bench/ttft_training.py measures it).
WORKER_NICENESS = 10
LOG_DIR = "jobs"


class WorkerBusy(Exception):
    """Another worker holds this data directory's lock."""


@contextlib.contextmanager
def worker_lock(data_dir: Path) -> Iterator[None]:
    """Hold ``<data_dir>/worker.lock`` for the block; WorkerBusy if another process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkerBusy(f"a worker is already running for {data_dir}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def worker_running(data_dir: Path) -> bool:
    """Whether a worker holds ``data_dir``'s lock now."""
    try:
        with worker_lock(Path(data_dir)):
            return False
    except WorkerBusy:
        return True


def ensure_worker(database_url: str, data_dir: Path, personas_dir: Path | None = None,
                  idle_exit: float = 300.0, niceness: int = WORKER_NICENESS) -> bool:
    """Start a detached worker for ``data_dir`` unless one is running; whether one was started.

    Detached (its own session): it outlives the server that started it, so a
    restart of the server never stops a job. It exits after ``idle_exit``
    seconds with nothing queued; it runs ``niceness`` below normal CPU priority (yield_cpu).
    """
    data_dir = Path(data_dir)
    if worker_running(data_dir):
        return False
    command = [sys.executable, "-m", "chatbot.cli", "jobs", "worker", "--db-url", database_url,
               "--data-dir", str(data_dir), "--idle-exit", str(idle_exit), "--nice", str(niceness)]
    if personas_dir is not None:
        command += ["--personas-dir", str(personas_dir)]
    with open(data_dir / "worker.log", "ab") as output:
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                         start_new_session=True)
    return True


def yield_cpu(niceness: int) -> None:
    """Let the chat go first: lower this process's CPU priority by ``niceness``.

    Linux groups the processes of a session for scheduling (autogroups), and a
    worker started by ``ensure_worker`` has a session of its own, where plain
    nice only ranks it against itself: the group's niceness is set too.
    """
    if niceness <= 0:
        return
    with contextlib.suppress(OSError):
        os.nice(niceness)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(niceness))


def run_worker(store, data_dir: Path, personas_dir: Path | None = None, *, once: bool = False,
               idle_exit: float | None = None, poll: float = 1.0,
               stop: threading.Event | None = None) -> int:
    """Run queued jobs until ``stop`` is set, ``once`` one job ran, or ``idle_exit`` seconds passed
    with nothing to do; how many jobs ran. WorkerBusy if another worker holds the data directory."""
    data_dir = Path(data_dir)
    queue = JobQueue(store.engine)
    stop = stop or threading.Event()
    # A job with no checkpoint is cancelled by interrupting the main thread with SIGUSR1 (its own
    # signal: SIGINT may be ignored, as in a process started from a background shell job). Signal
    # handlers belong to the main thread; a worker run in another thread cannot be interrupted.
    interruptible = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGUSR1, _cancel_now) if interruptible else None
    try:
        with worker_lock(data_dir):
            ran = _run_jobs(queue, store, data_dir, personas_dir, once, idle_exit, poll, stop, interruptible)
    finally:
        if interruptible:
            signal.signal(signal.SIGUSR1, previous)
    return ran


def _cancel_now(signum, frame) -> None:
    raise KeyboardInterrupt("cancelled")


def _run_jobs(queue: JobQueue, store, data_dir: Path, personas_dir: Path | None, once: bool,
              idle_exit: float | None, poll: float, stop: threading.Event, interruptible: bool) -> int:
    ran, idle_since = 0, time.monotonic()
    while not stop.is_set():
        queue.reap_orphans()
        job = queue.claim_next()
        if job is None:
            if once or (idle_exit is not None and time.monotonic() - idle_since > idle_exit):
                break
            stop.wait(poll)
            continue
        execute(queue, job, store, data_dir, personas_dir, interruptible)
        ran += 1
        idle_since = time.monotonic()
        if once:
            break
    return ran


def execute(queue: JobQueue, job: JobRecord, store, data_dir: Path, personas_dir: Path | None,
            interruptible: bool = False) -> None:
    """Run one claimed job to its end and record how it ended; never raises for the job's own failure."""
    log_path = data_dir / LOG_DIR / f"{job.id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(queue, job.id, str(log_path), checkpoints=job.kind in TRAINING_KINDS,
                      interruptible=interruptible)
    try:
        with tracker, output_to(log_path):
            print(f"job {job.id}: {job.kind} for persona {job.persona_id or '(all)'}, "
                  f"asked by {job.requested_by}", flush=True)
            result = RUNNERS[job.kind](job, store, data_dir, personas_dir, tracker)
            brief = {k: v for k, v in result.items() if k != "metrics"}
            print(f"job {job.id}: finished: {json.dumps(brief, default=str)}", flush=True)
    except KeyboardInterrupt as exc:  # a cancel (alignment.training.JobCancelled is one), or the worker stopped
        if not tracker.cancel.is_set():
            queue.finish(job.id, "interrupted", error="the worker was stopped; resume the job")
            raise
        resumable = f"; resume the job to continue run {tracker.run_id}" if tracker.run_id else ""
        queue.finish(job.id, "cancelled", error=f"{exc or 'cancelled'}{resumable}")
    except BaseException as exc:  # noqa: BLE001 - the job failed, the worker goes on
        with open(log_path, "a", encoding="utf-8") as handle:
            traceback.print_exc(file=handle)
        queue.finish(job.id, "failed", error=str(exc) if isinstance(exc, ValueError)
                     else f"{type(exc).__name__}: {exc}")
    else:
        queue.finish(job.id, "succeeded", result=result)


class Tracker:
    """While a job runs: a heartbeat every HEARTBEAT_SECONDS with its progress; notices a cancel.

    A training job checks ``cancel`` after every step and checkpoints before it
    stops. Any other job (``checkpoints=False``) has nothing to keep: a cancel
    interrupts it where it is (KeyboardInterrupt in the main thread).
    """

    def __init__(self, queue: JobQueue, job_id: int, log_path: str, checkpoints: bool, interruptible: bool = False):
        self.queue, self.job_id, self.log_path, self.checkpoints = queue, job_id, log_path, checkpoints
        self.interruptible = interruptible  # the worker's main thread takes SIGUSR1 as a cancel
        self.cancel = threading.Event()
        self.progress: Callable[[], float | None] = lambda: None
        self.run_id: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"job-{job_id}-heartbeat", daemon=True)

    def __enter__(self) -> Tracker:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()

    def beat(self) -> None:
        if self.queue.heartbeat(self.job_id, self.progress(), run_id=self.run_id, log_path=self.log_path) \
                and not self.cancel.is_set():
            self.cancel.set()
            if not self.checkpoints and self.interruptible and not self._done.is_set():
                # A real signal, not _thread.interrupt_main(): that one waits until the main thread
                # runs Python again, and a main thread blocked on a lock (a batch of replies) never does.
                os.kill(os.getpid(), signal.SIGUSR1)

    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT_SECONDS):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried; the job goes on
                log.exception("job %s: heartbeat failed", self.job_id)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's output to ``path`` for the block: ``sys.stdout``/``sys.stderr`` (Python's
    writes, wherever they pointed) and file descriptors 1 and 2 (C code, subprocesses, and
    handlers that kept the process's original streams)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8", buffering=1) as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
                yield
        finally:
            handle.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# -- what each kind does ---------------------------------------------------------


def run_training(job: JobRecord, store, data_dir: Path, personas_dir, tracker: Tracker) -> dict[str, Any]:
    from alignment.jobs import JobRequest, job_kind, start
    from chatbot.store.runs import RunStore

    request = job.request
    recipe = job_kind(job.kind).recipe_class.from_dict(dict(request.get("recipe") or {}), source="recipe")
    runs = RunStore(store.engine)
    started = start(JobRequest(job.kind, recipe, persona=job.persona_id, part=request.get("part", "policy"),
                               split=request.get("split", "conversation"), reward_run=request.get("reward_run"),
                               resume=request.get("resume")), store, runs, data_dir=data_dir)
    for note in started.notes:
        print(f"note: {note}", flush=True)
    print(started.describe(), flush=True)
    tracker.run_id = started.run_id
    tracker.progress = lambda: runs.get_run(started.run_id).progress
    tracker.beat()
    result = started.run(cancelled=tracker.cancel.is_set)
    return {"run": started.run_id, "version": result.version_id, "adapter": str(result.adapter_dir),
            "global_step": result.global_step,
            "resumed_from": str(result.resumed_from) if result.resumed_from else None, "metrics": result.metrics}


def run_evaluation(job: JobRecord, store, data_dir: Path, personas_dir, tracker: Tracker) -> dict[str, Any]:
    from alignment.evaluate import EvalOptions, evaluate
    from chatbot.personas import PersonaLibrary
    from chatbot.settings import REPO_PERSONAS

    request = dict(job.request)
    run_id = int(request.pop("run"))
    prompts = request.pop("prompts_file", None)
    options = EvalOptions(**request, prompts_file=Path(prompts) if prompts else None)
    evaluation = evaluate(store, run_id, options, personas=PersonaLibrary(personas_dir or REPO_PERSONAS),
                          data_dir=data_dir,
                          user_name=job.requested_by)
    return {"run": run_id, "version": evaluation["candidate"]["version"], "gate_passed": evaluation["gate"]["passed"],
            "report": evaluation["files"]["report"], "evaluation": evaluation["files"]["evaluation"]}


def run_simulation(job: JobRecord, store, data_dir: Path, personas_dir, tracker: Tracker) -> dict[str, Any]:
    from chatbot.chat import ChatService, params_for
    from chatbot.knowledge.retrieval import PersonaKnowledge
    from chatbot.personas import PersonaLibrary
    from chatbot.settings import REPO_PERSONAS, Settings
    from chatbot.simulation import BANNER, load_prompts, parse_rule, simulate
    from chatbot.startup import open_engine

    request = job.request
    rule = parse_rule(request["rule"])
    prompts = load_prompts(Path(request["prompts_file"]))
    n, samples = int(request.get("n") or len(prompts)), int(request.get("samples", 4))
    personas = PersonaLibrary(personas_dir or REPO_PERSONAS)
    persona = personas.get(job.persona_id)
    settings = Settings(data_dir=data_dir, **{k: v for k, v in request.get("engine", {}).items()})
    engine = open_engine(settings)
    done = [0]

    def progress(line: str) -> None:
        done[0] += 1
        print(line, flush=True)

    tracker.progress = lambda: done[0] / n
    try:
        service = ChatService(engine, personas, store, PersonaKnowledge(store.engine, personas.folder))
        params = params_for(persona, max_new_tokens=request.get("max_new_tokens"), seed=request.get("seed"))
        print(f"{BANNER}: persona {job.persona_id}, rule {request['rule']!r} ({rule.describe()}), "
              f"{n} prompts x {samples} replies", flush=True)
        report = simulate(service, job.persona_id, rule, prompts, n, samples, params, progress=progress)
    finally:
        engine.close()
    print(report.summary(), flush=True)
    return {"simulated": True, "replies": report.replies, "liked": report.liked, "disliked": report.disliked,
            "failed": report.failed}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    **{kind: run_training for kind in TRAINING_KINDS},
    "evaluate": run_evaluation,
    "simulate": run_simulation,
}
