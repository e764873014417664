"""Navigating a conversation stored as a tree of messages.

Retry adds a sibling reply under the same user message; editing a user
message adds a sibling under the same parent. The branch a person sees is a
path from the root (the greeting) to a leaf. Pure functions over the stored
messages: no database, no UI.
"""

from __future__ import annotations

from collections.abc import Sequence

from .store import MessageRecord


def children(messages: Sequence[MessageRecord], parent_id: int | None) -> list[MessageRecord]:
    return [m for m in messages if m.parent_id == parent_id]  # stored order = creation order


def siblings(messages: Sequence[MessageRecord], message_id: int) -> list[MessageRecord]:
    """The message and the others with the same parent, oldest first."""
    by_id = {m.id: m for m in messages}
    return children(messages, by_id[message_id].parent_id)


def newest_leaf(messages: Sequence[MessageRecord], message_id: int) -> int:
    """Follow the newest child down from a message until a leaf."""
    while kids := children(messages, message_id):
        message_id = kids[-1].id
    return message_id


def path_to(messages: Sequence[MessageRecord], leaf_id: int) -> list[MessageRecord]:
    """Root-to-leaf path ending at `leaf_id`."""
    by_id = {m.id: m for m in messages}
    path, current = [], by_id[leaf_id]
    while current is not None:
        path.append(current)
        current = by_id.get(current.parent_id) if current.parent_id is not None else None
    return path[::-1]


def latest_branch(messages: Sequence[MessageRecord]) -> list[MessageRecord]:
    """The branch ending at the most recently written message: where the person left off."""
    return path_to(messages, messages[-1].id) if messages else []


def branch_through(messages: Sequence[MessageRecord], message_id: int) -> list[MessageRecord]:
    """The branch that goes through `message_id` and continues along its newest replies."""
    return path_to(messages, newest_leaf(messages, message_id))
