"""The files of an evaluation (alignment/evaluate.py): JSON, every reply, Markdown report, PNG plots.

Plots are drawn on ``matplotlib.figure.Figure`` objects (the Agg canvas),
never through pyplot, so nothing global changes and no display is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from alignment.gate import failed_checks

# Training-curve keys shown first when a run logged them (PPO, then KTO); other numeric keys follow.
CURVE_ORDER = ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy",
               "reply/length_mean", "reply/eos_rate", "policy/clipfrac_avg", "val/clipfrac_avg",
               "policy/approxkl_avg", "loss/value_avg", "loss", "rewards/chosen", "rewards/rejected",
               "rewards/margins", "kl")
# Counters and settings, not training signals (eps: TRL's episodes/s, an int that is 0 on a CPU).
CURVE_SKIP = {"step", "time", "epoch", "episode", "eps", "lr", "learning_rate", "num_tokens"}
MAX_CURVES = 12

# (metrics key, label, format) for the table and the comparison chart.
METRIC_ROWS = (
    ("reward_mean", "mean reward (judge)", "{:.3f}"),
    ("kl_mean", "KL to reference (nats/reply)", "{:.3f}"),
    ("length_mean", "mean length (tokens)", "{:.1f}"),
    ("eos_rate", "EOS rate", "{:.2f}"),
    ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("repeated_3gram_rate", "repeated 3-gram rate", "{:.3f}"),
    ("reference_perplexity", "reference perplexity", "{:.2f}"),
    ("rule_rate", "rule satisfaction rate", "{:.2f}"),
)


def write_outputs(out: Path, evaluation: dict[str, Any], replies: dict[str, list], prompts: list[list[dict]],
                  run_dir: Path) -> dict[str, Any]:
    """Write everything to ``out``; sets and returns ``evaluation["files"]`` (absolute paths)."""
    out.mkdir(parents=True, exist_ok=True)
    plots = [metrics_plot(out / "metrics_comparison.png", evaluation)]
    if evaluation["judge"] is not None:
        plots.insert(0, reward_plot(out / "reward_distribution.png", replies))
    else:
        (out / "reward_distribution.png").unlink(missing_ok=True)
    curves = training_curves(out / "training_curves.png", run_dir / "metrics.jsonl")
    if curves is not None:
        plots.append(curves)
    else:
        (out / "training_curves.png").unlink(missing_ok=True)  # stale from an earlier evaluation
    files = {"evaluation": str(out / "evaluation.json"), "report": str(out / "report.md"),
             "samples": str(out / "samples.jsonl"), "plots": [str(p) for p in plots]}
    evaluation["files"] = files
    with (out / "samples.jsonl").open("w", encoding="utf-8") as handle:
        for side, items in replies.items():
            for r in items:
                handle.write(json.dumps({"model": side, "prompt_index": r.prompt_index, "sample": r.sample,
                                         "prompt": prompts[r.prompt_index], "reply": r.text,
                                         "tokens": r.length, "eos": r.eos, "reward": r.reward, "kl": r.kl,
                                         "liked_by_rule": r.liked}, ensure_ascii=False) + "\n")
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "report.md").write_text(markdown(evaluation), encoding="utf-8")
    return files


# -- plots ----------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def reward_plot(path: Path, replies: dict[str, list]) -> Path:
    """Histograms of the judge's rewards of both models' replies."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    values = {side: [r.reward for r in items] for side, items in replies.items()}
    everything = [v for vs in values.values() for v in vs]
    low, high = min(everything), max(everything)
    bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 10
    for side, color in (("baseline", "tab:gray"), ("candidate", "tab:blue")):
        ax.hist(values[side], bins=bins, alpha=0.55, color=color,
                label=f"{side} (mean {sum(values[side]) / len(values[side]):.3f})")
    ax.set_xlabel("reward (judge)")
    ax.set_ylabel("replies")
    ax.set_title("Reward distribution on held-out prompts")
    ax.legend()
    fig.savefig(path)
    return path


def metrics_plot(path: Path, evaluation: dict[str, Any]) -> Path:
    """One small candidate-vs-baseline bar pair per metric (their scales differ)."""
    cand, base = evaluation["metrics"]["candidate"], evaluation["metrics"]["baseline"]
    rows = [row for row in METRIC_ROWS if cand.get(row[0]) is not None or base.get(row[0]) is not None]
    columns = 3
    fig = _figure(10, 2.6 * math.ceil(len(rows) / columns))
    for i, (key, label, _) in enumerate(rows):
        ax = fig.add_subplot(math.ceil(len(rows) / columns), columns, i + 1)
        heights = [base.get(key) or 0.0, cand.get(key) or 0.0]
        errors = None
        ci_key = {"reward_mean": "reward_ci", "rule_rate": "rule_ci"}.get(key)
        if ci_key and base.get(ci_key) and cand.get(ci_key):
            errors = [[h - m[ci_key][0] for h, m in zip(heights, (base, cand), strict=True)],
                      [m[ci_key][1] - h for h, m in zip(heights, (base, cand), strict=True)]]
        ax.bar(["baseline", "candidate"], heights, color=["tab:gray", "tab:blue"], yerr=errors, capsize=4)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle("Candidate vs baseline")
    fig.savefig(path)
    return path


def read_curves(metrics_path: Path) -> dict[str, list[tuple[float, float]]]:
    """``{key: [(step, value), ...]}`` for every numeric key logged at two steps or more."""
    series: dict[str, list[tuple[float, float]]] = {}
    if not metrics_path.is_file():
        return {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted job
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), (int, float)):
            continue
        for key, value in entry.items():
            if key not in CURVE_SKIP and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                series.setdefault(key, []).append((entry["step"], value))
    return {k: v for k, v in series.items() if len(v) >= 2}


def training_curves(path: Path, metrics_path: Path) -> Path | None:
    """The run's logged training metrics against step; None when it logged none."""
    from matplotlib.ticker import MaxNLocator

    series = read_curves(metrics_path)
    if not series:
        return None
    keys = [k for k in CURVE_ORDER if k in series] + sorted(k for k in series if k not in CURVE_ORDER)
    keys = keys[:MAX_CURVES]
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig = _figure(4 * columns, 2.6 * rows)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, columns, i + 1)
        steps, values = zip(*series[key], strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"Training curves ({metrics_path.name})")
    fig.savefig(path)
    return path


# -- Markdown -------------------------------------------------------------------


def _cell(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v, fmt) for v in value) + "]"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return fmt.format(value)
    text = str(value).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    return text


def _quote(text: str, limit: int = 300) -> str:
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return _cell(text) if text.strip() else "*(empty)*"


def markdown(evaluation: dict[str, Any]) -> str:
    e = evaluation
    cand, base = e["metrics"]["candidate"], e["metrics"]["baseline"]
    prompts, sampling, win, gate, judge, rule = (e["prompts"], e["sampling"], e["win_rate"], e["gate"], e["judge"],
                                                 e["rule"])
    source = f"file `{prompts['file']}`" if prompts["source"] == "file" else "the run's held-out feedback prompts"
    lines = [
        f"# Evaluation of run {e['run']} ({e['kind']}), persona {e['persona'] or '(all)'}",
        "",
        f"Evaluated {e['evaluated_at']}.",
        "",
        f"- **Candidate:** {e['candidate']['label']}, adapter `{e['candidate']['adapter']}`",
        f"- **Baseline:** {e['baseline']['label']}" + (f", adapter `{e['baseline']['adapter']}`"
                                                        if e["baseline"]["adapter"] else ""),
        f"- **Reference** (for KL and perplexity): the base model `{e['base_model']}` with adapters disabled",
        f"- **Prompts:** {prompts['used']} from {source} ({prompts['available']} available; removed: "
        f"{prompts['removed_judge_trained']} the judge trained on, {prompts['removed_candidate_trained']} the "
        f"candidate trained on, {prompts['duplicates']} duplicates, {prompts.get('removed_too_long', 0)} too long)"
        + ("" if prompts["candidate_train_prompts_known"] else
           "; the candidate's train prompts are unknown (no train_prompts.json)"),
        f"- **Sampling:** replies per prompt and model: {sampling['samples']}, at most "
        f"{sampling['max_new_tokens']} new tokens, temperature {sampling['temperature']}, "
        f"top-p {sampling['top_p']}, top-k {sampling['top_k']}, "
        f"repetition penalty {sampling['repetition_penalty']}, seed {sampling['seed']} (the same seed for both "
        "models per prompt and sample)",
    ]
    lines += ["", "## Judges", "", "A candidate is judged only by what it was not trained against.", ""]
    if judge is not None:
        role = "judge" if judge["independent"] else "NOT a judge (shown, never checked by the gate)"
        lines.append(f"- **Reward run {judge['run']}** ({judge['part']} part of the feedback, eval pairwise accuracy "
                     f"{_cell(judge['eval_pairwise_accuracy'], '{:.2f}')}): {role}. {_cell(judge['why'])}.")
    if rule:
        lines.append(f"- **Rule** `{rule['spec']}` ({rule['description']}): judge. {rule['why']}.")
    if judge is None and not rule:
        lines.append("- none")
    lines += ["", "## Metrics", "", "| metric | candidate | baseline |", "|---|---|---|"]
    for key, label, fmt in METRIC_ROWS:
        if (key == "rule_rate" and not rule) or (key == "reward_mean" and judge is None):
            continue
        lines.append(f"| {label} | {_cell(cand[key], fmt)} | {_cell(base[key], fmt)} |")
    if judge is not None:
        lines.append(f"| mean reward 95% CI | {_cell(cand['reward_ci'])} | {_cell(base['reward_ci'])} |")
    if rule:
        lines.append(f"| rule rate 95% CI | {_cell(cand['rule_ci'], '{:.2f}')} | {_cell(base['rule_ci'], '{:.2f}')} |")
    if win is not None:
        lines += [
            "",
            "## Win rate" + ("" if judge["independent"] else " (by a reward model the candidate was trained against)"),
            "",
            f"The candidate's reply scored higher than the baseline's (same prompt, same seed) in {win['wins']} of "
            f"{win['comparisons']} comparisons, tied in {win['ties']} (counted as half), lost {win['losses']}: "
            f"**win rate {_cell(win['value'], '{:.3f}')}**, {win['confidence']:.0%} CI "
            f"{_cell(win['ci'], '{:.3f}')} ({win['resamples']} bootstrap resamples of prompts).",
        ]
    if rule:
        gain = rule["gain"]
        lines += [
            "",
            "## Rule",
            "",
            f"The rule liked {_cell(gain['baseline'], '{:.1%}')} of the baseline's replies and "
            f"{_cell(gain['candidate'], '{:.1%}')} of the candidate's: **gain {_cell(gain['value'], '{:+.3f}')}**, "
            f"{gain['confidence']:.0%} CI {_cell(gain['ci'], '{:+.3f}')} (prompts resampled, both models together).",
        ]
    lines += [
        "",
        f"## Promotion gate: {'PASSED' if gate['passed'] else 'FAILED'}",
        "",
        "| check | value | must be | passed |",
        "|---|---|---|---|",
    ]
    for c in gate["checks"]:
        lines.append(f"| {c['name']} | {_cell(c['value'], '{:.4g}')} | {c['op']} {_cell(c['bound'], '{:.4g}')} | "
                     f"{'yes' if c['passed'] else '**no**'} |")
    if not gate["passed"]:
        lines += ["", "Failed: " + "; ".join(failed_checks(gate)) + "."]
    lines += ["", "Bounds come from the run's recipe (`gate:`), defaults otherwise.", ""]
    lines += ["## Plots", ""]
    for plot in e["files"]["plots"]:
        name = Path(plot).name
        lines += [f"![{name}]({name})", ""]
    lines += ["## Sample replies", "", "First sample of the first prompts; every reply is in samples.jsonl.", "",
              "| prompt | candidate | baseline |", "|---|---|---|"]
    for s in e["samples"]:
        lines.append(f"| {_quote(s['prompt'], 200)} | {_quote(s['candidate'])} "
                     f"(reward {_cell(s['candidate_reward'])}) | {_quote(s['baseline'])} "
                     f"(reward {_cell(s['baseline_reward'])}) |")
    return "\n".join(lines) + "\n"
