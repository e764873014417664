"""The promotion gate: what an evaluation must show before a candidate may serve.

Better by a judge the candidate was not trained against (an independent
judge reward model, a declared rule; people judge through an A/B, see
``persona-studio models canary``), KL to the reference bounded, length and
end-of-sequence rate sane. A PPO run judged by the very reward model it was
optimised against passed with win rate 0.79 while the raters' rule did not
move: that reward model is reported but never judges. A PPO run that
collapsed into one repeated exclamation won on reward, so repetition and the
reference model's perplexity of the new replies are checked too::

    bounds = GateBounds.from_config(run.config)   # the recipe's ``gate:`` mapping
    verdict = bounds.check(evaluation)            # evaluation: alignment/evaluate.py
    verdict["passed"], [c for c in verdict["checks"] if not c["passed"]]

The verdict is stored as ``evaluation["gate"]`` on the candidate's
``model_versions`` row (``metrics["evaluation"]["gate"]``), which is what
``persona-studio models promote`` reads. Each check is ``{"name", "op",
"value", "bound", "passed"}``: ``value op bound`` must hold, ``bound`` is a
number or, for "within", ``[low, high]``. A check whose value cannot be
computed (no baseline tokens, say) fails with ``value`` None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateBounds:
    """Bounds of the gate; a recipe overrides any of them under ``gate:``."""

    min_win_rate_lower: float = field(default=0.5, metadata={
        "help": "The lower end of the win rate's 95 % CI (by an independent judge reward model) must be above this."})
    min_rule_gain_lower: float = field(default=0.0, metadata={
        "help": "With a declared rule: the lower end of the 95 % CI of its rate's gain over the baseline must be "
                "above this."})
    max_kl: float = field(default=5.0, metadata={
        "help": "Largest mean KL (nats per reply) of the candidate to the reference."})
    min_length_ratio: float = field(default=0.5, metadata={
        "help": "Candidate mean reply length / baseline's must be at least this."})
    max_length_ratio: float = field(default=2.0, metadata={
        "help": "... and at most this."})
    max_eos_rate_drop: float = field(default=0.2, metadata={
        "help": "Candidate EOS rate may be at most this much below the baseline's."})
    max_repetition_increase: float = field(default=0.1, metadata={
        "help": "Candidate repeated-3-gram rate may exceed the baseline's by at most this."})
    max_perplexity_ratio: float = field(default=2.0, metadata={
        "help": "Reference perplexity of the candidate's replies / of the baseline's, at most."})

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None, source: str = "gate") -> GateBounds:
        """Bounds from a mapping; unknown keys and non-numbers are a ValueError naming them."""
        values = values or {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: a mapping of bound names to numbers, not {type(values).__name__}")  # noqa: TRY004
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        bad = sorted(k for k, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float)))
        if bad:
            raise ValueError(f"{source}: {', '.join(bad)} must be numbers")
        bounds = cls(**{k: float(v) for k, v in values.items()})
        if bounds.min_length_ratio > bounds.max_length_ratio:
            raise ValueError(f"{source}: min_length_ratio {bounds.min_length_ratio} > max_length_ratio "
                             f"{bounds.max_length_ratio}")
        return bounds

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> GateBounds:
        """Bounds from a run's recipe config (its ``gate`` sub-mapping; absent = defaults)."""
        return cls.from_mapping((config or {}).get("gate"), source="recipe gate")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def check(self, evaluation: dict[str, Any]) -> dict[str, Any]:
        """The verdict on ``evaluation`` (alignment/evaluate.py: "metrics", "judge", "win_rate", "rule").

        Judgement: at least one independent judge must have judged, and every
        independent judge must find the candidate better: an independent
        judge reward model by its win rate, a declared rule by its gain. A
        reward model the candidate was trained against is no judge: its win
        rate is reported, never checked. Then the fluency bounds.
        """
        cand = evaluation["metrics"]["candidate"]
        base = evaluation["metrics"]["baseline"]
        judge = evaluation.get("judge") or {}
        rule = evaluation.get("rule") or {}
        judge_counts = judge.get("independent") is True
        rule_counts = rule.get("gain") is not None
        judgement = [_check("independent_judges", ">=", int(judge_counts) + int(rule_counts), 1)]
        if judge_counts:
            win_ci = (evaluation.get("win_rate") or {}).get("ci") or [None, None]
            judgement.append(_check("win_rate_lower", ">", win_ci[0], self.min_win_rate_lower))
        if rule_counts:
            gain_ci = rule["gain"].get("ci") or [None, None]
            judgement.append(_check("rule_gain_lower", ">", gain_ci[0], self.min_rule_gain_lower))
        eos_floor = None if base.get("eos_rate") is None else base["eos_rate"] - self.max_eos_rate_drop
        repetition_cap = (None if base.get("repeated_3gram_rate") is None
                          else base["repeated_3gram_rate"] + self.max_repetition_increase)
        checks = [
            *judgement,
            _check("kl", "<=", cand.get("kl_mean"), self.max_kl),
            _check("length_ratio", "within", _ratio(cand.get("length_mean"), base.get("length_mean")),
                   [self.min_length_ratio, self.max_length_ratio]),
            _check("eos_rate", ">=", cand.get("eos_rate"), eos_floor),
            _check("repeated_3gram_rate", "<=", cand.get("repeated_3gram_rate"), repetition_cap),
            _check("reference_perplexity_ratio", "<=",
                   _ratio(cand.get("reference_perplexity"), base.get("reference_perplexity")),
                   self.max_perplexity_ratio),
        ]
        return {"passed": all(c["passed"] for c in checks), "checks": checks, "bounds": self.to_dict()}


def check(evaluation: dict[str, Any], bounds: GateBounds | None = None) -> dict[str, Any]:
    """``bounds.check(evaluation)``, with the default bounds when none are given."""
    return (bounds or GateBounds()).check(evaluation)


def failed_checks(verdict: dict[str, Any]) -> list[str]:
    """One line per failed check, e.g. "kl: 7.31 (must be <= 5)"."""
    return [f"{c['name']}: {_show(c['value'])} (must be {c['op']} {_show(c['bound'])})"
            for c in verdict["checks"] if not c["passed"]]


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def _check(name: str, op: str, value: float | None, bound: Any) -> dict[str, Any]:
    if value is None or bound is None:
        passed = False
    elif op == ">":
        passed = value > bound
    elif op == ">=":
        passed = value >= bound
    elif op == "<=":
        passed = value <= bound
    else:  # within
        passed = bound[0] <= value <= bound[1]
    return {"name": name, "op": op, "value": value, "bound": bound, "passed": bool(passed)}


def _show(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return f"{value:.4g}"
