"""Reward-model metrics computed per pair, never per batch.

TRL's ``eval_accuracy`` is a mean of batch means: 17 pairs in batches of
8/8/1 weight the last pair like eight others (DESIGN.md, "Alignment").
Everything here works on one score per reply, so the batch size used to
compute the scores cannot change the result.
"""

from __future__ import annotations

from collections.abc import Sequence


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
