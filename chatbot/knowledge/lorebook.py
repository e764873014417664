"""Lorebooks: entries of a persona's world that reach the prompt when their keys come up.

The fields are Card V2's `character_book` and SillyTavern's world info, one for
one (chatbot/persona_cards.py maps them both ways):

    lorebook:
      scan_depth: 2          # the last N messages are searched for keys
      token_budget: 512      # all fired entries together; past it, the lowest priority go
      recursive_scanning: false   # fired entries' text may fire other entries
      entries:
        - name: The glade
          keys: [glade, clearing]
          secondary_keys: [night]     # with selective: also one of these (selective_logic)
          selective_logic: and_any    # and_any | and_all | not_any | not_all
          content: The glade is lit by fireflies at night.
          constant: false             # true: always in the prompt, keys or not
          case_sensitive: false
          whole_words: false          # a key must stand as a whole word
          enabled: true
          insertion_order: 100        # lower is placed earlier in the prompt
          priority: 10                # over budget, the lowest priority are left out first
          position: after_char        # before_char | after_char | at_depth
          depth: 4                    # at_depth: how many messages from the end
          role: system                # at_depth: system | user | assistant

`activate()` runs for every reply over the conversation so far and says which
entries fired, on which key, and where their text goes; the chat records that
with the reply (its provenance).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

Position = Literal["before_char", "after_char", "at_depth"]
Role = Literal["system", "user", "assistant"]
SelectiveLogic = Literal["and_any", "and_all", "not_any", "not_all"]
DEFAULT_SCAN_DEPTH = 2  # SillyTavern's default
DEFAULT_TOKEN_BUDGET = 512
DEFAULT_DEPTH = 4  # SillyTavern's default for an entry placed at a depth
MAX_RECURSION = 8  # passes of recursive scanning: entries firing entries stop after this many


class LoreEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[str] = Field(default_factory=list)
    content: str = ""
    name: str = ""  # for people (a card's `name`/`comment`); never sent to the model
    comment: str = ""
    id: int | None = None
    secondary_keys: list[str] = Field(default_factory=list)
    selective: bool = True  # the secondary keys count (SillyTavern: every entry is selective)
    selective_logic: SelectiveLogic = "and_any"
    constant: bool = False
    case_sensitive: bool = False
    whole_words: bool = False
    enabled: bool = True
    insertion_order: int = 100
    priority: int = 10
    position: Position = "before_char"
    depth: int = Field(DEFAULT_DEPTH, ge=0, le=1000)
    role: Role = "system"
    scan_depth: int | None = Field(None, ge=0, le=1000)  # this entry's own; None: the book's
    extensions: dict[str, Any] = Field(default_factory=dict)  # imported fields with no equivalent

    @field_validator("keys", "secondary_keys")
    @classmethod
    def _no_empty_keys(cls, value):
        if any(not key.strip() for key in value):
            raise ValueError("keys must not be empty")
        return value

    @property
    def label(self) -> str:
        """How people know the entry: its name, its comment, or its first key."""
        return self.name or self.comment or (self.keys[0] if self.keys else "(no keys)")


class Lorebook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    description: str = ""
    scan_depth: int = Field(DEFAULT_SCAN_DEPTH, ge=0, le=1000)
    token_budget: int = Field(DEFAULT_TOKEN_BUDGET, ge=1, le=100_000)
    recursive_scanning: bool = False
    entries: list[LoreEntry] = Field(default_factory=list)
    extensions: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Fired:
    """One entry that fired: why (its key, or None for a constant one) and what it adds."""

    index: int  # in the book's entries
    label: str
    key: str | None
    content: str
    tokens: int
    position: Position
    depth: int
    role: Role

    @property
    def place(self) -> str:
        """Where the entry goes: its position, and for at_depth the depth and role (`at_depth 2 (user)`)."""
        return f"{self.position} {self.depth} ({self.role})" if self.position == "at_depth" else self.position

    def provenance(self) -> dict[str, Any]:
        return {"entry": self.index, "name": self.label, "key": self.key, "position": self.position,
                **({"depth": self.depth, "role": self.role} if self.position == "at_depth" else {}),
                "tokens": self.tokens}


@dataclass(frozen=True)
class Activation:
    """What a lorebook adds to one prompt."""

    fired: list[Fired] = field(default_factory=list)  # in the prompt, in insertion order
    over_budget: list[Fired] = field(default_factory=list)  # fired, but left out for the token budget

    def text(self, position: Position) -> str:
        return "\n".join(f.content for f in self.fired if f.position == position)

    def at_depth(self) -> list[tuple[int, Role, str]]:
        """(depth, role, text) of the entries placed in the chat: one message per depth and role."""
        groups: dict[tuple[int, Role], list[str]] = {}
        for f in self.fired:
            if f.position == "at_depth":
                groups.setdefault((f.depth, f.role), []).append(f.content)
        return [(depth, role, "\n".join(texts)) for (depth, role), texts in sorted(groups.items())]

    def provenance(self) -> list[dict[str, Any]]:
        return [f.provenance() for f in self.fired] + \
            [{**f.provenance(), "left_out": "token budget"} for f in self.over_budget]


def _matcher(key: str, entry: LoreEntry) -> Callable[[str], bool]:
    """Whether `key` occurs in a text, with the entry's case and whole-word settings.

    Plain text matching, never a regular expression: keys come from imported
    cards, and a crafted pattern could stall every reply (SillyTavern's
    `/regex/` keys are kept as text).
    """
    flags = 0 if entry.case_sensitive else re.IGNORECASE
    if entry.whole_words and len(key.split()) == 1:
        # A word bounded by non-word characters or the ends, as SillyTavern does (so "cat" is not in "concat").
        pattern = re.compile(rf"(?:^|\W){re.escape(key)}(?:$|\W)", flags)
    else:
        pattern = re.compile(re.escape(key), flags)
    return lambda text: pattern.search(text) is not None


def _first_key(keys: Sequence[str], entry: LoreEntry, text: str, expand: Callable[[str], str]) -> str | None:
    for key in keys:
        key = expand(key).strip()
        if key and _matcher(key, entry)(text):
            return key
    return None


def _secondary_ok(entry: LoreEntry, text: str, expand: Callable[[str], str]) -> bool:
    """SillyTavern's selective logic over the secondary keys (no secondary keys: nothing to check)."""
    keys = [expand(k).strip() for k in entry.secondary_keys]
    keys = [k for k in keys if k]
    if not (entry.selective and keys):
        return True
    found = [_matcher(k, entry)(text) for k in keys]
    return {"and_any": any(found), "and_all": all(found),
            "not_any": not any(found), "not_all": not all(found)}[entry.selective_logic]


def _scan_text(messages: Sequence[dict], depth: int) -> str:
    return "\n".join(m["content"] for m in messages[len(messages) - depth:]) if depth > 0 else ""


def activate(book: Lorebook, messages: Sequence[dict], count_tokens: Callable[[str], int],
             expand: Callable[[str], str] = lambda text: text) -> Activation:
    """The entries of `book` that fire for a conversation ending with `messages` (newest last).

    A constant entry always fires; any other when one of its keys is in the
    last `scan_depth` messages (its own scan depth, if set) and its secondary
    keys agree. With recursive scanning, fired entries' text is searched too,
    for up to MAX_RECURSION passes. Then the budget: by priority (highest first,
    then insertion order) the entries' tokens are added up, and those past
    `token_budget` are left out. `expand` fills in {{char}}/{{user}} in keys and text.
    """
    candidates = [(i, e) for i, e in enumerate(book.entries) if e.enabled and e.content.strip()]
    fired: dict[int, str | None] = {}
    extra_text = ""  # fired entries' text, for recursive scanning
    for _ in range(MAX_RECURSION if book.recursive_scanning else 1):
        new = {}
        for i, entry in candidates:
            if i in fired:
                continue
            if entry.constant:
                new[i] = None
                continue
            text = _scan_text(messages, book.scan_depth if entry.scan_depth is None else entry.scan_depth)
            text = f"{text}\n{extra_text}" if extra_text else text
            key = _first_key(entry.keys, entry, text, expand)
            if key is not None and _secondary_ok(entry, text, expand):
                new[i] = key
        if not new:
            break
        fired.update(new)
        extra_text = "\n".join([extra_text, *(expand(book.entries[i].content) for i in new)]).strip()

    ranked = sorted(fired, key=lambda i: (-book.entries[i].priority, -book.entries[i].insertion_order, i))
    kept, over, used = [], [], 0
    for i in ranked:
        entry = book.entries[i]
        content = expand(entry.content).strip()
        item = Fired(i, entry.label, fired[i], content, count_tokens(content), entry.position, entry.depth,
                     entry.role)
        if used + item.tokens > book.token_budget:
            over.append(item)
            continue
        used += item.tokens
        kept.append(item)
    kept.sort(key=lambda f: (book.entries[f.index].insertion_order, f.index))
    return Activation(kept, over)
