"""Feedback -> training data and statistics.

Three export formats, one row per line (JSON Lines):

- ``jsonl``: every current vote with everything known about it: the reply,
  the exact prompt it answered, persona id and version, model version,
  generation settings, rating, reason, comment, user and times.
- ``kto``: TRL's unpaired format, ``{"prompt": [...], "completion": [...],
  "label": bool}``, one row per reply whose votes add up to a like or a dislike.
- ``preference``: TRL's conversational pairs, ``{"prompt": [...], "chosen":
  [...], "rejected": [...]}``, from liked and disliked replies to the
  identical prompt (regenerations are exactly that), every liked x disliked
  combination within a context.

Replies are labelled by the sum of their current votes (ties and cleared
votes give no label), so one user's change of mind is taken into account.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .store.repository import MessageRecord, VoteRow

FORMATS = ("jsonl", "preference", "kto")


def _json_ready(value):
    return value.isoformat() if hasattr(value, "isoformat") else value


def jsonl_rows(votes: Iterable[VoteRow]) -> Iterator[dict]:
    for vote in votes:
        message = {k: _json_ready(v) for k, v in asdict(vote.message).items()}
        yield {
            "message_id": vote.message.id,
            "conversation_id": vote.message.conversation_id,
            "persona_id": vote.message.persona_id,
            "persona_version": vote.message.persona_hash,
            "model_version_id": vote.message.model_version_id,
            "base_model": vote.base_model,
            "adapter_path": vote.adapter_path,
            "prompt": vote.message.prompt,
            "completion": vote.message.content,
            "rating": vote.feedback.rating,
            "reason": vote.feedback.reason,
            "comment": vote.feedback.comment,
            "simulated": vote.feedback.simulated,
            "user": vote.user_name,
            "voted_at": _json_ready(vote.feedback.updated_at),
            "message": message,
        }


@dataclass(frozen=True)
class LabelledReply:
    message: MessageRecord
    liked: bool


def labelled_replies(votes: Iterable[VoteRow]) -> list[LabelledReply]:
    """Replies whose current votes sum to a like (> 0) or a dislike (< 0); replies with no prompt
    (greetings) are skipped, as nothing was generated for them."""
    totals: dict[int, int] = defaultdict(int)
    messages: dict[int, MessageRecord] = {}
    for vote in votes:
        if vote.message.prompt and vote.feedback.rating:
            totals[vote.message.id] += vote.feedback.rating
            messages[vote.message.id] = vote.message
    return [LabelledReply(messages[i], total > 0) for i, total in totals.items() if total]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def kto_rows(votes: Iterable[VoteRow]) -> Iterator[dict]:
    for reply in labelled_replies(votes):
        yield {"prompt": reply.message.prompt, "completion": _assistant(reply.message.content),
               "label": reply.liked}


def context_key(prompt: list[dict]) -> str:
    """Two replies share a context when they answered the identical prompt."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def preference_rows(votes: Iterable[VoteRow]) -> Iterator[dict]:
    by_context: dict[str, list[LabelledReply]] = defaultdict(list)
    for reply in labelled_replies(votes):
        by_context[context_key(reply.message.prompt)].append(reply)
    for replies in by_context.values():
        liked = [r.message for r in replies if r.liked]
        disliked = [r.message for r in replies if not r.liked]
        for chosen in liked:
            for rejected in disliked:
                yield {"prompt": chosen.prompt, "chosen": _assistant(chosen.content),
                       "rejected": _assistant(rejected.content)}


def export_rows(votes: list[VoteRow], fmt: str) -> Iterator[dict]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    return {"jsonl": jsonl_rows, "preference": preference_rows, "kto": kto_rows}[fmt](votes)


@dataclass(frozen=True)
class LikeRate:
    persona_id: str | None
    model: str  # model_label: version id, base model, plus "+ adapter" when one served the reply
    likes: int
    dislikes: int

    @property
    def rate(self) -> float | None:
        rated = self.likes + self.dislikes
        return self.likes / rated if rated else None


def model_label(vote: VoteRow) -> str:
    """"v7: <base> + <adapter>": the version id (what `models list` shows) and what it is.

    A job's adapter folder is ``<run folder>/adapter``, so the run folder's
    name stands for it.
    """
    if vote.base_model is None:
        return "(greeting)"
    label = f"v{vote.message.model_version_id}: {vote.base_model}"
    if vote.adapter_path:
        path = Path(vote.adapter_path)
        label += f" + {path.parent.name if path.name == 'adapter' else vote.adapter_path}"
    return label


def like_rates(votes: Iterable[VoteRow]) -> list[LikeRate]:
    """Current likes and dislikes per persona and model version."""
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for vote in votes:
        if vote.feedback.rating:
            key = (vote.message.persona_id, model_label(vote))
            counts[key][0 if vote.feedback.rating > 0 else 1] += 1
    return [LikeRate(p, m, likes, dislikes) for (p, m), (likes, dislikes) in sorted(counts.items(),
                                                                                     key=lambda kv: str(kv[0]))]


def daily_like_rates(votes: Iterable[VoteRow], group: str = "persona") -> list[dict]:
    """Rows {day, group, likes, dislikes, like_rate} per day and persona (or model), for plots."""
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for vote in votes:
        if vote.feedback.rating:
            label = vote.message.persona_id if group == "persona" else model_label(vote)
            day = vote.feedback.updated_at.date().isoformat()
            counts[(day, label)][0 if vote.feedback.rating > 0 else 1] += 1
    return [{"day": day, "group": label, "likes": likes, "dislikes": dislikes,
             "like_rate": likes / (likes + dislikes)}
            for (day, label), (likes, dislikes) in sorted(counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))]
