"""Metrics of an evaluation (alignment/evaluate.py): replies' text statistics and bootstrap CIs.

Text statistics count lowercased whitespace-separated words, so they read
the same whatever the tokenizer:

- distinct-n: unique n-grams / all n-grams over all of a model's replies
  (low = the model says the same things to every prompt);
- repeated 3-gram rate: within each reply, the 3-grams that already occurred
  earlier in that reply, over all replies' 3-grams (high = "Arr! Arr! Arr!").

Confidence intervals resample prompts, not replies: the K samples of one
prompt are not independent, so each bootstrap draw takes whole prompts
(percentile interval, seeded).
"""

from __future__ import annotations

from collections.abc import Sequence

CONFIDENCE = 0.95
RESAMPLES = 2000


def words(text: str) -> list[str]:
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique n-grams / total n-grams over all ``texts``; None when there is no n-gram at all."""
    grams = [gram for text in texts for gram in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_rate(texts: Sequence[str], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same reply (0.0 with no n-grams)."""
    repeated = total = 0
    for text in texts:
        grams = ngrams(words(text), n)
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def group_mean(groups: Sequence[Sequence[float]]) -> float | None:
    """Mean over all values of all groups; None when there are none."""
    count = sum(len(g) for g in groups)
    return sum(sum(g) for g in groups) / count if count else None


def bootstrap_ci(groups: Sequence[Sequence[float]], resamples: int = RESAMPLES, seed: int = 0,
                 confidence: float = CONFIDENCE) -> list[float] | None:
    """Percentile CI of the mean of all values, resampling whole groups (prompts) with replacement.

    ``groups[i]`` are the values measured on prompt i (one per sample).
    None when there is no value at all.
    """
    import numpy as np

    groups = [g for g in groups if len(g)]
    if not groups:
        return None
    sums = np.array([float(sum(g)) for g in groups])
    counts = np.array([len(g) for g in groups])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(resamples, len(groups)))  # (R, prompts)
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)  # (R,)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return [float(low), float(high)]


def win_outcomes(candidate: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per comparison: 1 if the candidate scored higher, 0.5 on a tie, 0 if lower."""
    if len(candidate) != len(baseline):
        raise ValueError(f"{len(candidate)} candidate scores but {len(baseline)} baseline scores")
    return [1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline, strict=True)]


def win_rate(candidate: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
             resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Win rate of candidate over baseline per (prompt, sample), with a CI resampling prompts.

    ``candidate[i][k]`` and ``baseline[i][k]`` are the rewards of sample k of
    prompt i (generated with the same seed).
    """
    outcomes = [win_outcomes(c, b) for c, b in zip(candidate, baseline, strict=True)]
    flat = [o for group in outcomes for o in group]
    return {
        "value": group_mean(outcomes),
        "ci": bootstrap_ci(outcomes, resamples, seed, confidence),
        "confidence": confidence,
        "resamples": resamples,
        "comparisons": len(flat),
        "wins": sum(o == 1.0 for o in flat),
        "ties": sum(o == 0.5 for o in flat),
        "losses": sum(o == 0.0 for o in flat),
    }


def paired_gain(candidate: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Candidate mean minus baseline mean of a per-reply value (a rule's 0/1, say), with a CI.

    ``candidate[i]`` and ``baseline[i]`` are the values on prompt i. Each
    bootstrap draw takes whole prompts for both models at once, so the CI is
    of the paired difference: narrower than two separate CIs would suggest.
    """
    import numpy as np

    if len(candidate) != len(baseline):
        raise ValueError(f"{len(candidate)} candidate prompts but {len(baseline)} baseline prompts")
    keep = [i for i in range(len(candidate)) if len(candidate[i]) and len(baseline[i])]
    if not keep:
        return {"candidate": None, "baseline": None, "value": None, "ci": None, "confidence": confidence,
                "resamples": resamples}
    c_sums = np.array([float(sum(candidate[i])) for i in keep])
    b_sums = np.array([float(sum(baseline[i])) for i in keep])
    c_counts = np.array([len(candidate[i]) for i in keep])
    b_counts = np.array([len(baseline[i]) for i in keep])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(keep), size=(resamples, len(keep)))  # (R, prompts)
    gains = c_sums[picks].sum(1) / c_counts[picks].sum(1) - b_sums[picks].sum(1) / b_counts[picks].sum(1)  # (R,)
    tail = (1 - confidence) / 2
    low, high = np.quantile(gains, [tail, 1 - tail])
    c_mean, b_mean = c_sums.sum() / c_counts.sum(), b_sums.sum() / b_counts.sum()
    return {"candidate": float(c_mean), "baseline": float(b_mean), "value": float(c_mean - b_mean),
            "ci": [float(low), float(high)], "confidence": confidence, "resamples": resamples}
