"""The chat store: what was said, by which model and persona, and the votes.

``ChatStore.open(url)`` is the entry point; the schema is managed by the
Alembic migrations shipped in ``migrations/`` and applied by ``migrate``.
"""

from chatbot.store.canary import CanaryRecord, CanaryRefused, CanaryStats
from chatbot.store.db import StoreError, make_engine, migrate
from chatbot.store.models import (
    ApiKey,
    Base,
    Canary,
    Conversation,
    Feedback,
    FeedbackEvent,
    Message,
    ModelVersion,
    PersonaVersion,
    Promotion,
    User,
)
from chatbot.store.repository import ChatStore, ConversationRecord, FeedbackRecord, MessageRecord
from chatbot.store.versions import ModelVersionRecord, PromotionChange, PromotionRecord, PromotionRefused

__all__ = [
    "ApiKey",
    "Base",
    "Canary",
    "CanaryRecord",
    "CanaryRefused",
    "CanaryStats",
    "ChatStore",
    "ConversationRecord",
    "FeedbackRecord",
    "Conversation",
    "Feedback",
    "FeedbackEvent",
    "Message",
    "MessageRecord",
    "ModelVersion",
    "ModelVersionRecord",
    "PersonaVersion",
    "Promotion",
    "PromotionChange",
    "PromotionRecord",
    "PromotionRefused",
    "StoreError",
    "User",
    "make_engine",
    "migrate",
]
