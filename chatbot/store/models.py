"""SQLAlchemy models of the chat store.

These classes describe the schema the code expects; the schema a database
actually has is built by the Alembic migrations in ``migrations/versions``
(never by ``create_all``), and a test checks that the two agree.

Text columns with a small set of values (roles, statuses) are plain strings
guarded by CHECK constraints rather than ``Enum`` types: adding a value later
is then a one-line migration on both SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, REAL
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

USER_ROLES = ("user", "admin")
MESSAGE_ROLES = ("system", "user", "assistant")
MODEL_STATUSES = ("candidate", "serving", "retired")
FINISH_REASONS = ("eos", "length", "stopped", "greeting")
RATINGS = (1, -1)
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "interrupted")
JOB_KINDS = ("reward", "ppo", "kto", "dpo", "evaluate", "simulate")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
PROMOTION_ACTIONS = ("promote", "rollback")
CANARY_ARMS = ("control", "candidate")

# Deterministic constraint names: Alembic's batch mode (how SQLite alters a
# table) can only drop or change a constraint it can name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    SQLite has no time zones: SQLAlchemy stores its datetimes as text and
    reads them back naive. This type stores UTC and re-attaches the zone on
    the way out, so callers see the same kind of value on SQLite and on
    PostgreSQL (where the column is ``timestamptz``). Naive datetimes are
    refused on the way in because their zone is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one")
        value = value.astimezone(timezone.utc)
        # SQLite compares timestamps as text: keep one zone and no offset
        # suffix so that ordering and range filters stay correct.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Embedding(TypeDecorator[Any]):
    """A float32 vector (a numpy array in Python) stored the way each backend's vector search reads it.

    SQLite: a BLOB of little-endian float32, the format sqlite-vec's distance functions take.
    PostgreSQL: ``real[]``, which pgvector casts to its ``vector`` type in a query
    (``embedding::vector``). The column is not pgvector's own type, so the schema, and every
    migration, is the same whether or not the server has pgvector (see chatbot/knowledge/search.py).
    """

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(REAL()))
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        import numpy as np  # here: the store is imported by commands that never touch vectors

        vector = np.asarray(value, dtype="<f4")
        return vector.tolist() if dialect.name == "postgresql" else vector.tobytes()

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        import numpy as np

        if isinstance(value, (bytes, bytearray, memoryview)):
            return np.frombuffer(value, dtype="<f4").astype(np.float32)
        return np.asarray(value, dtype=np.float32)


def _created_at() -> Mapped[datetime]:
    # server_default as well, so rows inserted by plain SQL still get a time.
    return mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


def _updated_at() -> Mapped[datetime]:
    return mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow, server_default=func.now()
    )


def _in(column: str, values: tuple[Any, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in("role", USER_ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(20), default="user", server_default="user")
    # argon2 hash; NULL for the local user of an app without accounts.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    # Raised by a password change or removal: sessions begun under an older epoch are revoked.
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = _created_at()


class ApiKey(Base):
    """A key a program signs in with as an account (the /v1 API); only its SHA-256 is kept."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    created_at: Mapped[datetime] = _created_at()


class PersonaVersion(Base):
    """A persona's YAML text as it was when some conversation used it."""

    __tablename__ = "persona_versions"
    __table_args__ = (UniqueConstraint("persona_id", "content_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    persona_id: Mapped[str] = mapped_column(String(200))
    content_hash: Mapped[str] = mapped_column(String(128))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class ModelVersion(Base):
    """A base model plus an optional LoRA adapter: what wrote a reply.

    Identity is (base_model, adapter_path). A plain unique constraint would
    not do: NULLs are distinct there, so the bare base model could be
    recorded twice. The unique index is on ``coalesce(adapter_path, '')``.
    """

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint(_in("status", MODEL_STATUSES), name="status"),
        Index(
            "uq_model_versions_identity",
            "base_model",
            text("coalesce(adapter_path, '')"),
            unique=True,
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_model: Mapped[str] = mapped_column(String(500))
    adapter_path: Mapped[str | None] = mapped_column(String(1000))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    persona_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(
        String(20), default="serving", server_default="serving"
    )
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    run_id: Mapped[int | None] = mapped_column(Integer)  # the alignment run that made it
    created_at: Mapped[datetime] = _created_at()


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (CheckConstraint(_in("canary_arm", CANARY_ARMS), name="canary_arm"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    persona_id: Mapped[str] = mapped_column(String(200))
    persona_hash: Mapped[str] = mapped_column(String(128))
    title: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    # The A/B arm it was given when created during a canary (see store/canary.py);
    # NULL for one started with no canary running. Never changes afterwards.
    canary_id: Mapped[int | None] = mapped_column(ForeignKey("canaries.id"), index=True)
    canary_arm: Mapped[str | None] = mapped_column(String(20))


class Message(Base):
    """One chat message; ``parent_id`` makes retries and edits siblings."""

    __tablename__ = "messages"
    __table_args__ = (CheckConstraint(_in("role", MESSAGE_ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id"), index=True
    )
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), index=True)
    role: Mapped[str] = mapped_column(String(20))
    content: Mapped[str] = mapped_column(Text)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    generation_params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The exact chat messages ({role, content}) the model was given: the
    # context that training data is rebuilt from.
    prompt: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    first_token_ms: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(20))
    # The persona version that produced the message (copied from the
    # conversation when written; nullable only for rows older than 0002).
    persona_id: Mapped[str | None] = mapped_column(String(200))
    persona_hash: Mapped[str | None] = mapped_column(String(128))
    # What persona knowledge added to this reply's prompt and why: lorebook
    # entries with the key that fired them, retrieved document chunks with
    # their scores (chatbot/knowledge). Null when nothing was added.
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = _created_at()


class Feedback(Base):
    """A user's current vote on an assistant message (NULL: vote cleared)."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("message_id", "user_id"),
        CheckConstraint(_in("rating", RATINGS), name="rating"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    rating: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(200))  # preset tags, comma-separated
    comment: Mapped[str | None] = mapped_column(Text)
    # Cast by `persona-studio simulate` following a declared rule, not by a person.
    simulated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class FeedbackEvent(Base):
    """One change to a vote (cast, changed, cleared, reason or comment edited); append-only."""

    __tablename__ = "feedback_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feedback_id: Mapped[int] = mapped_column(ForeignKey("feedback.id"), index=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    rating: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(200))
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class AlignmentRun(Base):
    """One reward / PPO / KTO job over the feedback store."""

    __tablename__ = "alignment_runs"
    __table_args__ = (CheckConstraint(_in("status", RUN_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    persona_id: Mapped[str | None] = mapped_column(String(200))
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    dataset_hash: Mapped[str | None] = mapped_column(String(64))
    dataset_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="queued", server_default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    output_dir: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class Promotion(Base):
    """One promote or rollback of the version serving a persona; append-only.

    Replaying a persona's rows in id order as a stack (promote pushes its
    version, rollback pops) gives what serves it; see ``store/versions.py``.
    A rollback row names the version it took off.
    """

    __tablename__ = "promotions"
    __table_args__ = (
        CheckConstraint(_in("action", PROMOTION_ACTIONS), name="action"),
        # A forced promotion (past a failed or missing gate) must say why.
        CheckConstraint("NOT forced OR reason IS NOT NULL", name="forced_reason"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    persona_id: Mapped[str] = mapped_column(String(200), index=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    action: Mapped[str] = mapped_column(String(20))
    forced: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    reason: Mapped[str | None] = mapped_column(Text)
    gate: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the gate result as it was when promoted
    by: Mapped[str] = mapped_column(String(200))  # who: the OS user or `--by`
    created_at: Mapped[datetime] = _created_at()
    # The version's A/B on people's thumbs (a canary's figures) as they were when promoted.
    ab: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Canary(Base):
    """An A/B of a candidate version against what serves a persona, on new conversations' thumbs.

    While it runs (``ended_at`` NULL; at most one per persona) each new
    conversation of the persona is assigned an arm (``conversations.canary_arm``)
    and keeps it; see ``store/canary.py``.
    """

    __tablename__ = "canaries"
    __table_args__ = (
        CheckConstraint("share > 0 AND share < 1", name="share"),
        CheckConstraint("min_votes >= 1", name="min_votes"),
        CheckConstraint("ended_at IS NULL OR outcome IS NOT NULL", name="ended_outcome"),
        Index("uq_canaries_running", "persona_id", unique=True,
              sqlite_where=text("ended_at IS NULL"), postgresql_where=text("ended_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    persona_id: Mapped[str] = mapped_column(String(200), index=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    # What served the persona when it started; NULL: its persona file's adapter (or the base model).
    control_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    share: Mapped[float] = mapped_column(Float)  # of new conversations given to the candidate
    min_votes: Mapped[int] = mapped_column(Integer)  # per arm, before any decision
    # Whether simulated votes count in its decisions (auto-rollback, promotion): demos and tests.
    include_simulated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    started_by: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = _created_at()
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_by: Mapped[str | None] = mapped_column(String(200))  # a name, or "auto"
    outcome: Mapped[str | None] = mapped_column(Text)  # why it ended, one line
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # its figures when it ended


class Job(Base):
    """One piece of alignment work asked for in the app or the CLI, done by the worker process.

    ``request`` is what was asked (the job kind's options: recipe values,
    persona, evaluation settings), enough to run it again. A training job
    links its alignment run (``run_id``) once it has one; an evaluation
    links the run it evaluates. At most one job is running at a time
    (``uq_jobs_running``); see ``store/jobs.py``.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        Index("uq_jobs_running", "status", unique=True,
              sqlite_where=text("status = 'running'"), postgresql_where=text("status = 'running'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    persona_id: Mapped[str | None] = mapped_column(String(200))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="queued", server_default="queued", index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    run_id: Mapped[int | None] = mapped_column(ForeignKey("alignment_runs.id"))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    log_path: Mapped[str | None] = mapped_column(String(500))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    requested_by: Mapped[str] = mapped_column(String(200))
    worker: Mapped[str | None] = mapped_column(String(200))  # host:pid of the process running it
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class KnowledgeDocument(Base):
    """A file of a persona's knowledge as last indexed: the hash says whether it changed since.

    ``embedder`` names the model its vectors came from and ``chunker`` the chunk settings; a
    document indexed with others is made again by the next indexing run (chatbot/knowledge/).
    """

    __tablename__ = "knowledge_documents"
    __table_args__ = (UniqueConstraint("persona_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    persona_id: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(String(1000))  # relative to the personas folder, with /
    content_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the file's bytes
    embedder: Mapped[str] = mapped_column(String(200))
    chunker: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(Integer)  # bytes
    chunk_count: Mapped[int] = mapped_column(Integer)
    indexed_at: Mapped[datetime] = _created_at()


class KnowledgeChunk(Base):
    """A piece of a knowledge document with its vector, and where it is in the file (for a citation)."""

    __tablename__ = "knowledge_chunks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("knowledge_documents.id", ondelete="CASCADE"),
                                             index=True)
    ordinal: Mapped[int] = mapped_column(Integer)  # its place in the document
    # Before the text: SQLite reads a row's columns in order, and a search reads only this one.
    embedding: Mapped[Any] = mapped_column(Embedding())
    heading: Mapped[str | None] = mapped_column(Text)
    page: Mapped[int | None] = mapped_column(Integer)  # 1-based, for a PDF
    line_start: Mapped[int] = mapped_column(Integer)
    line_end: Mapped[int] = mapped_column(Integer)
    char_start: Mapped[int] = mapped_column(Integer)
    char_end: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
