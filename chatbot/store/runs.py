"""Alignment runs and the candidate model versions they produce.

A small store class over ``alignment_runs`` and ``model_versions`` (no SQL
in job code: the alignment jobs in alignment/ use it). Registering a
candidate and marking its run succeeded happen in one transaction: a job
killed at any point leaves either no version or a version whose run says
succeeded, never a half-registered one.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from chatbot.store.base import DetachedRow, StoreBase
from chatbot.store.errors import NotFound
from chatbot.store.models import RUN_STATUSES, AlignmentRun, ModelVersion

JOB_FILE = "job.json"  # in a run's output folder: the process running it

# The metrics column keeps the latest step's logs plus this many past steps;
# the full history is in the run's metrics.jsonl / TensorBoard logs.
HISTORY_LIMIT = 1000


@dataclass(frozen=True)
class RunRecord(DetachedRow):
    id: int
    kind: str
    persona_id: str | None
    config: dict[str, Any] | None
    dataset_hash: str | None
    dataset_stats: dict[str, Any] | None
    status: str
    progress: float
    metrics: dict[str, Any] | None
    error: str | None
    output_dir: str | None
    created_at: datetime
    updated_at: datetime


def claim(output_dir: str | Path) -> None:
    """Record this process as the one running the job in ``output_dir`` (see ``process_alive``)."""
    path = Path(output_dir) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": datetime.now().isoformat(timespec="seconds")}), encoding="utf-8")


def process_alive(output_dir: str | Path | None) -> bool | None:
    """Whether the process that claimed ``output_dir`` still exists; None when this machine cannot tell.

    A killed job (SIGKILL, power loss) cannot update its run row, so a run
    that says "running" is checked against its process instead. Only a
    process on this host can be checked; a reused pid reads as alive, which
    errs on the side of not touching a run.
    """
    try:
        job = json.loads((Path(output_dir) / JOB_FILE).read_text(encoding="utf-8"))
    except (TypeError, OSError, ValueError):
        return None
    return pid_alive(job.get("host"), job.get("pid"))


def pid_alive(host: str | None, pid) -> bool | None:
    """Whether process ``pid`` on ``host`` exists; None when this machine cannot tell (another host,
    no pid). A reused pid reads as alive, which errs on the side of not touching a job."""
    if host != socket.gethostname() or not str(pid).isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunStore(StoreBase):
    """Create, update and read alignment runs; register candidate versions.

    Shares the chat store's engine: ``RunStore(chat_store.engine)``. Sessions
    and retried writes come from StoreBase (store/base.py); an unknown run or
    version is NotFound.
    """

    @staticmethod
    def _run(session: Session, run_id: int) -> AlignmentRun:
        row = session.get(AlignmentRun, run_id)
        if row is None:
            raise NotFound(f"alignment run {run_id} does not exist")
        return row

    def create_run(
        self,
        kind: str,
        *,
        persona_id: str | None = None,
        config: dict[str, Any] | None = None,
        dataset_hash: str | None = None,
        dataset_stats: dict[str, Any] | None = None,
        output_dir: str | None = None,
    ) -> int:
        def work(session: Session) -> int:
            row = AlignmentRun(
                kind=kind, persona_id=persona_id, config=config, dataset_hash=dataset_hash,
                dataset_stats=dataset_stats, output_dir=output_dir, status="queued", progress=0.0,
            )
            session.add(row)
            session.flush()
            return row.id

        return self.write(work)

    def set_status(self, run_id: int, status: str, error: str | None = None) -> None:
        """Move a run to ``status``; ``error`` is kept for failed/interrupted runs. NotFound for an unknown run."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, not {status!r}")
        if status == "succeeded":
            raise ValueError("a run succeeds only through register_candidate")

        def work(session: Session) -> None:
            row = self._run(session, run_id)
            row.status = status
            row.error = error

        self.write(work)

    def record_step(self, run_id: int, progress: float, logs: dict[str, Any] | None = None) -> None:
        """Store progress (0..1) and, if given, one step's logs. NotFound for an unknown run."""

        def work(session: Session) -> None:
            row = self._run(session, run_id)
            row.progress = max(0.0, min(1.0, float(progress)))
            if logs:
                metrics = dict(row.metrics or {})
                history = list(metrics.get("history", []))[-(HISTORY_LIMIT - 1):]
                history.append(logs)
                metrics["history"] = history
                metrics["last"] = logs
                # A fresh dict: SQLAlchemy's JSON type only notices reassignment.
                row.metrics = metrics

        self.write(work)

    def reap_stale(self) -> list[int]:
        """Mark "running" runs whose process is gone as interrupted; their ids."""
        reaped = []
        for run in self.list_runs(limit=HISTORY_LIMIT):
            if run.status == "running" and process_alive(run.output_dir) is False:
                self.set_status(run.id, "interrupted",
                                "its process ended without updating the run (killed?); resume with --resume")
                reaped.append(run.id)
        return reaped

    def resumable(self, run_id: int, kind: str, *, check_process: bool = True) -> RunRecord:
        """The run ``run_id``, checked for continuing as a ``kind`` job.

        NotFound for an unknown run; ValueError for a run of another kind, or,
        with ``check_process``, one whose process is still running it.
        """
        run = self.get_run(run_id)
        if run.kind != kind:
            raise ValueError(f"run {run.id} is a {run.kind} run, not {kind}")
        if check_process and run.status == "running" and process_alive(run.output_dir):
            raise ValueError(f"run {run.id} is still running ({run.output_dir}/{JOB_FILE})")
        return run

    def get_run(self, run_id: int) -> RunRecord:
        """The run; NotFound if there is none with that id."""
        with self.read_session() as session:
            return RunRecord.from_row(self._run(session, run_id))

    def list_runs(self, kind: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Newest first."""
        with self.read_session() as session:
            query = select(AlignmentRun).order_by(AlignmentRun.id.desc()).limit(limit)
            if kind is not None:
                query = query.where(AlignmentRun.kind == kind)
            return [RunRecord.from_row(row) for row in session.scalars(query)]

    def register_candidate(
        self,
        run_id: int,
        *,
        base_model: str,
        adapter_path: str,
        metrics: dict[str, Any],
        persona_id: str | None = None,
        parent_id: int | None = None,
    ) -> int:
        """Record the run's adapter as a candidate version and mark the run succeeded.

        One transaction: both happen or neither does. Returns the version id.
        NotFound for an unknown run.
        """

        def work(session: Session) -> int:
            run = self._run(session, run_id)
            version = ModelVersion(
                base_model=base_model, adapter_path=adapter_path, parent_id=parent_id,
                persona_id=persona_id if persona_id is not None else run.persona_id,
                status="candidate", metrics=metrics, run_id=run_id,
            )
            session.add(version)
            run_metrics = dict(run.metrics or {})
            run_metrics["eval"] = metrics
            run.metrics = run_metrics
            run.status = "succeeded"
            run.progress = 1.0
            run.error = None
            session.flush()
            return version.id

        return self.write(work)

    def candidate_for_run(self, run_id: int) -> int | None:
        """The id of the version a run registered, if any."""
        with self.read_session() as session:
            return session.scalar(select(ModelVersion.id).where(ModelVersion.run_id == run_id))

    def record_evaluation(self, version_id: int, evaluation: dict[str, Any]) -> None:
        """Store an evaluation (alignment/evaluate.py) under the version's ``metrics["evaluation"]``.

        ``persona-studio models promote`` reads ``["evaluation"]["gate"]`` from
        there. A later evaluation replaces an earlier one. NotFound for an unknown version.
        """

        def work(session: Session) -> None:
            version = session.get(ModelVersion, version_id)
            if version is None:
                raise NotFound(f"model version {version_id} does not exist")
            metrics = dict(version.metrics or {})
            metrics["evaluation"] = evaluation
            # A fresh dict: SQLAlchemy's JSON type only notices reassignment.
            version.metrics = metrics

        self.write(work)
