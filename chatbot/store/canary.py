"""Canaries: an online A/B of a candidate model version on people's thumbs.

A canary runs a candidate version against the control, what served the
persona when it started (a promoted version, or with none the persona file's
adapter or the base model), on the persona's NEW conversations. At most one
runs per persona (a partial unique index backs the check).

Assignment is sticky and seed-free. A conversation gets its arm once, in the
transaction that creates it: "candidate" when a hash of (canary id,
conversation id), read as a number in [0, 1), is below the share, else
"control". The arm is stored on the conversation (``canary_id``,
``canary_arm``). Every reply of it, Retry and edits included, comes from that
arm while the canary runs. Conversations started before the canary have no
arm and keep what they had. Once the canary ends, every conversation gets
what serves the persona again. Each reply still records the model version
that wrote it.

The statistics: each arm's like rate is its liked votes over its votes
(current +1/-1 votes on model-written replies in the arm's conversations,
made while the canary ran). Conversations, not votes, are the independent
unit: one person's votes within a conversation are correlated. So the
standard error is the cluster-robust (delta-method) one of a ratio estimator
over conversations::

    p = sum(y_i) / sum(m_i)
    Var(p) = n / (n - 1) * sum((y_i - p * m_i) ** 2) / (sum(m_i)) ** 2

where conversation i has m_i votes and y_i likes, and n conversations have
votes. With one vote per conversation it is p(1-p)/(n-1), the usual binomial
variance. The difference (candidate minus control) gets a 95 % CI from the
normal approximation, d +- 1.96 * sqrt(Var_candidate + Var_control). It is
deterministic, so a test can check it by hand. It needs two voted
conversations in each arm.

Decisions wait for the minimum sample, ``min_votes`` counted votes in each
arm. With 100 per arm (the default) a 20-point difference around a 50 % like
rate is detected with about 80 % power. With the minimum reached:

* a CI entirely below 0 is significantly worse. The canary is ended
  automatically ("rolled back: significantly worse (...)") by the vote that
  showed it, inside that vote's transaction. Every counted vote passes
  there, so no check is missed, and no background thread is needed. The check
  is serialized per persona, with the promotions' lock;
* a CI entirely above 0 is significantly better. ``promote`` then accepts a
  version whose offline gate failed or is missing, without ``--force``;
* ``promote --require-ab`` refuses a version unless its A/B reached the
  minimum and is not significantly worse.

Simulated votes (`persona-studio simulate`) count in a canary's decisions
only if it was started with ``include_simulated`` (for demos and tests).
Promoting the candidate ends its canary ("promoted"). Promoting another
version, or rolling back, changes the control, so that also ends the canary.
An A/B counts for a promotion only while its control is what serves the
persona.

These functions are the body of ``ChatStore``'s canary methods; the
``session``-level ones are called inside the store's own transactions
(conversation creation, votes, promote and rollback).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime
from statistics import NormalDist
from typing import Any

from sqlalchemy import case, false, func, select
from sqlalchemy.orm import Session

from chatbot.store.base import DetachedRow, StoreBase
from chatbot.store.errors import NotFound
from chatbot.store.models import Canary, Conversation, Feedback, Message, ModelVersion, utcnow
from chatbot.store.versions import (
    ModelVersionRecord,
    PromotionRefused,
    acting_name,
    check_gate,
    lock_persona,
    promotion_stack,
    target_persona,
    version_record,
    version_run_kind,
)

CONTROL, CANDIDATE = "control", "candidate"
DEFAULT_SHARE = 0.2
DEFAULT_MIN_VOTES = 100
Z95 = NormalDist().inv_cdf(0.975)  # 1.959963...
METHOD = ("like rate = liked / votes per arm; SE clustered by conversation (delta method); "
          "difference candidate - control with a normal-approximation 95% CI")


class CanaryRefused(PromotionRefused):
    """A canary that cannot be started, stopped or used; the message says why, in one line."""


@dataclass(frozen=True)
class CanaryRecord(DetachedRow):
    """A canary as stored; a detached copy of its row."""

    id: int
    persona_id: str
    candidate_id: int
    control_id: int | None
    share: float
    min_votes: int
    include_simulated: bool
    started_by: str
    started_at: datetime
    ended_at: datetime | None
    ended_by: str | None
    outcome: str | None
    result: dict[str, Any] | None

    @property
    def running(self) -> bool:
        return self.ended_at is None


@dataclass(frozen=True)
class ArmStats:
    arm: str
    version_id: int | None  # None: the persona file's adapter or the base model (control only)
    assigned: int  # conversations given this arm
    conversations: int  # of those, the ones with counted votes: the independent unit
    votes: int
    liked: int
    like_rate: float | None
    se: float | None  # None with fewer than two voted conversations

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "arm"}


@dataclass(frozen=True)
class CanaryStats:
    canary: CanaryRecord
    include_simulated: bool  # whether simulated votes were counted
    control: ArmStats
    candidate: ArmStats
    difference: float | None  # candidate minus control like rate
    ci: tuple[float, float] | None  # its 95 % CI

    @property
    def min_votes_reached(self) -> bool:
        return min(self.control.votes, self.candidate.votes) >= self.canary.min_votes

    @property
    def decided(self) -> bool:
        """The minimum sample is reached and the CI exists: the figures may decide something."""
        return self.min_votes_reached and self.ci is not None

    @property
    def worse(self) -> bool:
        return self.decided and self.ci[1] < 0

    @property
    def better(self) -> bool:
        return self.decided and self.ci[0] > 0

    @property
    def verdict(self) -> str:
        if not self.decided:
            return "not enough votes yet"
        if self.worse:
            return "significantly worse"
        return "significantly better" if self.better else "no significant difference"

    def summary(self) -> str:
        """One line: both like rates, the difference with its CI, the votes."""
        def arm(a: ArmStats) -> str:
            rate = "n/a" if a.like_rate is None else f"{a.like_rate:.1%}"
            return f"{a.arm} {rate} ({a.liked} of {a.votes} votes, {a.conversations} conversations)"

        text = f"{arm(self.candidate)} vs {arm(self.control)}"
        if self.difference is not None:
            text += f": {self.difference * 100:+.1f} points"
        if self.ci is not None:
            text += f", 95% CI [{self.ci[0] * 100:+.1f}, {self.ci[1] * 100:+.1f}]"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "canary": self.canary.id, "candidate": self.canary.candidate_id, "control": self.canary.control_id,
            "share": self.canary.share, "min_votes": self.canary.min_votes,
            "include_simulated": self.include_simulated,
            "arms": {CONTROL: self.control.to_dict(), CANDIDATE: self.candidate.to_dict()},
            "difference": self.difference, "ci": list(self.ci) if self.ci is not None else None,
            "min_votes_reached": self.min_votes_reached, "verdict": self.verdict, "summary": self.summary(),
            "method": METHOD,
        }


# -- the rule and the statistics (pure) ------------------------------------


def assign_arm(canary_id: int, conversation_id: int, share: float) -> str:
    """The arm of a conversation: deterministic, seed-free, and "candidate" for a ``share`` of ids."""
    digest = hashlib.blake2b(f"canary:{canary_id}:conversation:{conversation_id}".encode(), digest_size=8).digest()
    return CANDIDATE if int.from_bytes(digest, "big") / 2**64 < share else CONTROL


def arm_estimate(clusters: list[tuple[int, int]]) -> tuple[int, int, float | None, float | None]:
    """(votes, liked, like rate, standard error) from (votes, liked) per conversation; see the module doc."""
    clusters = [(m, y) for m, y in clusters if m > 0]
    votes, liked = sum(m for m, _ in clusters), sum(y for _, y in clusters)
    if not votes:
        return 0, 0, None, None
    rate = liked / votes
    n = len(clusters)
    if n < 2:
        return votes, liked, rate, None
    variance = n / (n - 1) * sum((y - rate * m) ** 2 for m, y in clusters) / votes**2
    return votes, liked, rate, math.sqrt(variance)


def difference_ci(control: ArmStats, candidate: ArmStats) -> tuple[float | None, tuple[float, float] | None]:
    """Candidate minus control like rate, and its normal-approximation 95 % CI (None without SEs)."""
    if control.like_rate is None or candidate.like_rate is None:
        return None, None
    diff = candidate.like_rate - control.like_rate
    if control.se is None or candidate.se is None:
        return diff, None
    half = Z95 * math.sqrt(control.se**2 + candidate.se**2)
    return diff, (diff - half, diff + half)


# -- reading ----------------------------------------------------------------


def _running(session: Session, persona_id: str, *, fresh: bool = False) -> Canary | None:
    query = select(Canary).where(Canary.persona_id == persona_id, Canary.ended_at.is_(None))
    if fresh:  # after taking the persona's lock: not a copy loaded before it
        query = query.execution_options(populate_existing=True)
    return session.scalars(query).first()


def _stats(session: Session, canary: Canary, include_simulated: bool) -> CanaryStats:
    per_conversation = (
        select(Conversation.canary_arm, Message.conversation_id, func.count(Feedback.id),
               func.sum(case((Feedback.rating == 1, 1), else_=0)))
        .join(Message, Message.id == Feedback.message_id)
        .join(Conversation, Conversation.id == Message.conversation_id)
        # Replies a model wrote (not greetings), with a current vote.
        .where(Conversation.canary_id == canary.id, Message.role == "assistant",
               Message.model_version_id.is_not(None), Feedback.rating.is_not(None))
        .group_by(Conversation.canary_arm, Message.conversation_id))
    if not include_simulated:
        per_conversation = per_conversation.where(Feedback.simulated == false())
    if canary.ended_at is not None:  # replies written after it ended came from the control
        per_conversation = per_conversation.where(Message.created_at <= canary.ended_at)
    clusters: dict[str, list[tuple[int, int]]] = {CONTROL: [], CANDIDATE: []}
    for arm, _, votes, liked in session.execute(per_conversation):
        clusters[arm].append((int(votes), int(liked or 0)))
    assigned = dict(session.execute(select(Conversation.canary_arm, func.count()).where(
        Conversation.canary_id == canary.id).group_by(Conversation.canary_arm)).all())
    arms = {}
    for arm, version_id in ((CONTROL, canary.control_id), (CANDIDATE, canary.candidate_id)):
        votes, liked, rate, se = arm_estimate(clusters[arm])
        arms[arm] = ArmStats(arm, version_id, int(assigned.get(arm, 0)), len(clusters[arm]), votes, liked,
                             rate, se)
    diff, ci = difference_ci(arms[CONTROL], arms[CANDIDATE])
    return CanaryStats(CanaryRecord.from_row(canary), include_simulated, arms[CONTROL], arms[CANDIDATE], diff, ci)


def stats(store: StoreBase, canary_id: int, include_simulated: bool | None = None) -> CanaryStats:
    """A canary's figures; simulated votes count if asked or if the canary counts them."""
    with store.read_session() as session:
        canary = session.get(Canary, canary_id)
        if canary is None:
            raise NotFound(f"canary {canary_id} does not exist")
        return _stats(session, canary, bool(include_simulated) or canary.include_simulated)


def canaries(store: StoreBase, persona_id: str) -> list[CanaryRecord]:
    """The persona's canaries, oldest first."""
    with store.read_session() as session:
        rows = session.scalars(select(Canary).where(Canary.persona_id == persona_id).order_by(Canary.id))
        return [CanaryRecord.from_row(row) for row in rows]


def running_canary(store: StoreBase, persona_id: str) -> CanaryRecord | None:
    with store.read_session() as session:
        row = _running(session, persona_id)
        return None if row is None else CanaryRecord.from_row(row)


def serving_version(store: StoreBase, persona_id: str, conversation_id: int | None) -> ModelVersionRecord | None:
    """The candidate for a conversation in a running canary's candidate arm; else what serves the persona."""
    with store.read_session() as session:
        if conversation_id is not None:
            candidate = session.scalar(
                select(Canary.candidate_id).join(Conversation, Conversation.canary_id == Canary.id)
                .where(Conversation.id == conversation_id, Conversation.canary_arm == CANDIDATE,
                       Canary.ended_at.is_(None)))
            if candidate is not None:
                return version_record(session, candidate)
        stack = promotion_stack(session, persona_id)
        return version_record(session, stack[-1] if stack else None)


# -- writing ----------------------------------------------------------------


def start(store: StoreBase, version_id: int, *, by: str, share: float = DEFAULT_SHARE,
          min_votes: int = DEFAULT_MIN_VOTES, persona_id: str | None = None,
          include_simulated: bool = False) -> CanaryRecord:
    by = acting_name(by)
    if not (isinstance(share, (int, float)) and 0 < share < 1):
        raise CanaryRefused(f"--share must be between 0 and 1 (exclusive), not {share}")
    if isinstance(min_votes, bool) or not isinstance(min_votes, int) or min_votes < 1:
        raise CanaryRefused(f"--min-votes must be a whole number of votes per arm, at least 1, not {min_votes}")

    def work(session: Session) -> CanaryRecord:
        row = session.get(ModelVersion, version_id)
        if row is None:
            raise NotFound(f"model version {version_id} does not exist")
        version = ModelVersionRecord.from_row(row)
        target = target_persona(version, persona_id)
        # What could serve at all (a policy adapter on disk); the offline gate is not required:
        # the A/B is the other judge.
        check_gate(version, version_run_kind(session, version), force=True)
        lock_persona(session, target)
        stack = promotion_stack(session, target)
        control = stack[-1] if stack else None
        if control == version_id:
            raise CanaryRefused(f"version {version_id} already serves persona {target!r}: there is nothing to "
                                "compare it with")
        running = _running(session, target, fresh=True)
        if running is not None:
            raise CanaryRefused(f"persona {target!r} already has a running canary (canary {running.id}, version "
                                f"{running.candidate_id}, started by {running.started_by}): stop it first with "
                                f"`persona-studio models canary-stop {target}`")
        canary = Canary(persona_id=target, candidate_id=version_id, control_id=control, share=float(share),
                        min_votes=min_votes, include_simulated=include_simulated, started_by=by)
        session.add(canary)
        session.flush()
        return CanaryRecord.from_row(canary)

    return store.write(work)


def _end(session: Session, canary: Canary, *, by: str, outcome: str) -> CanaryRecord:
    figures = _stats(session, canary, canary.include_simulated)
    canary.ended_at, canary.ended_by, canary.outcome = utcnow(), by, outcome
    canary.result = figures.to_dict()
    session.flush()
    return CanaryRecord.from_row(canary)


def stop(store: StoreBase, persona_id: str, *, by: str) -> CanaryRecord:
    by = acting_name(by)

    def work(session: Session) -> CanaryRecord:
        lock_persona(session, persona_id)
        canary = _running(session, persona_id, fresh=True)
        if canary is None:
            raise CanaryRefused(f"no canary is running for persona {persona_id!r}")
        return _end(session, canary, by=by, outcome=f"stopped by {by}")

    return store.write(work)


# -- hooks inside the store's own transactions -----------------------------------


def assign(session: Session, conversation: Conversation) -> None:
    """Give a new (flushed) conversation its arm if a canary runs for its persona."""
    canary = _running(session, conversation.persona_id)
    if canary is not None:
        conversation.canary_id = canary.id
        conversation.canary_arm = assign_arm(canary.id, conversation.id, canary.share)


def after_vote(session: Session, conversation_id: int, simulated: bool) -> CanaryRecord | None:
    """End the conversation's canary if this vote shows the candidate significantly worse; the ended canary."""
    canary_id = session.scalar(select(Conversation.canary_id).where(Conversation.id == conversation_id))
    if canary_id is None:
        return None
    running = session.execute(select(Canary.persona_id, Canary.include_simulated)
                              .where(Canary.id == canary_id, Canary.ended_at.is_(None))).first()
    if running is None or (simulated and not running.include_simulated):
        return None  # ended already, or a vote it does not count
    lock_persona(session, running.persona_id)  # then this check sees every vote committed before it
    canary = session.scalars(select(Canary).where(Canary.id == canary_id, Canary.ended_at.is_(None))
                             .execution_options(populate_existing=True)).first()
    if canary is None:
        return None
    figures = _stats(session, canary, canary.include_simulated)
    if not figures.worse:
        return None
    return _end(session, canary, by="auto", outcome=f"rolled back: significantly worse ({figures.summary()})")


def end_for_change(session: Session, persona_id: str, *, by: str, promoted: int | None) -> CanaryRecord | None:
    """A promote (``promoted``: the version) or rollback (None) changed what serves: end the running canary."""
    canary = _running(session, persona_id, fresh=True)
    if canary is None:
        return None
    if promoted == canary.candidate_id:
        outcome = f"promoted by {by}"
    elif promoted is not None:
        outcome = f"ended: version {promoted} was promoted by {by}, replacing its control"
    else:
        outcome = f"ended: a rollback by {by} replaced its control"
    return _end(session, canary, by=by, outcome=outcome)


def ab_for(session: Session, persona_id: str, version_id: int, control_id: int | None) -> CanaryStats | None:
    """The figures of the version's newest canary for the persona, if its control is what serves now."""
    canary = session.scalars(select(Canary).where(Canary.persona_id == persona_id, Canary.candidate_id == version_id)
                             .order_by(Canary.id.desc())).first()
    if canary is None or canary.control_id != control_id:
        return None
    return _stats(session, canary, canary.include_simulated)


def require_ab(figures: CanaryStats | None, version_id: int, persona_id: str) -> None:
    """``promote --require-ab``: the A/B reached its minimum and is not significantly worse."""
    if figures is None:
        raise CanaryRefused(f"version {version_id} has no A/B against what serves persona {persona_id!r} now: start "
                            f"one with `persona-studio models canary {version_id}`, or promote without --require-ab")
    where = f"version {version_id}'s A/B (canary {figures.canary.id})"
    if not figures.min_votes_reached:
        raise CanaryRefused(f"{where} has not reached its minimum sample of {figures.canary.min_votes} votes per "
                            f"arm (candidate {figures.candidate.votes}, control {figures.control.votes})")
    if figures.ci is None:
        raise CanaryRefused(f"{where} has no confidence interval yet: each arm needs votes in two conversations")
    if figures.worse:
        raise CanaryRefused(f"{where} shows it significantly worse than the control: {figures.summary()}")
