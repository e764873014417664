"""The job queue (chatbot/store/jobs.py) on SQLite and PostgreSQL, and its worker (alignment/worker.py)
running real jobs on a tiny random model: success, cancel with a checkpoint, a killed worker, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cli_helpers import run_cli, stop_worker
from test_align_cli import fill

from chatbot.store import ChatStore
from chatbot.store.jobs import STALE_AFTER, JobQueue
from chatbot.store.models import utcnow
from chatbot.store.runs import RunStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def queue(any_db_url):
    store = ChatStore.open(any_db_url)
    yield JobQueue(store.engine)
    store.close()


def wait_for(check, what: str, timeout: float = 180.0, process: subprocess.Popen | None = None):
    """``check()``'s first truthy value; fails after ``timeout`` or when ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert process is None or process.poll() is None, f"the worker exited before {what}"
        time.sleep(0.2)
    return value


# -- the queue ----------------------------------------------------------------------


def test_jobs_run_one_at_a_time_oldest_first(queue):
    first = queue.enqueue("kto", {"recipe": {}}, requested_by="ann", persona_id="pirate")
    second = queue.enqueue("reward", {"recipe": {}}, requested_by="bob")
    claimed = queue.claim_next("host:1")
    assert (claimed.id, claimed.status, claimed.worker) == (first, "running", "host:1")
    assert queue.claim_next("host:2") is None  # one running job at a time, whoever asks
    queue.finish(first, "succeeded", result={"run": 3})
    assert queue.get(first).progress == 1.0 and queue.get(first).result == {"run": 3}
    assert queue.claim_next("host:2").id == second
    assert [j.id for j in queue.list_jobs()] == [second, first]
    assert [j.id for j in queue.list_jobs("pirate")] == [first]


def test_racing_workers_claim_a_job_once(queue):
    for _ in range(3):
        queue.enqueue("dpo", {}, requested_by="ann")
    claimed, barrier = [], threading.Barrier(4)

    def claim(name: str) -> None:
        barrier.wait()
        claimed.append(queue.claim_next(name))

    threads = [threading.Thread(target=claim, args=(f"host:{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len([c for c in claimed if c is not None]) == 1
    assert len([j for j in queue.list_jobs() if j.status == "running"]) == 1


def test_cancel_a_queued_job_at_once_and_a_running_one_through_its_heartbeat(queue):
    waiting = queue.enqueue("kto", {}, requested_by="ann")
    running = queue.enqueue("kto", {}, requested_by="ann")
    assert queue.cancel(waiting).status == "cancelled"
    assert queue.claim_next("host:1").id == running
    assert queue.heartbeat(running, 0.25) is False
    assert queue.cancel(running).status == "running"  # asked; the worker stops it
    assert queue.heartbeat(running, 0.5) is True
    assert queue.get(running).progress == 0.5
    queue.finish(running, "cancelled")
    with pytest.raises(ValueError, match=f"job {running} is already cancelled"):
        queue.cancel(running)


def test_an_orphaned_job_and_its_run_are_interrupted_then_resume_from_the_run(queue):
    runs = RunStore(queue.engine)
    run_id = runs.create_run("kto", persona_id="pirate")
    runs.set_status(run_id, "running")
    job = queue.enqueue("kto", {"recipe": {"lora_r": 4}}, requested_by="ann", persona_id="pirate")
    queue.claim_next(f"{os.uname().nodename}:999999999")  # this host, a process that does not exist
    queue.heartbeat(job, 0.3, run_id=run_id)
    assert queue.reap_orphans() == [job]
    assert queue.get(job).status == "interrupted" and "resume it" in queue.get(job).error
    assert runs.get_run(run_id).status == "interrupted"
    again = queue.resume(job, requested_by="bob")
    resumed = queue.get(again)
    assert (resumed.status, resumed.run_id, resumed.requested_by) == ("queued", run_id, "bob")
    assert resumed.request == {"recipe": {"lora_r": 4}, "resume": run_id}
    with pytest.raises(ValueError, match="only an interrupted or cancelled job resumes"):
        queue.resume(again, requested_by="bob")


def test_the_tab_shows_a_running_jobs_progress_as_of_its_last_step_not_its_last_heartbeat(any_db_url, tmp_path):
    from alignment.board import JobBoard

    store = ChatStore.open(any_db_url)
    queue, runs = JobQueue(store.engine), RunStore(store.engine)
    job = queue.enqueue("dpo", {"recipe": {"lora_r": 4}}, requested_by="ann", persona_id="pirate")
    queue.claim_next(f"{os.uname().nodename}:{os.getpid()}")  # a live worker: not reaped as an orphan
    run_id = runs.create_run("dpo", persona_id="pirate")
    queue.heartbeat(job, 0.1, run_id=run_id)
    runs.record_step(run_id, 0.4)  # steps since that heartbeat
    board = JobBoard(store, any_db_url, tmp_path / "data", start_worker=False)
    try:
        assert queue.get(job).progress == pytest.approx(0.1)
        assert board.status(job).job.progress == pytest.approx(0.4)
    finally:
        store.close()


def test_a_job_on_another_host_is_orphaned_only_once_its_heartbeat_is_stale(queue):
    job = queue.enqueue("reward", {}, requested_by="ann")
    queue.claim_next("elsewhere:123")
    assert queue.reap_orphans() == []  # its heartbeat is fresh: another machine's worker is at it
    assert queue.reap_orphans(now=utcnow() + STALE_AFTER + timedelta(seconds=1)) == [job]


def test_bad_requests_are_refused_with_what_was_wrong(queue):
    with pytest.raises(ValueError, match="job kind must be one of"):
        queue.enqueue("sft", {}, requested_by="ann")
    with pytest.raises(ValueError, match="requested_by"):
        queue.enqueue("kto", {}, requested_by=" ")
    with pytest.raises(LookupError, match="job 42 does not exist"):
        queue.get(42)


# -- the worker, on a tiny model ---------------------------------------------------------


def _recipe(tiny_model, tmp_path, **values) -> Path:
    path = tmp_path / "recipe.yaml"
    settings = {"base_model": str(tiny_model), "min_pairs": 8, "per_device_train_batch_size": 4, **values}
    path.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    return path


def _submit(store, recipe: Path, kind: str = "reward") -> int:
    done = run_cli("jobs", "submit", kind, "--recipe", str(recipe), "--persona", "pirate",
                   "--db-url", str(store.engine.url))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["job"]


@pytest.mark.model
def test_the_worker_runs_a_submitted_job_and_records_its_result(store, tiny_model, tmp_path):
    from alignment.worker import run_worker

    fill(store, 30)
    job_id = _submit(store, _recipe(tiny_model, tmp_path, max_steps=3, save_steps=2))
    queue = JobQueue(store.engine)
    assert queue.get(job_id).status == "queued"  # nothing ran in the process that asked
    assert run_worker(store, tmp_path / "data", REPO / "personas", once=True) == 1
    job = queue.get(job_id)
    assert job.status == "succeeded", job.error
    run = RunStore(store.engine).get_run(job.run_id)
    assert (run.status, run.kind, run.persona_id) == ("succeeded", "reward", "pirate")
    assert job.result["version"] == RunStore(store.engine).candidate_for_run(run.id)
    assert job.result["global_step"] == 3 and job.progress == 1.0
    output = Path(job.log_path).read_text()
    assert f"job {job_id}: reward for persona pirate" in output and f"run {run.id}: reward model" in output
    shown = run_cli("jobs", "log", str(job_id), "--lines", "3", "--db-url", str(store.engine.url))
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 3


@pytest.mark.model
def test_a_job_that_cannot_start_fails_with_the_reason_and_the_worker_goes_on(store, tiny_model, tmp_path):
    from alignment.worker import run_worker

    fill(store, 3)  # far below min_pairs
    first = _submit(store, _recipe(tiny_model, tmp_path, max_steps=2))
    second = _submit(store, _recipe(tiny_model, tmp_path, max_steps=2))
    assert run_worker(store, tmp_path / "data", REPO / "personas", idle_exit=0) == 2
    queue = JobQueue(store.engine)
    for job_id in (first, second):
        job = queue.get(job_id)
        assert job.status == "failed" and "the recipe needs at least 9" in job.error, job.error


@pytest.mark.model
def test_cancel_writes_a_checkpoint_and_resume_continues_from_it(store, tiny_model, tmp_path):
    from alignment.worker import run_worker

    fill(store, 30)
    job_id = _submit(store, _recipe(tiny_model, tmp_path, max_steps=100000, save_steps=100000))
    queue, runs = JobQueue(store.engine), RunStore(store.engine)
    worker = threading.Thread(target=run_worker, args=(store, tmp_path / "data", REPO / "personas"),
                              kwargs={"once": True})
    worker.start()
    run_id = wait_for(lambda: (job := queue.get(job_id)).run_id and job.progress > 0 and job.run_id,
                      "the job to start training")
    assert run_cli("jobs", "cancel", str(job_id), "--db-url", str(store.engine.url)).returncode == 0
    worker.join(timeout=120)
    assert not worker.is_alive()
    job, run = queue.get(job_id), runs.get_run(run_id)
    assert job.status == "cancelled" and f"continue run {run_id}" in job.error
    assert run.status == "interrupted" and runs.candidate_for_run(run_id) is None
    checkpoints = sorted((Path(run.output_dir) / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "cancel wrote no checkpoint"
    saved_at = int(checkpoints[-1].name.split("-")[1])

    # Resume, with fewer steps left: the recipe of the new job is the old one (what the run was started with).
    again = queue.resume(job_id, requested_by="ann")
    with store.session() as session:  # a shorter run, so the test ends: the same run, 2 steps past the checkpoint
        from chatbot.store.models import Job

        row = session.get(Job, again)
        row.request = {**row.request, "recipe": {**row.request["recipe"], "max_steps": saved_at + 2}}
    assert run_worker(store, tmp_path / "data", REPO / "personas", once=True) == 1
    resumed = queue.get(again)
    assert resumed.status == "succeeded", resumed.error
    assert resumed.run_id == run_id and resumed.result["resumed_from"].endswith(f"checkpoint-{saved_at}")
    assert resumed.result["global_step"] == saved_at + 2 and runs.get_run(run_id).status == "succeeded"


@pytest.mark.model
def test_a_killed_worker_leaves_the_job_interrupted_and_it_resumes(store, tiny_model, tmp_path):
    """A worker crash as the Alignment tab sees it: the tab's next poll shows the job interrupted,
    and its Resume continues the run from the last checkpoint."""
    from alignment.board import JobBoard
    from alignment.worker import run_worker

    fill(store, 30)
    job_id = _submit(store, _recipe(tiny_model, tmp_path, max_steps=100000, save_steps=2))
    queue, runs = JobQueue(store.engine), RunStore(store.engine)
    data = tmp_path / "data"
    worker = subprocess.Popen([sys.executable, "-m", "chatbot.cli", "jobs", "worker", "--once",
                               "--db-url", str(store.engine.url), "--data-dir", str(data)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        run_id = wait_for(lambda: queue.get(job_id).run_id, "the job's run", process=worker)
        checkpoints = Path(runs.get_run(run_id).output_dir) / "checkpoints"
        wait_for(lambda: any((c / "trainer_state.json").exists() for c in checkpoints.glob("checkpoint-*")),
                 "a checkpoint", process=worker)
        assert queue.reap_orphans() == []  # alive: left alone
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    assert queue.get(job_id).status == "running"  # nothing could record the kill...
    board = JobBoard(store, str(store.engine.url), data, REPO / "personas", start_worker=False)
    assert board.status(job_id).job.status == "interrupted"  # ...until the tab (anyone) looks
    assert runs.get_run(run_id).status == "interrupted"

    again = board.resume(job_id, requested_by="ann")
    saved_at = max(int(c.name.split("-")[1]) for c in checkpoints.glob("checkpoint-*")
                   if (c / "trainer_state.json").exists())
    with store.session() as session:
        from chatbot.store.models import Job

        row = session.get(Job, again)
        row.request = {**row.request, "recipe": {**row.request["recipe"], "max_steps": saved_at + 1}}
    assert run_worker(store, data, REPO / "personas", once=True) == 1
    resumed = queue.get(again)
    assert resumed.status == "succeeded", resumed.error
    assert resumed.result["global_step"] == saved_at + 1 and runs.get_run(run_id).status == "succeeded"


def test_one_worker_per_data_directory(tmp_path, store):
    from alignment.worker import WorkerBusy, ensure_worker, run_worker, worker_lock, worker_running

    data = tmp_path / "data"
    assert not worker_running(data)
    with worker_lock(data):
        assert worker_running(data)
        assert ensure_worker(str(store.engine.url), data) is False  # one is running: none started
        with pytest.raises(WorkerBusy, match="a worker is already running"):
            run_worker(store, data, once=True)
    assert not worker_running(data)
    # With none running, ensure_worker starts one, detached; with nothing queued it soon exits.
    assert ensure_worker(str(store.engine.url), data, idle_exit=0) is True
    wait_for(lambda: "ran 0 job(s)" in (data / "worker.log").read_text(errors="replace")
             if (data / "worker.log").exists() else False, "the started worker to exit")


def test_resume_passes_over_a_checkpoint_cut_off_while_it_was_written(tmp_path):
    from alignment.training import find_checkpoint

    checkpoints = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False), (10, False)):
        folder = checkpoints / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert find_checkpoint(checkpoints, resume=True) == checkpoints / "checkpoint-4"
    with pytest.raises(ValueError, match="already has checkpoint-4"):
        find_checkpoint(checkpoints, resume=False)
    assert find_checkpoint(checkpoints, resume=True, complete_marker="state.json") is None


@pytest.mark.model
def test_a_simulation_from_the_board_stores_votes_marked_simulated(store, tiny_model, tmp_path):
    from alignment.board import JobBoard
    from alignment.worker import run_worker

    data = tmp_path / "data"
    board = JobBoard(store, str(store.engine.url), data, REPO / "personas", start_worker=False,
                     engine_options={"model": str(tiny_model)})
    with pytest.raises(ValueError, match="unknown rule 'dots'"):
        board.simulate("pirate", "dots", "ann")
    job_id = board.simulate("pirate", "digits", "ann", n=2, samples=2)
    assert run_worker(store, data, REPO / "personas", once=True) == 1
    job = board.queue.get(job_id)
    assert job.status == "succeeded", job.error
    assert job.result["simulated"] is True and job.result["replies"] == 4
    rows = store.feedback_rows(persona_id="pirate")
    assert len(rows) == 4 and all(r.feedback.simulated for r in rows)
    assert all(store.get_conversation(c).title.startswith("SIMULATED")
               for c in {r.message.conversation_id for r in rows})
    assert "SIMULATED" in Path(job.log_path).read_text()
    assert board.votes("pirate")["simulated"] == (job.result["liked"], job.result["disliked"])


@pytest.mark.model
def test_cancelling_a_job_without_checkpoints_stops_it_where_it_is_and_the_worker_goes_on(
        store, tiny_model, tmp_path):
    """A simulation (like an evaluation) has no checkpoint to write: the worker's heartbeat thread stops
    it with an interrupt in the worker's main thread. The replies stored so far stay, and the worker
    then runs the next job. A real worker process, started with SIGINT ignored as a background shell
    job (or pytest-xdist) starts it: the cancel must not depend on SIGINT."""
    from alignment.board import JobBoard

    data = tmp_path / "data"
    board = JobBoard(store, str(store.engine.url), data, REPO / "personas", start_worker=False,
                     engine_options={"model": str(tiny_model)})
    long_one = board.simulate("pirate", "digits", "ann", n=64, samples=8)  # minutes on the tiny model
    # Then a job that fails at once, whatever the simulation stored: it asks for far more rows.
    next_one = board.queue.enqueue("kto", {"recipe": {"min_rows": 10**6}}, requested_by="ann", persona_id="pirate")
    worker = subprocess.Popen([sys.executable, "-m", "chatbot.cli", "jobs", "worker", "--idle-exit", "0",
                               "--db-url", str(store.engine.url), "--data-dir", str(data),
                               "--personas-dir", str(REPO / "personas")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: board.queue.get(long_one).progress > 0, "the simulation's first replies", process=worker)
        assert run_cli("jobs", "cancel", str(long_one), "--db-url", str(store.engine.url)).returncode == 0
        assert worker.wait(timeout=300) == 0  # both jobs done, then nothing queued: it exits
    finally:
        if worker.poll() is None:
            worker.kill()
    cancelled, after = board.queue.get(long_one), board.queue.get(next_one)
    assert cancelled.status == "cancelled", cancelled.error
    kept = len(store.feedback_rows(persona_id="pirate"))
    assert 0 < kept < 64 * 8  # what was simulated before the cancel stays
    assert after.status == "failed" and "labelled replies for persona pirate" in after.error


def test_the_board_shows_peoples_like_rate_before_and_after_each_promotion(store, tmp_path):
    """The promotion log in the tab: people's votes (never simulated ones) on the replies of the version
    serving before and after, next to what the version's evaluation predicted."""
    from alignment.board import JobBoard
    from test_models_registry import FAILED_GATE, PASSED_GATE, evaluated

    runs = RunStore(store.engine)

    def version(win: float, gate: dict) -> int:
        folder = tmp_path / f"adapter-{win}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        run_id = runs.create_run("dpo", persona_id="pirate")
        metrics = evaluated(gate)
        metrics["evaluation"]["win_rate"] = {"value": win, "ci": [win - 0.1, win + 0.1]}
        return runs.register_candidate(run_id, base_model="tiny", adapter_path=str(folder), metrics=metrics)

    first, second = version(0.6, PASSED_GATE), version(0.7, FAILED_GATE)
    person, simulator = store.get_or_create_user("ann"), store.get_or_create_user("simulator")

    def replies(version_id: int | None, liked: int, disliked: int, simulated_likes: int = 0) -> None:
        conv = store.create_conversation(person, "pirate", "v1")
        asked = store.add_message(conv, "user", "Hi?")
        for rating, count, who, simulated in ((1, liked, person, False), (-1, disliked, person, False),
                                              (1, simulated_likes, simulator, True)):
            for _ in range(count):
                reply = store.add_message(conv, "assistant", "Arr", parent_id=asked, prompt=[],
                                          model_version_id=version_id)
                store.set_feedback(reply, who, rating, simulated=simulated)

    replies(first, liked=1, disliked=3, simulated_likes=5)
    replies(second, liked=3, disliked=1)
    store.promote(first, by="ann")
    store.promote(second, by="bob", force=True, reason="looks better")
    board = JobBoard(store, str(store.engine.url), tmp_path / "data", start_worker=False)
    latest, earlier = board.promotion_history("pirate")
    assert (latest["version"], latest["by"], latest["forced"]) == (second, "bob", "yes: looks better")
    assert (latest["people before"], latest["people after"]) == ("25% of 4", "75% of 4")  # simulated left out
    assert latest["evaluation predicted"] == "win rate 0.70 [0.60, 0.80]"
    assert (earlier["people before"], earlier["people after"]) == ("no votes", "25% of 4")
    store.rollback("pirate", by="ann")
    assert board.promotion_history("pirate")[0]["people after"] == "25% of 4"


def test_a_restarted_server_starts_a_worker_for_what_is_still_queued(store, tmp_path):
    """`serve` builds the job board at start-up; its resume_queue() starts the worker when work waits,
    at the CPU priority the server was told to give it (--worker-nice)."""
    from alignment.board import JobBoard

    data = tmp_path / "data"
    board = JobBoard(store, str(store.engine.url), data, REPO / "personas", worker_niceness=3)
    assert board.resume_queue() is False  # nothing queued: no worker
    # A job queued before the restart (one that fails at once: no feedback), then the start-up.
    job_id = board.queue.enqueue("kto", {"recipe": {"min_rows": 4}}, requested_by="ann", persona_id="pirate")
    assert board.resume_queue() is True
    try:
        job = wait_for(lambda: (j := board.queue.get(job_id)).finished and j, "the started worker to run the job")
        assert job.status == "failed" and "labelled replies for persona pirate" in job.error
        worker = int((data / "worker.lock").read_text())
        assert os.getpriority(os.PRIO_PROCESS, worker) == min(os.nice(0) + 3, 19)
    finally:  # the worker waits for more work for minutes: stop it
        stop_worker(data)


def test_the_board_runs_a_canary_and_shows_its_live_figures(store, tmp_path):
    from test_models_registry import PASSED_GATE, evaluated

    from alignment.board import JobBoard
    from chatbot.ui.alignment_tab import canary_text

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    runs = RunStore(store.engine)
    version = runs.register_candidate(runs.create_run("kto", persona_id="pirate"), base_model="tiny",
                                      adapter_path=str(folder), metrics=evaluated(PASSED_GATE))
    board = JobBoard(store, str(store.engine.url), tmp_path / "data", start_worker=False)
    assert board.canary("pirate") is None and canary_text(None) == ""
    assert [v.id for v in board.versions("pirate")] == [version]
    started = board.start_canary(version, "ann", share=0.5, min_votes=3)
    running = board.canary("pirate")
    assert running["canary"].id == started.id
    assert canary_text(running) == (f"**Canary running:** version {version} on 50% of new conversations. "
                                    "control: - of 0 votes · candidate: - of 0 votes (deciding from 3 votes per arm)")
    assert board.stop_canary("pirate", "ann").ended_at is not None and board.canary("pirate") is None
    board.promote(version, "ann")
    assert store.serving_version("pirate").id == version
    board.rollback("pirate", "ann")
    assert store.serving_version("pirate") is None
    assert [r["action"] for r in board.promotion_history("pirate")] == ["rollback", "promote"]
