"""The chat store: what was said, by which model and persona, and the votes.

``ChatStore.open(url)`` is the entry point; the schema is managed by the
Alembic migrations shipped in ``migrations/`` and applied by ``migrate``.
"""

from chatbot.store.db import StoreError, make_engine, migrate
from chatbot.store.models import (
    Base,
    Conversation,
    Feedback,
    FeedbackEvent,
    Message,
    ModelVersion,
    PersonaVersion,
    User,
)
from chatbot.store.repository import ChatStore, ConversationRecord, FeedbackRecord, MessageRecord

__all__ = [
    "Base",
    "ChatStore",
    "ConversationRecord",
    "FeedbackRecord",
    "Conversation",
    "Feedback",
    "FeedbackEvent",
    "Message",
    "MessageRecord",
    "ModelVersion",
    "PersonaVersion",
    "StoreError",
    "User",
    "make_engine",
    "migrate",
]
