"""`persona-studio align reward|runs|show` end to end on a real SQLite store and a tiny random model.

The commands run in this process (`main(argv)`); a job killed with SIGKILL runs in its own.
"""

import json
import subprocess
import sys

import pytest
from cli_helpers import run_cli

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


@pytest.fixture
def cli():
    """`persona-studio align ARGS`, in this process."""
    def align(*args):
        return run_cli("align", *args)
    return align


def test_reward_job_from_the_store_registers_a_candidate(store, tiny_model, tmp_path, cli):
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


def test_too_little_data_is_refused_with_the_counts(store, tiny_model, tmp_path, cli):
    fill(store, 3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {tiny_model}\nmin_pairs: 32\n")
    done = cli("reward", "--recipe", str(recipe), "--db-url", str(store.engine.url), "--persona", "pirate")
    assert done.returncode == 1
    assert "3 pairs for persona pirate" in done.stderr, done.stderr
    assert "the recipe needs at least 33 (32 train, 1 eval)" in done.stderr
    assert "Traceback" not in done.stderr


def test_kto_job_from_the_store_registers_a_candidate(store, tiny_model, tmp_path, cli):
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


def test_kto_too_little_data_is_refused_with_the_counts(store, tiny_model, tmp_path, cli):
    fill(store, 3)
    recipe = tmp_path / "kto.yaml"
    recipe.write_text(f"base_model: {tiny_model}\nmin_rows: 32\n")
    done = cli("kto", "--recipe", str(recipe), "--db-url", str(store.engine.url), "--persona", "pirate")
    assert done.returncode == 1
    assert "for persona pirate" in done.stderr and "the recipe needs at least 33 (32 train, 1 eval)" in done.stderr
    assert "Traceback" not in done.stderr


def test_ppo_job_trains_against_the_newest_reward_run(store, tiny_model, tmp_path, cli):
    fill(store, 30)
    url, data = str(store.engine.url), str(tmp_path / "data")
    ppo_recipe = tmp_path / "ppo.yaml"
    ppo_recipe.write_text(f"base_model: {tiny_model}\nsteps: 2\nsave_steps: 1\nmin_prompts: 4\nresponse_length: 6\n"
                          "per_device_train_batch_size: 2\ngradient_accumulation_steps: 2\nbf16: false\n")
    none_yet = cli("ppo", "--recipe", str(ppo_recipe), "--db-url", url, "--data-dir", data, "--persona", "pirate")
    assert none_yet.returncode == 1 and "no succeeded reward run for persona pirate" in none_yet.stderr

    reward_recipe = tmp_path / "reward.yaml"
    reward_recipe.write_text(f"base_model: {tiny_model}\nmax_steps: 2\nmin_pairs: 8\n")
    reward = cli("reward", "--recipe", str(reward_recipe), "--db-url", url, "--data-dir", data, "--persona", "pirate")
    assert reward.returncode == 0, reward.stderr[-2000:]
    reward_run = json.loads(reward.stdout.strip().splitlines()[-1])["run"]

    done = cli("ppo", "--recipe", str(ppo_recipe), "--db-url", url, "--data-dir", data, "--persona", "pirate")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] and result["metrics"]["reward_model"].endswith(
        json.loads(cli("show", str(reward_run), "--db-url", url).stdout)["output_dir"].split("/")[-1])
    assert result["metrics"]["steps_logged"] == 2
    shown = json.loads(cli("show", str(result["run"]), "--db-url", url).stdout)
    assert shown["kind"] == "ppo" and shown["status"] == "succeeded"
    # Every job records which prompts it trained on, for evaluations to leave out.
    from pathlib import Path

    trained_on = json.loads((Path(shown["output_dir"]) / "train_prompts.json").read_text())["keys"]
    assert len(trained_on) == shown["dataset_stats"]["train"]

    wrong = cli("ppo", "--recipe", str(ppo_recipe), "--db-url", url, "--reward-run", str(result["run"]))
    assert wrong.returncode == 1 and f"--reward-run {result['run']} is a succeeded ppo run" in wrong.stderr


def test_a_killed_job_is_reported_interrupted_not_running(store, tiny_model, tmp_path, cli):
    """SIGKILL leaves no chance to update the run row; `align runs` notices the process is gone."""
    import signal
    import time

    fill(store, 30)
    url, data = str(store.engine.url), str(tmp_path / "data")
    recipe = tmp_path / "reward.yaml"
    recipe.write_text(f"base_model: {tiny_model}\nmax_steps: 100000\nmin_pairs: 8\nsave_steps: 1000\n")
    job = subprocess.Popen([sys.executable, "-m", "chatbot.cli", "align", "reward", "--recipe", str(recipe),
                            "--db-url", url, "--data-dir", data], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    from chatbot.store.runs import RunStore

    runs = RunStore(store.engine)
    deadline = time.monotonic() + 120
    while not (runs.list_runs() and runs.list_runs()[0].status == "running" and runs.list_runs()[0].progress > 0):
        assert time.monotonic() < deadline and job.poll() is None, "the job did not start training"
        time.sleep(0.5)
    listed = cli("runs", "--db-url", url)
    assert "reward  running" in listed.stdout  # alive: left alone
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    listed = cli("runs", "--db-url", url)
    assert "reward  interrupted" in listed.stdout, listed.stdout
    run = runs.list_runs()[0]
    assert "resume with --resume" in run.error and runs.candidate_for_run(run.id) is None


def test_a_job_refused_before_training_is_marked_failed(store, tiny_model, tmp_path, cli):
    fill(store, 30)
    recipe = tmp_path / "reward.yaml"
    recipe.write_text(f"base_model: {tiny_model}\nmax_steps: 2\nmin_pairs: 8\nmax_length: 8\n")  # every pair too long
    url = str(store.engine.url)
    done = cli("reward", "--recipe", str(recipe), "--db-url", url, "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 1 and "max_length=8" in done.stderr
    from chatbot.store.runs import RunStore

    run = RunStore(store.engine).list_runs()[0]
    assert run.status == "failed" and "max_length=8" in run.error


def test_ppo_never_picks_a_judge_reward_model_by_default(store, tmp_path):
    from alignment.jobs import reward_dir
    from chatbot.store.runs import RunStore

    runs = RunStore(store.engine)

    def reward_run(part: str) -> int:
        run_id = runs.create_run("reward", persona_id="pirate", output_dir=str(tmp_path / part),
                                 dataset_stats={"part": part})
        runs.register_candidate(run_id, base_model="tiny", adapter_path=str(tmp_path / part / "adapter"), metrics={})
        return run_id

    policy = reward_run("policy")
    judge = reward_run("judge")  # newer, but kept for judging
    notes = []
    assert reward_dir(runs, None, "pirate", notes) == tmp_path / "policy" and notes == []
    assert reward_dir(runs, judge, "pirate", notes) == tmp_path / "judge"  # named explicitly: allowed, with a warning
    assert notes == [f"reward run {judge} was trained as a judge (--part judge); optimised against, "
                     "it can no longer judge this policy"]
    assert policy < judge
