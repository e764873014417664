"""Training data for alignment jobs, built from the feedback store.

Three datasets, rows as plain dicts in TRL's conversational format:

- preference (reward model): ``{"prompt": [...], "chosen": [assistant], "rejected": [assistant]}``
  from a liked and a disliked reply to the identical prompt. Regenerations
  (siblings: same parent message) come first, ``source="regeneration"``; pairs
  across conversations that happen to share a prompt follow, ``source="same_prompt"``.
- kto: ``{"prompt": [...], "completion": [assistant], "label": bool}``, one per labelled reply.
- prompts (PPO): ``{"prompt": [...]}``, each distinct prompt that a rated reply answered.

Rows also carry ids (``conversation_id``, message ids, ``source``) so a run can
be traced back; ``to_trl(rows)`` strips them to TRL's columns.

Replies are labelled by ``chatbot.feedback_export.labelled_replies`` (sum of
current votes), so the export command and the jobs agree on every label.

Train/eval are split by conversation or by time, never by row. Conversations
that share an identical prompt are kept together (one "group"), so no prompt
is both trained on and held out. By conversation, a group goes to eval when a
hash of (seed, group) falls under ``eval_fraction``: a group never changes side
as more data arrives. By time, the newest groups (by when their first rated
reply was written) are held out.

The rest is split again, by conversation group, into two parts (``part``):
the judge part (JUDGE_FRACTION of the groups, by a hash with a fixed salt)
and the policy part. A policy and the reward model it is optimised against
train on the policy part; a reward model that judges their candidates trains
on the judge part, so it has never seen a conversation they learned from
(``align evaluate`` checks this from the runs' train_prompts.json).

Every split carries ``snapshot_hash``: sha256 of the canonical JSON of its rows
and their side, stable across runs and changed by any vote that changes a label.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from chatbot.feedback_export import LabelledReply, context_key, labelled_replies
from chatbot.store import ChatStore
from chatbot.store.repository import MessageRecord, VoteRow

SPLITS = ("conversation", "time")
# Conversation-level parts of the feedback: the policy side (a policy and the reward model it is
# optimised against) and the judge side (a reward model that judges their candidates), never both.
PARTS = ("all", "policy", "judge")
JUDGE_FRACTION = 0.25
JUDGE_SALT = "judge-part"
TRL_COLUMNS = {
    "preference": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "prompts": ("prompt",),
}
# Whether each reply of a pair ended on its own (EOS) rather than at the length cap or a
# Stop press (None: not recorded): the reward job reports how much its scores follow it.
DIAGNOSTIC_COLUMNS = {"preference": ("chosen_eos", "rejected_eos")}
UNITS = {"preference": "pairs", "kto": "labelled replies", "prompts": "prompts"}
HINTS = {
    "preference": "pairs need a liked and a disliked reply to the same prompt: press Retry and vote on "
                  "both versions (or, for demos only, `persona-studio simulate`)",
    "kto": "vote on more replies (or, for demos only, `persona-studio simulate`)",
    "prompts": "rate replies to more distinct prompts",
}
SOURCE_ORDER = {"regeneration": 0, "same_prompt": 1}


class DataTooSmall(Exception):
    """Too few rows for a recipe; the message names the counts, the persona and the minimum."""

    def __init__(self, message: str, *, kind: str, persona: str | None, train: int, eval: int,
                 min_train: int, min_eval: int):
        super().__init__(message)
        self.kind, self.persona = kind, persona
        self.train, self.eval, self.min_train, self.min_eval = train, eval, min_train, min_eval


@dataclass(frozen=True)
class Split:
    """One dataset, split into train and eval rows, with counts and a snapshot hash."""

    kind: str  # "preference", "kto" or "prompts"
    train: tuple[dict, ...]
    eval: tuple[dict, ...]
    stats: dict[str, Any] = field(hash=False)
    snapshot_hash: str = ""

    @property
    def persona(self) -> str | None:
        return self.stats.get("persona")

    def trl(self, part: str = "train") -> list[dict]:
        """The train or eval rows with TRL's columns only; eval rows also keep the
        diagnostic columns a job reports on (DIAGNOSTIC_COLUMNS), which no trainer sees."""
        extra = DIAGNOSTIC_COLUMNS.get(self.kind, ()) if part == "eval" else ()
        return to_trl(getattr(self, part), self.kind, extra)

    def require(self, min_train: int, min_eval: int = 0) -> Split:
        return require(self, min_train, min_eval)


def to_trl(rows: Iterable[dict], kind: str, extra: Sequence[str] = ()) -> list[dict]:
    columns = (*TRL_COLUMNS[kind], *extra)
    return [{c: row[c] for c in columns if c in row} for row in rows]


def require(split: Split, min_train: int, min_eval: int = 0) -> Split:
    """The split itself if it has enough rows; otherwise DataTooSmall saying what is missing."""
    train, eval_ = len(split.train), len(split.eval)
    if train >= min_train and eval_ >= min_eval:
        return split
    unit = UNITS[split.kind]
    persona = split.persona
    who = f"persona {persona}" if persona else "all personas"
    filters = "".join(f", {name} {split.stats[key]}" for name, key in
                      (("since", "since"), ("model version", "model_version")) if split.stats.get(key))
    needs = f"at least {min_train + min_eval}" + (f" ({min_train} train, {min_eval} eval)" if min_eval else "")
    part, other = split.stats.get("part", "all"), split.stats.get("other_part", 0)
    where = "" if part == "all" else (f", {other} in the {'judge' if part == 'policy' else 'policy'} part: "
                                      f"{part} jobs train on the {part} part only")
    message = (f"{train + eval_ + other} {unit} for {who}{filters} ({train} train, {eval_} eval{where}; split by "
               f"{split.stats['split']}), the recipe needs {needs}; {HINTS[split.kind]}")
    raise DataTooSmall(message, kind=split.kind, persona=persona, train=train, eval=eval_,
                       min_train=min_train, min_eval=min_eval)


# -- building -----------------------------------------------------------------


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _votes(store: ChatStore, persona, since, model_version) -> list[VoteRow]:
    return store.feedback_rows(persona, since, model_version)


def _groups(messages: Iterable[MessageRecord]) -> dict[int, int]:
    """conversation id -> group id: conversations sharing a prompt are one group (union-find)."""
    parent: dict[int, int] = {}

    def find(c: int) -> int:
        parent.setdefault(c, c)
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    first_in_context: dict[str, int] = {}
    for m in messages:
        find(m.conversation_id)
        other = first_in_context.setdefault(context_key(m.prompt), m.conversation_id)
        a, b = find(other), find(m.conversation_id)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the group is named after its oldest conversation
    return {c: find(c) for c in parent}


def _hash_fraction(seed: int, group: int) -> float:
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _eval_groups(group_times: dict[int, datetime], split: str, eval_fraction: float, seed: int) -> set[int]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), not {eval_fraction}")
    if split == "conversation":
        return {g for g in group_times if _hash_fraction(seed, g) < eval_fraction}
    newest_first = sorted(group_times, key=lambda g: (group_times[g], g), reverse=True)
    return set(newest_first[:math.floor(len(newest_first) * eval_fraction + 0.5)])


def snapshot_hash(kind: str, train: Sequence[dict], eval_: Sequence[dict]) -> str:
    canonical = json.dumps({"kind": kind, "train": list(train), "eval": list(eval_)},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def in_part(group: int, part: str) -> bool:
    """Is conversation group ``group`` in ``part`` of the feedback (PARTS)?

    The judge part is JUDGE_FRACTION of the groups by a hash with a fixed salt:
    unlike the eval split it does not depend on a recipe's seed, so whatever
    seeds two jobs use, a job trained on the policy part and one trained on
    the judge part never share a conversation.
    """
    if part not in PARTS:
        raise ValueError(f"unknown feedback part {part!r}: use one of {', '.join(PARTS)}")
    if part == "all":
        return True
    return (_hash_fraction(JUDGE_SALT, group) < JUDGE_FRACTION) == (part == "judge")


def _finish(kind: str, rows: list[tuple[int, dict]], group_times: dict[int, datetime], votes: list[VoteRow],
            filters: dict, split: str, eval_fraction: float, seed: int, extra: dict, part: str = "all") -> Split:
    """rows: (group id, row) in their final order. The eval rows are the held-out groups whatever
    ``part`` is; the train rows are the other groups of that part."""
    held_out = _eval_groups(group_times, split, eval_fraction, seed)
    train = tuple(row for g, row in rows if g not in held_out and in_part(g, part))
    other_part = sum(1 for g, _ in rows if g not in held_out) - len(train)
    eval_ = tuple(row for g, row in rows if g in held_out)
    rated = [v for v in votes if v.feedback.rating]
    stats = {
        "kind": kind, **filters, "split": split, "eval_fraction": eval_fraction, "seed": seed, "part": part,
        "votes": len(rated), "simulated_votes": sum(v.feedback.simulated for v in rated),
        "train": len(train), "eval": len(eval_), "other_part": other_part,
        "train_conversations": len({r["conversation_id"] for r in train}),
        "eval_conversations": len({r["conversation_id"] for r in eval_}),
        "groups": len(group_times), "eval_groups": len(held_out), **extra,
    }
    if split == "time" and held_out:
        stats["eval_from"] = min(group_times[g] for g in held_out).isoformat()
    return Split(kind, train, eval_, stats, snapshot_hash(kind, train, eval_))


def _labelled(store, persona, since, model_version):
    votes = _votes(store, persona, since, model_version)
    replies = sorted(labelled_replies(votes), key=lambda r: r.message.id)
    groups = _groups(r.message for r in replies)
    group_times: dict[int, datetime] = {}
    for r in replies:
        g = groups[r.message.conversation_id]
        group_times[g] = min(group_times.get(g, r.message.created_at), r.message.created_at)
    filters = {"persona": persona, "since": since.isoformat() if since else None, "model_version": model_version}
    return votes, replies, groups, group_times, filters


def _ended(message: MessageRecord) -> bool | None:
    """True if the reply ended with EOS, False if cut (length cap, Stop), None if not recorded."""
    return None if message.finish_reason is None else message.finish_reason == "eos"


def _pair_source(chosen: MessageRecord, rejected: MessageRecord) -> str:
    siblings = (chosen.conversation_id == rejected.conversation_id and chosen.parent_id is not None
                and chosen.parent_id == rejected.parent_id)
    return "regeneration" if siblings else "same_prompt"


def build_preference(store: ChatStore, persona: str | None = None, since: datetime | None = None,
                     model_version: int | None = None, split: str = "conversation",
                     eval_fraction: float = 0.2, seed: int = 0, part: str = "all") -> Split:
    """Every liked x disliked pair of replies to the identical prompt; regenerations first."""
    votes, replies, groups, group_times, filters = _labelled(store, persona, since, model_version)
    by_context: dict[str, list[LabelledReply]] = defaultdict(list)
    for r in replies:
        by_context[context_key(r.message.prompt)].append(r)
    pairs = []
    for context_rank, same in enumerate(by_context.values()):  # contexts in order of their first reply
        for chosen in (r.message for r in same if r.liked):
            for rejected in (r.message for r in same if not r.liked):
                source = _pair_source(chosen, rejected)
                # A pair belongs to its chosen reply's conversation; both are in one group anyway.
                row = {"prompt": chosen.prompt, "chosen": _assistant(chosen.content),
                       "rejected": _assistant(rejected.content), "source": source,
                       "conversation_id": chosen.conversation_id, "chosen_id": chosen.id,
                       "rejected_id": rejected.id, "chosen_eos": _ended(chosen),
                       "rejected_eos": _ended(rejected)}
                pairs.append(((SOURCE_ORDER[source], context_rank, chosen.id, rejected.id),
                              groups[chosen.conversation_id], row))
    pairs.sort(key=lambda p: p[0])
    extra = {"labelled_replies": len(replies), "liked": sum(r.liked for r in replies),
             "contexts": len(by_context),
             "contexts_with_pairs": len({context_key(row["prompt"]) for _, _, row in pairs}),
             "regeneration_pairs": sum(row["source"] == "regeneration" for _, _, row in pairs),
             "same_prompt_pairs": sum(row["source"] == "same_prompt" for _, _, row in pairs)}
    return _finish("preference", [(g, row) for _, g, row in pairs], group_times, votes, filters,
                   split, eval_fraction, seed, extra, part)


def build_kto(store: ChatStore, persona: str | None = None, since: datetime | None = None,
              model_version: int | None = None, split: str = "conversation",
              eval_fraction: float = 0.2, seed: int = 0, part: str = "all") -> Split:
    """One row per reply whose current votes add up to a like or a dislike."""
    votes, replies, groups, group_times, filters = _labelled(store, persona, since, model_version)
    rows = [(groups[r.message.conversation_id],
             {"prompt": r.message.prompt, "completion": _assistant(r.message.content), "label": r.liked,
              "conversation_id": r.message.conversation_id, "message_id": r.message.id})
            for r in replies]
    liked = sum(r.liked for r in replies)
    return _finish("kto", rows, group_times, votes, filters, split, eval_fraction, seed,
                   {"liked": liked, "disliked": len(replies) - liked}, part)


def build_prompts(store: ChatStore, persona: str | None = None, since: datetime | None = None,
                  model_version: int | None = None, split: str = "conversation",
                  eval_fraction: float = 0.2, seed: int = 0, part: str = "all") -> Split:
    """Each distinct prompt (the chat messages before a rated reply, without the reply), once."""
    votes = _votes(store, persona, since, model_version)
    rated = sorted({v.message.id: v.message for v in votes if v.feedback.rating and v.message.prompt}.values(),
                   key=lambda m: m.id)
    groups = _groups(rated)
    group_times: dict[int, datetime] = {}
    rows, seen = [], set()
    for m in rated:
        g = groups[m.conversation_id]
        group_times[g] = min(group_times.get(g, m.created_at), m.created_at)
        key = context_key(m.prompt)
        if key not in seen:
            seen.add(key)
            rows.append((g, {"prompt": m.prompt, "conversation_id": m.conversation_id, "message_id": m.id}))
    filters = {"persona": persona, "since": since.isoformat() if since else None, "model_version": model_version}
    return _finish("prompts", rows, group_times, votes, filters, split, eval_fraction, seed,
                   {"rated_replies": len(rated)}, part)


# -- which prompts a job trained on ---------------------------------------------

TRAIN_PROMPTS_FILE = "train_prompts.json"


def prompt_fingerprints(rows: Iterable[dict]) -> list[str]:
    """sha256 hex of ``context_key(row["prompt"])`` for each row, distinct, in first-seen order.

    A job writes these for its train rows to ``<output_dir>/train_prompts.json``
    (``write_train_prompts``) so that an evaluation can drop every held-out
    prompt the judge or the candidate was trained on, whatever split each used.
    """
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(hashlib.sha256(context_key(row["prompt"]).encode("utf-8")).hexdigest())
    return list(seen)


def write_train_prompts(output_dir, rows: Sequence[dict]):
    """Write the prompt fingerprints (``keys``) and conversation ids (``conversations``) of the
    train ``rows`` to ``output_dir/train_prompts.json``; returns the path.

    ``align evaluate`` reads both: the prompts to hold out, the conversations to
    prove a judge independent of the candidate it judges."""
    from pathlib import Path

    path = Path(output_dir) / TRAIN_PROMPTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    conversations = sorted({row["conversation_id"] for row in rows if "conversation_id" in row})
    path.write_text(json.dumps({"keys": prompt_fingerprints(rows), "conversations": conversations}),
                    encoding="utf-8")
    return path
