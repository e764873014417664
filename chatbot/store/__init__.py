"""The chat store: what was said, by which model and persona, and the votes.

``ChatStore.open(url)`` is the entry point; the schema is managed by the
Alembic migrations shipped in ``migrations/`` and applied by ``migrate``.
``AccountStore`` (accounts.py), ``RunStore`` (runs.py) and ``JobQueue``
(jobs.py) share its engine; all derive from ``StoreBase`` (base.py), and all
raise ``NotFound`` (errors.py) for a row that does not exist.

Modules, lowest first (each imports only those before it): db, models,
errors, base; versions; canary; promotions; runs, jobs, accounts, repository.
"""

from chatbot.store.accounts import AccountStore
from chatbot.store.base import DetachedRow, StoreBase
from chatbot.store.canary import CanaryRecord, CanaryRefused, CanaryStats
from chatbot.store.db import StoreError, make_engine, migrate
from chatbot.store.errors import NotFound
from chatbot.store.jobs import JobQueue, JobRecord
from chatbot.store.models import (
    ApiKey,
    Base,
    Canary,
    Conversation,
    Feedback,
    FeedbackEvent,
    Job,
    Message,
    ModelVersion,
    PersonaVersion,
    Promotion,
    User,
)
from chatbot.store.repository import ChatStore, ConversationRecord, FeedbackRecord, MessageRecord
from chatbot.store.runs import RunRecord, RunStore
from chatbot.store.versions import ModelVersionRecord, PromotionChange, PromotionRecord, PromotionRefused

__all__ = [
    "AccountStore",
    "ApiKey",
    "Base",
    "Canary",
    "CanaryRecord",
    "CanaryRefused",
    "CanaryStats",
    "ChatStore",
    "Conversation",
    "ConversationRecord",
    "DetachedRow",
    "Feedback",
    "FeedbackEvent",
    "FeedbackRecord",
    "Job",
    "JobQueue",
    "JobRecord",
    "Message",
    "MessageRecord",
    "ModelVersion",
    "ModelVersionRecord",
    "NotFound",
    "PersonaVersion",
    "Promotion",
    "PromotionChange",
    "PromotionRecord",
    "PromotionRefused",
    "RunRecord",
    "RunStore",
    "StoreBase",
    "StoreError",
    "User",
    "make_engine",
    "migrate",
]
