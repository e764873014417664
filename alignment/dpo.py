"""DPO job: TRL DPOTrainer on the base causal LM with a LoRA adapter.

Learns from the same-context pairs the reward job uses (a liked and a
disliked reply to the identical prompt), with no reward model and no
sampling::

    recipe = DPORecipe.from_yaml("alignment/recipes/dpo_cpu.yaml")
    split = build_preference(store, persona, eval_fraction=recipe.eval_fraction, seed=recipe.seed)
    result = train_dpo(recipe, split.trl("train"), split.trl("eval"), out_dir,
                       run_store=RunStore(store.engine), run_id=run_id, data_dir=data_dir)

Rows are TRL conversational preference rows: ``{"prompt": [messages],
"chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}``;
pairs with chosen == rejected are dropped (``alignment.reward.validate_rows``).

Why DPO next to KTO: a pair says which of two replies to one prompt is
better, a stronger signal than two unrelated thumbs, and DPO optimises it
directly; KTO also learns from replies that have no partner.

Reference model: none is passed, so DPOTrainer (trl 1.12, ``_compute_loss``)
computes reference log-probs with the same model under ``use_adapter(model,
None)``, i.e. the LoRA adapter disabled. The eval report below does the same
with ``disable_adapter()`` (``alignment.kto.implicit_rewards``).

Eval metrics are the job's own, per held-out pair, never TRL's batch means:
the implicit reward margin ``beta * [(log p(chosen) - log p_ref(chosen)) -
(log p(rejected) - log p_ref(rejected))]``, its sign (pairwise accuracy),
its mean, each side's mean log-ratio, and the "prefer the longer reply"
baseline; and, as for the reward model (``alignment.metrics.shortcut_report``),
what the implicit rewards follow besides the thumbs: accuracy on the
length-matched pairs, correlation with length and with ending at EOS.

Token boundary: TRL tokenizes each side as ``chat_template(prompt,
add_generation_prompt)`` followed by the rest of ``chat_template(prompt +
reply)`` (the reply, ``<|im_end|>`` and a newline), cut after max_length
tokens (the reply's end goes first), and drops pairs whose prompt alone
reaches max_length. Each
side is scored here as a KTO row with exactly that split, so training and the
report agree. Recipe plumbing (YAML, checkpoints, run-store tracking, the
per-step callback, base-model resolution, pad token, finishing) is in
alignment/training.py and alignment/recipe.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.kto import encode_row, implicit_rewards
from alignment.metrics import Reply, longer_reply_accuracy, mean_margin, pairwise_accuracy, shortcut_report
from alignment.recipe import EpochFields, GateFields
from alignment.reward import reply_text, validate_rows
from alignment.training import (
    JobResult,
    cancel_callback,
    ensure_pad_token,
    find_checkpoint,
    finish_job,
    job_callback,
    lora_config,
    resolve_base_model,
    run_tracked,
    trainer_arguments,
    trl_rows,
)
from chatbot.store.runs import RunStore

log = logging.getLogger(__name__)

KIND = "dpo"
# DPOConfig.loss_type values of trl 1.12 (DPOTrainer raises on others only at the first step).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPORecipe(EpochFields, GateFields):
    """Settings of one DPO job; each maps onto DPOConfig/LoraConfig (bases: alignment/recipe.py)."""

    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})
    beta: float = field(default=0.1, metadata={
        "help": "DPO beta: strength of the pull towards the reference (higher = closer)."})
    loss_type: str = field(default="sigmoid", metadata={
        "help": "DPOConfig loss_type: 'sigmoid' is the DPO paper's loss; 'ipo', 'hinge', ... are variants."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Pairs per step and device."})
    max_length: int = field(default=512, metadata={
        "help": "Longest prompt+reply in tokens; longer replies are truncated, pairs whose prompt fills it are "
                "dropped and counted."})
    min_pairs: int = field(default=16, metadata={"help": "Refuse to train on fewer usable train pairs."})
    seed: int = field(default=42, metadata={"help": "Seed for the LoRA init and data order."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"recipe loss_type {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


# -- data ---------------------------------------------------------------------


def side_rows(rows: Sequence[dict[str, Any]], side: str) -> list[dict[str, Any]]:
    """Each pair's ``side`` ("chosen" or "rejected") as a KTO row, the form kto.py scores."""
    return [{"prompt": row["prompt"], "completion": row[side]} for row in rows]


def drop_long_prompts(tokenizer: Any, rows: Sequence[dict[str, Any]],
                      max_length: int | None) -> tuple[list[dict[str, Any]], int]:
    """Pairs whose prompt leaves room for a reply (TRL drops the others silently), and how many were dropped."""
    if max_length is None:
        return list(rows), 0
    kept = [row for row, side in zip(rows, side_rows(rows, "chosen"), strict=True)
            if len(encode_row(tokenizer, side)[0]) < max_length]
    return kept, len(rows) - len(kept)


# -- eval ---------------------------------------------------------------------


def dpo_report(chosen: Sequence[float], rejected: Sequence[float], chosen_lengths: Sequence[int],
               rejected_lengths: Sequence[int], beta: float) -> dict[str, Any]:
    """Per-pair eval metrics from each side's log-ratio log p_policy - log p_reference.

    The implicit reward of a reply is beta * its log-ratio, so a pair's margin
    is beta * (chosen - rejected) and it is ranked right when that is > 0.
    """
    return {
        "eval_pairs": len(chosen),
        "pairwise_accuracy": pairwise_accuracy(chosen, rejected),  # c > r exactly when beta * (c - r) > 0
        "mean_margin": beta * mean_margin(chosen, rejected),
        "chosen_mean_logratio": sum(chosen) / len(chosen),
        "rejected_mean_logratio": sum(rejected) / len(rejected),
        "longer_reply_accuracy": longer_reply_accuracy(chosen_lengths, rejected_lengths),
        "beta": beta,
    }


def pair_logratios(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], batch_size: int = 8,
                   max_length: int | None = None) -> tuple[list[float], list[float]]:
    """Per pair: the chosen and the rejected reply's log-ratio to the reference (the adapter disabled)."""
    ratios = implicit_rewards(model, tokenizer, side_rows(rows, "chosen") + side_rows(rows, "rejected"),
                              batch_size, max_length)
    return ratios[:len(rows)], ratios[len(rows):]


def shortcut_pairs(tokenizer: Any, rows: Sequence[dict[str, Any]], chosen: Sequence[float],
                   rejected: Sequence[float], beta: float) -> list[tuple[Reply, Reply]]:
    """Each pair's sides as ``metrics.shortcut_report`` sees them: implicit reward (beta x log-ratio),
    reply tokens (as the reward job counts them, no template tokens) and whether it ended at EOS
    (the eval rows' diagnostic columns; None when absent)."""

    def reply(row: dict[str, Any], side: str, ratio: float) -> Reply:
        text = reply_text(row[side])
        key = (json.dumps(row["prompt"], sort_keys=True), text)  # one reply in several pairs counts once
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return Reply(key, beta * ratio, tokens, row.get(f"{side}_eos"))

    return [(reply(row, "chosen", c), reply(row, "rejected", r))
            for row, c, r in zip(rows, chosen, rejected, strict=True)]


# -- training -----------------------------------------------------------------


def train_dpo(
    recipe: DPORecipe,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Sequence[dict[str, Any]],
    output_dir: str | Path,
    run_store: RunStore | None = None,
    run_id: int | None = None,
    resume: bool = False,
    progress: bool = True,
    data_dir: Path | None = None,
    callbacks: Sequence[Any] = (),
    cancelled: Callable[[], bool] | None = None,
) -> JobResult:
    """Train a LoRA adapter with DPO, report it on ``eval_rows`` and register a candidate.

    Layout of ``output_dir`` as for the reward job: ``checkpoints/``,
    ``adapter/`` (LoRA + tokenizer), ``metrics.jsonl``, ``report.json``.
    A KeyboardInterrupt marks the run interrupted, any other error failed;
    both re-raise. ``resume=True`` continues from the last checkpoint.
    """
    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    train_rows = validate_rows(train_rows, "train", recipe.min_pairs)
    eval_rows = validate_rows(eval_rows, "eval")
    last_checkpoint = find_checkpoint(checkpoints, resume)
    if cancelled is not None:  # a worker's job that someone cancels: checkpoint, then stop
        callbacks = [*callbacks, cancel_callback(cancelled)]
    return run_tracked(run_store, run_id, lambda: _train(
        recipe, train_rows, eval_rows, output_dir, checkpoints, last_checkpoint,
        run_store, run_id, progress, data_dir, callbacks))


def _train(recipe, train_rows, eval_rows, output_dir, checkpoints, last_checkpoint,
           run_store, run_id, progress, data_dir, callbacks) -> JobResult:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    base = resolve_base_model(recipe.base_model, data_dir)
    set_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ensure_pad_token(tokenizer, model)  # before the trainer, which would otherwise pad with EOS

    train_kept, train_too_long = drop_long_prompts(tokenizer, train_rows, recipe.max_length)
    eval_kept, eval_too_long = drop_long_prompts(tokenizer, eval_rows, recipe.max_length)
    if len(train_kept) < len(train_rows):
        validate_rows(train_kept, f"train (after dropping {train_too_long} prompts >= max_length="
                                  f"{recipe.max_length})", recipe.min_pairs)
    if not eval_kept:
        raise ValueError(f"eval: all {eval_too_long} prompts reach max_length={recipe.max_length}")

    output_dir.mkdir(parents=True, exist_ok=True)
    args = DPOConfig(**trainer_arguments(recipe, checkpoints, progress), beta=recipe.beta,
                     loss_type=[recipe.loss_type])
    peft_config = lora_config(recipe, "CAUSAL_LM")
    columns = ("prompt", "chosen", "rejected")
    trainer = DPOTrainer(
        model=model,
        ref_model=None,  # reference = this model with the adapter disabled (see module docstring)
        args=args,
        train_dataset=Dataset.from_list(trl_rows(train_kept, columns)),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[job_callback(run_store, run_id, output_dir / "metrics.jsonl"), *callbacks],
    )
    trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)

    policy = trainer.accelerator.unwrap_model(trainer.model)
    chosen, rejected = pair_logratios(policy, tokenizer, eval_kept, recipe.per_device_train_batch_size * 2,
                                      recipe.max_length)
    metrics = dpo_report(chosen, rejected, [len(reply_text(row["chosen"])) for row in eval_kept],
                         [len(reply_text(row["rejected"])) for row in eval_kept], recipe.beta)
    metrics.update(shortcut_report(shortcut_pairs(tokenizer, eval_kept, chosen, rejected, recipe.beta)))
    metrics.update(loss_type=recipe.loss_type, train_pairs=len(train_kept),
                   train_dropped_too_long=train_too_long, eval_dropped_too_long=eval_too_long,
                   global_step=trainer.state.global_step,
                   token_boundary="chat_template(prompt + reply), reply after the generation prompt")

    # The adapter and the tokenizer (with its pad token).
    return finish_job(lambda folder: trainer.save_model(str(folder)), recipe, base, metrics, output_dir,
                      run_store, run_id, trainer.state.global_step, last_checkpoint)
