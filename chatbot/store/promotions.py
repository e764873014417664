"""Promote a model version to serve a persona, and roll back (the log and the gate: versions.py).

Promote and rollback each run in one transaction, serialized per persona:
on SQLite by the write lock every store transaction takes (BEGIN IMMEDIATE,
see db.py), on PostgreSQL by a transaction-scoped advisory lock on the
persona, so two at once cannot both build on the same stack top. Either one
ends the persona's running canary (canary.py).

These functions are the body of ``ChatStore``'s methods of the same names.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from chatbot.store import canary
from chatbot.store.base import StoreBase
from chatbot.store.errors import NotFound
from chatbot.store.models import ModelVersion, Promotion
from chatbot.store.versions import (
    ModelVersionRecord,
    PromotionChange,
    PromotionRecord,
    PromotionRefused,
    acting_name,
    check_gate,
    lock_persona,
    promotion_stack,
    target_persona,
    version_record,
    version_run_kind,
)


def _refresh_statuses(session: Session, version_ids: set[int]) -> None:
    """Each promoted-at-some-time version: "serving" if on top of any persona's stack, else "retired"."""
    session.flush()
    for version_id in version_ids:
        personas = session.scalars(select(Promotion.persona_id).distinct()
                                   .where(Promotion.version_id == version_id)).all()
        on_top = any((stack := promotion_stack(session, p)) and stack[-1] == version_id for p in personas)
        session.get(ModelVersion, version_id).status = "serving" if on_top else "retired"


def _append(session: Session, **values: Any) -> Promotion:
    entry = Promotion(**values)
    session.add(entry)
    session.flush()
    return entry


def _change(session: Session, entry: Promotion, version_id: int, previous: int | None,
            ended_canary: Any = None) -> PromotionChange:
    session.flush()
    stack = promotion_stack(session, entry.persona_id)
    return PromotionChange(
        entry=PromotionRecord.from_row(entry), version=version_record(session, version_id),
        previous=version_record(session, previous), serving=version_record(session, stack[-1] if stack else None),
        ended_canary=ended_canary)


def promote(store: StoreBase, version_id: int, *, by: str, force: bool = False, reason: str | None = None,
            persona_id: str | None = None, require_ab: bool = False) -> PromotionChange:
    by = acting_name(by)
    reason = reason.strip() if reason and reason.strip() else None
    if force and reason is None:
        raise PromotionRefused("--force needs --reason TEXT: a forced promotion records why")

    def work(session: Session) -> PromotionChange:
        row = session.get(ModelVersion, version_id)
        if row is None:
            raise NotFound(f"model version {version_id} does not exist")
        version = ModelVersionRecord.from_row(row)
        target = target_persona(version, persona_id)
        run_kind = version_run_kind(session, version)
        check_gate(version, run_kind, force=True)  # what can never be promoted, whatever the A/B says
        lock_persona(session, target)
        stack = promotion_stack(session, target)
        previous = stack[-1] if stack else None
        ab = canary.ab_for(session, target, version_id, previous)
        if require_ab:
            canary.require_ab(ab, version_id, target)
        # People are an independent judge: an A/B that shows it significantly better stands in for the gate.
        try:
            gate = check_gate(version, run_kind, force=force or (ab is not None and ab.better))
        except PromotionRefused as refused:
            if ab is None:
                raise
            raise PromotionRefused(f"{refused}; nor does its A/B (canary {ab.canary.id}) show it significantly "
                                   f"better: {ab.verdict} ({ab.summary()})") from None
        if previous == version_id:
            raise PromotionRefused(f"version {version_id} already serves persona {target!r}")
        # Forced only when the gate was really overridden: --force on a passing version changes nothing,
        # nor on one whose A/B shows it better.
        forced = force and not (gate is not None and gate.get("passed") is True) and not (ab is not None and ab.better)
        entry = _append(session, persona_id=target, version_id=version_id, action="promote",
                        forced=forced, reason=reason, gate=gate, by=by,
                        ab=ab.to_dict() if ab is not None else None)
        ended = canary.end_for_change(session, target, by=by, promoted=version_id)
        _refresh_statuses(session, {version_id} | ({previous} if previous is not None else set()))
        return _change(session, entry, version_id, previous, ended)

    return store.write(work)


def rollback(store: StoreBase, persona_id: str, *, by: str) -> PromotionChange:
    by = acting_name(by)

    def work(session: Session) -> PromotionChange:
        lock_persona(session, persona_id)
        stack = promotion_stack(session, persona_id)
        if not stack:
            raise PromotionRefused(f"nothing to roll back: no promoted version serves persona {persona_id!r} "
                                   "(it uses its persona file's adapter, or the base model)")
        top = stack[-1]
        entry = _append(session, persona_id=persona_id, version_id=top, action="rollback", by=by)
        ended = canary.end_for_change(session, persona_id, by=by, promoted=None)
        _refresh_statuses(session, {top} | ({stack[-2]} if len(stack) > 1 else set()))
        return _change(session, entry, top, top, ended)

    return store.write(work)
