"""Persona + history -> chat-template messages that fit the context window.

The tokenizer's chat template is the only prompt format: nothing here knows
what a model's special tokens look like. When the conversation is too long,
whole turns are dropped from the oldest end; the system prompt never is.
"""

from __future__ import annotations

from typing import Callable, Sequence

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


class PromptTooLong(Exception):
    """Even the system prompt and the newest message alone do not fit."""


def build_messages(system_prompt: str, history: Sequence[Message]) -> list[Message]:
    """System prompt first, then the conversation (greeting included) in order."""
    return [{"role": "system", "content": system_prompt}] + [
        {"role": m["role"], "content": m["content"]} for m in history
    ]


def fit_to_context(
    messages: list[Message],
    count_tokens: Callable[[list[Message]], int],
    context_tokens: int,
    reply_tokens: int,
) -> list[Message]:
    """Drop the oldest turns after the system prompt until prompt + reply budget fit.

    `messages[0]` is the system prompt and `messages[-1]` the message being
    answered; both are always kept. Turns are dropped one message at a time
    from the front, and a leading assistant message (a greeting or an answer
    whose question was dropped) goes with them, so the kept history starts
    with a user turn.
    """
    budget = context_tokens - reply_tokens
    if budget <= 0:
        raise PromptTooLong(
            f"the reply budget ({reply_tokens} tokens) leaves no room in the "
            f"{context_tokens}-token context; lower max_new_tokens")
    system, history = messages[:1], list(messages[1:])
    while True:
        candidate = system + history
        used = count_tokens(candidate)
        if used <= budget:
            return candidate
        if len(history) <= 1:
            raise PromptTooLong(
                f"the message is too long: with the system prompt it takes {used} tokens, "
                f"and only {budget} fit beside a {reply_tokens}-token reply; shorten it")
        history.pop(0)
        while len(history) > 1 and history[0]["role"] != "user":
            history.pop(0)
