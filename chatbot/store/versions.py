"""Model versions, promoting one to serve a persona, and rolling back.

The ``promotions`` table is an append-only log. Replayed per persona in id
order as a stack ("promote" pushes its version, "rollback" pops the top),
it says what serves the persona: the version on top, or, when the stack is
empty, the persona file's own adapter (or the bare base model). The running
app asks for every reply (``ChatStore.serving_version``), so a promotion
made by another process takes effect on the next reply.

``model_versions.status`` follows the log: a version on top of some
persona's stack is "serving"; one that was promoted and then popped or
pushed down is "retired"; one never promoted stays "candidate".

A version is promotable when it is a policy adapter (not a reward model)
whose folder is on disk and whose ``metrics["evaluation"]["gate"]`` (written
by ``persona-studio align evaluate``) passed. ``force`` with a reason
promotes past a missing or failed gate, never past the first two; so does an
A/B on people's thumbs that shows the version significantly better
(``store/canary.py``), and ``require_ab`` demands a sufficient A/B that does
not show it worse. A promote or rollback ends the persona's running canary.

Promote and rollback themselves are in promotions.py (they also end canaries,
canary.py, which builds on this module). The functions here taking a store
are the body of ``ChatStore``'s methods of the same names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from chatbot.store.base import DetachedRow, StoreBase
from chatbot.store.errors import NotFound
from chatbot.store.models import AlignmentRun, ModelVersion, Promotion

# Runs whose adapter is a reward model (a score head), which cannot write replies.
NON_POLICY_KINDS = ("reward",)


class PromotionRefused(ValueError):
    """A promote or rollback that is not allowed; the message says why, in one line."""


@dataclass(frozen=True)
class ModelVersionRecord(DetachedRow):
    """A model version as stored; a detached copy of its row."""

    id: int
    base_model: str
    adapter_path: str | None
    persona_id: str | None
    status: str
    metrics: dict[str, Any] | None
    run_id: int | None
    created_at: datetime
    parent_id: int | None

    @property
    def evaluation(self) -> dict[str, Any] | None:
        """What `persona-studio align evaluate` wrote, if it ran."""
        evaluation = (self.metrics or {}).get("evaluation")
        return evaluation if isinstance(evaluation, dict) else None

    @property
    def gate(self) -> dict[str, Any] | None:
        gate = (self.evaluation or {}).get("gate")
        return gate if isinstance(gate, dict) else None


@dataclass(frozen=True)
class PromotionRecord(DetachedRow):
    """One row of the promotions log."""

    id: int
    persona_id: str
    version_id: int
    action: str
    forced: bool
    reason: str | None
    gate: dict[str, Any] | None
    by: str
    created_at: datetime
    ab: dict[str, Any] | None = None  # the A/B's figures when promoted (CanaryStats.to_dict)


@dataclass(frozen=True)
class PromotionChange:
    """What a promote or rollback did."""

    entry: PromotionRecord  # the log row it appended
    version: ModelVersionRecord  # the version promoted, or the one rolled back (status as it is now)
    previous: ModelVersionRecord | None  # what served the persona before (None: its own adapter / base)
    serving: ModelVersionRecord | None  # what serves it now (None: its own adapter / base)
    ended_canary: Any = None  # the persona's canary (canary.CanaryRecord) this change ended, if one ran


# -- reading ----------------------------------------------------------------


def promotion_stack(session: Session, persona_id: str) -> list[int]:
    """The persona's version ids, bottom first, from replaying its log."""
    stack: list[int] = []
    rows = session.execute(select(Promotion.action, Promotion.version_id)
                           .where(Promotion.persona_id == persona_id).order_by(Promotion.id))
    for action, version_id in rows:
        if action == "promote":
            stack.append(version_id)
        elif stack:
            stack.pop()
    return stack


def version_record(session: Session, version_id: int | None) -> ModelVersionRecord | None:
    if version_id is None:
        return None
    row = session.get(ModelVersion, version_id)
    return None if row is None else ModelVersionRecord.from_row(row)


def serving_version(store: StoreBase, persona_id: str) -> ModelVersionRecord | None:
    with store.read_session() as session:
        stack = promotion_stack(session, persona_id)
        return version_record(session, stack[-1] if stack else None)


def get_version(store: StoreBase, version_id: int) -> ModelVersionRecord:
    with store.read_session() as session:
        record = version_record(session, version_id)
    if record is None:
        raise NotFound(f"model version {version_id} does not exist")
    return record


def list_versions(store: StoreBase, persona_id: str | None = None) -> list[ModelVersionRecord]:
    """Newest first; for a persona, its own versions and any promoted for it."""
    query = select(ModelVersion).order_by(ModelVersion.id.desc())
    if persona_id is not None:
        promoted = select(Promotion.version_id).where(Promotion.persona_id == persona_id)
        query = query.where(or_(ModelVersion.persona_id == persona_id, ModelVersion.id.in_(promoted)))
    with store.read_session() as session:
        return [ModelVersionRecord.from_row(row) for row in session.scalars(query)]


def run_kinds(store: StoreBase, run_ids: set[int]) -> dict[int, str]:
    """The kind ("reward", "kto", "ppo", ...) of each of these alignment runs that exists."""
    if not run_ids:
        return {}
    with store.read_session() as session:
        return dict(session.execute(select(AlignmentRun.id, AlignmentRun.kind)
                                    .where(AlignmentRun.id.in_(run_ids))).all())


def promotion_log(store: StoreBase, persona_id: str) -> list[PromotionRecord]:
    """The persona's promotions and rollbacks, oldest first."""
    with store.read_session() as session:
        rows = session.scalars(select(Promotion).where(Promotion.persona_id == persona_id)
                               .order_by(Promotion.id))
        return [PromotionRecord.from_row(row) for row in rows]


# -- the gate ---------------------------------------------------------------


def _show(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe_check(check: dict[str, Any]) -> str:
    """One gate check as "kl = 7.31 (must be <= 5)" (alignment/gate.py's checks carry "op" and a number
    or [low, high] bound; a bound written as text, "<= 5", is shown as it is)."""
    op = check.get("op")
    bound = f"{op} {_show(check.get('bound'))}" if op else _show(check.get("bound", "?"))
    return f"{check.get('name', '?')} = {_show(check.get('value'))} (must be {bound})"


def check_gate(version: ModelVersionRecord, run_kind: str | None, *, force: bool = False) -> dict[str, Any] | None:
    """The gate result to record if ``version`` may be promoted; PromotionRefused if not.

    Being a policy adapter on disk is required even with ``force``: anything
    else cannot serve. A missing or failed evaluation gate is overridden by
    ``force`` (the caller records the reason).
    """
    vid = version.id
    if run_kind in NON_POLICY_KINDS:
        raise PromotionRefused(f"version {vid} is a {run_kind} model (run {version.run_id}), not a policy: "
                               "it scores replies and cannot write them; promote the policy its run trained")
    if not version.adapter_path:
        raise PromotionRefused(f"version {vid} is the bare base model {version.base_model!r}: only a LoRA "
                               "adapter can be promoted (with nothing promoted, a persona uses its own adapter "
                               "or the base model)")
    folder = Path(version.adapter_path)
    if not folder.is_dir():
        raise PromotionRefused(f"version {vid}'s adapter folder {folder} does not exist")
    if not (folder / "adapter_config.json").is_file():
        raise PromotionRefused(f"version {vid}'s folder {folder} holds no LoRA adapter (no adapter_config.json)")
    gate = version.gate
    if gate is None:
        if force:
            return None
        run = f"{version.run_id}" if version.run_id is not None else "<run>"
        raise PromotionRefused(f"version {vid} has not been evaluated: run `persona-studio align evaluate {run}` "
                               "first, or promote with --force --reason TEXT")
    if gate.get("passed") is not True and not force:
        failed = [c for c in gate.get("checks") or [] if isinstance(c, dict) and not c.get("passed")]
        listed = "; ".join(describe_check(c) for c in failed) or "its result says it did not pass"
        raise PromotionRefused(f"version {vid} failed its promotion gate: {listed}; "
                               "promote with --force --reason TEXT to override")
    return gate


# -- what promotions and canaries share -------------------------------------


def lock_persona(session: Session, persona_id: str) -> None:
    """Serialize promotions of one persona (PostgreSQL; SQLite's write lock already does)."""
    if session.get_bind().dialect.name == "postgresql":
        digest = hashlib.blake2b(f"promotions:{persona_id}".encode(), digest_size=8).digest()
        session.execute(select(func.pg_advisory_xact_lock(int.from_bytes(digest, "big", signed=True))))


def acting_name(by: str) -> str:
    if not by or not by.strip():
        raise PromotionRefused("say who is doing this (by)")
    return by.strip()


def target_persona(version: ModelVersionRecord, persona_id: str | None) -> str:
    """The persona a version is to serve: its own, or ``persona_id`` for one trained without a persona."""
    if version.persona_id is None and persona_id is None:
        raise PromotionRefused(f"version {version.id} belongs to no persona: name the one it should "
                               "serve with --persona ID")
    if version.persona_id is not None and persona_id is not None and persona_id != version.persona_id:
        raise PromotionRefused(f"version {version.id} was trained for persona {version.persona_id!r}, "
                               f"not {persona_id!r}")
    return persona_id or version.persona_id


def version_run_kind(session: Session, version: ModelVersionRecord) -> str | None:
    if version.run_id is None:
        return None
    return session.scalar(select(AlignmentRun.kind).where(AlignmentRun.id == version.run_id))
