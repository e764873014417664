"""PPO job on a tiny random model with the real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_helpers import InterruptAt, Snapshot

from alignment.ppo import PPORecipe, train_ppo
from alignment.reward import RewardRecipe, score_pairs, train_reward
from alignment.training import ensure_pad_token
from chatbot.store.runs import RunStore

REPO = Path(__file__).resolve().parent.parent
PER_STEP = ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy",
            "policy/clipfrac_avg", "val/clipfrac_avg", "reply/length_mean", "reply/eos_rate")


def _prompts(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": [{"role": "system", "content": "You are a pirate."},
                        {"role": "user", "content": f"Tell me about island {i}."}]}
            for i in range(offset, offset + n)]


def _pairs(n: int, offset: int = 0) -> list[dict]:
    return [{**row, "chosen": [{"role": "assistant", "content": "Arr, gold!"}],
             "rejected": [{"role": "assistant", "content": "It is a nice place to visit."}]}
            for row in _prompts(n, offset)]


@pytest.fixture(scope="module")
def reward_dir(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reward")
    train_reward(RewardRecipe(base_model=str(tiny_model), lora_r=4, lora_alpha=8, learning_rate=5e-3, max_steps=4,
                              per_device_train_batch_size=4, max_length=128, min_pairs=8, seed=0),
                 _pairs(16), _pairs(4, 100), out, progress=False)
    return out


def _recipe(tiny_model: Path, **overrides) -> PPORecipe:
    values = {"base_model": str(tiny_model), "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3, "steps": 4,
              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "response_length": 8,
              "min_prompts": 4, "save_steps": 2, "bf16": False, "max_kl": None, "seed": 0}
    values.update(overrides)
    return PPORecipe(**values)


def _logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_job_trains_saves_and_registers(tiny_model, reward_dir, store, tmp_path):
    from safetensors import safe_open

    runs = RunStore(store.engine)
    out = tmp_path / "run"
    run_id = runs.create_run("ppo", persona_id="pirate", output_dir=str(out))
    snapshot = Snapshot()
    result = train_ppo(_recipe(tiny_model), _prompts(12), _prompts(4, 100), out, reward_dir=reward_dir,
                       run_store=runs, run_id=run_id, progress=False, callbacks=[snapshot.callback])

    changed = {n for n in snapshot.before if not snapshot.before[n].equal(snapshot.after[n])}
    assert any(n.startswith("policy.") and "lora" in n for n in changed), sorted(changed)[:5]
    assert any(n.startswith("value_model.") and "lora" in n for n in changed)
    assert any(n.startswith("value_model.score") for n in changed)  # the head is trained too

    with safe_open(str(result.adapter_dir / "adapter_model.safetensors"), "pt") as weights:
        assert any("lora_B" in key for key in weights.keys())
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"  # what the chat engine loads

    steps = _logged(out)
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4]
    assert list((out / "checkpoints" / "runs").rglob("events.out.tfevents*"))  # TensorBoard logs too
    for key in PER_STEP:
        assert all(key in entry for entry in steps), key
    assert all(0.0 <= entry["reply/eos_rate"] <= 1.0 and 1 <= entry["reply/length_mean"] <= 8 for entry in steps)
    assert result.metrics["steps_logged"] == 4 and not result.metrics["stopped_early"]

    run = runs.get_run(run_id)
    assert run.status == "succeeded" and run.progress == 1.0
    assert run.metrics["last"]["step"] == 4 and "objective/kl" in run.metrics["last"]
    assert runs.candidate_for_run(run_id) == result.version_id is not None
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["steps"] == 4 and report["metrics"]["kept_step"] == 4


def test_interrupted_ppo_resumes_from_its_checkpoint(tiny_model, reward_dir, store, tmp_path):
    from safetensors.torch import load_file

    runs = RunStore(store.engine)
    out = tmp_path / "run"
    run_id = runs.create_run("ppo", output_dir=str(out))
    with pytest.raises(KeyboardInterrupt):
        train_ppo(_recipe(tiny_model), _prompts(12), [], out, reward_dir=reward_dir, run_store=runs,
                  run_id=run_id,
                  progress=False, callbacks=[InterruptAt(3).callback])
    assert runs.get_run(run_id).status == "interrupted"
    assert runs.candidate_for_run(run_id) is None and not (out / "adapter").exists()
    checkpoint = out / "checkpoints" / "checkpoint-2"
    for name in ("policy.safetensors", "previous_policy.safetensors", "value.safetensors", "training_state.pt"):
        assert (checkpoint / name).is_file(), name
    saved_policy = load_file(str(checkpoint / "policy.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved_policy.items())  # trained, not the init

    with pytest.raises(ValueError, match="resume"):  # no silent restart over a checkpoint
        train_ppo(_recipe(tiny_model), _prompts(12), [], out, reward_dir=reward_dir, progress=False)

    capture = Snapshot()
    result = train_ppo(_recipe(tiny_model), _prompts(12), [], out, reward_dir=reward_dir, run_store=runs,
                       run_id=run_id,
                       resume=True, progress=False, callbacks=[capture.callback])
    restored = {k.removeprefix("policy."): v for k, v in capture.before.items() if k.startswith("policy.")}
    # Training went on from checkpoint-2's weights, not from a fresh adapter.
    assert all(restored[k].equal(v) for k, v in saved_policy.items())
    assert result.resumed_from == checkpoint and result.global_step == 4
    # Steps 1-3 logged before the interruption (3 was redone), 3-4 after resuming at step 2.
    assert [entry["step"] for entry in _logged(out)] == [1, 2, 3, 3, 4]
    assert runs.get_run(run_id).status == "succeeded"
    assert (out / "checkpoints" / "checkpoint-4").is_dir()


def test_kl_early_stop_keeps_the_last_policy_within_bounds(tiny_model, reward_dir, tmp_path):
    from safetensors.torch import load_file

    # A learning rate this high moves the policy far in one update: the KL
    # logged at step 2 (of the policy after update 1) exceeds the bound.
    result = train_ppo(_recipe(tiny_model, learning_rate=0.5, max_kl=0.05), _prompts(12), [], tmp_path / "run",
                       reward_dir=reward_dir, progress=False)
    assert result.metrics["stopped_early"], result.metrics
    assert "max_kl 0.05" in result.metrics["stop_reason"]
    stopped_at = len(_logged(tmp_path / "run"))
    assert stopped_at < 4
    assert result.metrics["kept_step"] == stopped_at - 2
    if result.metrics["kept_step"] == 0:  # the initial adapter: LoRA B is zero, the policy is the reference
        weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
        assert all(v.abs().sum() == 0 for k, v in weights.items() if "lora_B" in k)


@pytest.mark.parametrize("rows, message", [
    ([], r"train: no prompts \(0 rows\)"),
    ([{"prompt": [{"role": "assistant", "content": "hi"}]}] * 6, r"train: 6 of 6 rows are not a 'prompt' list"),
    ("few", r"train: 3 distinct prompts; the recipe needs min_prompts=4"),
])
def test_bad_data_is_refused_with_counts(tiny_model, reward_dir, tmp_path, rows, message):
    rows = _prompts(3) if rows == "few" else rows
    with pytest.raises(ValueError, match=message):
        train_ppo(_recipe(tiny_model), rows, [], tmp_path / "run", reward_dir=reward_dir, progress=False)


def test_fewer_prompts_than_a_batch_is_refused(tiny_model, reward_dir, tmp_path):
    # PPOTrainer drops ragged batches and would loop forever without one.
    with pytest.raises(ValueError, match="5 prompts, fewer than one batch of 6"):
        train_ppo(_recipe(tiny_model, per_device_train_batch_size=3, min_prompts=1), _prompts(5), [],
                  tmp_path / "run", reward_dir=reward_dir, progress=False)


def test_reward_model_must_exist_and_share_the_base(tiny_model, reward_dir, tmp_path, checkpoint):
    with pytest.raises(ValueError, match="has no adapter/"):
        train_ppo(_recipe(tiny_model), _prompts(12), [], tmp_path / "run", reward_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="the reward model was trained on"):
        train_ppo(_recipe(checkpoint), _prompts(12), [], tmp_path / "run2", reward_dir=reward_dir, progress=False)


def test_ppo_scores_replies_on_the_reward_models_training_boundary(tiny_model, reward_dir):
    """TRL's get_reward on a left-padded query + reply + EOS equals the reward job's own scoring."""
    import torch
    from transformers import AutoTokenizer
    from trl.experimental.utils import get_reward

    from alignment.ppo import encode_prompts, load_reward_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ensure_pad_token(tokenizer)
    model = load_reward_model(reward_dir, tiny_model, tokenizer, torch.float32)
    rows = _pairs(2)
    rows[1]["prompt"] = [{"role": "user", "content": "A much longer question about the sea, the sky, the gold?"}]
    queries = [item["input_ids"] for item in encode_prompts(tokenizer, rows, 512)[0]]
    replies = [tokenizer(r["chosen"][0]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for r in rows]
    width = max(map(len, queries))
    reply_width = max(map(len, replies))
    batch = torch.full((2, width + reply_width), tokenizer.pad_token_id)
    for i, (query, reply) in enumerate(zip(queries, replies, strict=True)):
        batch[i, width - len(query):width] = torch.tensor(query)  # left-padded query, as PPO generates
        batch[i, width:width + len(reply)] = torch.tensor(reply)  # reply padded after EOS, as PPO truncates
    _, ppo_scores, _ = get_reward(model, batch, tokenizer.pad_token_id, width)
    chosen, _ = score_pairs(model, tokenizer, rows)
    assert ppo_scores.tolist() == pytest.approx(chosen, abs=1e-4)


@pytest.mark.parametrize("name", ["ppo_cpu.yaml", "ppo_gpu.yaml"])
def test_recipes_load(name):
    recipe = PPORecipe.from_yaml(REPO / "alignment" / "recipes" / name)
    assert recipe.steps > 0 and recipe.max_kl and recipe.batch_size() % recipe.num_mini_batches == 0


def test_a_gate_typo_fails_when_the_recipe_loads(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("steps: 2\ngate:\n  max_kll: 3\n")
    with pytest.raises(ValueError, match="max_kll"):
        PPORecipe.from_yaml(path)


@pytest.mark.parametrize("bf16", [True, False])
def test_the_recipes_bf16_reaches_ppos_accelerator(tiny_model, reward_dir, tmp_path, monkeypatch, bf16):
    """PPOTrainer builds its own Accelerator; bf16 in the config alone would train in float32."""
    import os

    from trl.experimental.ppo import PPOTrainer

    built = {}
    real_init = PPOTrainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built["precision"] = self.accelerator.mixed_precision

    monkeypatch.setattr(PPOTrainer, "__init__", init)
    train_ppo(_recipe(tiny_model, steps=1, bf16=bf16), _prompts(12), [], tmp_path / "run",
              reward_dir=reward_dir, progress=False)
    assert built["precision"] == ("bf16" if bf16 else "no")
    assert "ACCELERATE_MIXED_PRECISION" not in os.environ  # set only while the trainer is built


def test_whiten_rewards_reaches_the_trainer(tiny_model, reward_dir, tmp_path):
    from transformers import TrainerCallback

    seen = {}

    class Args(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update(whiten=args.whiten_rewards, kl_coef=args.kl_coef)

    with pytest.raises(ValueError, match="whiten_rewards needs at least 8 rollouts per mini-batch, not 4"):
        train_ppo(_recipe(tiny_model, whiten_rewards=True), _prompts(8), [], tmp_path / "small", reward_dir=reward_dir)
    train_ppo(_recipe(tiny_model, steps=1, whiten_rewards=True, kl_coef=0.2, per_device_train_batch_size=4),
              _prompts(8), _prompts(2, 100), tmp_path / "run", reward_dir=reward_dir, progress=False,
              callbacks=[Args()])
    assert seen == {"whiten": True, "kl_coef": 0.2}
    assert PPORecipe.from_yaml(REPO / "alignment" / "recipes" / "ppo_cpu.yaml").whiten_rewards is False
