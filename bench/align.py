"""Alignment job speed on the bundled model: the project's job runner vs TRL called directly.

    python bench/align.py [--rounds 2] [--reward-steps 12] [--ppo-steps 6] [--only reward|ppo]

For the reward model and for PPO, runs the same recipe alternately through
the job runner (``alignment.reward.train_reward`` / ``alignment.ppo.train_ppo``
with a run store on a real SQLite file, per-step metrics, checkpoints, reply
stats, KL watch) and through TRL's trainer called directly with the same
config and the same model objects, in this one process, and prints seconds
per step (steady state: the mean interval between step ends after the first
step, so each step's logging and checkpointing is counted) and the peak
resident memory of each phase. Alternating rounds keep this noisy machine's
drift out of the ratio.

The data is synthetic (the bench measures speed, not learning): preference
pairs and prompts from alignment/prompts/everyday_train.txt.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from alignment.ppo import (
    PPORecipe,
    encode_prompts,
    load_reward_model,
    mixed_precision,
    train_ppo,
    value_model_from,
)
from alignment.reward import RewardRecipe, encode_rows, train_reward
from alignment.training import ensure_pad_token, lora_config, trainer_arguments
from chatbot.default_model import ensure_checkpoint
from chatbot.settings import Settings
from chatbot.simulation import load_prompts
from chatbot.store import ChatStore
from chatbot.store.runs import RunStore

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # read when trl.experimental is first imported
PROMPTS = REPO / "alignment" / "prompts" / "everyday_train.txt"


class StepClock(TrainerCallback):
    """Times between step ends; the first interval (warm-up) is dropped."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        intervals = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][1:]
        return sum(intervals) / len(intervals)


class PeakRSS:
    """Peak resident set size of this process while the block runs, sampled every 50 ms."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": text}]


def reward_rows(prompts: list[str]) -> list[dict]:
    return [{"prompt": _chat(p), "chosen": [{"role": "assistant", "content": "Sure: keep it short and clear."}],
             "rejected": [{"role": "assistant", "content": "Well, there are many, many things one could say "
                                                           "about that, and I will now say all of them at length."}]}
            for p in prompts]


# -- reward model ---------------------------------------------------------------


def reward_runner(recipe, rows, out: Path, runs: RunStore, base: Path) -> tuple[float, int]:
    clock = StepClock()
    run_id = runs.create_run("reward", output_dir=str(out))
    with PeakRSS() as rss:
        train_reward(recipe, rows, rows[:8], out, run_store=runs, run_id=run_id, progress=False,
                     callbacks=[clock])
    return clock.seconds_per_step(), rss.peak


def reward_direct(recipe, rows, out: Path, base: Path) -> tuple[float, int]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    clock = StepClock()
    with PeakRSS() as rss:
        set_seed(recipe.seed)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
        ensure_pad_token(tokenizer, model)
        encoded, _ = encode_rows(tokenizer, rows, recipe.max_length)
        trainer = RewardTrainer(
            model=model, args=RewardConfig(**trainer_arguments(recipe, out / "checkpoints", False)),
            train_dataset=Dataset.from_list([{k: e[k] for k in ("chosen_ids", "rejected_ids")} for e in encoded]),
            processing_class=tokenizer, peft_config=lora_config(recipe, "SEQ_CLS", modules_to_save=["score"]),
            callbacks=[clock])
        trainer.train()
    return clock.seconds_per_step(), rss.peak


# -- PPO --------------------------------------------------------------------------


def ppo_runner(recipe, prompts, reward_dir: Path, out: Path, runs: RunStore) -> tuple[float, int]:
    clock = StepClock()
    run_id = runs.create_run("ppo", output_dir=str(out))
    with PeakRSS() as rss:
        train_ppo(recipe, prompts, [], out, reward_dir=reward_dir, run_store=runs, run_id=run_id, progress=False,
                  callbacks=[clock])
    return clock.seconds_per_step(), rss.peak


def ppo_direct(recipe: PPORecipe, prompts, reward_dir: Path, out: Path, base: Path) -> tuple[float, int]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    clock = StepClock()
    with PeakRSS() as rss:
        set_seed(recipe.seed)
        tokenizer = AutoTokenizer.from_pretrained(base)
        ensure_pad_token(tokenizer)
        tokenizer.padding_side = "left"
        encoded, _ = encode_prompts(tokenizer, prompts, recipe.max_prompt_length)
        reward_model = load_reward_model(reward_dir, base, tokenizer, torch.float32)
        policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        policy.config.pad_token_id = policy.generation_config.pad_token_id = tokenizer.pad_token_id
        args = PPOConfig(
            output_dir=str(out), learning_rate=recipe.learning_rate,
            per_device_train_batch_size=recipe.per_device_train_batch_size,
            gradient_accumulation_steps=recipe.gradient_accumulation_steps, total_episodes=recipe.steps *
            recipe.batch_size(), num_mini_batches=recipe.num_mini_batches, num_ppo_epochs=recipe.num_ppo_epochs,
            local_rollout_forward_batch_size=recipe.per_device_train_batch_size,
            response_length=recipe.response_length, temperature=recipe.temperature, stop_token="eos",
            missing_eos_penalty=recipe.missing_eos_penalty, kl_coef=recipe.kl_coef, bf16=recipe.bf16,
            gradient_checkpointing=recipe.gradient_checkpointing, use_cpu=not torch.cuda.is_available(),
            seed=recipe.seed, save_strategy="no",
            logging_steps=1, report_to="none", disable_tqdm=True, num_sample_generations=0)
        with mixed_precision(recipe.bf16):  # as the job does: PPOTrainer's Accelerator ignores args.bf16
            trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                                 reward_model=reward_model, value_model=value_model_from(reward_model, recipe),
                                 train_dataset=Dataset.from_list(encoded),
                                 peft_config=lora_config(recipe, "CAUSAL_LM"), callbacks=[clock])
        trainer.train()
    return clock.seconds_per_step(), rss.peak


# -- main -------------------------------------------------------------------------


def compare(name: str, rounds: int, runner, direct) -> dict:
    results: dict[str, list] = {"runner": [], "direct": []}
    for round_ in range(rounds):
        # Alternate which goes first, so neither always runs on a warmer machine.
        order = [("runner", runner), ("direct", direct)] if round_ % 2 == 0 else [("direct", direct),
                                                                                   ("runner", runner)]
        for label, function in order:
            seconds, peak = function(round_)
            results[label].append((seconds, peak))
            print(f"  {name} {label:<6} round {round_ + 1}: {seconds:6.2f} s/step, peak RSS {peak / 2**30:.2f} GiB",
                  flush=True)
            gc.collect()
    runner_s = statistics.median(s for s, _ in results["runner"])
    direct_s = statistics.median(s for s, _ in results["direct"])
    summary = {"job": name, "runner_s_per_step": runner_s, "direct_s_per_step": direct_s,
               "overhead": runner_s / direct_s - 1,
               "runner_peak_rss_gib": max(p for _, p in results["runner"]) / 2**30,
               "direct_peak_rss_gib": max(p for _, p in results["direct"]) / 2**30}
    print(f"{name}: runner {runner_s:.2f} s/step vs TRL direct {direct_s:.2f} s/step -> overhead "
          f"{summary['overhead']:+.1%}; peak RSS {summary['runner_peak_rss_gib']:.2f} vs "
          f"{summary['direct_peak_rss_gib']:.2f} GiB", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each path per job (alternating)")
    parser.add_argument("--reward-steps", type=int, default=12)
    parser.add_argument("--ppo-steps", type=int, default=6)
    parser.add_argument("--only", choices=("reward", "ppo"), default=None)
    parser.add_argument("--data-dir", type=Path, default=Settings.from_sources().data_dir,
                        help="where the bundled model is converted (as for `make run`)")
    parser.add_argument("--base-model", type=Path, default=None,
                        help="a checkpoint folder instead of the bundled model (e.g. a tiny one, to try the script)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    base = args.base_model or ensure_checkpoint(args.data_dir)
    prompts = load_prompts(PROMPTS)
    rows = reward_rows(prompts)
    summaries = []
    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        tmp = Path(tmp)
        store = ChatStore.open(f"sqlite:///{tmp / 'bench.db'}")
        runs = RunStore(store.engine)
        reward_recipe = RewardRecipe(base_model=str(base), max_steps=args.reward_steps,
                                     per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                     save_steps=max(2, args.reward_steps // 2), min_pairs=8, max_length=256)
        if args.only in (None, "reward"):
            print(f"reward model: {args.reward_steps} steps of {reward_recipe.per_device_train_batch_size} x "
                  f"{reward_recipe.gradient_accumulation_steps} pairs, LoRA r={reward_recipe.lora_r}", flush=True)
            summaries.append(compare(
                "reward", args.rounds,
                lambda r: reward_runner(reward_recipe, rows, tmp / f"reward-runner-{r}", runs, base),
                lambda r: reward_direct(reward_recipe, rows, tmp / f"reward-direct-{r}", base)))
        if args.only in (None, "ppo"):
            reward_dir = tmp / "reward-for-ppo"
            train_reward(RewardRecipe(base_model=str(base), max_steps=2, min_pairs=8, max_length=256), rows, rows[:8],
                         reward_dir, progress=False)
            ppo_recipe = PPORecipe.from_yaml(REPO / "alignment" / "recipes" / "ppo_cpu.yaml", base_model=str(base),
                                             steps=args.ppo_steps, save_steps=max(2, args.ppo_steps // 2),
                                             max_kl=None)
            ppo_prompts = [{"prompt": _chat(p)} for p in prompts]
            print(f"PPO: {args.ppo_steps} steps of {ppo_recipe.batch_size()} rollouts x {ppo_recipe.num_ppo_epochs} "
                  f"epochs, {ppo_recipe.response_length}-token replies, bf16={ppo_recipe.bf16}", flush=True)
            summaries.append(compare(
                "ppo", args.rounds,
                lambda r: ppo_runner(ppo_recipe, ppo_prompts, reward_dir, tmp / f"ppo-runner-{r}", runs),
                lambda r: ppo_direct(ppo_recipe, ppo_prompts, reward_dir, tmp / f"ppo-direct-{r}", base)))
        store.close()
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
