"""DPO job on a tiny random model with the real tokenizer: same-context pairs from a SQLite store,
the run's layout and bookkeeping, per-pair eval metrics, resume, refusals, `align dpo` and
`align evaluate` on its candidate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from training_helpers import InterruptAt, Snapshot

from alignment import data
from alignment.dpo import DPORecipe, dpo_report, pair_logratios, train_dpo
from alignment.gate import GateBounds
from chatbot.store import ChatStore
from chatbot.store.runs import RunStore

REPO = Path(__file__).resolve().parent.parent
PERSONA = "pirate"
CONVERSATIONS = 30
EVAL_FRACTION = 0.3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads on a shared 2-core machine (see tests/test_evaluate.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompt(i: int) -> list[dict]:
    return [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": f"Question {i}?"}]


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


def _recipe(tiny_model: Path, **overrides) -> DPORecipe:
    values = {"base_model": str(tiny_model), "lora_r": 4, "lora_alpha": 8, "learning_rate": 5e-3,
              "max_steps": 4, "per_device_train_batch_size": 4, "max_length": 128, "min_pairs": 8,
              "save_steps": 2, "seed": 0, "eval_fraction": EVAL_FRACTION}
    values.update(overrides)
    return DPORecipe(**values)


def _same(row: dict) -> dict:
    """The pair with its rejected reply replaced by the chosen one: no signal."""
    return {**row, "rejected": row["chosen"]}


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """A store with same-context pairs, a tiny DPO run on them (with a parameter snapshot), and a
    tiny reward run to judge it."""
    from alignment.reward import RewardRecipe, train_reward

    folder = tmp_path_factory.mktemp("dpo")
    store = ChatStore.open(f"sqlite:///{folder / 'chat.db'}")
    _fill(store)
    runs = RunStore(store.engine)
    split = data.build_preference(store, persona=PERSONA, eval_fraction=EVAL_FRACTION, seed=0)

    recipe = _recipe(tiny_model, save_steps=100)
    out = folder / "dpo"
    run_id = runs.create_run("dpo", persona_id=PERSONA, config=recipe.to_dict(), dataset_hash=split.snapshot_hash,
                             dataset_stats=split.stats, output_dir=str(out))
    data.write_train_prompts(out, split.train)  # what `persona-studio align` (chatbot/cli/align.py) does for every job
    snapshot = Snapshot()
    train = split.trl("train")
    # Two pairs with chosen == rejected: dropped by validation, not trained on.
    # Eval rows carry data.DIAGNOSTIC_COLUMNS: here every liked reply ended with EOS, no disliked one did.
    eval_rows = [{**row, "chosen_eos": True, "rejected_eos": False} for row in split.trl("eval")]
    result = train_dpo(recipe, train + [_same(train[0]), _same(train[1])], eval_rows, out,
                       run_store=runs, run_id=run_id, progress=False, callbacks=[snapshot.callback])

    judge_out = folder / "reward"
    judge_recipe = RewardRecipe(base_model=str(tiny_model), lora_r=4, lora_alpha=8, learning_rate=5e-3, max_steps=4,
                                per_device_train_batch_size=4, max_length=128, save_steps=100, seed=0, min_pairs=8,
                                eval_fraction=EVAL_FRACTION)
    judge = runs.create_run("reward", persona_id=PERSONA, config=judge_recipe.to_dict(),
                            dataset_hash=split.snapshot_hash, dataset_stats=split.stats, output_dir=str(judge_out))
    data.write_train_prompts(judge_out, split.train)
    train_reward(judge_recipe, split.trl("train"), split.trl("eval"), judge_out, run_store=runs, run_id=judge,
                 progress=False)
    yield {"store": store, "runs": runs, "split": split, "run": run_id, "result": result, "snapshot": snapshot,
           "judge": judge, "folder": folder, "recipe": recipe}
    store.close()


def test_dpo_job_trains_saves_and_registers(setup):
    from safetensors import safe_open
    from sqlalchemy import select

    from chatbot.store.models import ModelVersion

    store, runs, run_id, result, split = setup["store"], setup["runs"], setup["run"], setup["result"], setup["split"]
    snapshot = setup["snapshot"]
    changed = [n for n in snapshot.before if not snapshot.before[n].equal(snapshot.after[n])]
    assert changed and all("lora" in n for n in snapshot.before)  # only the adapter trains
    with safe_open(str(result.adapter_dir / "adapter_model.safetensors"), "pt") as weights:
        assert any("lora" in key for key in weights.keys())  # noqa: SIM118
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert (result.adapter_dir / "tokenizer_config.json").is_file()

    m = result.metrics
    assert m["eval_pairs"] == len(split.eval) >= 3
    assert m["train_pairs"] == len(split.train)  # the two chosen == rejected pairs were dropped
    assert m["train_dropped_too_long"] == m["eval_dropped_too_long"] == 0
    assert 0.0 <= m["pairwise_accuracy"] <= 1.0
    assert m["pairwise_accuracy"] * m["eval_pairs"] == pytest.approx(round(m["pairwise_accuracy"] * m["eval_pairs"]))
    assert m["mean_margin"] == pytest.approx(m["beta"] * (m["chosen_mean_logratio"] - m["rejected_mean_logratio"]))
    assert m["chosen_mean_logratio"] != 0.0  # the adapter moved the policy off the reference
    assert m["longer_reply_accuracy"] == 1.0  # "Arr, answer i, matey!" is always longer than "The answer is i."
    assert (m["beta"], m["loss_type"], m["global_step"]) == (0.1, "sigmoid", 4) and result.global_step == 4
    assert "chat_template" in m["token_boundary"]
    # What the implicit rewards follow besides the thumbs (metrics.shortcut_report, as for the reward job).
    assert m["eval_replies"] == 2 * m["eval_pairs"] and 0 <= m["length_matched_pairs"] <= m["eval_pairs"]
    assert m["score_eos_corr"] == pytest.approx(m["score_label_corr"])  # EOS is the label in these rows
    assert -1.0 <= m["score_length_corr"] <= 1.0 and -1.0 <= m["label_length_corr"] <= 1.0
    report = json.loads((setup["folder"] / "dpo" / "report.json").read_text())
    assert report["metrics"] == json.loads(json.dumps(m)) and report["recipe"]["loss_type"] == "sigmoid"

    run = runs.get_run(run_id)
    assert run.status == "succeeded" and run.progress == 1.0
    assert run.metrics["eval"]["mean_margin"] == m["mean_margin"]
    assert len(run.metrics["history"]) >= 4 and any("loss" in entry for entry in run.metrics["history"])
    # Step 1 runs before any update: the fresh adapter (B = 0) equals the reference, the adapter disabled,
    # so every margin is exactly 0 and the sigmoid loss is ln 2.
    first = run.metrics["history"][0]
    assert first["step"] == 1 and first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    version = runs.candidate_for_run(run_id)
    assert version == result.version_id is not None
    with store.engine.connect() as conn:
        row = conn.execute(select(ModelVersion).where(ModelVersion.id == version)).one()
    assert row.status == "candidate" and row.run_id == run_id and row.persona_id == PERSONA
    assert row.adapter_path == str(result.adapter_dir.resolve())


def test_eval_metrics_are_per_pair_and_reproduced_by_the_saved_adapter(setup, tiny_model):
    """The saved adapter, reloaded, gives the report's figures one pair at a time: nothing depends on
    the batch the pairs were scored in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, rows = setup["result"], setup["split"].trl("eval")
    tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result.adapter_dir)
    chosen, rejected = pair_logratios(model, tokenizer, rows, batch_size=1, max_length=128)
    lengths = [len(row["chosen"][0]["content"]) for row in rows], [len(row["rejected"][0]["content"]) for row in rows]
    again = dpo_report(chosen, rejected, *lengths, beta=0.1)
    for key in ("eval_pairs", "pairwise_accuracy", "longer_reply_accuracy"):
        assert again[key] == result.metrics[key], key
    for key in ("mean_margin", "chosen_mean_logratio", "rejected_mean_logratio"):
        assert again[key] == pytest.approx(result.metrics[key], abs=1e-4), key
    assert pair_logratios(model, tokenizer, rows, batch_size=8, max_length=128)[0] == pytest.approx(chosen, abs=1e-4)


def test_dpo_report_is_per_pair():
    # Log-ratios per pair: margins 0.1 * (2, -1, 0.5) -> two of three ranked right.
    report = dpo_report([1.0, -1.0, 0.0], [-1.0, 0.0, -0.5], [10, 5, 7], [3, 5, 9], beta=0.1)
    assert report["eval_pairs"] == 3
    assert report["pairwise_accuracy"] == pytest.approx(2 / 3)
    assert report["mean_margin"] == pytest.approx(0.1 * 1.5 / 3)
    assert report["chosen_mean_logratio"] == pytest.approx(0.0)
    assert report["rejected_mean_logratio"] == pytest.approx(-0.5)
    assert report["longer_reply_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert dpo_report([0.5], [0.5], [1], [1], beta=0.1)["pairwise_accuracy"] == 0.0  # a tie is not a win
    with pytest.raises(ValueError, match="2 chosen scores but 1 rejected"):
        dpo_report([1.0, 2.0], [1.0], [1, 1], [1], beta=0.1)


def test_interrupted_dpo_job_resumes(setup, tiny_model, tmp_path):
    runs, split = setup["runs"], setup["split"]
    train, eval_ = split.trl("train"), split.trl("eval")
    run_id = runs.create_run("dpo")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_dpo(_recipe(tiny_model), train, eval_, out, run_store=runs, run_id=run_id, progress=False,
                  callbacks=[InterruptAt(3).callback])
    assert runs.get_run(run_id).status == "interrupted"
    assert runs.candidate_for_run(run_id) is None
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not (out / "adapter").exists()

    with pytest.raises(ValueError, match="resume"):
        train_dpo(_recipe(tiny_model), train, eval_, out, progress=False)

    result = train_dpo(_recipe(tiny_model), train, eval_, out, run_store=runs, run_id=run_id, resume=True,
                       progress=False)
    assert result.resumed_from == out / "checkpoints" / "checkpoint-2"
    assert result.global_step == 4
    loss_steps = [e["step"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if "loss" in e]
    assert loss_steps == [1, 2, 3, 4]
    assert runs.get_run(run_id).status == "succeeded"
    assert runs.candidate_for_run(run_id) == result.version_id


@pytest.mark.parametrize("rows, message", [
    ([], r"train: no preference rows \(0 pairs\)"),
    ("identical", r"train: all 6 pairs have chosen == rejected; nothing to learn"),
    ("few", r"train: 5 usable pairs \(7 rows, 2 with chosen == rejected\); the recipe needs min_pairs=8"),
    ([{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}]}] * 3,
     r"train: 3 rows, malformed: 3 missing 'rejected'"),
])
def test_bad_dpo_data_is_refused_with_counts(setup, tiny_model, tmp_path, rows, message):
    train = setup["split"].trl("train")
    if rows == "identical":
        rows = [_same(row) for row in train[:6]]
    elif rows == "few":
        rows = train[:5] + [_same(row) for row in train[5:7]]
    runs = setup["runs"]
    run_id = runs.create_run("dpo")
    with pytest.raises(ValueError, match=message):
        train_dpo(_recipe(tiny_model), rows, setup["split"].trl("eval"), tmp_path / "run", run_store=runs,
                  run_id=run_id, progress=False)
    assert runs.candidate_for_run(run_id) is None


def test_prompts_longer_than_max_length_are_counted_and_refused(setup, tiny_model, tmp_path):
    runs, split = setup["runs"], setup["split"]
    run_id = runs.create_run("dpo")
    with pytest.raises(ValueError, match=rf"train \(after dropping {len(split.train)} prompts >= max_length=8\): "
                                         r"no preference rows \(0 pairs\)"):
        train_dpo(_recipe(tiny_model, max_length=8), split.trl("train"), split.trl("eval"), tmp_path / "run",
                  run_store=runs, run_id=run_id, progress=False)
    assert runs.get_run(run_id).status == "failed" and runs.candidate_for_run(run_id) is None


@pytest.mark.parametrize("name", ["dpo_cpu.yaml", "dpo_gpu.yaml"])
def test_shipped_dpo_recipes_load_and_state_the_default_gate(name):
    recipe = DPORecipe.from_yaml(REPO / "alignment" / "recipes" / name)
    assert recipe.lora_r > 0 and recipe.beta > 0 and recipe.loss_type == "sigmoid" and recipe.min_pairs > 0
    assert GateBounds.from_config(recipe.to_dict()) == GateBounds()
    assert set(recipe.gate) == set(GateBounds().to_dict())


def test_bad_dpo_recipes_are_refused_before_training(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("beta: 0.1\nmin_rows: 8\n")
    with pytest.raises(ValueError, match="unknown key.*min_rows"):
        DPORecipe.from_yaml(path)
    with pytest.raises(ValueError, match="max_kll"):
        DPORecipe(gate={"max_kll": 3})
    with pytest.raises(ValueError, match="loss_type 'sigmoidd' is not one of sigmoid, hinge, ipo"):
        DPORecipe(loss_type="sigmoidd")


def test_align_dpo_command_then_evaluate(setup, tiny_model, tmp_path, capsys):
    """`align dpo` from the store end to end, then `align evaluate` takes its run as a policy run."""
    from chatbot.cli import main

    url = str(setup["store"].engine.url)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"base_model: {tiny_model}\nmax_steps: 3\nsave_steps: 2\nmin_pairs: 8\nlora_r: 4\n"
                      f"lora_alpha: 8\nlearning_rate: 5.0e-3\nper_device_train_batch_size: 4\n"
                      f"gradient_accumulation_steps: 1\nmax_length: 128\neval_fraction: {EVAL_FRACTION}\nseed: 0\n")
    code = main(["align", "dpo", "--recipe", str(recipe), "--db-url", url, "--data-dir", str(tmp_path / "data"),
                 "--persona", PERSONA, "--output", str(tmp_path / "cli-run")])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    # The command trains on the policy part of the feedback by default (the judge part is set aside).
    split = data.build_preference(setup["store"], persona=PERSONA, eval_fraction=EVAL_FRACTION, seed=0, part="policy")
    assert len(split.train) < len(setup["split"].train) and split.eval == setup["split"].eval
    assert f"DPO policy on {len(split.train)} train / {len(split.eval)} eval pairs" in captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    runs = setup["runs"]
    run = runs.get_run(result["run"])
    assert (run.kind, run.status, run.persona_id) == ("dpo", "succeeded", PERSONA)
    assert result["version"] == runs.candidate_for_run(result["run"])
    assert result["adapter"] == str(tmp_path / "cli-run" / "adapter")
    assert result["metrics"]["eval_pairs"] == len(split.eval) and result["metrics"]["global_step"] == 3
    assert (tmp_path / "cli-run" / "train_prompts.json").is_file()

    code = main(["align", "evaluate", str(result["run"]), "--db-url", url, "--baseline", "base",
                 "--judge", str(setup["judge"]), "--samples", "1", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["run"] == result["run"] and summary["judge"] == setup["judge"]
    evaluation = json.loads(Path(summary["evaluation"]).read_text())
    assert evaluation["kind"] == "dpo" and evaluation["candidate"]["version"] == result["version"]
    assert evaluation["prompts"]["used"] > 0 and evaluation["metrics"]["candidate"]["kl_mean"] != 0.0
    assert setup["store"].get_version(result["version"]).metrics["evaluation"]["gate"] == evaluation["gate"]


@pytest.mark.parametrize(("line", "error"), [
    ("learning_rate: fast", "r.yaml: learning_rate must be a number, not 'fast'"),
    ("learning_rate: 5e-6", "not '5e-6' (YAML reads 5e-6 as text; write it with a dot"),
    ("lora_r: 2.5", "lora_r must be a whole number, not 2.5"),
    ("bf16: maybe", "bf16 must be true or false, not 'maybe'"),
    ("lora_target_modules: q_proj", "lora_target_modules must be a list of text, not 'q_proj'"),
    ("gate: 3", "gate must be a mapping, not 3"),
])
def test_a_recipe_value_of_the_wrong_type_is_refused_with_its_key(tmp_path, line, error):
    """Every recipe kind loads through RecipeLoader.from_dict: the CLI's --recipe and the Alignment tab's editor."""
    path = tmp_path / "r.yaml"
    path.write_text(line + "\n")
    with pytest.raises(ValueError) as raised:
        DPORecipe.from_yaml(path)
    assert error in str(raised.value)
    assert DPORecipe.from_dict({"learning_rate": 5, "lora_r": 8, "bf16": True}).learning_rate == 5  # ints are numbers
