"""The job queue: alignment work asked for in the app (or the CLI) and done by a worker process.

A job is a row in ``jobs``. Its life::

    queued --claim--> running --finish--> succeeded | failed | cancelled | interrupted
       \\--cancel--> cancelled          \\--its worker died--> interrupted (reap_orphans)

* ``enqueue`` adds a queued job; nothing runs in the process that asks.
* ``claim_next`` gives a worker the oldest queued job, marked running. At most
  one job runs at a time (a partial unique index, ``uq_jobs_running``): two
  workers racing for the next job cannot both win, whichever process or host
  they run on.
* While it runs, the worker calls ``heartbeat`` every few seconds; it answers
  whether someone asked to cancel, so the job can checkpoint and stop.
* ``reap_orphans`` marks running jobs whose worker is gone (its process is dead,
  or its heartbeat is older than ``STALE_AFTER``) interrupted, and their
  alignment runs with them; ``resume`` queues such a job again, continuing its
  run from its last checkpoint.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from chatbot.store.base import DetachedRow, StoreBase
from chatbot.store.errors import NotFound
from chatbot.store.models import JOB_KINDS, AlignmentRun, Job, utcnow
from chatbot.store.runs import pid_alive

HEARTBEAT_SECONDS = 2.0  # how often a worker says it is alive
STALE_AFTER = timedelta(seconds=60)  # a running job not heard of for this long is orphaned
TRAINING_KINDS = ("reward", "ppo", "kto", "dpo")
FINAL_STATUSES = ("succeeded", "failed", "cancelled", "interrupted")


@dataclass(frozen=True)
class JobRecord(DetachedRow):
    id: int
    kind: str
    persona_id: str | None
    request: dict[str, Any]
    status: str
    progress: float
    run_id: int | None
    result: dict[str, Any] | None
    error: str | None
    log_path: str | None
    cancel_requested: bool
    requested_by: str
    worker: str | None
    heartbeat_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


def this_worker() -> str:
    """How a worker names itself in ``jobs.worker``: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_alive(worker: str | None) -> bool | None:
    """Whether the process named ``host:pid`` exists; None when this machine cannot tell (another host)."""
    host, _, pid = (worker or "").rpartition(":")
    return pid_alive(host, pid)


class JobQueue(StoreBase):
    """Queue, claim, track and finish jobs (see the module docstring). Unknown ids are NotFound."""

    @staticmethod
    def _job(session: Session, job_id: int) -> Job:
        row = session.get(Job, job_id)
        if row is None:
            raise NotFound(f"job {job_id} does not exist")
        return row

    def enqueue(self, kind: str, request: dict[str, Any], *, requested_by: str,
                persona_id: str | None = None, run_id: int | None = None) -> int:
        """Queue a job; its id. ValueError for an unknown kind or a request that is not a mapping."""
        if kind not in JOB_KINDS:
            raise ValueError(f"job kind must be one of {', '.join(JOB_KINDS)}, not {kind!r}")
        if not isinstance(request, dict):
            raise ValueError("a job's request is a mapping of options")
        if not requested_by or not requested_by.strip():
            raise ValueError("say who asks for the job (requested_by)")

        def work(session: Session) -> int:
            row = Job(kind=kind, request=request, persona_id=persona_id, run_id=run_id,
                      requested_by=requested_by.strip(), status="queued", progress=0.0)
            session.add(row)
            session.flush()
            return row.id

        return self.write(work)

    def claim_next(self, worker: str | None = None) -> JobRecord | None:
        """The oldest queued job, now running under ``worker``; None when nothing is queued or a job runs."""
        worker = worker or this_worker()

        def work(session: Session) -> JobRecord | None:
            if session.scalar(select(Job.id).where(Job.status == "running")) is not None:
                return None
            job_id = session.scalar(select(Job.id).where(Job.status == "queued").order_by(Job.id).limit(1))
            if job_id is None:
                return None
            now = utcnow()
            # Conditional on still being queued: of two workers updating the same row, the second
            # (PostgreSQL: once the first commits) changes nothing. The unique index refuses a
            # second running job, whichever row it is.
            claimed = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
                status="running", worker=worker, started_at=now, heartbeat_at=now, updated_at=now))
            if claimed.rowcount != 1:
                return None
            return JobRecord.from_row(self._job(session, job_id))

        try:
            return self.write(work)
        except IntegrityError:  # another worker claimed a job between our check and our update
            return None

    def heartbeat(self, job_id: int, progress: float | None = None, *, run_id: int | None = None,
                  log_path: str | None = None) -> bool:
        """Say the job's worker is alive (and how far it got); whether a cancel was asked for."""

        def work(session: Session) -> bool:
            row = self._job(session, job_id)
            row.heartbeat_at = utcnow()
            if progress is not None:
                row.progress = max(0.0, min(1.0, float(progress)))
            if run_id is not None:
                row.run_id = run_id
            if log_path is not None:
                row.log_path = log_path
            return row.cancel_requested

        return self.write(work)

    def finish(self, job_id: int, status: str, *, result: dict[str, Any] | None = None,
               error: str | None = None) -> None:
        """End a job: succeeded (with its result), failed or interrupted (with the error), cancelled."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"a finished job is one of {', '.join(FINAL_STATUSES)}, not {status!r}")

        def work(session: Session) -> None:
            row = self._job(session, job_id)
            row.status, row.result, row.error, row.finished_at = status, result, error, utcnow()
            if status == "succeeded":
                row.progress = 1.0

        self.write(work)

    def cancel(self, job_id: int) -> JobRecord:
        """Cancel a queued job at once; ask a running one to checkpoint and stop. ValueError once finished."""

        def work(session: Session) -> JobRecord:
            row = self._job(session, job_id)
            if row.status in FINAL_STATUSES:
                raise ValueError(f"job {job_id} is already {row.status}")
            if row.status == "queued":
                row.status, row.finished_at, row.error = "cancelled", utcnow(), "cancelled before it started"
            else:
                row.cancel_requested = True
            return JobRecord.from_row(row)

        return self.write(work)

    def reap_orphans(self, now: datetime | None = None) -> list[int]:
        """Mark running jobs whose worker is gone interrupted, with their alignment runs; their ids."""
        now = now or utcnow()
        with self.read_session() as session:
            running = [JobRecord.from_row(r) for r in session.scalars(select(Job).where(Job.status == "running"))]
        reaped = []
        for job in running:
            alive = worker_alive(job.worker)
            stale = job.heartbeat_at is None or now - job.heartbeat_at > STALE_AFTER
            if alive is False or (alive is None and stale):
                if self._interrupt(job.id, f"its worker ({job.worker}) stopped without finishing it; resume it"):
                    reaped.append(job.id)
        return reaped

    def _interrupt(self, job_id: int, why: str) -> bool:
        def work(session: Session) -> bool:
            row = self._job(session, job_id)
            if row.status != "running":  # finished meanwhile
                return False
            row.status, row.error, row.finished_at = "interrupted", why, utcnow()
            if row.run_id is not None:
                run = session.get(AlignmentRun, row.run_id)
                if run is not None and run.status in ("queued", "running"):
                    run.status, run.error = "interrupted", why
            return True

        return self.write(work)

    def resume(self, job_id: int, *, requested_by: str) -> int:
        """Queue an interrupted or cancelled job again; a training job continues its run from its checkpoint.

        The new job's id. ValueError for a job that is not interrupted or cancelled.
        """
        job = self.get(job_id)
        if job.status not in ("interrupted", "cancelled"):
            raise ValueError(f"job {job_id} is {job.status}: only an interrupted or cancelled job resumes")
        request = dict(job.request)
        if job.kind in TRAINING_KINDS and job.run_id is not None:
            request["resume"] = job.run_id
        return self.enqueue(job.kind, request, requested_by=requested_by, persona_id=job.persona_id,
                            run_id=job.run_id)

    def get(self, job_id: int) -> JobRecord:
        with self.read_session() as session:
            return JobRecord.from_row(self._job(session, job_id))

    def list_jobs(self, persona_id: str | None = None, limit: int = 50) -> list[JobRecord]:
        """Newest first."""
        with self.read_session() as session:
            query = select(Job).order_by(Job.id.desc()).limit(limit)
            if persona_id is not None:
                query = query.where(Job.persona_id == persona_id)
            return [JobRecord.from_row(row) for row in session.scalars(query)]
