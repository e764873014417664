"""Reward-model job on a tiny random model with the real tokenizer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from training_helpers import InterruptAt, Snapshot

from alignment import metrics
from alignment.reward import RewardRecipe, encode_pair_side, train_reward
from alignment.training import ensure_pad_token
from chatbot.store.runs import RunStore

REPO = Path(__file__).resolve().parent.parent


# -- metrics ------------------------------------------------------------------


def test_pairwise_accuracy_is_per_pair_not_per_batch():
    # 17 pairs in batches 8/8/1. Batch 1 has 8/8 right, batch 2
    # 5/8, the last pair is wrong: a mean of batch means says 0.54, the
    # pairs say 13/17 = 0.76.
    chosen = [1.0] * 13 + [0.0] * 4
    rejected = [0.0] * 13 + [1.0] * 4
    chosen = chosen[:8] + chosen[8:13] + [0.0] * 3 + [0.0]
    rejected = rejected[:8] + rejected[8:13] + [1.0] * 3 + [1.0]
    batches = [(0, 8), (8, 16), (16, 17)]
    batch_means = [metrics.pairwise_accuracy(chosen[a:b], rejected[a:b]) for a, b in batches]
    assert sum(batch_means) / 3 == pytest.approx((1 + 5 / 8 + 0) / 3)
    assert metrics.pairwise_accuracy(chosen, rejected) == pytest.approx(13 / 17)


def test_margin_auc_and_length_baseline():
    assert metrics.mean_margin([2.0, 1.0], [0.0, 2.0]) == pytest.approx(0.5)
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert metrics.roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.5)  # ties count half
    with pytest.raises(ValueError, match="both classes"):
        metrics.roc_auc([0.1, 0.2], [1, 1])
    assert metrics.longer_reply_accuracy([10, 5, 3], [2, 5, 9]) == pytest.approx(1.5 / 3)


def test_shortcut_report_separates_what_the_scores_follow():
    import numpy as np

    R = metrics.Reply
    a, b = R("a", 1.0, 10, True), R("b", 0.0, 30, False)
    c, d = R("c", 2.0, 20, True), R("d", 3.0, 21, True)
    report = metrics.shortcut_report([(a, b), (c, d), (a, d)])
    # Only (c, d) is length-matched (20 vs 21 tokens), and there the model is wrong.
    assert (report["length_matched_pairs"], report["length_matched_accuracy"]) == (1, 0.0)
    assert report["eval_replies"] == 4  # a and d appear in two pairs each, counted once
    scores, labels, lengths, eos = [1, 0, 2, 3], [1, 0, 1, 0], [10, 30, 20, 21], [1, 0, 1, 1]
    assert report["score_label_corr"] == pytest.approx(np.corrcoef(scores, labels)[0, 1])
    assert report["score_length_corr"] == pytest.approx(np.corrcoef(scores, lengths)[0, 1])
    assert report["score_eos_corr"] == pytest.approx(np.corrcoef(scores, eos)[0, 1])
    assert report["label_length_corr"] == pytest.approx(np.corrcoef(labels, lengths)[0, 1])
    # An unrecorded end and a constant column give None, not a made-up number.
    unknown = metrics.shortcut_report([(R("x", 1.0, 5, None), R("y", 0.0, 5, True))])
    assert unknown["score_eos_corr"] is None and unknown["score_length_corr"] is None
    assert unknown["length_matched_accuracy"] == 1.0
    assert metrics.length_matched(100, 110) and not metrics.length_matched(100, 112)
    assert metrics.length_matched(3, 5) and not metrics.length_matched(3, 6)


# -- the job ------------------------------------------------------------------


def _rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        prompt = [{"role": "system", "content": "You are a pirate."},
                  {"role": "user", "content": f"Tell me about island {i}."}]
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": f"Arr, island {i} be full of gold, arr!"}],
            "rejected": [{"role": "assistant", "content": f"Island {i} is a nice place to visit."}],
        })
    return rows


def _recipe(tiny_model: Path, **overrides) -> RewardRecipe:
    values = {"base_model": str(tiny_model), "lora_r": 4, "lora_alpha": 8, "learning_rate": 5e-3,
              "max_steps": 4, "per_device_train_batch_size": 4, "max_length": 128, "min_pairs": 8,
              "save_steps": 2, "seed": 0}
    values.update(overrides)
    return RewardRecipe(**values)


def test_reward_job_trains_saves_and_registers(tiny_model, store, tmp_path):
    from safetensors import safe_open

    runs = RunStore(store.engine)
    run_id = runs.create_run("reward", persona_id="pirate", output_dir=str(tmp_path / "run"))
    snapshot = Snapshot()
    # Eval rows carry data.DIAGNOSTIC_COLUMNS: here every liked reply ended with EOS, no disliked one did.
    eval_rows = [{**row, "chosen_eos": True, "rejected_eos": False} for row in _rows(8, offset=100)]
    result = train_reward(_recipe(tiny_model), _rows(24), eval_rows, tmp_path / "run",
                          run_store=runs, run_id=run_id, progress=False, callbacks=[snapshot.callback])

    changed = [n for n in snapshot.before if not snapshot.before[n].equal(snapshot.after[n])]
    assert any("lora" in n for n in changed) and any("score" in n for n in changed)

    with safe_open(str(result.adapter_dir / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert any("score" in key for key in keys), keys
    assert any("lora" in key for key in keys)

    for key in ("pairwise_accuracy", "mean_margin", "roc_auc", "longer_reply_accuracy", "eval_pairs"):
        assert key in result.metrics
    assert 0.0 <= result.metrics["pairwise_accuracy"] <= 1.0
    assert result.metrics["eval_pairs"] == 8
    assert result.global_step == 4
    m = result.metrics
    assert m["eval_replies"] == 16 and 0 <= m["length_matched_pairs"] <= 8
    assert m["score_eos_corr"] == pytest.approx(m["score_label_corr"])  # EOS is the label in these rows
    assert -1.0 <= m["score_length_corr"] <= 1.0 and -1.0 <= m["label_length_corr"] <= 1.0

    run = runs.get_run(run_id)
    assert run.status == "succeeded" and run.progress == 1.0
    assert run.metrics["eval"]["pairwise_accuracy"] == result.metrics["pairwise_accuracy"]
    assert len(run.metrics["history"]) >= 4  # one log per step
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) >= 4
    stamps = [entry["time"] for entry in logged]  # wall-clock seconds, so step speed is readable from the file
    assert stamps == sorted(stamps) and abs(stamps[-1] - time.time()) < 600
    assert list((tmp_path / "run" / "checkpoints" / "runs").rglob("events.out.tfevents*"))  # TensorBoard
    version = runs.candidate_for_run(run_id)
    assert version == result.version_id is not None
    from sqlalchemy import select

    from chatbot.store.models import ModelVersion
    with store.engine.connect() as conn:
        row = conn.execute(select(ModelVersion).where(ModelVersion.id == version)).one()
    assert row.status == "candidate" and row.run_id == run_id
    assert row.adapter_path == str(result.adapter_dir.resolve())


def test_interrupted_job_registers_nothing_and_resumes(tiny_model, store, tmp_path):
    runs = RunStore(store.engine)
    run_id = runs.create_run("reward")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_reward(_recipe(tiny_model), _rows(24), _rows(6, 100), out, run_store=runs, run_id=run_id,
                     progress=False, callbacks=[InterruptAt(3).callback])
    run = runs.get_run(run_id)
    assert run.status == "interrupted"
    assert 0.0 < run.progress < 1.0
    assert runs.candidate_for_run(run_id) is None
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert not (out / "adapter").exists()

    with pytest.raises(ValueError, match="resume"):  # no silent restart over a checkpoint
        train_reward(_recipe(tiny_model), _rows(24), _rows(6, 100), out, progress=False)

    result = train_reward(_recipe(tiny_model), _rows(24), _rows(6, 100), out, run_store=runs,
                          run_id=run_id, resume=True, progress=False)
    assert result.resumed_from == out / "checkpoints" / "checkpoint-2"
    assert result.global_step == 4
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    import json

    loss_steps = [entry["step"] for entry in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if "loss" in entry]
    # Steps 1-2 ran before the interruption; after resuming, training went on at
    # step 3 (the interrupted step is redone from checkpoint-2), not at step 1.
    assert loss_steps == [1, 2, 3, 4]
    assert runs.get_run(run_id).status == "succeeded"
    assert runs.candidate_for_run(run_id) == result.version_id


@pytest.mark.parametrize("rows, message", [
    ([], r"train: no preference rows \(0 pairs\)"),
    ([{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}]}] * 3,
     r"train: 3 rows, malformed: 3 missing 'rejected'"),
    ([{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
       "rejected": [{"role": "assistant", "content": "a"}]}] * 20,
     r"train: all 20 pairs have chosen == rejected"),
    ("few", r"train: 5 usable pairs \(5 rows, 0 with chosen == rejected\); the recipe needs min_pairs=8"),
])
def test_bad_data_is_refused_with_counts(tiny_model, tmp_path, rows, message):
    rows = _rows(5) if rows == "few" else rows
    with pytest.raises(ValueError, match=message):
        train_reward(_recipe(tiny_model), rows, _rows(4, 100), tmp_path / "run", progress=False)


def test_training_and_scoring_share_the_eos_boundary(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    prompt = [{"role": "user", "content": "hi"}]
    ids = encode_pair_side(tokenizer, prompt, "arr")
    assert ids[-1] == tokenizer.eos_token_id  # ends at <|im_end|>, no trailing newline
    generation_prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    if hasattr(generation_prompt, "keys"):
        generation_prompt = generation_prompt["input_ids"]
    assert ids[:len(generation_prompt)] == list(generation_prompt)


@pytest.mark.parametrize("name", ["reward_cpu.yaml", "reward_gpu.yaml"])
def test_recipes_load(name):
    recipe = RewardRecipe.from_yaml(REPO / "alignment" / "recipes" / name)
    assert recipe.lora_r > 0 and recipe.save_steps > 0


def test_unknown_recipe_key_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lora_r: 8\nlearnig_rate: 1e-4\n")
    with pytest.raises(ValueError, match="learnig_rate"):
        RewardRecipe.from_yaml(path)
