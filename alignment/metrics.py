"""Reward-model metrics computed per pair, never per batch.

TRL's ``eval_accuracy`` is a mean of batch means: 17 pairs in batches of
8/8/1 weight the last pair like eight others.
Everything here works on one score per reply, so the batch size used to
compute the scores cannot change the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Replies within 10 % (or 2 tokens) of each other's length count as length-matched.
LENGTH_MATCH_TOLERANCE = 0.1


def _check_paired(chosen: Sequence[float], rejected: Sequence[float]) -> None:
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen scores but {len(rejected)} rejected scores")
    if not chosen:
        raise ValueError("no pairs to measure")


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Fraction of pairs where the chosen reply scores strictly higher."""
    _check_paired(chosen, rejected)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)


def mean_margin(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Mean of chosen minus rejected score over pairs."""
    _check_paired(chosen, rejected)
    return sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of ``scores`` against 0/1 ``labels``.

    Rank-based (Mann-Whitney U): the probability that a random positive
    outscores a random negative, ties counting half. Raises ValueError when
    one class is absent, where the AUC is undefined.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    positives = sum(1 for label in labels if label)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"ROC-AUC needs both classes: {positives} positive, {negatives} negative")
    # Average ranks (1-based) so tied scores share their rank.
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        average = (start + end) / 2 + 1
        for position in range(start, end + 1):
            ranks[order[position]] = average
        start = end + 1
    positive_rank_sum = sum(rank for rank, label in zip(ranks, labels) if label)
    u = positive_rank_sum - positives * (positives + 1) / 2
    return u / (positives * negatives)


def longer_reply_accuracy(chosen_lengths: Sequence[int], rejected_lengths: Sequence[int]) -> float:
    """Accuracy of the baseline "prefer the longer reply"; equal lengths count half."""
    _check_paired(chosen_lengths, rejected_lengths)
    total = sum(
        1.0 if c > r else 0.5 if c == r else 0.0
        for c, r in zip(chosen_lengths, rejected_lengths)
    )
    return total / len(chosen_lengths)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None with fewer than two points or when either side is constant."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5


@dataclass(frozen=True)
class Reply:
    """One side of an eval pair as the shortcut report sees it."""

    key: Any  # the same reply in several pairs has one key
    score: float
    tokens: int
    eos: bool | None  # ended on its own; None: not recorded


def length_matched(a: int, b: int, tolerance: float = LENGTH_MATCH_TOLERANCE) -> bool:
    """Are two replies about as long: within ``tolerance`` of the longer, or 2 tokens?"""
    return abs(a - b) <= max(2, tolerance * max(a, b))


def reward_report(
    chosen: Sequence[float],
    rejected: Sequence[float],
    chosen_lengths: Sequence[int],
    rejected_lengths: Sequence[int],
) -> dict[str, float]:
    """The eval-split report of a reward model: one dict, JSON-ready."""
    return {
        "eval_pairs": len(chosen),
        "pairwise_accuracy": pairwise_accuracy(chosen, rejected),
        "mean_margin": mean_margin(chosen, rejected),
        "roc_auc": roc_auc(list(chosen) + list(rejected), [1] * len(chosen) + [0] * len(rejected)),
        "longer_reply_accuracy": longer_reply_accuracy(chosen_lengths, rejected_lengths),
    }


def shortcut_report(pairs: Sequence[tuple[Reply, Reply]]) -> dict[str, float | int | None]:
    """What a reward model learned besides the label, from its eval pairs (chosen, rejected).

    A reward model that ranks by length teaches PPO to write shorter or
    longer replies whatever the raters meant:

    - ``length_matched_accuracy``: pairwise accuracy on the pairs whose replies
      are about as long (``length_matched``), where length cannot decide;
    - ``score_label_corr`` next to ``score_length_corr`` and ``score_eos_corr``:
      how much the scores follow the thumbs, the length in tokens and whether
      the reply ended on its own, over the distinct replies of the pairs (a
      reply in several pairs counts once); ``label_length_corr`` says how much
      the thumbs themselves follow length in this data.
    """
    matched = [pair for pair in pairs if length_matched(pair[0].tokens, pair[1].tokens)]
    replies = {r.key: (r, label) for pair in pairs for r, label in zip(pair, (1.0, 0.0))}.values()
    scores = [r.score for r, _ in replies]
    labels = [label for _, label in replies]
    lengths = [float(r.tokens) for r, _ in replies]
    ended = [(r.score, float(r.eos)) for r, _ in replies if r.eos is not None]
    return {
        "length_matched_pairs": len(matched),
        "length_matched_accuracy": (sum(c.score > r.score for c, r in matched) / len(matched)) if matched else None,
        "eval_replies": len(scores),
        "score_label_corr": pearson(scores, labels),
        "score_length_corr": pearson(scores, lengths),
        "score_eos_corr": pearson(*zip(*ended)) if len(ended) == len(scores) else None,
        "label_length_corr": pearson(labels, lengths),
    }
