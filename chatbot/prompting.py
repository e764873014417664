"""Persona + history -> chat-template messages that fit the context window.

The tokenizer's chat template is the only prompt format: nothing here knows
what a model's special tokens look like. The message list is

    system prompt, example chats, the conversation (greeting first), with
    post-history instructions added to the last message and notes placed at a
    depth (a persona's depth prompt, lorebook entries) inside the conversation

When it is too long, whole turns are dropped from the oldest end of the
conversation; the system prompt, the examples and the message being
answered never are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class Prompt:
    """Messages for the chat template; the first `head` and last `tail` are never dropped."""

    messages: list[Message]
    head: int = 1
    tail: int = 1
    provenance: dict[str, Any] | None = None  # what persona knowledge added, and why (stored with the reply)


def estimate_tokens(text: str) -> int:
    """About a token per 4 characters: for a budget where no tokenizer is at hand."""
    return len(text) // 4 + 1


class PromptTooLong(Exception):
    """Even the fixed parts and the newest message alone do not fit."""


def build_prompt(system_prompt: str, history: Sequence[Message], examples: Sequence[Message] = (),
                 post_history: str = "", at_depth: Sequence[tuple[int, str, str]] = (),
                 provenance: dict[str, Any] | None = None) -> Prompt:
    """`history` ends with the message being answered; `post_history` is added to it.

    Post-history instructions ride on the last user message rather than
    being a trailing system message: small chat models (SmolLM2 measured)
    answer a trailing system message instead of the user.
    `at_depth`: (depth, role, text) messages placed `depth` messages before the
    end of the conversation (0: after the newest; deeper than the conversation:
    at its start). They and everything after them are never dropped.
    """
    chat = [{"role": m["role"], "content": m["content"]} for m in history]
    if post_history and chat and chat[-1]["role"] == "user":
        chat[-1] = {"role": "user", "content": f"{chat[-1]['content']}\n\n({post_history})"}
    places = [(len(chat) - min(depth, len(chat)), n, role, text)
              for n, (depth, role, text) in enumerate(at_depth) if text]
    for place, _, role, text in sorted(places, key=lambda p: (-p[0], -p[1])):
        chat.insert(place, {"role": role, "content": text})
    first = min((place for place, *_ in places), default=len(chat) - 1)  # the first message placed
    messages = [{"role": "system", "content": system_prompt}, *examples, *chat]
    return Prompt(messages, head=1 + len(examples), tail=max(1, len(chat) - first), provenance=provenance)


def fit_to_context(
    prompt: Prompt,
    count_tokens: Callable[[list[Message]], int],
    context_tokens: int,
    reply_tokens: int,
) -> list[Message]:
    """Drop the oldest conversation turns until prompt + reply budget fit.

    The pinned head (system prompt, examples) and tail (the message being
    answered) are always kept.
    Turns are dropped one message at a time from the oldest end, and a leading
    assistant message (a greeting, or an answer whose question was dropped)
    goes with them, so the kept conversation starts with a user turn.
    """
    budget = context_tokens - reply_tokens
    if budget <= 0:
        raise PromptTooLong(
            f"the reply budget ({reply_tokens} tokens) leaves no room in the "
            f"{context_tokens}-token context; lower max_new_tokens")
    messages, tail = prompt.messages, prompt.tail
    head = min(prompt.head, max(len(messages) - tail, 0))  # a lone message is the tail, not also the head
    pinned_head, middle, pinned_tail = messages[:head], messages[head:-tail], messages[-tail:]
    checked_pinned = False
    while True:
        candidate = pinned_head + middle + pinned_tail
        used = count_tokens(candidate)
        if used <= budget:
            return candidate
        if middle and not checked_pinned:
            # When even the pinned parts do not fit, dropping turns one at a time (counting the
            # whole prompt again each time) cannot help: refuse after one count, not one per turn.
            checked_pinned = True
            pinned = count_tokens(pinned_head + pinned_tail)
            if pinned > budget:
                used, middle = pinned, []
        if not middle:
            raise PromptTooLong(
                f"the message is too long: with the persona's prompt it takes {used} tokens, "
                f"and only {budget} fit beside a {reply_tokens}-token reply; shorten it")
        middle.pop(0)
        while middle and middle[0]["role"] != "user":
            middle.pop(0)
