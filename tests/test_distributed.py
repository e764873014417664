"""Alignment jobs under several processes (`torchrun`, as `accelerate launch` starts them), on CPU with gloo.

This machine has no GPU; two CPU processes exercise the same code paths as a
multi-GPU DDP run: data sharded across processes, only process 0 writing to
the store and the run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_align_cli import fill

from chatbot.store.runs import RunStore

pytestmark = pytest.mark.model

TORCHRUN = Path(sys.executable).with_name("torchrun")


def launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    return subprocess.run([str(TORCHRUN), "--nproc_per_node", str(processes), "-m", "chatbot.cli", "align", *args],
                          capture_output=True, text=True, timeout=600, env=env)


def test_reward_and_ppo_jobs_under_two_processes(store, tiny_model, tmp_path):
    fill(store, 30)
    url, data = str(store.engine.url), str(tmp_path / "data")
    reward_recipe = tmp_path / "reward.yaml"
    reward_recipe.write_text(f"base_model: {tiny_model}\nmax_steps: 3\nmin_pairs: 8\nsave_steps: 2\n"
                             "per_device_train_batch_size: 2\ngradient_accumulation_steps: 1\n")
    reward = launch("reward", "--recipe", str(reward_recipe), "--db-url", url, "--data-dir", data,
                    "--persona", "pirate", "--output", str(tmp_path / "reward"))
    assert reward.returncode == 0, reward.stderr[-3000:]
    results = [json.loads(line) for line in reward.stdout.splitlines() if line.startswith("{\"run\"")]
    assert len(results) == 1  # one process reports
    train_pairs = results[0]["metrics"]["train_pairs"]
    logged = [json.loads(line) for line in (tmp_path / "reward" / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in logged if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3]  # written once, not once per process
    # Sharded: each step consumed 2 pairs on each of 2 processes.
    assert steps[-1]["epoch"] == pytest.approx(3 / -(-train_pairs // 4), abs=0.01)

    ppo_recipe = tmp_path / "ppo.yaml"
    ppo_recipe.write_text(f"base_model: {tiny_model}\nsteps: 2\nsave_steps: 1\nmin_prompts: 4\nresponse_length: 6\n"
                          "per_device_train_batch_size: 2\ngradient_accumulation_steps: 1\nbf16: false\n")
    ppo = launch("ppo", "--recipe", str(ppo_recipe), "--db-url", url, "--data-dir", data, "--persona", "pirate",
                 "--output", str(tmp_path / "ppo"))
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert logged[-1]["episode"] == 2 * 2 * 2  # 2 steps x 2 rollouts x 2 processes
    assert (tmp_path / "ppo" / "checkpoints" / "checkpoint-2" / "value.safetensors").is_file()

    runs = RunStore(store.engine)
    assert [(r.kind, r.status) for r in runs.list_runs()] == [("ppo", "succeeded"), ("reward", "succeeded")]
    assert all(runs.candidate_for_run(r.id) for r in runs.list_runs())

    again = launch("ppo", "--recipe", str(ppo_recipe), "--db-url", url, "--persona", "pirate",
                   "--output", str(tmp_path / "ppo"))
    # Refused by whichever process gets there first: process 0 checks that the folder is empty, the other
    # one (it cannot: process 0 may already be writing a new run's files there) finds its checkpoint.
    assert again.returncode != 0
    assert ("is not empty: a new run needs a new folder" in again.stderr
            or "already has checkpoint-2: resume it, or use a new output directory" in again.stderr), again.stderr[-2000:]
    assert len(runs.list_runs()) == 2, "the refused run was not recorded"
