"""The table of `bench/efficacy.sh`: rule satisfaction before and after, per rule and method.

    python bench/efficacy_table.py DATA_DIR

Reads each finished evaluation (``DATA_DIR/logs/<rule>-<method>-evaluate.json``
points at its evaluation.json) and the stage times (``DATA_DIR/timings.tsv``)
and prints one Markdown row per rule and method: the rule's rate on held-out
prompts for the base model and the candidate with 95 % CIs, the paired gain
with its CI, the independent judge reward model's win rate, KL to the
reference, distinct-2 and mean length of both, the training wall time and the
gate's verdict. Unfinished pairs are left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ci(values, fmt="{:.0%}") -> str:
    return "n/a" if not values else "[" + ", ".join(fmt.format(v) for v in values) + "]"


def rows(data_dir: Path) -> list[str]:
    timings = {}
    path = data_dir / "timings.tsv"
    if path.is_file():
        for line in path.read_text().splitlines()[1:]:
            stage, seconds = line.split("\t")
            timings[stage] = int(seconds)
    out = []
    for summary_path in sorted((data_dir / "logs").glob("*-evaluate.json")):
        name, method = summary_path.name[:-len("-evaluate.json")].rsplit("-", 1)
        summary = json.loads(summary_path.read_text())
        e = json.loads(Path(summary["evaluation"]).read_text())
        rule = f"`{e['rule']['spec']}`"
        cand, base = e["metrics"]["candidate"], e["metrics"]["baseline"]
        gain, win = e["rule"]["gain"], e["win_rate"]
        judge = e["judge"]
        win_text = "n/a" if win is None else (f"{win['value']:.2f} {_ci(win['ci'], '{:.2f}')}"
                                              + ("" if judge["independent"] else " (not independent)"))
        ratio = cand["distinct_2"] / base["distinct_2"] if base["distinct_2"] else float("nan")
        minutes = timings.get(f"{name}-{method}", 0) / 60
        out.append(
            f"| {rule} | {method} | {base['rule_rate']:.0%} {_ci(base['rule_ci'])} | "
            f"{cand['rule_rate']:.0%} {_ci(cand['rule_ci'])} | {gain['value'] * 100:+.0f} "
            f"{_ci([g * 100 for g in gain['ci']], '{:+.0f}')} | {win_text} | {cand['kl_mean']:.2f} | "
            f"{cand['distinct_2']:.2f} / {base['distinct_2']:.2f} ({ratio:.2f}x) | "
            f"{cand['length_mean']:.0f} / {base['length_mean']:.0f} | {minutes:.1f} min | "
            f"{_verdict(e['gate'])} |")
    return out


def _verdict(gate: dict) -> str:
    """'passed', or 'failed:' and the checks that failed."""
    failed = [c["name"] for c in gate["checks"] if not c["passed"]]
    return "passed" if gate["passed"] else "failed: " + ", ".join(failed)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    data_dir = Path(sys.argv[1])
    print("| rule | method | rule rate, base | rule rate, candidate | gain (points) [95% CI] | "
          "judge win rate | KL | distinct-2 cand / base | length cand / base (tokens) | training | gate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows(data_dir):
        print(row)


if __name__ == "__main__":
    main()
