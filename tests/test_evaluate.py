"""`align evaluate` and the promotion gate: metric functions, gate bounds, and end-to-end
evaluations of tiny KTO and reward runs (random 2-layer Llama, real tokenizer)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from alignment import data
from alignment import eval_metrics as em
from alignment.evaluate import EvalOptions, EvaluationError, Prompts, Reply, drop_trained, evaluate, file_prompts
from alignment.gate import GateBounds, check, failed_checks
from chatbot.personas import PersonaLibrary, render
from chatbot.store import ChatStore
from chatbot.store.runs import RunStore

REPO = Path(__file__).resolve().parent.parent
PERSONA = "pirate"
CONVERSATIONS = 48
EVAL_FRACTION = 0.3
FAST = dict(samples=2, max_new_tokens=6)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads each
    spinning for the other made these tests 4x slower (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- metric functions -------------------------------------------------------------


def test_distinct_n_counts_unique_ngrams_over_all_replies():
    assert em.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert em.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert em.distinct_n(["Arr ARR arr"], 1) == pytest.approx(1 / 3)  # words are lowercased
    assert em.distinct_n(["one", ""], 2) is None  # no bigram at all


def test_repeated_ngram_rate_is_within_replies():
    assert em.repeated_ngram_rate(["arr ! arr ! arr ! arr"]) == pytest.approx(3 / 5)  # 5 trigrams, 2 distinct
    # The same 3-gram in two different replies is not a repetition.
    assert em.repeated_ngram_rate(["the sea is wide", "the sea is deep"]) == 0.0
    assert em.repeated_ngram_rate(["a a a a", "b c d"]) == pytest.approx(1 / 3)  # 1 of (2 + 1)
    assert em.repeated_ngram_rate(["short", ""]) == 0.0


def test_bootstrap_ci_contains_the_true_mean_and_narrows_with_more_prompts():
    rng = np.random.default_rng(1)
    small = [list(rng.binomial(1, 0.3, size=2).astype(float)) for _ in range(40)]
    large = [list(rng.binomial(1, 0.3, size=2).astype(float)) for _ in range(1000)]
    low_s, high_s = em.bootstrap_ci(small, seed=0)
    low_l, high_l = em.bootstrap_ci(large, seed=0)
    assert low_s < 0.3 < high_s and low_l < 0.3 < high_l
    assert high_l - low_l < (high_s - low_s) / 3
    assert low_s <= em.group_mean(small) <= high_s
    assert em.bootstrap_ci(small, seed=0) == [low_s, high_s]  # seeded
    assert em.bootstrap_ci([[2.0, 2.0], [2.0]]) == [2.0, 2.0]
    assert em.bootstrap_ci([[], []]) is None


def test_bootstrap_resamples_whole_prompts():
    # Two prompts, every sample of a prompt alike: the CI must span the prompts' means.
    low, high = em.bootstrap_ci([[0.0] * 10, [1.0] * 10], resamples=4000, seed=3)
    assert low == 0.0 and high == 1.0


def test_win_rate_counts_ties_as_half():
    result = em.win_rate([[1.0, 0.0], [0.5, 0.5]], [[0.0, 0.0], [0.5, 1.0]])
    assert result["value"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    assert (result["wins"], result["ties"], result["losses"], result["comparisons"]) == (1, 2, 1, 4)
    assert result["ci"][0] <= result["value"] <= result["ci"][1]
    all_ties = em.win_rate([[1.0], [2.0]], [[1.0], [2.0]])
    assert all_ties["value"] == 0.5 and all_ties["ci"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="2 candidate scores but 1"):
        em.win_outcomes([1.0, 2.0], [1.0])


# -- the gate ---------------------------------------------------------------------


def _evaluation(**candidate) -> dict:
    base = {"kl_mean": 0.0, "length_mean": 20.0, "eos_rate": 0.9, "repeated_3gram_rate": 0.02,
            "reference_perplexity": 8.0}
    cand = {"kl_mean": 2.0, "length_mean": 18.0, "eos_rate": 0.85, "repeated_3gram_rate": 0.05,
            "reference_perplexity": 10.0}
    win_ci = candidate.pop("win_ci", [0.56, 0.71])
    judge = {"run": 1, "independent": candidate.pop("independent", True)}
    rule = candidate.pop("rule", None)
    cand.update(candidate)
    return {"metrics": {"candidate": cand, "baseline": base}, "win_rate": {"value": 0.63, "ci": win_ci},
            "judge": judge, "rule": rule}


def _failed(verdict: dict) -> list[str]:
    return [c["name"] for c in verdict["checks"] if not c["passed"]]


def test_gate_passes_a_better_and_still_fluent_candidate():
    verdict = check(_evaluation())
    assert verdict["passed"] is True and _failed(verdict) == []
    assert [c["name"] for c in verdict["checks"]] == [
        "independent_judges", "win_rate_lower", "kl", "length_ratio", "eos_rate", "repeated_3gram_rate",
        "reference_perplexity_ratio"]
    assert all(set(c) == {"name", "op", "value", "bound", "passed"} for c in verdict["checks"])
    length = verdict["checks"][3]
    assert length["value"] == pytest.approx(0.9) and length["bound"] == [0.5, 2.0]
    assert verdict["bounds"] == GateBounds().to_dict()
    json.dumps(verdict)  # stored in a JSON column


@pytest.mark.parametrize("change, failed", [
    ({"win_ci": [0.5, 0.6]}, ["win_rate_lower"]),  # the lower bound must be above 0.5, not equal
    ({"kl_mean": 5.5}, ["kl"]),
    ({"length_mean": 45.0}, ["length_ratio"]),
    ({"length_mean": 9.0}, ["length_ratio"]),
    ({"eos_rate": 0.6}, ["eos_rate"]),
    # A collapsed PPO run measured on this model: won on reward, one repeated exclamation.
    ({"repeated_3gram_rate": 0.6, "reference_perplexity": 40.0}, ["repeated_3gram_rate",
                                                                   "reference_perplexity_ratio"]),
    ({"reference_perplexity": None}, ["reference_perplexity_ratio"]),  # unknown is not a pass
])
def test_gate_fails_each_bound(change, failed):
    verdict = check(_evaluation(**change))
    assert verdict["passed"] is False and _failed(verdict) == failed
    assert len(failed_checks(verdict)) == len(failed)


def _rule(low: float, high: float) -> dict:
    return {"spec": "contains:arr", "gain": {"candidate": 0.2, "baseline": 0.15, "value": 0.05, "ci": [low, high]}}


def test_gate_refuses_a_candidate_that_fooled_its_own_reward_model():
    """The issue's PPO run: win rate 0.79 [0.68, 0.88] by the reward model it was optimised against,
    while the raters' rule went from 15.6 % to 20.3 %, no significant gain. The old gate passed it."""
    fooled = _evaluation(independent=False, win_ci=[0.68, 0.88], rule=_rule(-0.05, 0.14))
    verdict = check(fooled)
    assert verdict["passed"] is False and _failed(verdict) == ["rule_gain_lower"]
    assert "win_rate_lower" not in [c["name"] for c in verdict["checks"]]  # that reward model judges nothing
    # Without the rule nothing independent judged it at all.
    alone = check(_evaluation(independent=False, win_ci=[0.68, 0.88]))
    assert _failed(alone) == ["independent_judges"]
    assert failed_checks(alone) == ["independent_judges: 0 (must be >= 1)"]
    # The rule alone can pass a candidate; an independent judge's losing win rate still fails it.
    assert check(_evaluation(independent=False, rule=_rule(0.08, 0.3)))["passed"] is True
    assert _failed(check(_evaluation(win_ci=[0.4, 0.6], rule=_rule(0.08, 0.3)))) == ["win_rate_lower"]
    assert check(_evaluation(rule=_rule(0.08, 0.3)))["checks"][0]["value"] == 2


def test_gate_bounds_come_from_the_recipe():
    bounds = GateBounds.from_config({"lr": 1, "gate": {"max_kl": 1.5, "min_win_rate_lower": 0.4}})
    assert bounds.max_kl == 1.5 and bounds.max_length_ratio == 2.0
    verdict = bounds.check(_evaluation(win_ci=[0.45, 0.6]))
    assert _failed(verdict) == ["kl"] and verdict["bounds"]["max_kl"] == 1.5
    assert failed_checks(verdict) == ["kl: 2 (must be <= 1.5)"]
    assert GateBounds.from_config({}) == GateBounds() == GateBounds.from_config({"gate": None})


def test_unknown_or_bad_gate_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) max_kll, min_win; known: .*max_kl"):
        GateBounds.from_config({"gate": {"max_kll": 3, "min_win": 0.5}})
    with pytest.raises(ValueError, match="max_kl must be numbers"):
        GateBounds.from_mapping({"max_kl": "high"})
    from alignment.kto import KTORecipe

    with pytest.raises(ValueError, match="max_kll"):
        KTORecipe(gate={"max_kll": 3})  # refused when the recipe loads, before any training


@pytest.mark.parametrize("name", ["kto_cpu.yaml", "kto_gpu.yaml"])
def test_shipped_recipes_state_the_default_gate(name):
    from alignment.kto import KTORecipe

    recipe = KTORecipe.from_yaml(REPO / "alignment" / "recipes" / name)
    assert GateBounds.from_config(recipe.to_dict()) == GateBounds()
    assert set(recipe.gate) == set(GateBounds().to_dict())


# -- prompt bookkeeping -------------------------------------------------------------


def _prompt(i: int) -> list[dict]:
    return [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": f"Question {i}?"}]


def test_prompt_fingerprints_are_sha256_of_the_context_key():
    import hashlib

    from chatbot.feedback_export import context_key

    rows = [{"prompt": _prompt(1)}, {"prompt": _prompt(2)}, {"prompt": _prompt(1)}]
    keys = data.prompt_fingerprints(rows)
    assert keys == [hashlib.sha256(context_key(_prompt(i)).encode()).hexdigest() for i in (1, 2)]
    # Key order inside a message does not matter (context_key sorts keys).
    assert data.prompt_fingerprints([{"prompt": [dict(reversed(list(m.items()))) for m in _prompt(1)]}]) == keys[:1]


def test_drop_trained_removes_judge_and_candidate_prompts_and_counts_them():
    judge = set(data.prompt_fingerprints([{"prompt": _prompt(1)}]))
    candidate = set(data.prompt_fingerprints([{"prompt": _prompt(2)}, {"prompt": _prompt(1)}]))
    prompts = Prompts([_prompt(i) for i in (1, 2, 3, 3, 4)], {"source": "held-out", "available": 5})
    kept = drop_trained(prompts, judge, candidate)
    assert kept.rows == [_prompt(3), _prompt(4)]
    assert (kept.stats["removed_judge_trained"], kept.stats["removed_candidate_trained"],
            kept.stats["duplicates"], kept.stats["used"]) == (1, 1, 1, 2)
    unknown = drop_trained(prompts, judge, None)
    assert unknown.stats["used"] == 3 and unknown.stats["candidate_train_prompts_known"] is False


def test_file_prompts_are_rendered_as_a_first_chat_message(tmp_path):
    persona = PersonaLibrary(REPO / "personas").get(PERSONA)
    path = tmp_path / "prompts.txt"
    path.write_text("# treasure questions\n\nWhere is the gold?\n  Who are ye?  \n")
    prompts = file_prompts(path, persona, user_name="Ann")
    rendered = render(persona, "Ann")
    assert prompts.stats == {"source": "file", "file": str(path), "available": 2}
    first = prompts.rows[0]
    assert first[0] == {"role": "system", "content": rendered.system_prompt}
    assert first[1:-2] == rendered.examples
    assert first[-2] == {"role": "assistant", "content": rendered.greetings[0]}
    assert first[-1] == {"role": "user", "content": "Where is the gold?"}
    assert prompts.rows[1][-1]["content"] == "Who are ye?"


# -- tiny runs -------------------------------------------------------------------------


def _fill(store: ChatStore) -> None:
    """Per conversation: one prompt, a liked 'arr' reply and a disliked plain one (regenerations)."""
    user = store.get_or_create_user("rater")
    model = store.get_or_create_model_version("tiny")
    for i in range(CONVERSATIONS):
        conv = store.create_conversation(user, PERSONA, "v1")
        asked = store.add_message(conv, "user", f"Question {i}?")
        good = store.add_message(conv, "assistant", f"Arr, answer {i}, matey!", parent_id=asked, prompt=_prompt(i),
                                 model_version_id=model)
        bad = store.add_message(conv, "assistant", f"The answer is {i}.", parent_id=asked, prompt=_prompt(i),
                                model_version_id=model)
        store.set_feedback(good, user, 1)
        store.set_feedback(bad, user, -1)


def _train_run(store, runs, kind: str, recipe, build, train, out: Path, part: str = "policy") -> int:
    split = build(store, persona=PERSONA, eval_fraction=recipe.eval_fraction, seed=recipe.seed, part=part)
    run_id = runs.create_run(kind, persona_id=PERSONA, config=recipe.to_dict(), dataset_hash=split.snapshot_hash,
                             dataset_stats=split.stats, output_dir=str(out))
    data.write_train_prompts(out, split.train)  # what `persona-studio align` (chatbot/cli/align.py) does for every job
    train(recipe, split.trl("train"), split.trl("eval"), out, run_store=runs, run_id=run_id, progress=False)
    return run_id


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """A store with feedback, a tiny reward run on the judge part (the independent judge) and a tiny
    KTO run on the policy part (the candidate)."""
    from alignment.kto import KTORecipe, train_kto
    from alignment.reward import RewardRecipe, train_reward

    folder = tmp_path_factory.mktemp("evaluate")
    store = ChatStore.open(f"sqlite:///{folder / 'chat.db'}")
    _fill(store)
    runs = RunStore(store.engine)
    common = dict(base_model=str(tiny_model), lora_r=4, lora_alpha=8, learning_rate=5e-3, max_steps=4,
                  per_device_train_batch_size=4, max_length=128, save_steps=100, seed=0,
                  eval_fraction=EVAL_FRACTION)
    judge = _train_run(store, runs, "reward", RewardRecipe(**common, min_pairs=4), data.build_preference,
                       train_reward, folder / "reward", part="judge")
    kto = _train_run(store, runs, "kto", KTORecipe(**common, min_rows=8), data.build_kto, train_kto,
                     folder / "kto")
    held_out = data.build_prompts(store, persona=PERSONA, eval_fraction=EVAL_FRACTION, seed=0)
    yield {"store": store, "runs": runs, "judge": judge, "kto": kto, "folder": folder, "held_out": held_out,
           "personas": PersonaLibrary(REPO / "personas"), "tiny_model": tiny_model}
    store.close()


def _copy_judge(setup, name: str, keys: list[str] | None) -> int:
    """Another succeeded reward run with the judge's adapter, trained (it says) on ``keys``."""
    runs = setup["runs"]
    judge = runs.get_run(setup["judge"])
    out = setup["folder"] / name
    shutil.copytree(judge.output_dir, out)
    (out / "train_prompts.json").unlink()
    if keys is not None:
        (out / "train_prompts.json").write_text(json.dumps({"keys": keys}))
    run_id = runs.create_run("reward", persona_id=PERSONA, config=judge.config, output_dir=str(out))
    runs.register_candidate(run_id, base_model=str(setup["tiny_model"]), adapter_path=str(out / "adapter"),
                            metrics={})
    return run_id


def test_held_out_split_is_what_the_jobs_held_out(setup):
    held_out = setup["held_out"]
    assert 3 <= len(held_out.eval) < CONVERSATIONS  # enough prompts for the tests below
    judge_keys = set(json.loads((Path(setup["runs"].get_run(setup["judge"]).output_dir)
                                 / "train_prompts.json").read_text())["keys"])
    assert not judge_keys & set(data.prompt_fingerprints(held_out.eval))
    assert judge_keys < set(data.prompt_fingerprints(held_out.train))
    kto_keys = set(json.loads((Path(setup["runs"].get_run(setup["kto"]).output_dir)
                               / "train_prompts.json").read_text())["keys"])
    assert kto_keys and not kto_keys & judge_keys  # the judge's part and the policy's part


def test_judge_scores_as_the_reward_job_did(setup):
    """The reloaded reward adapter (LoRA + score head) reproduces the job's own eval accuracy and margin."""
    from alignment.evaluate import score_replies
    from alignment.metrics import mean_margin, pairwise_accuracy

    judge = setup["runs"].get_run(setup["judge"])
    pairs = data.build_preference(setup["store"], persona=PERSONA, eval_fraction=EVAL_FRACTION, seed=0).eval
    prompts = [row["prompt"] for row in pairs]
    replies = {"candidate": [Reply(i, 0, row["chosen"][0]["content"], [], True) for i, row in enumerate(pairs)],
               "baseline": [Reply(i, 0, row["rejected"][0]["content"], [], True) for i, row in enumerate(pairs)]}

    class Bar:
        def update(self, n):
            pass

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["tiny_model"])
    score_replies(Path(judge.output_dir), setup["tiny_model"], tokenizer, prompts, replies, judge.id, Bar())
    chosen = [r.reward for r in replies["candidate"]]
    rejected = [r.reward for r in replies["baseline"]]
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(judge.metrics["eval"]["pairwise_accuracy"])
    assert mean_margin(chosen, rejected) == pytest.approx(judge.metrics["eval"]["mean_margin"], abs=1e-5)


def test_evaluate_kto_run_against_the_base_model(setup):
    store, runs, kto = setup["store"], setup["runs"], setup["kto"]
    version = runs.candidate_for_run(kto)
    evaluation = evaluate(store, kto, EvalOptions(baseline="base", judge=setup["judge"], rule="contains:arr",
                                                  **FAST), personas=setup["personas"], progress=False)
    used = len(setup["held_out"].eval)
    out = Path(runs.get_run(kto).output_dir) / "evaluation"

    assert evaluation["candidate"]["version"] == version and evaluation["baseline"]["source"] == "base"
    assert evaluation["prompts"]["used"] == evaluation["prompts"]["available"] == used
    assert evaluation["prompts"]["removed_judge_trained"] == evaluation["prompts"]["removed_candidate_trained"] == 0
    assert evaluation["prompts"]["candidate_train_prompts_known"] is True
    pirate = setup["personas"].get(PERSONA).persona.generation
    assert (evaluation["sampling"]["temperature"], evaluation["sampling"]["top_p"]) == (pirate.temperature,
                                                                                        pirate.top_p)
    cand, base = evaluation["metrics"]["candidate"], evaluation["metrics"]["baseline"]
    for metrics in (cand, base):
        assert metrics["replies"] == 2 * used
        assert 0 < metrics["length_mean"] <= FAST["max_new_tokens"] and 0.0 <= metrics["eos_rate"] <= 1.0
        assert metrics["reward_ci"][0] <= metrics["reward_mean"] <= metrics["reward_ci"][1]
        assert metrics["reference_perplexity"] > 1.0 and 0.0 < metrics["distinct_1"] <= 1.0
        assert 0.0 <= metrics["rule_rate"] <= 1.0 and len(metrics["rule_ci"]) == 2
    assert base["kl_mean"] == 0.0  # the base model is the reference
    assert cand["kl_mean"] != 0.0  # the trained adapter moved the policy
    win = evaluation["win_rate"]
    assert win["comparisons"] == 2 * used == win["wins"] + win["ties"] + win["losses"]
    assert win["ci"][0] <= win["value"] <= win["ci"][1]
    # Two independent judges: the reward run trained on the judge part, and the declared rule.
    judge = evaluation["judge"]
    assert (judge["run"], judge["part"], judge["independent"]) == (setup["judge"], "judge", True)
    assert f"judge run {setup['judge']} trained on" in judge["why"] and f"the candidate (run {kto})" in judge["why"]
    gain = evaluation["rule"]["gain"]
    assert gain["value"] == pytest.approx(cand["rule_rate"] - base["rule_rate"])
    assert gain["ci"][0] <= gain["value"] <= gain["ci"][1] and evaluation["rule"]["independent"] is True
    gate = evaluation["gate"]
    assert [c["name"] for c in gate["checks"][:3]] == ["independent_judges", "win_rate_lower", "rule_gain_lower"]
    assert len(gate["checks"]) == 8 and gate["passed"] == all(c["passed"] for c in gate["checks"])
    assert gate["checks"][0]["value"] == 2
    assert gate["checks"][3] == {"name": "kl", "op": "<=", "value": cand["kl_mean"], "bound": 5.0,
                                 "passed": cand["kl_mean"] <= 5.0}
    assert cand["kl_mean"] > 0.0 and base["kl_mean"] == 0.0

    # Files: evaluation.json (= the return value), every reply, the report and its plots.
    assert json.loads((out / "evaluation.json").read_text()) == json.loads(json.dumps(evaluation))
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 * used and {json.loads(line)["model"] for line in lines} == {"candidate", "baseline"}
    plots = {Path(p).name for p in evaluation["files"]["plots"]}
    assert plots == {"reward_distribution.png", "metrics_comparison.png", "training_curves.png"}
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert f"# Evaluation of run {kto} (kto), persona {PERSONA}" in report
    assert f"**Prompts:** {used} from the run's held-out feedback prompts" in report
    assert "| mean reward (judge) |" in report and "| rule satisfaction rate |" in report
    assert f"- **Reward run {setup['judge']}** (judge part of the feedback" in report and "## Rule" in report
    assert f"## Promotion gate: {'PASSED' if gate['passed'] else 'FAILED'}" in report
    assert "![training_curves.png](training_curves.png)" in report
    assert report.count("| Question ") == len(evaluation["samples"]) == min(used, 6)

    # Stored on the candidate's version, next to the job's own metrics, where `models promote` reads it.
    row = store.get_version(version)
    assert row.metrics["evaluation"]["gate"] == gate and "logratio_margin" in row.metrics


def test_evaluate_ppo_run(setup, tiny_model):
    """A PPO run has the KTO run's layout; its per-step objective/* logs become the training curves."""
    import functools

    from alignment.eval_report import read_curves
    from alignment.ppo import PPORecipe, train_ppo

    store, runs = setup["store"], setup["runs"]
    recipe = PPORecipe(base_model=str(tiny_model), lora_r=4, lora_alpha=8, learning_rate=1e-3, steps=2,
                       per_device_train_batch_size=2, gradient_accumulation_steps=2, response_length=6,
                       min_prompts=4, save_steps=100, bf16=False, max_kl=None, seed=0, eval_fraction=EVAL_FRACTION)
    train = functools.partial(train_ppo, reward_dir=Path(runs.get_run(setup["judge"]).output_dir))
    ppo = _train_run(store, runs, "ppo", recipe, data.build_prompts, train, setup["folder"] / "ppo")
    # Judged by the reward model it was optimised against, and by a rule it never moved (the tiny model
    # never says "arr"): that reward model is reported, not counted, and the rule refuses the candidate.
    evaluation = evaluate(store, ppo, EvalOptions(baseline="base", judge=setup["judge"], samples=1, max_new_tokens=4,
                                                  rule="contains:arr"),
                          personas=setup["personas"], progress=False)
    judge = evaluation["judge"]
    assert judge["run"] == setup["judge"] and judge["independent"] is False
    assert f"is the reward model run {ppo} was optimised against" in judge["why"]
    assert evaluation["win_rate"]["comparisons"] == evaluation["prompts"]["used"]  # still shown
    assert evaluation["rule"]["gain"]["ci"] == [0.0, 0.0]
    gate = evaluation["gate"]
    assert gate["passed"] is False and "win_rate_lower" not in [c["name"] for c in gate["checks"]]
    assert [c["name"] for c in gate["checks"] if not c["passed"]][0] == "rule_gain_lower"
    report = (setup["folder"] / "ppo" / "evaluation" / "report.md").read_text()
    assert "NOT a judge (shown, never checked by the gate)" in report
    assert "## Win rate (by a reward model the candidate was trained against)" in report
    assert evaluation["kind"] == "ppo" and evaluation["candidate"]["version"] == runs.candidate_for_run(ppo)
    assert evaluation["prompts"]["used"] == len(setup["held_out"].eval)
    assert evaluation["metrics"]["candidate"]["kl_mean"] != 0.0
    curves = set(read_curves(setup["folder"] / "ppo" / "metrics.jsonl"))
    assert {"objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy",
            "reply/length_mean", "reply/eos_rate"} <= curves
    assert not {"eps", "episode", "lr", "time"} & curves  # counters and clocks, not training signals
    assert any(p.endswith("training_curves.png") for p in evaluation["files"]["plots"])
    assert store.get_version(evaluation["candidate"]["version"]).metrics["evaluation"]["gate"] == evaluation["gate"]


def test_same_seed_per_prompt_and_sample_for_both_models(setup, tiny_model):
    """Against a copy of its own adapter the candidate writes the same replies: every comparison ties,
    and the gate refuses (the win rate's lower bound is not above 0.5). A judge trained on two of the
    held-out prompts has them removed."""
    store, runs, kto = setup["store"], setup["runs"], setup["kto"]
    adapter = Path(runs.get_run(kto).output_dir) / "adapter"
    shutil.copytree(adapter, setup["folder"] / "twin")
    twin = store.get_or_create_model_version(str(tiny_model), str(setup["folder"] / "twin"))
    eval_keys = data.prompt_fingerprints(setup["held_out"].eval)
    judge = _copy_judge(setup, "judge-two", eval_keys[:2])

    evaluation = evaluate(store, kto, EvalOptions(baseline=str(twin), judge=judge, **FAST),
                          personas=setup["personas"], progress=False)
    assert evaluation["baseline"] == {"label": f"v{twin}", "version": twin, "source": "explicit",
                                      "adapter": str(setup["folder"] / "twin")}
    assert evaluation["prompts"]["removed_judge_trained"] == 2
    assert evaluation["prompts"]["used"] == len(eval_keys) - 2
    win = evaluation["win_rate"]
    assert win["ties"] == win["comparisons"] and win["value"] == 0.5 and win["ci"] == [0.5, 0.5]
    cand, base = evaluation["metrics"]["candidate"], evaluation["metrics"]["baseline"]
    assert cand["kl_mean"] == pytest.approx(base["kl_mean"]) and cand["kl_mean"] != 0.0
    assert cand["length_mean"] == base["length_mean"] and cand["reward_mean"] == base["reward_mean"]
    assert evaluation["gate"]["passed"] is False
    # A copied judge that does not say which conversations it trained on cannot be shown independent.
    assert evaluation["judge"]["independent"] is False
    assert "did not record its training conversations" in evaluation["judge"]["why"]
    assert [c["name"] for c in evaluation["gate"]["checks"] if not c["passed"]] == ["independent_judges"]
    assert evaluation["metrics"]["candidate"]["rule_rate"] is None  # no --rule


def test_batched_generation_writes_what_one_prompt_at_a_time_does(setup, tiny_model):
    """Prompts of different lengths in flight together (decoded together by the chat's engine) get
    the replies, KL and reference NLL each gets alone."""
    from tqdm.auto import tqdm

    from alignment.evaluate import Side, generate_and_measure
    from chatbot.engine import GenerationParams

    adapter = str(Path(setup["runs"].get_run(setup["kto"]).output_dir) / "adapter")
    candidate = Side("candidate", None, adapter, "candidate")
    base = Side("base", None, None, "base")
    prompts = [[{"role": "user", "content": text}] for text in
               ("Hi", "Tell me a long story about the sea, the ships and the gold of the old captains.",
                "Where is the treasure?", "Arr?", "What do pirates eat on a long voyage across the ocean?")]
    # Sampled: seeds, not order, decide. evaluate() caps the length from its options the same way.
    sampled = GenerationParams(temperature=0.9, repetition_penalty=1.0, max_new_tokens=8)

    def replies(batch: int) -> dict:
        options = EvalOptions(samples=2, max_new_tokens=8, batch=batch)
        with tqdm(disable=True) as bar:
            out, _ = generate_and_measure(tiny_model, candidate, base, prompts, options, sampled, bar)
        return {side: [(r.prompt_index, r.sample, r.token_ids) for r in rows] for side, rows in out.items()}, \
            {side: [x for r in rows for x in (r.kl, r.ref_nll)] for side, rows in out.items()}

    (alone, alone_scores), (together, together_scores) = replies(batch=1), replies(batch=3)
    for side in ("candidate", "baseline"):
        assert together[side] == alone[side], side
        assert together_scores[side] == pytest.approx(alone_scores[side], abs=1e-3)
    assert together["candidate"] != together["baseline"]  # the adapter made a difference to compare


def test_kl_is_exact_non_negative_and_matches_a_direct_computation(tiny_model, tmp_path):
    """A known adapter (random, non-zero LoRA weights): the evaluation's KL of each reply equals
    sum_t sum_v p(v) (log p(v) - log q(v)) computed one sequence at a time on the merged model and the
    base model, and is positive; the reference model's KL to itself is 0."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignment.evaluate import kl_and_reference_nll

    torch.manual_seed(0)
    adapter = tmp_path / "known"
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # random A and B: the adapter changes the model
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config).save_pretrained(adapter)

    prompts = [[1, 5, 9, 13], [2, 4], [7, 8, 9, 10, 11, 12]]
    replies = [[20, 21, 22], [30], [40, 41, 42, 43, 44]]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter,
                                     adapter_name="known").eval()
    with torch.inference_mode():
        kls, nlls = kl_and_reference_nll(peft, "known", 0, prompts, replies, batch_size=2)
        ref_kls, ref_nlls = kl_and_reference_nll(peft, None, 0, prompts, replies)
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).merge_and_unload()
        for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
            ids = torch.tensor([prompt + reply])
            p = torch.log_softmax(merged(ids).logits[0, len(prompt) - 1:-1], -1)  # (len(reply), V)
            q = torch.log_softmax(base(ids).logits[0, len(prompt) - 1:-1], -1)
            assert kls[i] == pytest.approx((p.exp() * (p - q)).sum().item(), rel=1e-4, abs=1e-6)
            assert nlls[i] == pytest.approx(-q.gather(-1, torch.tensor(reply)[:, None]).sum().item(), rel=1e-5)
    assert all(kl > 0 for kl in kls)
    assert ref_kls == [0.0, 0.0, 0.0] and ref_nlls == pytest.approx(nlls)


def test_default_baseline_is_what_serves_the_persona(setup, tiny_model, tmp_path):
    store, runs, kto = setup["store"], setup["runs"], setup["kto"]
    assert hasattr(store, "serving_version")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Ahoy?\n")
    options = EvalOptions(judge=setup["judge"], samples=1, max_new_tokens=2, prompts_file=prompts)
    evaluation = evaluate(store, kto, options, personas=setup["personas"], progress=False)
    assert evaluation["baseline"]["source"] == "base"  # nothing promoted, no adapter in pirate.yaml

    served = setup["folder"] / "served"
    shutil.copytree(Path(runs.get_run(kto).output_dir) / "adapter", served)
    version = store.get_or_create_model_version(str(tiny_model), str(served))
    store.promote(version, by="test", force=True, reason="a baseline for the test", persona_id=PERSONA)
    try:
        evaluation = evaluate(store, kto, options, personas=setup["personas"], progress=False)
        assert evaluation["baseline"]["version"] == version and evaluation["baseline"]["source"] == "serving"
        assert evaluation["baseline"]["adapter"] == str(served)
    finally:
        store.rollback(PERSONA, by="test")


def test_prompts_file_and_a_judge_that_trained_on_one_of_them(setup, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Where be the treasure?\nWhat ship do ye sail?\nWho is the captain?\n")
    rendered = file_prompts(path, setup["personas"].get(PERSONA))
    judge = _copy_judge(setup, "judge-file", data.prompt_fingerprints([{"prompt": rendered.rows[1]}]))
    evaluation = evaluate(setup["store"], setup["kto"],
                          EvalOptions(baseline="base", judge=judge, prompts_file=path, samples=1, max_new_tokens=4),
                          personas=setup["personas"], progress=False)
    prompts = evaluation["prompts"]
    assert (prompts["source"], prompts["available"], prompts["removed_judge_trained"], prompts["used"]) == (
        "file", 3, 1, 2)
    assert [s["prompt"] for s in evaluation["samples"]] == ["Where be the treasure?", "Who is the captain?"]


def test_a_declared_rule_judges_alone_when_there_is_no_reward_run(setup, tmp_path):
    """A policy run of a persona with no reward run: the rule is the only judge; no win rate, no reward."""
    runs, store = setup["runs"], setup["store"]
    kto = runs.get_run(setup["kto"])
    out = tmp_path / "assistant-kto"
    shutil.copytree(kto.output_dir, out)
    shutil.rmtree(out / "evaluation", ignore_errors=True)
    run_id = runs.create_run("kto", persona_id="assistant", config=kto.config, output_dir=str(out))
    runs.register_candidate(run_id, base_model=str(setup["tiny_model"]), adapter_path=str(out / "adapter"),
                            metrics={})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I boil an egg?\nWhat is a cloud?\n")
    options = EvalOptions(baseline="base", prompts_file=prompts, samples=1, max_new_tokens=4)
    with pytest.raises(EvaluationError, match="no succeeded reward run for persona assistant to judge with"):
        evaluate(store, run_id, options, personas=setup["personas"], progress=False)
    evaluation = evaluate(store, run_id, replace(options, rule="digits"), personas=setup["personas"],
                          progress=False)
    assert evaluation["judge"] is None and evaluation["win_rate"] is None
    assert evaluation["metrics"]["candidate"]["reward_mean"] is None
    assert [c["name"] for c in evaluation["gate"]["checks"][:2]] == ["independent_judges", "rule_gain_lower"]
    assert evaluation["gate"]["checks"][0]["value"] == 1
    report = (out / "evaluation" / "report.md").read_text()
    assert "## Win rate" not in report and "**Rule** `digits`" in report and "| mean reward" not in report
    assert not (out / "evaluation" / "reward_distribution.png").exists()


# -- refusals ----------------------------------------------------------------------------


def _refused(setup, run_id, match, **options):
    with pytest.raises(EvaluationError, match=match):
        evaluate(setup["store"], run_id, EvalOptions(**{"baseline": "base", **FAST, **options}),
                 personas=setup["personas"], progress=False)


def test_reward_run_is_not_a_candidate(setup):
    _refused(setup, setup["judge"], rf"run {setup['judge']} is a reward run, not a policy run \(kto, ppo, dpo\)",
             judge=setup["judge"])


def test_unknown_and_unfinished_runs_are_refused(setup):
    _refused(setup, 999, "alignment run 999 does not exist")
    unfinished = setup["runs"].create_run("kto", persona_id=PERSONA, config={"eval_fraction": 0.3, "seed": 0})
    _refused(setup, unfinished, rf"run {unfinished} has no candidate version \(status queued\)")


def test_bad_judges_are_refused(setup):
    _refused(setup, setup["kto"], rf"judge run {setup['kto']} is a kto run, not a reward run", judge=setup["kto"])
    _refused(setup, setup["kto"], "judge run 999 does not exist", judge=999)
    unknown = _copy_judge(setup, "judge-unknown", None)
    _refused(setup, setup["kto"], rf"judge run {unknown} has no train_prompts.json", judge=unknown)
    failed = setup["runs"].create_run("reward", persona_id=PERSONA)
    setup["runs"].set_status(failed, "failed", "boom")
    _refused(setup, setup["kto"], rf"judge run {failed} has status failed, not succeeded", judge=failed)


def test_judge_trained_on_every_held_out_prompt_leaves_none(setup):
    everything = data.prompt_fingerprints(setup["held_out"].train + setup["held_out"].eval)
    judge = _copy_judge(setup, "judge-all", everything)
    used = len(setup["held_out"].eval)
    _refused(setup, setup["kto"], rf"no held-out prompts left: {used} from run {setup['kto']}'s held-out split, "
                                  rf"{used} removed as judge run {judge} trained on them", judge=judge)


def test_bad_baselines_are_refused(setup):
    version = setup["runs"].candidate_for_run(setup["kto"])
    _refused(setup, setup["kto"], f"the baseline v{version} is the candidate itself", baseline=str(version))
    _refused(setup, setup["kto"], "baseline model version 999 does not exist", baseline="999")
    _refused(setup, setup["kto"], "--baseline must be a model version id or 'base', not 'best'", baseline="best")
    judge_version = setup["runs"].candidate_for_run(setup["judge"])
    _refused(setup, setup["kto"], f"baseline v{judge_version} has no causal-LM LoRA adapter",
             baseline=str(judge_version))
    other = setup["store"].get_or_create_model_version("another-model")
    _refused(setup, setup["kto"], f"baseline v{other} runs on base model 'another-model'", baseline=str(other))


# -- the command ----------------------------------------------------------------------------


def test_align_evaluate_command(setup, capsys):
    from chatbot.cli import main

    url = str(setup["store"].engine.url)
    kto, judge = setup["kto"], setup["judge"]
    code = main(["align", "evaluate", str(kto), "--db-url", url, "--baseline", "base", "--judge", str(judge),
                 "--samples", "1", "--max-new-tokens", "3", "--rule", "question", "--seed", "7"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["run"] == kto and summary["judge"] == judge and summary["baseline"] == "base model"
    assert summary["prompts"] == len(setup["held_out"].eval) and set(summary["reward"]) == {"candidate", "baseline"}
    assert Path(summary["report"]).is_file() and summary["report"].endswith("evaluation/report.md")
    stored = json.loads(Path(summary["evaluation"]).read_text())
    assert stored["sampling"]["seed"] == 7 and stored["rule"]["spec"] == "question"
    assert summary["gate_passed"] == stored["gate"]["passed"]

    for args, message in (([str(judge)], f"run {judge} is a reward run, not a policy run"),
                          (["999"], "alignment run 999 does not exist"),
                          ([str(kto), "--judge", str(kto)], f"judge run {kto} is a kto run, not a reward run"),
                          ([str(kto), "--rule", "long"], "unknown rule 'long'")):
        code = main(["align", "evaluate", *args, "--db-url", url, "--baseline", "base"])
        err = capsys.readouterr().err
        assert code == 1 and f"persona-studio: error: {message}" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
