"""ChatStore: every read and write the chat app makes, behind one small class.

Each method runs in its own short transaction and returns plain values or
frozen records, never ORM objects, so one ChatStore can be shared by all of
Gradio's worker threads and nothing it returns goes stale or lazy-loads.

"Get or create" and upsert methods are race-safe without locks of their own:
they try, and when a concurrent writer wins the unique constraint they
retry, finding that writer's row. Sessions and that retrying come from
``StoreBase`` (base.py); a row asked for by id that does not exist is
``NotFound`` (errors.py).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from chatbot.store import canary, promotions, versions
from chatbot.store.base import DetachedRow, StoreBase
from chatbot.store.canary import CanaryRecord, CanaryStats
from chatbot.store.db import make_engine, migrate
from chatbot.store.errors import NotFound
from chatbot.store.models import (
    MESSAGE_ROLES,
    RATINGS,
    USER_ROLES,
    Conversation,
    Feedback,
    FeedbackEvent,
    Message,
    ModelVersion,
    PersonaVersion,
    User,
    utcnow,
)
from chatbot.store.versions import ModelVersionRecord, PromotionChange, PromotionRecord

TITLE_LENGTH = 60
# The longest conversation search accepted: titles are at most 200 characters, and SQLite
# refuses LIKE patterns over 50,000 bytes with an error naming the SQL.
SEARCH_LENGTH = 200

# "leave this field as it is" for optional keyword arguments where None means "clear".
UNCHANGED = object()


@dataclasses.dataclass(frozen=True)
class ConversationRecord(DetachedRow):
    """A conversation as stored; a detached copy of its row."""

    id: int
    user_id: int
    persona_id: str
    persona_hash: str
    title: str | None
    created_at: datetime
    updated_at: datetime
    canary_id: int | None = None  # the canary that assigned it an arm (store/canary.py), if one ran
    canary_arm: str | None = None  # "control" or "candidate"


@dataclasses.dataclass(frozen=True)
class VoteRow:
    """A vote with the reply it rates (and so the exact prompt that reply answered)."""

    feedback: FeedbackRecord
    message: MessageRecord
    user_name: str
    base_model: str | None
    adapter_path: str | None


@dataclasses.dataclass(frozen=True)
class FeedbackRecord(DetachedRow):
    message_id: int
    user_id: int
    rating: int | None
    reason: str | None
    comment: str | None
    simulated: bool
    updated_at: datetime


@dataclasses.dataclass(frozen=True)
class MessageRecord(DetachedRow):
    """A message as stored; a detached copy of its row."""

    id: int
    conversation_id: int
    parent_id: int | None
    role: str
    content: str
    model_version_id: int | None
    generation_params: dict[str, Any] | None
    prompt: list[dict[str, Any]] | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float | None
    first_token_ms: float | None
    finish_reason: str | None
    persona_id: str | None
    persona_hash: str | None
    provenance: dict[str, Any] | None
    created_at: datetime


def _title_from(content: str) -> str | None:
    """First TITLE_LENGTH characters of a message, on one line."""
    flat = " ".join(content.split())
    return flat[:TITLE_LENGTH] or None


class ChatStore(StoreBase):
    """Users, persona and model versions, conversations, messages, votes.

    Sessions and retried writes come from StoreBase (store/base.py).
    """

    @classmethod
    def open(cls, url: str) -> ChatStore:
        """Connect to ``url`` and migrate it to the newest schema.

        Raises StoreError (one line, password hidden) if that fails.
        """
        engine = make_engine(url)
        try:
            migrate(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- users, personas, models ----------------------------------------

    def get_or_create_user(self, name: str, role: str = "user") -> int:
        """The id of user ``name``, created with ``role`` if new.

        An existing user keeps the role it has: changing roles is an admin
        action, not a side effect of logging in.
        """
        if not name or not name.strip():
            raise ValueError("user name must not be empty")
        if role not in USER_ROLES:
            raise ValueError(f"user role must be one of {USER_ROLES}, not {role!r}")

        def work(session: Session) -> int:
            found = session.scalar(select(User.id).where(User.name == name))
            if found is not None:
                return found
            user = User(name=name, role=role)
            session.add(user)
            session.flush()
            return user.id

        return self.write(work)

    def record_persona_version(self, persona_id: str, content_hash: str, text: str) -> None:
        """Keep the persona text a conversation was started with (idempotent)."""

        def work(session: Session) -> None:
            exists = session.scalar(
                select(PersonaVersion.id).where(
                    PersonaVersion.persona_id == persona_id,
                    PersonaVersion.content_hash == content_hash,
                )
            )
            if exists is None:
                session.add(
                    PersonaVersion(persona_id=persona_id, content_hash=content_hash, text=text)
                )
                session.flush()

        self.write(work)

    def persona_version_text(self, persona_id: str, content_hash: str) -> str:
        """The YAML text of a persona version some conversation used; NotFound if never recorded."""
        with self.read_session() as session:
            text = session.scalar(select(PersonaVersion.text).where(
                PersonaVersion.persona_id == persona_id, PersonaVersion.content_hash == content_hash))
        if text is None:
            raise NotFound(f"persona {persona_id} version {content_hash} was never recorded")
        return text

    def get_or_create_model_version(
        self, base_model: str, adapter_path: str | None = None
    ) -> int:
        """The id of the (base model, adapter) pair, recorded if new."""

        def work(session: Session) -> int:
            found = session.scalar(
                select(ModelVersion.id).where(
                    ModelVersion.base_model == base_model,
                    ModelVersion.adapter_path.is_(None)
                    if adapter_path is None
                    else ModelVersion.adapter_path == adapter_path,
                )
            )
            if found is not None:
                return found
            version = ModelVersion(base_model=base_model, adapter_path=adapter_path)
            session.add(version)
            session.flush()
            return version.id

        return self.write(work)

    # -- model versions and promotions (logic: store/versions.py, promotions.py) --

    def serving_version(self, persona_id: str, conversation_id: int | None = None) -> ModelVersionRecord | None:
        """The promoted version serving the persona; None: its persona file's adapter (or the bare base).

        With a conversation: the canary's candidate if the conversation is in the candidate arm of a
        running canary (store/canary.py), else the same.
        """
        if conversation_id is None:
            return versions.serving_version(self, persona_id)
        return canary.serving_version(self, persona_id, conversation_id)

    def get_version(self, version_id: int) -> ModelVersionRecord:
        """One model version; NotFound if there is none with that id."""
        return versions.get_version(self, version_id)

    def list_versions(self, persona_id: str | None = None) -> list[ModelVersionRecord]:
        """Model versions, newest first; for a persona, its own and any promoted for it."""
        return versions.list_versions(self, persona_id)

    def promote(self, version_id: int, *, by: str, force: bool = False, reason: str | None = None,
                persona_id: str | None = None, require_ab: bool = False) -> PromotionChange:
        """Make a version serve its persona (or ``persona_id``, for a version without one), past the gate.

        Raises PromotionRefused (a ValueError) saying why when it may not,
        NotFound for an unknown version. ``force`` needs a ``reason``. An A/B
        (canary) showing the version significantly better stands in for the
        gate; ``require_ab`` demands one that reached its minimum sample and
        is not significantly worse.
        """
        return promotions.promote(self, version_id, by=by, force=force, reason=reason, persona_id=persona_id,
                                  require_ab=require_ab)

    def rollback(self, persona_id: str, *, by: str) -> PromotionChange:
        """Take the persona's serving version off; the one promoted before it serves again."""
        return promotions.rollback(self, persona_id, by=by)

    def promotion_log(self, persona_id: str) -> list[PromotionRecord]:
        """The persona's promotions and rollbacks, oldest first."""
        return versions.promotion_log(self, persona_id)

    # -- canaries: A/B on people's thumbs (the logic is in store/canary.py) --

    def start_canary(self, version_id: int, *, by: str, share: float = 0.2, min_votes: int = 100,
                     persona_id: str | None = None, include_simulated: bool = False) -> CanaryRecord:
        """Serve ``share`` of the persona's new conversations from the version, the rest from the control.

        Raises CanaryRefused (a PromotionRefused) saying why when it may not, NotFound for an unknown version.
        """
        return canary.start(self, version_id, by=by, share=share, min_votes=min_votes, persona_id=persona_id,
                            include_simulated=include_simulated)

    def stop_canary(self, persona_id: str, *, by: str) -> CanaryRecord:
        """End the persona's running canary: every conversation gets the control again."""
        return canary.stop(self, persona_id, by=by)

    def running_canary(self, persona_id: str) -> CanaryRecord | None:
        return canary.running_canary(self, persona_id)

    def canaries(self, persona_id: str) -> list[CanaryRecord]:
        """The persona's canaries, running or ended, oldest first."""
        return canary.canaries(self, persona_id)

    def canary_stats(self, canary_id: int, include_simulated: bool | None = None) -> CanaryStats:
        """Both arms' like rates and their difference with a 95 % CI; NotFound for an unknown canary."""
        return canary.stats(self, canary_id, include_simulated)

    # -- conversations and messages -------------------------------------

    def create_conversation(
        self, user_id: int, persona_id: str, persona_hash: str, title: str | None = None
    ) -> int:
        """A new conversation of the user's; its id. NotFound if there is no such user."""

        def work(session: Session) -> int:
            if session.get(User, user_id) is None:
                raise NotFound(f"user {user_id} does not exist")
            conversation = Conversation(
                user_id=user_id, persona_id=persona_id, persona_hash=persona_hash, title=title
            )
            session.add(conversation)
            session.flush()
            canary.assign(session, conversation)  # its A/B arm, if a canary runs: decided once, here
            return conversation.id

        return self.write(work)

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        parent_id: int | None = None,
        model_version_id: int | None = None,
        generation_params: dict[str, Any] | None = None,
        prompt: list[dict[str, Any]] | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        latency_ms: float | None = None,
        first_token_ms: float | None = None,
        finish_reason: str | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> int:
        """Append a message; returns its id.

        Also bumps the conversation's ``updated_at`` and, while it has no
        title, names it after its first user message. NotFound if the
        conversation or the parent message does not exist.
        """
        if role not in MESSAGE_ROLES:
            raise ValueError(f"message role must be one of {MESSAGE_ROLES}, not {role!r}")

        def work(session: Session) -> int:
            conversation = session.get(Conversation, conversation_id)
            if conversation is None:
                raise NotFound(f"conversation {conversation_id} does not exist")
            if parent_id is not None:
                parent = session.get(Message, parent_id)
                if parent is None:
                    raise NotFound(f"parent message {parent_id} does not exist")
                if parent.conversation_id != conversation_id:
                    raise ValueError(
                        f"parent message {parent_id} is not in conversation {conversation_id}"
                    )
            message = Message(
                conversation_id=conversation_id,
                persona_id=conversation.persona_id,
                persona_hash=conversation.persona_hash,
                role=role,
                content=content,
                parent_id=parent_id,
                model_version_id=model_version_id,
                generation_params=generation_params,
                prompt=prompt,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_ms=latency_ms,
                first_token_ms=first_token_ms,
                finish_reason=finish_reason,
                provenance=provenance,
            )
            session.add(message)
            conversation.updated_at = utcnow()
            if conversation.title is None and role == "user":
                conversation.title = _title_from(content)
            session.flush()
            return message.id

        return self.write(work)

    def get_message(self, message_id: int) -> MessageRecord:
        """The stored message; NotFound if there is none."""
        with self.read_session() as session:
            row = session.get(Message, message_id)
            if row is None:
                raise NotFound(f"message {message_id} does not exist")
            return MessageRecord.from_row(row)

    def conversation_messages(self, conversation_id: int) -> list[MessageRecord]:
        """All messages of a conversation, every branch, in insertion order."""
        with self.read_session() as session:
            rows = session.scalars(
                select(Message)
                .where(Message.conversation_id == conversation_id)
                .order_by(Message.id)
            )
            return [MessageRecord.from_row(row) for row in rows]

    def get_conversation(self, conversation_id: int) -> ConversationRecord:
        """The stored conversation; NotFound if there is none."""
        with self.read_session() as session:
            row = session.get(Conversation, conversation_id)
            if row is None:
                raise NotFound(f"conversation {conversation_id} does not exist")
            return ConversationRecord.from_row(row)

    def list_conversations(self, user_id: int, search: str = "", limit: int = 200) -> list[ConversationRecord]:
        """A user's conversations, most recently active first; `search` matches titles and messages.

        The search is matched literally, case-insensitively: ``%`` and ``_`` are
        escaped (``autoescape``), not LIKE wildcards. ValueError if it is longer
        than SEARCH_LENGTH characters.
        """
        search = search.strip()
        if len(search) > SEARCH_LENGTH:
            raise ValueError(f"the search is too long: {len(search):,} characters, at most {SEARCH_LENGTH}")
        if "\x00" in search:  # SQLite's LIKE stops reading at a NUL: "\x00" alone would match everything
            raise ValueError("the search contains a NUL character (\\x00)")
        query = select(Conversation).where(Conversation.user_id == user_id)
        if search:
            in_messages = select(Message.conversation_id).where(Message.content.icontains(search, autoescape=True))
            query = query.where(Conversation.title.icontains(search, autoescape=True)
                                | Conversation.id.in_(in_messages))
        query = query.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit)
        with self.read_session() as session:
            return [ConversationRecord.from_row(row) for row in session.scalars(query)]

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        """Retitle a conversation; ValueError for an empty title, NotFound if there is no such conversation."""
        title = " ".join(title.split())[:200]
        if not title:
            raise ValueError("a conversation title must not be empty")

        def work(session: Session) -> None:
            row = session.get(Conversation, conversation_id)
            if row is None:
                raise NotFound(f"conversation {conversation_id} does not exist")
            row.title = title

        self.write(work)

    def delete_conversation(self, conversation_id: int) -> None:
        """Delete a conversation with its messages, votes and vote history, in one transaction.

        A conversation that does not exist (deleted already) is no error.
        """

        def work(session: Session) -> None:
            message_ids = select(Message.id).where(Message.conversation_id == conversation_id)
            session.execute(delete(FeedbackEvent).where(FeedbackEvent.message_id.in_(message_ids)))
            session.execute(delete(Feedback).where(Feedback.message_id.in_(message_ids)))
            # Children first: messages.parent_id points into the same table.
            session.execute(update(Message).where(Message.conversation_id == conversation_id)
                            .values(parent_id=None))
            session.execute(delete(Message).where(Message.conversation_id == conversation_id))
            session.execute(delete(Conversation).where(Conversation.id == conversation_id))

        self.write(work)

    def conversation_votes(self, conversation_id: int, user_id: int) -> dict[int, FeedbackRecord]:
        """The user's current votes in a conversation, by message id."""
        query = (select(Feedback).join(Message, Message.id == Feedback.message_id)
                 .where(Message.conversation_id == conversation_id, Feedback.user_id == user_id))
        with self.read_session() as session:
            return {row.message_id: FeedbackRecord.from_row(row) for row in session.scalars(query)}

    # -- feedback --------------------------------------------------------

    def set_feedback(self, message_id: int, user_id: int, rating: int | None, *,
                     reason: str | None | object = UNCHANGED,
                     comment: str | None | object = UNCHANGED, simulated: bool = False) -> None:
        """Set (or with ``None`` clear) a user's vote on an assistant reply.

        One row per (message, user): a changed vote overwrites it, a cleared
        vote keeps it with a NULL rating, and ``updated_at`` says when.
        ``reason`` and ``comment`` stay as they were unless given. Every call
        also appends the resulting state to ``feedback_events``. ``simulated``
        marks a vote cast by a rule (`persona-studio simulate`), not a person.
        """
        # bool is an int subclass: True would otherwise be stored as +1.
        if rating is not None and (isinstance(rating, bool) or rating not in RATINGS):
            raise ValueError(f"rating must be +1, -1 or None, not {rating!r}")

        def work(session: Session) -> None:
            message = session.get(Message, message_id)
            if message is None:
                raise NotFound(f"message {message_id} does not exist")
            if message.role != "assistant":
                raise ValueError(
                    f"message {message_id} is a {message.role} message; "
                    "only assistant messages can be rated"
                )
            if session.get(User, user_id) is None:
                raise NotFound(f"user {user_id} does not exist")
            vote = session.scalar(
                select(Feedback).where(
                    Feedback.message_id == message_id, Feedback.user_id == user_id
                )
            )
            if vote is None:
                vote = Feedback(message_id=message_id, user_id=user_id)
                session.add(vote)
            vote.rating = rating
            vote.simulated = simulated
            if reason is not UNCHANGED:
                vote.reason = reason or None
            if comment is not UNCHANGED:
                vote.comment = comment or None
            # Set explicitly: onupdate does not fire when nothing changed, yet
            # a repeated vote is still a fresh event.
            vote.updated_at = utcnow()
            session.flush()
            session.add(FeedbackEvent(feedback_id=vote.id, message_id=message_id, user_id=user_id,
                                      rating=vote.rating, reason=vote.reason, comment=vote.comment))
            # A vote in a canary's conversation may show its candidate significantly worse: ended here.
            canary.after_vote(session, message.conversation_id, simulated)

        self.write(work)

    def feedback_rows(self, persona_id: str | None = None, since: datetime | None = None,
                      model_version_id: int | None = None, user_id: int | None = None) -> list[VoteRow]:
        """Current votes (cleared ones included) joined with their reply and its context, oldest first."""
        query = (
            select(Feedback, Message, User.name, ModelVersion.base_model, ModelVersion.adapter_path)
            .join(Message, Message.id == Feedback.message_id)
            .join(User, User.id == Feedback.user_id)
            .outerjoin(ModelVersion, ModelVersion.id == Message.model_version_id)
            .order_by(Feedback.updated_at, Feedback.id)
        )
        if persona_id:
            query = query.where(Message.persona_id == persona_id)
        if since is not None:
            query = query.where(Feedback.updated_at >= since)
        if model_version_id is not None:
            query = query.where(Message.model_version_id == model_version_id)
        if user_id is not None:
            query = query.where(Feedback.user_id == user_id)
        with self.read_session() as session:
            return [VoteRow(feedback=FeedbackRecord.from_row(f), message=MessageRecord.from_row(m),
                            user_name=name, base_model=base, adapter_path=adapter)
                    for f, m, name, base, adapter in session.execute(query)]

    def get_feedback(self, message_id: int, user_id: int) -> int | None:
        """The user's current rating of a message; None if none or cleared."""
        with self.read_session() as session:
            return session.scalar(
                select(Feedback.rating).where(
                    Feedback.message_id == message_id, Feedback.user_id == user_id
                )
            )
