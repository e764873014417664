#!/usr/bin/env bash
# Does the loop learn what raters meant? For each rule and each method, on the
# bundled model, CPU only, with the shipped CPU recipes:
#
#   simulate once (a prompt's replies sampled together) -> per rule: a copy of
#   the store, re-rated by that rule -> judge reward model (judge part) ->
#   PPO (after a reward model on the policy part), KTO and DPO on the policy
#   part -> each
#   candidate evaluated against the base model on held-out prompts, judged by
#   the rule and by the judge reward model.
#
#   bash bench/efficacy.sh [DATA_DIR]      (default: .efficacy/ in the repository)
#   .venv/bin/python bench/efficacy_table.py DATA_DIR     # the table, from what has finished
#
# Rules are not about length and not "ends with a question"; the defaults liked
# 22 %, 17 % and 23 % of the bundled model's replies. Settings
# (environment): RULES ("digits contains:also mark::"), METHODS ("ppo kto dpo"),
# PERSONA (assistant), N (64 training prompts), SAMPLES (8 replies each),
# MAX_NEW_TOKENS (64), EVAL_SAMPLES (2 per held-out prompt). Every stage's wall
# time goes to DATA_DIR/timings.tsv; rerunning resumes after the last finished
# stage, and a training stage that was stopped continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=$(realpath -m "${1:-.efficacy}")
RULES=${RULES:-digits contains:also mark::}
METHODS=${METHODS:-ppo kto dpo}
PERSONA=${PERSONA:-assistant}
N=${N:-64}
SAMPLES=${SAMPLES:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
EVAL_SAMPLES=${EVAL_SAMPLES:-2}
PS="$PWD/.venv/bin/persona-studio"
export TRL_EXPERIMENTAL_SILENCE=1

mkdir -p "$DATA_DIR/logs"
[ -e "$DATA_DIR/timings.tsv" ] || printf 'stage\tseconds\n' > "$DATA_DIR/timings.tsv"

stage() {  # stage NAME COMMAND...: run, log, time; stdout's last line is kept in logs/NAME.json
    local name=$1; shift
    local start=$SECONDS
    if [ -e "$DATA_DIR/logs/$name.done" ]; then
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
# A training stage stopped before it finished (its log names its run) continues that run from its
# last checkpoint instead of starting over.
resume() { [ -e "$DATA_DIR/logs/$1.err" ] && sed -n 's/^run \([0-9][0-9]*\): .*/--resume \1/p' "$DATA_DIR/logs/$1.err" | tail -1; }
field() { .venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }

# The replies are the base model's whatever the rule: generate them once.
FIRST_RULE=${RULES%% *}
BASE=(--data-dir "$DATA_DIR/replies" --db-url "sqlite:///$DATA_DIR/replies/chat.db")
stage simulate "$PS" simulate "${BASE[@]}" --persona "$PERSONA" --rule "$FIRST_RULE" \
    --prompts alignment/prompts/everyday_train.txt --n "$N" --samples "$SAMPLES" \
    --max-new-tokens "$MAX_NEW_TOKENS" --seed 1

for RULE in $RULES; do
    NAME=${RULE//:/_}  # a file name: contains:also -> contains_also
    DIR="$DATA_DIR/$NAME"
    COMMON=(--data-dir "$DIR" --db-url "sqlite:///$DIR/chat.db")
    if [ ! -e "$DIR/chat.db" ]; then
        mkdir -p "$DIR"
        ln -sfn "$DATA_DIR/replies/models" "$DIR/models"  # the converted bundled model, shared
        .venv/bin/python -c "import sqlite3,sys; s=sqlite3.connect(sys.argv[1]); d=sqlite3.connect(sys.argv[2]); s.backup(d)" \
            "$DATA_DIR/replies/chat.db" "$DIR/chat.db"
    fi
    stage "$NAME-rerate" "$PS" simulate "${COMMON[@]}" --persona "$PERSONA" --rule "$RULE" --rerate
    stage "$NAME-judge" "$PS" align reward "${COMMON[@]}" --recipe alignment/recipes/reward_cpu.yaml \
        --persona "$PERSONA" --part judge $(resume "$NAME-judge")
    JUDGE_RUN=$(field "$DATA_DIR/logs/$NAME-judge.json" run)
    for METHOD in $METHODS; do
        if [ "$METHOD" = ppo ]; then  # only PPO needs a reward model of its own (policy part)
            stage "$NAME-reward" "$PS" align reward "${COMMON[@]}" --recipe alignment/recipes/reward_cpu.yaml \
                --persona "$PERSONA" $(resume "$NAME-reward")
        fi
        stage "$NAME-$METHOD" "$PS" align "$METHOD" "${COMMON[@]}" --recipe "alignment/recipes/${METHOD}_cpu.yaml" \
            --persona "$PERSONA" $(resume "$NAME-$METHOD")
        RUN=$(field "$DATA_DIR/logs/$NAME-$METHOD.json" run)
        stage "$NAME-$METHOD-evaluate" "$PS" align evaluate "$RUN" "${COMMON[@]}" --baseline base \
            --judge "$JUDGE_RUN" --prompts alignment/prompts/everyday_heldout.txt --samples "$EVAL_SAMPLES" \
            --max-new-tokens "$MAX_NEW_TOKENS" --rule "$RULE" --seed 7
    done
done
column -t "$DATA_DIR/timings.tsv" >&2
.venv/bin/python bench/efficacy_table.py "$DATA_DIR"
