"""`persona-studio align reward|runs|show` end to end on a real SQLite store and a tiny random model."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model


def fill(store, conversations: int) -> None:
    """Per conversation: one prompt, a liked 'arr' reply and a disliked plain one (regenerations)."""
    user = store.get_or_create_user("rater")
    model = store.get_or_create_model_version("tiny")
    for i in range(conversations):
        conv = store.create_conversation(user, "pirate", "v1")
        asked = store.add_message(conv, "user", f"Question {i}?")
        prompt = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": f"Question {i}?"}]
        good = store.add_message(conv, "assistant", f"Arr, answer {i}, matey!", parent_id=asked, prompt=prompt,
                                 model_version_id=model)
        bad = store.add_message(conv, "assistant", f"The answer is {i}.", parent_id=asked, prompt=prompt,
                                model_version_id=model)
        store.set_feedback(good, user, 1)
        store.set_feedback(bad, user, -1)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "chatbot.cli", "align", *args], capture_output=True, text=True,
                          timeout=300)


def test_reward_job_from_the_store_registers_a_candidate(store, tiny_model, tmp_path):
    fill(store, 30)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {tiny_model}\nmax_steps: 3\nsave_steps: 2\nmin_pairs: 8\n"
                      "per_device_train_batch_size: 4\ngradient_accumulation_steps: 1\n")
    url, data = str(store.engine.url), str(tmp_path / "data")
    done = cli("reward", "--recipe", str(recipe), "--db-url", url, "--data-dir", data, "--persona", "pirate")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] and 0.0 <= result["metrics"]["pairwise_accuracy"] <= 1.0
    listed = cli("runs", "--db-url", url)
    assert f"{result['run']:>4}  reward  succeeded" in listed.stdout
    shown = json.loads(cli("show", str(result["run"]), "--db-url", url).stdout)
    assert shown["status"] == "succeeded" and shown["dataset_hash"] and shown["persona_id"] == "pirate"
    with store.engine.connect() as conn:
        status, run_id = conn.exec_driver_sql(
            "select status, run_id from model_versions where id = ?", (result["version"],)).one()
    assert (status, run_id) == ("candidate", result["run"])


def test_too_little_data_is_refused_with_the_counts(store, tiny_model, tmp_path):
    fill(store, 3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {tiny_model}\nmin_pairs: 32\n")
    done = cli("reward", "--recipe", str(recipe), "--db-url", str(store.engine.url), "--persona", "pirate")
    assert done.returncode == 1
    assert "3 pairs for persona pirate" in done.stderr, done.stderr
    assert "the recipe needs at least 33 (32 train, 1 eval)" in done.stderr
    assert "Traceback" not in done.stderr


def test_kto_job_from_the_store_registers_a_candidate(store, tiny_model, tmp_path):
    fill(store, 30)
    recipe = tmp_path / "kto.yaml"
    recipe.write_text(f"base_model: {tiny_model}\nmax_steps: 3\nsave_steps: 2\nmin_rows: 8\n"
                      "per_device_train_batch_size: 4\ngradient_accumulation_steps: 1\n")
    url, data = str(store.engine.url), str(tmp_path / "data")
    done = cli("kto", "--recipe", str(recipe), "--db-url", url, "--data-dir", data, "--persona", "pirate")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    metrics = result["metrics"]
    assert result["version"] and metrics["eval_desirable"] > 0 and metrics["eval_undesirable"] > 0
    assert metrics["train_rows"] == metrics["train_desirable"] + metrics["train_undesirable"]
    assert "logratio_margin" in metrics
    listed = cli("runs", "--db-url", url, "--kind", "kto")
    assert f"{result['run']:>4}  kto     succeeded" in listed.stdout
    with store.engine.connect() as conn:
        status, run_id = conn.exec_driver_sql(
            "select status, run_id from model_versions where id = ?", (result["version"],)).one()
    assert (status, run_id) == ("candidate", result["run"])
    # Resuming a run as the wrong kind is refused.
    reward_recipe = tmp_path / "reward.yaml"
    reward_recipe.write_text(f"base_model: {tiny_model}\nmin_pairs: 8\n")
    wrong = cli("reward", "--recipe", str(reward_recipe), "--db-url", url, "--resume", str(result["run"]))
    assert wrong.returncode == 1 and f"run {result['run']} is a kto run, not reward" in wrong.stderr


def test_kto_too_little_data_is_refused_with_the_counts(store, tiny_model, tmp_path):
    fill(store, 3)
    recipe = tmp_path / "kto.yaml"
    recipe.write_text(f"base_model: {tiny_model}\nmin_rows: 32\n")
    done = cli("kto", "--recipe", str(recipe), "--db-url", str(store.engine.url), "--persona", "pirate")
    assert done.returncode == 1
    assert "for persona pirate" in done.stderr and "the recipe needs at least 33 (32 train, 1 eval)" in done.stderr
    assert "Traceback" not in done.stderr
