"""PPO job: TRL PPOTrainer on a LoRA adapter, rewarded by a trained reward model.

Every import of ``trl.experimental.ppo`` is in this module (it
exists in trl 0.26 to 1.12 and was removed in 1.13, hence ``trl<1.13``)::

    recipe = PPORecipe.from_yaml("alignment/recipes/ppo_cpu.yaml")
    split = build_prompts(store, persona, eval_fraction=recipe.eval_fraction, seed=recipe.seed)
    result = train_ppo(recipe, split.trl("train"), split.trl("eval"), out_dir, reward_dir=reward_dir,
                       run_store=RunStore(store.engine), run_id=run_id, data_dir=data_dir)

Models, all on one tokenizer (the base model's, with the reward job's pad
token ``<|endoftext|>``, distinct from EOS, because PPO finds the end of a
reply at the first pad):

- policy: the base causal LM with a fresh LoRA adapter (``peft_config``);
- reference: the same model with the adapter disabled (``ref_model=None``);
- reward: the reward run's adapter merged into its base, frozen;
- value: initialised from the reward model (its merged backbone and score
  head), trained through its own LoRA adapter plus the head, so that a
  checkpoint is megabytes rather than a second copy of the model.

Token boundary: PPO scores ``query + reply`` truncated after the first EOS,
the query being ``chat_template(prompt, add_generation_prompt=True)``: the
same ids ``alignment.reward.encode_pair_side`` trains the reward model on.

What PPOTrainer does not do, done here:

- checkpoints and ``--resume``: ``PPOTrainer.train`` always starts at step 0
  and its own checkpoints hold the policy only. ``checkpoint-N/`` here holds
  the policy and value adapters, optimizer, scheduler and RNG state; resuming
  loads them and runs the remaining steps (prompts are drawn in a new order).
- early stop on KL: PPOTrainer ignores ``control.should_training_stop``.
  ``objective/kl`` at step k measures the policy before update k; when it
  exceeds ``max_kl``, training stops and the last policy whose KL was within
  bounds (two updates back) is the one saved.
- reply length and EOS rate per step, from the policy's rollouts.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.recipe import BUNDLED, GateFields, TrainingFields
from alignment.training import (
    JobCancelled,
    JobResult,
    ensure_pad_token,
    find_checkpoint,
    finish_job,
    job_callback,
    lora_config,
    resolve_base_model,
    run_tracked,
    trainer_arguments,
)
from chatbot.engine import encode_chat
from chatbot.store.runs import RunStore

log = logging.getLogger(__name__)

KIND = "ppo"
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class PPORecipe(TrainingFields, GateFields):
    """Settings of one PPO job; each maps onto PPOConfig/LoraConfig or the job's own controls
    (bases: alignment/recipe.py)."""

    base_model: str = field(default=BUNDLED, metadata={
        "help": "Base checkpoint folder, or 'bundled'; must be the reward model's base."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (policy and value adapters)."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the LoRA branch; PPO disables dropout in its models anyway."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate."})
    steps: int = field(default=40, metadata={
        "help": "PPO updates; each draws a batch of prompts and generates one reply per prompt."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Rollouts per micro-batch and device."})
    gradient_accumulation_steps: int = field(default=2, metadata={
        "help": "Micro-batches per update: batch = this x per_device_train_batch_size x devices."})
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches each batch is split into."})
    num_ppo_epochs: int = field(default=2, metadata={"help": "Optimisation passes over each batch of rollouts."})
    response_length: int = field(default=48, metadata={
        "help": "Longest reply in tokens; size it to the persona's replies (see missing_eos_penalty)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the rollouts."})
    missing_eos_penalty: float | None = field(default=1.0, metadata={
        "help": "Subtracted from the score of a reply that hits response_length without EOS; null = none."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty to the reference."})
    whiten_rewards: bool = field(default=False, metadata={
        "help": "Whiten the per-token rewards within each batch (TRL PPOConfig): a reward model's scale then "
                "no longer sets the step size, only its ranking of the batch's replies does."})
    kl_estimator: str = field(default="k1", metadata={"help": "'k1' or 'k3' (TRL's KL estimators)."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value prediction clip."})
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    max_kl: float | None = field(default=4.0, metadata={
        "help": "Stop when objective/kl exceeds this and keep the last policy within it; null = never."})
    max_prompt_length: int = field(default=384, metadata={
        "help": "Prompts longer than this (tokens) are dropped and counted."})
    eval_fraction: float = field(default=0.2, metadata={
        "help": "Share of conversations held out; read by the data split. Held-out prompts are for evaluate."})
    min_prompts: int = field(default=16, metadata={"help": "Refuse to train on fewer distinct train prompts."})
    save_steps: int = field(default=10, metadata={"help": "Checkpoint every N updates."})
    bf16: bool = field(default=True, metadata={"help": "bfloat16 mixed precision (set explicitly)."})
    seed: int = field(default=42, metadata={"help": "Seed for the LoRA init, prompt order and sampling."})

    def batch_size(self, world_size: int = 1) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size


class KLExceeded(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised from the step callback to leave PPOTrainer.train, which has no stop of its own."""


# -- data ---------------------------------------------------------------------


def validate_prompts(rows: Sequence[dict[str, Any]], split: str, min_prompts: int = 1) -> list[dict[str, Any]]:
    """``rows`` as a list if every row is a chat ending in a user message; ValueError naming counts otherwise."""
    if not rows:
        raise ValueError(f"{split}: no prompts (0 rows)")
    bad = 0
    for row in rows:
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if (not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict)
                or prompt[-1].get("role") != "user" or not isinstance(prompt[-1].get("content"), str)):
            bad += 1
    if bad:
        raise ValueError(f"{split}: {bad} of {len(rows)} rows are not a 'prompt' list of messages ending in a "
                         "user message")
    if len(rows) < min_prompts:
        raise ValueError(f"{split}: {len(rows)} distinct prompts; the recipe needs min_prompts={min_prompts}")
    return list(rows)


def encode_prompts(tokenizer: Any, rows: Sequence[dict[str, Any]],
                   max_prompt_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """``{"input_ids": chat_template(prompt, add_generation_prompt)}`` per row, and how many were too long."""
    encoded, too_long = [], 0
    for row in rows:
        ids = encode_chat(tokenizer, row["prompt"])  # message text stays text, as in the chat
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        encoded.append({"input_ids": list(ids)})
    return encoded, too_long


# -- models -------------------------------------------------------------------


def load_reward_model(reward_dir: Path, base: Path, tokenizer: Any, dtype: Any):
    """The reward run's adapter (LoRA + score head) merged into its base: a plain frozen classifier."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapter = reward_dir / "adapter"
    report = reward_dir / "report.json"
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"reward run folder {reward_dir} has no adapter/ (did the reward run finish?)")
    if report.is_file():
        trained_on = json.loads(report.read_text(encoding="utf-8")).get("base_model")
        if trained_on and Path(trained_on).resolve() != Path(base).resolve():
            raise ValueError(f"the reward model was trained on {trained_on}, the policy's base is {base}: "
                             "PPO needs both on one base model and tokenizer")
    reward_tokenizer = AutoTokenizer.from_pretrained(adapter)
    if (len(reward_tokenizer), reward_tokenizer.pad_token_id) != (len(tokenizer), tokenizer.pad_token_id):
        raise ValueError("the reward model's tokenizer differs from the policy's (vocabulary or pad token); "
                         "train the reward model on this base model")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval().requires_grad_(False)
    return model


def value_model_from(reward_model: Any, recipe: PPORecipe):
    """A value model initialised from the reward model, trained through LoRA + its score head."""
    import torch
    from peft import get_peft_model

    class ValueModel(torch.nn.Module):
        # PPOTrainer reaches the backbone as getattr(model, model.base_model_prefix)
        # and the head as model.score.
        base_model_prefix = "backbone"

        def __init__(self, backbone, score):
            super().__init__()
            self.backbone = backbone
            self.score = score

    backbone = get_peft_model(copy.deepcopy(getattr(reward_model, reward_model.base_model_prefix)),
                              lora_config(recipe, task_type=None))
    score = copy.deepcopy(reward_model.score).requires_grad_(True)
    return ValueModel(backbone, score)


class RolloutStats:
    """Wraps the policy's ``generate`` to measure reply length and EOS rate of every rollout."""

    def __init__(self, policy: Any, eos_id: int, pad_id: int) -> None:
        self.lengths: list[int] = []
        self.eos: list[bool] = []
        self._generate = policy.generate
        self._eos_id, self._pad_id = eos_id, pad_id
        policy.generate = self.generate  # an instance attribute on our own model object

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        output = self._generate(*args, **kwargs)
        prompt_width = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        sequences = output.sequences if hasattr(output, "sequences") else output
        for reply in sequences[:, prompt_width:].tolist():
            if self._eos_id in reply:
                self.lengths.append(reply.index(self._eos_id) + 1)
                self.eos.append(True)
            else:
                self.lengths.append(sum(token != self._pad_id for token in reply))
                self.eos.append(False)
        return output

    def pop(self) -> dict[str, float]:
        if not self.lengths:
            return {}
        stats = {"reply/length_mean": sum(self.lengths) / len(self.lengths),
                 "reply/eos_rate": sum(self.eos) / len(self.eos)}
        self.lengths, self.eos = [], []
        return stats


# -- checkpoints --------------------------------------------------------------


def trainable_state(module: Any) -> dict[str, Any]:
    """The trainable tensors of ``module`` (LoRA weights, the value head), detached copies."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: Any, state: dict[str, Any]) -> None:
    import torch

    params = dict(module.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]}): "
                         "was it written with another recipe?")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def save_checkpoint(folder: Path, trainer: Any, step: int, previous_policy: dict[str, Any] | None,
                    limit: int) -> Path:
    """Write ``folder/checkpoint-<step>`` atomically (temp folder, then rename) and prune old ones."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    target = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    save_file({k: v.contiguous() for k, v in trainable_state(wrapper.policy).items()}, str(tmp / "policy.safetensors"))
    if previous_policy is not None:
        save_file({k: v.contiguous() for k, v in previous_policy.items()}, str(tmp / "previous_policy.safetensors"))
    save_file({k: v.contiguous() for k, v in trainable_state(wrapper.value_model).items()},
              str(tmp / "value.safetensors"))
    torch.save({"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.lr_scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                "python_rng": random.getstate()}, tmp / "training_state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "episode": step * trainer.args.batch_size}),
                                    encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    existing = sorted((p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()),
                      key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
    for old in existing[:-limit] if limit > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoint_step(checkpoint: Path) -> int:
    """The number of updates done when ``checkpoint`` was written."""
    return json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))["step"]


def load_checkpoint(checkpoint: Path, trainer: Any) -> dict[str, Any] | None:
    """Restore a checkpoint into a freshly built trainer; returns the policy before its last update."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    load_trainable_state(wrapper.policy, load_file(str(checkpoint / "policy.safetensors")))
    load_trainable_state(wrapper.value_model, load_file(str(checkpoint / "value.safetensors")))
    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.lr_scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    previous = checkpoint / "previous_policy.safetensors"
    return load_file(str(previous)) if previous.is_file() else None


# -- the step callback --------------------------------------------------------


def control_callback(recipe: PPORecipe, checkpoints: Path, step_offset: int,
                     cancelled: Callable[[], bool] | None = None):
    """Reply stats into each step's logs, KL early stop with policy snapshots, checkpoints, and a
    cancel (``cancelled()`` true): a checkpoint of the step, then JobCancelled."""
    from transformers import TrainerCallback

    class PPOControl(TrainerCallback):
        def __init__(self) -> None:
            self.trainer: Any = None  # set once the trainer exists
            self.stats: RolloutStats | None = None
            # Policy weights after the last two updates: (step, state). The
            # KL logged at step k is that of the policy after update k - 1.
            self.snapshots: collections.deque = collections.deque(maxlen=2)
            self.stop: dict[str, Any] | None = None

        def policy(self):
            return self.trainer.accelerator.unwrap_model(self.trainer.model).policy

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "objective/kl" not in logs:
                return
            if self.stats is not None:
                logs.update(self.stats.pop())  # before the job callback writes the entry
            kl = logs["objective/kl"]
            step = step_offset + state.global_step
            if recipe.max_kl is not None and (kl > recipe.max_kl or not math.isfinite(kl)):
                # The policy after update step-1 is out of bounds; keep the one before it.
                kept_step, kept = self.snapshots[0] if len(self.snapshots) == 2 else self.snapshots[-1]
                self.stop = {"step": step, "kl": kl, "kept_step": kept_step, "kept_policy": kept}

        def on_step_end(self, args, state, control, **kwargs):
            step = step_offset + state.global_step
            if self.stop is not None:
                raise KLExceeded(self.stop)
            previous = self.snapshots[-1][1] if self.snapshots else None
            self.snapshots.append((step, trainable_state(self.policy())))
            saving = recipe.save_steps > 0 and step % recipe.save_steps == 0
            stopping = cancelled is not None and cancelled()
            if (saving or stopping) and self.trainer.accelerator.is_main_process:
                save_checkpoint(checkpoints, self.trainer, step, previous, recipe.save_total_limit)
            if stopping:
                raise JobCancelled(f"cancelled at step {step}; its checkpoint is saved")

    return PPOControl()


# -- training -----------------------------------------------------------------


def train_ppo(
    recipe: PPORecipe,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Sequence[dict[str, Any]],
    output_dir: str | Path,
    *,
    reward_dir: str | Path,
    run_store: RunStore | None = None,
    run_id: int | None = None,
    resume: bool = False,
    progress: bool = True,
    data_dir: Path | None = None,
    callbacks: Sequence[Any] = (),
    cancelled: Callable[[], bool] | None = None,
) -> JobResult:
    """Train a LoRA policy with PPO against the reward model in ``reward_dir`` and register a candidate.

    ``output_dir``: ``checkpoints/checkpoint-N`` (every save_steps),
    ``adapter/`` (policy LoRA + tokenizer), ``metrics.jsonl`` and ``checkpoints/runs/`` (TensorBoard), per step,
    ``report.json``. A KeyboardInterrupt marks the run interrupted, any other
    error failed; both re-raise. ``resume=True`` continues from the last
    checkpoint. ``eval_rows`` (held-out prompts) are only checked here; they
    are what ``align evaluate`` generates on.
    """
    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    train_rows = validate_prompts(train_rows, "train", recipe.min_prompts)
    if eval_rows:
        validate_prompts(eval_rows, "eval")
    if recipe.steps < 1:
        raise ValueError(f"steps must be >= 1, not {recipe.steps}")
    if recipe.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"kl_estimator must be 'k1' or 'k3', not {recipe.kl_estimator!r}")
    if recipe.whiten_rewards and recipe.batch_size() // recipe.num_mini_batches < 8:
        # TRL asserts this deep inside train(); say it before anything loads.
        raise ValueError(f"whiten_rewards needs at least 8 rollouts per mini-batch, not "
                         f"{recipe.batch_size() // recipe.num_mini_batches} (batch {recipe.batch_size()} / "
                         f"num_mini_batches {recipe.num_mini_batches})")
    if recipe.batch_size() % recipe.num_mini_batches:
        raise ValueError(f"the batch ({recipe.batch_size()} rollouts) must split evenly into "
                         f"num_mini_batches={recipe.num_mini_batches}")
    last_checkpoint = _find_ppo_checkpoint(checkpoints, resume)
    return run_tracked(run_store, run_id, lambda: _train(
        recipe, train_rows, Path(reward_dir), output_dir, checkpoints, last_checkpoint,
        run_store, run_id, progress, data_dir, callbacks, cancelled))


def _find_ppo_checkpoint(checkpoints: Path, resume: bool) -> Path | None:
    # find_checkpoint's rules (refuse to overwrite, warn when nothing to resume, pass over a
    # partial folder); save_checkpoint writes state.json last.
    return find_checkpoint(checkpoints, resume, complete_marker="state.json")


def _train(recipe, train_rows, reward_dir, output_dir, checkpoints, last_checkpoint,
           run_store, run_id, progress, data_dir, callbacks, cancelled=None) -> JobResult:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    base = resolve_base_model(recipe.base_model, data_dir)
    set_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # queries are generated from: pad on the left
    train_encoded, too_long = encode_prompts(tokenizer, train_rows, recipe.max_prompt_length)
    if len(train_encoded) < recipe.min_prompts:
        raise ValueError(f"train: {len(train_encoded)} prompts fit max_prompt_length={recipe.max_prompt_length} "
                         f"({too_long} too long); the recipe needs min_prompts={recipe.min_prompts}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by `accelerate launch`
    local_batch = recipe.batch_size()
    if len(train_encoded) < local_batch:
        # PPOTrainer drops the last ragged batch: fewer prompts than a batch would never yield one.
        raise ValueError(f"train: {len(train_encoded)} prompts, fewer than one batch of {local_batch} "
                         "(per_device_train_batch_size x gradient_accumulation_steps)")

    dtype = torch.float32  # weights stay float32; bf16 is autocast (recipe.bf16)
    reward_model = load_reward_model(reward_dir, base, tokenizer, dtype)
    value_model = value_model_from(reward_model, recipe)
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    policy.config.pad_token_id = policy.generation_config.pad_token_id = tokenizer.pad_token_id

    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.mkdir(exist_ok=True)
    arguments = trainer_arguments(recipe, checkpoints, progress)
    arguments["save_strategy"] = "no"  # checkpoints are written by the control callback (policy + value + optimizer)
    args = PPOConfig(
        **arguments,
        total_episodes=recipe.steps * recipe.batch_size(world_size),
        num_mini_batches=recipe.num_mini_batches,
        num_ppo_epochs=recipe.num_ppo_epochs,
        local_rollout_forward_batch_size=recipe.per_device_train_batch_size,
        response_length=recipe.response_length,
        temperature=recipe.temperature,
        stop_token="eos",
        missing_eos_penalty=recipe.missing_eos_penalty,
        kl_coef=recipe.kl_coef,
        kl_estimator=recipe.kl_estimator,
        whiten_rewards=recipe.whiten_rewards,
        cliprange=recipe.cliprange,
        vf_coef=recipe.vf_coef,
        cliprange_value=recipe.cliprange_value,
        gamma=recipe.gamma,
        lam=recipe.lam,
        num_sample_generations=0,  # evaluation is `align evaluate`, on held-out prompts
    )
    done = checkpoint_step(last_checkpoint) if last_checkpoint is not None else 0
    control = control_callback(recipe, checkpoints, done, cancelled)
    reference = None  # the policy with its adapter disabled
    if world_size > 1:
        # trl 1.12 reaches the adapter-disabled reference as `self.model.policy`,
        # which a DistributedDataParallel wrapper does not have: with several
        # processes the reference is a frozen copy of the base model instead.
        reference = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval().requires_grad_(False)
    with mixed_precision(recipe.bf16):
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=reference,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=Dataset.from_list(train_encoded),
            peft_config=lora_config(recipe, "CAUSAL_LM"),
            callbacks=[job_callback(run_store, run_id, output_dir / "metrics.jsonl", done), control,
                       *callbacks],
        )
    # The job callback writes each step's entry; the reply stats must be in it
    # first, so the control callback's on_log runs before it.
    trainer.callback_handler.callbacks.remove(control)
    trainer.callback_handler.callbacks.insert(0, control)
    control.trainer = trainer
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    control.stats = RolloutStats(wrapper.policy, tokenizer.eos_token_id, tokenizer.pad_token_id)

    if last_checkpoint is not None:
        previous = load_checkpoint(last_checkpoint, trainer)
        if previous is not None:
            control.snapshots.append((done - 1, previous))
        log.info("resuming %s at step %d of %d", last_checkpoint, done, recipe.steps)
    control.snapshots.append((done, trainable_state(wrapper.policy)))
    # The optimizer and scheduler were built for all steps; run the remaining ones.
    args.num_total_batches = max(0, recipe.steps - done)

    try:
        if args.num_total_batches:
            trainer.train()
        final_step, stop = recipe.steps, None
    except KLExceeded as signal:
        stop = signal.args[0]
        final_step = stop["kept_step"]
        load_trainable_state(wrapper.policy, stop["kept_policy"])
        log.warning("objective/kl %.2f > max_kl %.2f at step %d: stopped, keeping the policy of step %d",
                    stop["kl"], recipe.max_kl, stop["step"], final_step)

    metrics = _report(output_dir / "metrics.jsonl", recipe, stop, final_step)
    metrics.update(train_prompts=len(train_encoded), train_dropped_too_long=too_long,
                   reward_model=str(reward_dir), batch_size=args.batch_size,
                   token_boundary="chat_template(prompt, add_generation_prompt) + reply up to EOS")

    if not trainer.accelerator.is_main_process:  # one writer under `accelerate launch`
        return JobResult(metrics=metrics, adapter_dir=output_dir / "adapter", global_step=final_step,
                         resumed_from=last_checkpoint)

    def save_adapter(folder: Path) -> None:
        wrapper.policy.save_pretrained(str(folder))
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(str(folder))

    return finish_job(save_adapter, recipe, base, metrics, output_dir, run_store, run_id, final_step,
                      last_checkpoint)


@contextlib.contextmanager
def mixed_precision(bf16: bool):
    """Make PPOTrainer's Accelerator autocast to bfloat16 when the recipe says bf16.

    PPOTrainer builds ``Accelerator(gradient_accumulation_steps=...)`` itself,
    without the config's precision; since transformers 5 stopped exporting
    ACCELERATE_MIXED_PRECISION, ``bf16: true`` would silently train in
    float32. The Accelerator reads that variable when it is built, so it is
    set for exactly that moment (``accelerate launch`` sets it for a whole run).
    """
    key = "ACCELERATE_MIXED_PRECISION"
    before = os.environ.get(key)
    if bf16 and before is None:
        os.environ[key] = "bf16"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)


def _report(metrics_path: Path, recipe: PPORecipe, stop: dict[str, Any] | None, final_step: int) -> dict[str, Any]:
    """The run's summary: first and last logged value of each tracked metric, and how it ended."""
    steps = []
    if metrics_path.is_file():
        steps = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [entry for entry in steps if "objective/kl" in entry]
    tracked = ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy",
               "policy/clipfrac_avg", "val/clipfrac_avg", "reply/length_mean", "reply/eos_rate")
    report: dict[str, Any] = {
        "steps_planned": recipe.steps,
        "steps_logged": len(steps),
        "kept_step": final_step,
        "stopped_early": stop is not None,
        "stop_reason": (f"objective/kl {stop['kl']:.3f} > max_kl {recipe.max_kl} at step {stop['step']}"
                        if stop else None),
    }
    for key in tracked:
        values = [entry[key] for entry in steps if key in entry]
        if values:
            report[f"first/{key}"] = values[0]
            report[f"last/{key}"] = values[-1]
    return report
