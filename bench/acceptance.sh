#!/usr/bin/env bash
# The whole alignment loop on the bundled model, CPU only, from an empty store:
#   SIMULATED feedback from a rule -> reward model (policy part) and judge reward
#   model (judge part) -> PPO -> evaluation on held-out prompts, judged by the
#   judge and the rule -> promotion through the gate.
#
#   bash bench/acceptance.sh [DATA_DIR]      (default: .acceptance/ in the repository)
#
# Each stage's wall time goes to DATA_DIR/timings.tsv; every command's output
# to DATA_DIR/logs/. The report is under the PPO run's evaluation/ folder.
# Run it again on the same DATA_DIR to resume after the last finished stage.
# Settings (environment): PERSONA (assistant), RULE (short:40: likes replies
# under 40 words), SAMPLES (8 replies per training prompt: the reward model
# needs many same-context pairs), MAX_NEW_TOKENS (64).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=$(realpath -m "${1:-.acceptance}")
PERSONA=${PERSONA:-assistant}
RULE=${RULE:-short:40}
SAMPLES=${SAMPLES:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
PS=".venv/bin/persona-studio"
export TRL_EXPERIMENTAL_SILENCE=1
COMMON=(--data-dir "$DATA_DIR" --db-url "sqlite:///$DATA_DIR/chat.db")

mkdir -p "$DATA_DIR/logs"
[ -e "$DATA_DIR/timings.tsv" ] || printf 'stage\tseconds\n' > "$DATA_DIR/timings.tsv"

stage() {  # stage NAME COMMAND...: run, log, time; stdout's last line is kept in logs/NAME.json
    local name=$1; shift
    local start=$SECONDS
    if [ -e "$DATA_DIR/logs/$name.done" ]; then  # rerunning the script resumes after the last finished stage
        echo "== $name: done before, skipped" >&2; return
    fi
    echo "== $name: $*" >&2
    "$@" > "$DATA_DIR/logs/$name.out" 2> "$DATA_DIR/logs/$name.err" || {
        echo "stage $name failed; see $DATA_DIR/logs/$name.err" >&2; tail -5 "$DATA_DIR/logs/$name.err" >&2; exit 1; }
    printf '%s\t%s\n' "$name" $((SECONDS - start)) >> "$DATA_DIR/timings.tsv"
    tail -1 "$DATA_DIR/logs/$name.out" > "$DATA_DIR/logs/$name.json"
    touch "$DATA_DIR/logs/$name.done"
    echo "   $((SECONDS - start)) s" >&2
}
field() { .venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }

stage simulate "$PS" simulate "${COMMON[@]}" --persona "$PERSONA" --rule "$RULE" \
    --prompts alignment/prompts/everyday_train.txt --samples "$SAMPLES" --max-new-tokens "$MAX_NEW_TOKENS" --seed 1
stage reward "$PS" align reward "${COMMON[@]}" --recipe alignment/recipes/reward_cpu.yaml --persona "$PERSONA"
# An independent judge: a reward model on the judge part of the feedback, which PPO and its reward model never see.
stage judge "$PS" align reward "${COMMON[@]}" --recipe alignment/recipes/reward_cpu.yaml --persona "$PERSONA" \
    --part judge
stage ppo "$PS" align ppo "${COMMON[@]}" --recipe alignment/recipes/ppo_cpu.yaml --persona "$PERSONA"
PPO_RUN=$(field "$DATA_DIR/logs/ppo.json" run)
VERSION=$(field "$DATA_DIR/logs/ppo.json" version)
stage evaluate "$PS" align evaluate "$PPO_RUN" "${COMMON[@]}" --prompts alignment/prompts/everyday_heldout.txt \
    --samples 2 --max-new-tokens "$MAX_NEW_TOKENS" --rule "$RULE" --seed 7
# The gate decides; a refusal names the failed checks (the run still counts as measured).
if "$PS" models promote "$VERSION" "${COMMON[@]}" --by acceptance > "$DATA_DIR/logs/promote.out" \
        2> "$DATA_DIR/logs/promote.err"; then
    echo "promoted version $VERSION for $PERSONA" >&2
else
    echo "not promoted: $(cat "$DATA_DIR/logs/promote.err")" >&2
fi
column -t "$DATA_DIR/timings.tsv" >&2
echo "report: $(field "$DATA_DIR/logs/evaluate.json" report)" >&2
