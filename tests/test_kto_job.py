"""KTO job on a tiny random model with the real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_helpers import InterruptAt, Snapshot

from alignment.kto import KTORecipe, class_weights, kto_report, train_kto
from chatbot.store.runs import RunStore

REPO = Path(__file__).resolve().parent.parent


def _rows(n: int, offset: int = 0, labels: str = "both") -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        liked = (i % 2 == 0) if labels == "both" else labels == "liked"
        reply = f"Arr, island {i} be full of gold, arr!" if liked else f"Island {i} is a nice place to visit."
        rows.append({"prompt": [{"role": "system", "content": "You are a pirate."},
                                {"role": "user", "content": f"Tell me about island {i}."}],
                     "completion": [{"role": "assistant", "content": reply}], "label": liked})
    return rows


def _recipe(tiny_model: Path, **overrides) -> KTORecipe:
    values = {"base_model": str(tiny_model), "lora_r": 4, "lora_alpha": 8, "learning_rate": 5e-3,
              "max_steps": 4, "per_device_train_batch_size": 4, "max_length": 128, "min_rows": 8,
              "save_steps": 2, "seed": 0}
    values.update(overrides)
    return KTORecipe(**values)


def test_kto_job_trains_saves_and_registers(tiny_model, store, tmp_path):
    from safetensors import safe_open
    from sqlalchemy import select

    from chatbot.store.models import ModelVersion

    runs = RunStore(store.engine)
    run_id = runs.create_run("kto", persona_id="pirate", output_dir=str(tmp_path / "run"))
    snapshot = Snapshot()
    result = train_kto(_recipe(tiny_model), _rows(24), _rows(8, offset=100), tmp_path / "run",
                       run_store=runs, run_id=run_id, progress=False, callbacks=[snapshot.callback])

    changed = [n for n in snapshot.before if not snapshot.before[n].equal(snapshot.after[n])]
    assert changed and all("lora" in n for n in snapshot.before)
    with safe_open(str(result.adapter_dir / "adapter_model.safetensors"), "pt") as weights:
        assert any("lora" in key for key in weights.keys())  # noqa: SIM118
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"

    m = result.metrics
    assert (m["eval_rows"], m["eval_desirable"], m["eval_undesirable"]) == (8, 4, 4)
    assert (m["train_rows"], m["train_desirable"], m["train_undesirable"]) == (24, 12, 12)
    for key in ("desirable_mean_logratio", "undesirable_mean_logratio", "logratio_margin", "roc_auc"):
        assert isinstance(m[key], float)
    assert 0.0 <= m["desirable_positive_rate"] <= 1.0 and 0.0 <= m["undesirable_negative_rate"] <= 1.0
    assert m["desirable_mean_logratio"] != 0.0  # the adapter moved the policy off the reference
    assert result.global_step == 4
    # Balanced data: 'auto' weights 7/6 : 1, a ratio inside TRL's [1, 4/3].
    assert m["weights_from"] == "auto" and m["weighted_ratio"] == pytest.approx(7 / 6)

    run = runs.get_run(run_id)
    assert run.status == "succeeded" and run.progress == 1.0
    assert run.metrics["eval"]["logratio_margin"] == m["logratio_margin"]
    assert len(run.metrics["history"]) >= 4
    assert any("loss" in entry for entry in run.metrics["history"])
    version = runs.candidate_for_run(run_id)
    assert version == result.version_id is not None
    with store.engine.connect() as conn:
        row = conn.execute(select(ModelVersion).where(ModelVersion.id == version)).one()
    assert row.status == "candidate" and row.run_id == run_id
    assert row.adapter_path == str(result.adapter_dir.resolve())


def test_interrupted_kto_job_resumes(tiny_model, store, tmp_path):
    runs = RunStore(store.engine)
    run_id = runs.create_run("kto")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_kto(_recipe(tiny_model), _rows(24), _rows(6, 100), out, run_store=runs, run_id=run_id,
                  progress=False, callbacks=[InterruptAt(3).callback])
    assert runs.get_run(run_id).status == "interrupted"
    assert runs.candidate_for_run(run_id) is None
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not (out / "adapter").exists()

    with pytest.raises(ValueError, match="resume"):
        train_kto(_recipe(tiny_model), _rows(24), _rows(6, 100), out, progress=False)

    result = train_kto(_recipe(tiny_model), _rows(24), _rows(6, 100), out, run_store=runs,
                       run_id=run_id, resume=True, progress=False)
    assert result.resumed_from == out / "checkpoints" / "checkpoint-2"
    assert result.global_step == 4
    loss_steps = [e["step"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if "loss" in e]
    assert loss_steps == [1, 2, 3, 4]
    assert runs.get_run(run_id).status == "succeeded"
    assert runs.candidate_for_run(run_id) == result.version_id


@pytest.mark.parametrize("rows, message", [
    ([], r"train: no KTO rows \(0 rows\)"),
    ("liked", r"train: all 20 rows are desirable \(20 desirable, 0 undesirable\); KTO needs both"),
    ("disliked", r"train: all 20 rows are undesirable \(0 desirable, 20 undesirable\)"),
    ("few", r"train: 5 rows \(3 desirable, 2 undesirable\); the recipe needs min_rows=8"),
    ([{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "a"}]}] * 3,
     r"train: 3 rows, malformed: 3 missing 'label'"),
])
def test_bad_kto_data_is_refused_with_counts(tiny_model, store, tmp_path, rows, message):
    rows = {"liked": _rows(20, labels="liked"), "disliked": _rows(20, labels="disliked"),
            "few": _rows(5)}.get(rows, rows) if isinstance(rows, str) else rows
    runs = RunStore(store.engine)
    run_id = runs.create_run("kto")
    with pytest.raises(ValueError, match=message):
        train_kto(_recipe(tiny_model), rows, _rows(4, 100), tmp_path / "run", run_store=runs, run_id=run_id,
                  progress=False)
    assert runs.candidate_for_run(run_id) is None


def test_kto_report_is_per_row():
    report = kto_report([1.0, -0.5, 0.5, -2.0, 3.0], [True, True, False, False, False], beta=0.1)
    assert report["desirable_mean_logratio"] == pytest.approx(0.25)
    assert report["undesirable_mean_logratio"] == pytest.approx(0.5)
    assert report["logratio_margin"] == pytest.approx(-0.25)
    assert report["desirable_positive_rate"] == pytest.approx(0.5)
    assert report["undesirable_negative_rate"] == pytest.approx(1 / 3)
    one_label = kto_report([1.0], [True], beta=0.1)
    assert one_label["undesirable_mean_logratio"] is None and one_label["roc_auc"] is None


@pytest.mark.parametrize("name", ["kto_cpu.yaml", "kto_gpu.yaml"])
def test_kto_recipes_load(name):
    recipe = KTORecipe.from_yaml(REPO / "alignment" / "recipes" / name)
    assert recipe.lora_r > 0 and recipe.per_device_train_batch_size > 1 and recipe.beta > 0


def test_unknown_kto_recipe_key_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("beta: 0.1\nmin_pairs: 8\n")
    with pytest.raises(ValueError, match="min_pairs"):
        KTORecipe.from_yaml(path)


@pytest.mark.parametrize("liked, disliked, expected", [
    (49, 359, (7 / 6 * 359 / 49, 1.0)),  # the feedback: the rare likes weigh 8.5x
    (300, 100, (1.0, 300 / 100 / (7 / 6))),  # mostly likes: the dislikes are raised instead
    (10, 10, (7 / 6, 1.0)),
])
def test_auto_weights_follow_the_data_balance(liked, disliked, expected):
    weights = class_weights(KTORecipe(), liked, disliked)
    assert (weights["desirable_weight"], weights["undesirable_weight"]) == pytest.approx(expected)
    assert min(weights["desirable_weight"], weights["undesirable_weight"]) == 1.0
    ratio = weights["desirable_weight"] * liked / (weights["undesirable_weight"] * disliked)
    assert weights["weighted_ratio"] == pytest.approx(ratio) == pytest.approx(7 / 6)
    assert weights["in_recommended_range"] is True and weights["weights_from"] == "auto"


def test_recipe_weights_are_used_as_given_and_flagged_outside_the_guidance(caplog):
    weights = class_weights(KTORecipe(desirable_weight=1.0, undesirable_weight=1.0), 49, 359)
    assert (weights["desirable_weight"], weights["undesirable_weight"], weights["weights_from"]) == (1.0, 1.0, "recipe")
    assert weights["weighted_ratio"] == pytest.approx(49 / 359) and weights["in_recommended_range"] is False
    assert "outside TRL's recommended [1, 4/3]" in caplog.text


@pytest.mark.parametrize("values, message", [
    ({"desirable_weight": "auto", "undesirable_weight": 2.0}, "both 'auto' or both numbers"),
    ({"desirable_weight": 0, "undesirable_weight": 1.0}, "must be positive numbers or 'auto'"),
    ({"desirable_weight": "heavy", "undesirable_weight": "auto"}, "both 'auto' or both numbers"),
])
def test_bad_weights_are_refused_when_the_recipe_loads(values, message):
    with pytest.raises(ValueError, match=message):
        KTORecipe(**values)


def test_trained_weights_are_the_auto_ones(tiny_model, tmp_path):
    """An unbalanced train split (6 liked, 18 disliked): the trainer got weights 3.5 : 1 and the run records them."""
    rows = _rows(24)
    for i, row in enumerate(rows):
        row["label"] = i % 4 == 0
    seen = {}

    from transformers import TrainerCallback

    class Weights(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update(desirable=args.desirable_weight, undesirable=args.undesirable_weight)

    result = train_kto(_recipe(tiny_model, max_steps=1), rows, _rows(8, offset=100), tmp_path / "run",
                       progress=False, callbacks=[Weights()])
    assert seen == {"desirable": pytest.approx(3.5), "undesirable": 1.0}
    m = result.metrics
    assert (m["train_desirable"], m["train_undesirable"]) == (6, 18)
    assert (m["desirable_weight"], m["undesirable_weight"]) == (pytest.approx(3.5), 1.0)
