"""KTO job: TRL KTOTrainer on the base causal LM with a LoRA adapter.

Learns straight from unpaired thumbs::

    recipe = KTORecipe.from_yaml("alignment/recipes/kto_cpu.yaml")
    split = build_kto(store, persona, eval_fraction=recipe.eval_fraction, seed=recipe.seed)
    result = train_kto(recipe, split.trl("train"), split.trl("eval"), out_dir,
                       run_store=RunStore(store.engine), run_id=run_id, data_dir=data_dir)

Rows are TRL conversational unpaired rows: ``{"prompt": [messages],
"completion": [{"role": "assistant", "content": ...}], "label": bool}``.

Reference model: none is passed, so KTOTrainer (trl 1.12,
``compute_ref_log_probs``) computes reference log-probs with the same model
under ``use_adapter(model, None)``, i.e. the LoRA adapter disabled. The eval
report below does the same with ``disable_adapter()``.

Token boundary: TRL tokenizes a conversational row itself as
``chat_template(prompt, add_generation_prompt)`` followed by the rest of
``chat_template(prompt + completion)`` (the reply, ``<|im_end|>`` and a
newline). The eval log-probs here use exactly that split, so training and
the report agree. Recipe plumbing (YAML, checkpoints, run-store tracking,
the per-step callback, base-model resolution, pad token, finishing) is in
alignment/training.py and alignment/recipe.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.recipe import EpochFields, GateFields
from alignment.reward import reply_text
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
from chatbot.engine import encode_chat
from chatbot.store.runs import RunStore

log = logging.getLogger(__name__)

KIND = "kto"
AUTO = "auto"
# TRL's KTO guidance (KTOTrainer warns outside it): desirable_weight x liked rows over
# undesirable_weight x disliked rows should lie in [1, 4/3]. "auto" aims at the middle.
WEIGHT_RATIO_RANGE = (1.0, 4 / 3)
AUTO_RATIO = 7 / 6


@dataclass
class KTORecipe(EpochFields, GateFields):
    """Settings of one KTO job; each maps onto KTOConfig/LoraConfig (bases: alignment/recipe.py)."""

    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})
    beta: float = field(default=0.1, metadata={
        "help": "KTO beta: strength of the pull towards the reference (higher = closer)."})
    desirable_weight: float | str = field(default=AUTO, metadata={
        "help": "Loss weight of liked replies, or 'auto': set from the data's balance (class_weights)."})
    undesirable_weight: float | str = field(default=AUTO, metadata={
        "help": "Loss weight of disliked replies, or 'auto' (both or neither are 'auto')."})
    per_device_train_batch_size: int = field(default=4, metadata={
        "help": "Rows per step and device; > 1, the KL estimate mismatches completions within a batch."})
    max_length: int = field(default=512, metadata={
        "help": "Longest prompt+reply in tokens; longer rows are truncated, rows whose prompt fills it are dropped "
                "and counted."})
    min_rows: int = field(default=16, metadata={"help": "Refuse to train on fewer usable train rows."})
    seed: int = field(default=42, metadata={"help": "Seed for the LoRA init and data order."})

    def __post_init__(self) -> None:
        super().__post_init__()
        weights = (self.desirable_weight, self.undesirable_weight)
        if (AUTO in weights) != (weights == (AUTO, AUTO)):
            raise ValueError("desirable_weight and undesirable_weight are both 'auto' or both numbers, "
                             f"not {weights[0]!r} and {weights[1]!r}")
        if AUTO not in weights and not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0
                                           for w in weights):
            raise ValueError(f"desirable_weight and undesirable_weight must be positive numbers or 'auto', "
                             f"not {weights[0]!r} and {weights[1]!r}")


# -- data ---------------------------------------------------------------------


def _counts(rows: Sequence[dict[str, Any]]) -> str:
    desirable = sum(bool(row["label"]) for row in rows)
    return f"{desirable} desirable, {len(rows) - desirable} undesirable"


def validate_rows(rows: Sequence[dict[str, Any]], split: str, min_rows: int = 1,
                  both_labels: bool = True) -> list[dict[str, Any]]:
    """``rows`` as a list if usable; ValueError naming the counts otherwise."""
    if not rows:
        raise ValueError(f"{split}: no KTO rows (0 rows)")
    malformed: dict[str, int] = {}

    def bad(reason: str) -> None:
        malformed[reason] = malformed.get(reason, 0) + 1

    for row in rows:
        if not isinstance(row, dict):
            bad("not a mapping")
            continue
        for key in ("prompt", "completion", "label"):
            if key not in row:
                bad(f"missing {key!r}")
        if "prompt" in row and (not isinstance(row["prompt"], list) or not row["prompt"]):
            bad("empty or non-list 'prompt'")
        if "completion" in row and reply_text(row["completion"]) is None:
            bad("'completion' is not one non-empty assistant message")
        if "label" in row and not isinstance(row["label"], bool):
            bad("'label' is not a bool")
    if malformed:
        details = "; ".join(f"{count} {reason}" for reason, count in sorted(malformed.items()))
        raise ValueError(f"{split}: {len(rows)} rows, malformed: {details}")
    rows = list(rows)
    desirable = sum(row["label"] for row in rows)
    if both_labels and desirable in (0, len(rows)):
        which = "desirable" if desirable else "undesirable"
        raise ValueError(f"{split}: all {len(rows)} rows are {which} ({_counts(rows)}); "
                         "KTO needs both liked and disliked replies")
    if len(rows) < min_rows:
        raise ValueError(f"{split}: {len(rows)} rows ({_counts(rows)}); the recipe needs min_rows={min_rows}")
    return rows


def encode_row(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) split as TRL's KTOTrainer splits a conversational row (see trl_rows)."""
    prompt_ids = encode_chat(tokenizer, row["prompt"])
    full_ids = encode_chat(tokenizer, row["prompt"] + row["completion"], add_generation_prompt=False)
    return prompt_ids, full_ids[len(prompt_ids):]


def drop_long_prompts(tokenizer: Any, rows: Sequence[dict[str, Any]],
                      max_length: int | None) -> tuple[list[dict[str, Any]], int]:
    """Rows whose prompt leaves room for the reply (TRL drops the others silently), and how many were dropped."""
    if max_length is None:
        return list(rows), 0
    kept = [row for row in rows if len(encode_row(tokenizer, row)[0]) < max_length]
    return kept, len(rows) - len(kept)


def class_weights(recipe: KTORecipe, desirable: int, undesirable: int) -> dict[str, Any]:
    """The loss weights to train with, and what they mean for this data's balance.

    With ``auto`` the rarer label's weight is raised (the other stays 1) so that
    desirable_weight x desirable / (undesirable_weight x undesirable) is 7/6, inside TRL's
    recommended [1, 4/3]. Unweighted, 49 liked against 359 disliked rows gave a ratio of
    0.14, and KTO learned to make the liked replies *less* likely. Numbers in the recipe
    are used as given; ``in_recommended_range`` says whether they follow the guidance.
    """
    if desirable < 1 or undesirable < 1:
        raise ValueError(f"KTO needs liked and disliked rows, not {desirable} and {undesirable}")
    if recipe.desirable_weight == AUTO:
        raised = AUTO_RATIO * undesirable / desirable  # the desirable weight that gives the target ratio
        dw, uw, source = (raised, 1.0, "auto") if raised >= 1 else (1.0, 1 / raised, "auto")
    else:
        dw, uw, source = float(recipe.desirable_weight), float(recipe.undesirable_weight), "recipe"
    ratio = dw * desirable / (uw * undesirable)
    low, high = WEIGHT_RATIO_RANGE
    if not low - 1e-9 <= ratio <= high + 1e-9:
        log.warning("KTO weights %.3g:%.3g on %d liked / %d disliked rows give a ratio of %.2f, outside TRL's "
                    "recommended [1, 4/3]; set them to 'auto' to follow the data", dw, uw, desirable, undesirable,
                    ratio)
    return {"desirable_weight": dw, "undesirable_weight": uw, "weights_from": source, "weighted_ratio": ratio,
            "in_recommended_range": low - 1e-9 <= ratio <= high + 1e-9}


# -- eval ---------------------------------------------------------------------


def completion_logps(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], batch_size: int = 8,
                     max_length: int | None = None) -> list[float]:
    """Summed log-prob of each row's completion given its prompt, under ``model`` as it is."""
    import torch

    logps: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = [encode_row(tokenizer, row) for row in rows[start:start + batch_size]]
        sequences = [(p + c)[:max_length] if max_length else p + c for p, c in batch]
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for i, ((prompt, _), ids) in enumerate(zip(batch, sequences, strict=True)):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention[i, :len(ids)] = 1
            mask[i, len(prompt):len(ids)] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(
            -1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        logps.extend((token_logps * mask[:, 1:].to(device)).sum(-1).cpu().tolist())
    return logps


def implicit_rewards(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], batch_size: int = 8,
                     max_length: int | None = None) -> list[float]:
    """Per row: log p_policy(completion | prompt) - log p_reference, the reference being the adapter disabled."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            policy = completion_logps(model, tokenizer, rows, batch_size, max_length)
            with model.disable_adapter():
                reference = completion_logps(model, tokenizer, rows, batch_size, max_length)
    finally:
        if was_training:
            model.train()
    return [p - r for p, r in zip(policy, reference, strict=True)]


def kto_report(rewards: Sequence[float], labels: Sequence[bool], beta: float) -> dict[str, Any]:
    """Per-row eval metrics of implicit rewards (log-ratios) against thumbs; None where a label is absent."""
    desirable = [r for r, label in zip(rewards, labels, strict=True) if label]
    undesirable = [r for r, label in zip(rewards, labels, strict=True) if not label]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    des_mean, und_mean = mean(desirable), mean(undesirable)
    report: dict[str, Any] = {
        "eval_rows": len(rewards),
        "eval_desirable": len(desirable),
        "eval_undesirable": len(undesirable),
        "desirable_mean_logratio": des_mean,
        "undesirable_mean_logratio": und_mean,
        "logratio_margin": des_mean - und_mean if desirable and undesirable else None,
        "desirable_positive_rate": mean([float(r > 0) for r in desirable]),
        "undesirable_negative_rate": mean([float(r < 0) for r in undesirable]),
        "beta": beta,
    }
    if desirable and undesirable:
        from alignment.metrics import roc_auc

        report["roc_auc"] = roc_auc(list(rewards), [int(label) for label in labels])
    else:
        report["roc_auc"] = None
    return report


# -- training -----------------------------------------------------------------


def train_kto(
    recipe: KTORecipe,
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
    """Train a LoRA adapter with KTO, report it on ``eval_rows`` and register a candidate.

    Layout of ``output_dir`` as for the reward job: ``checkpoints/``,
    ``adapter/`` (LoRA + tokenizer), ``metrics.jsonl``, ``report.json``.
    A KeyboardInterrupt marks the run interrupted, any other error failed;
    both re-raise. ``resume=True`` continues from the last checkpoint.
    """
    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    train_rows = validate_rows(train_rows, "train", recipe.min_rows)
    eval_rows = validate_rows(eval_rows, "eval", both_labels=False)
    if recipe.per_device_train_batch_size < 2:
        raise ValueError("per_device_train_batch_size must be > 1: KTO estimates its KL term within a batch")
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
    from trl import KTOConfig, KTOTrainer

    base = resolve_base_model(recipe.base_model, data_dir)
    set_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ensure_pad_token(tokenizer, model)  # before the trainer, which would otherwise pad with EOS

    train_kept, train_too_long = drop_long_prompts(tokenizer, train_rows, recipe.max_length)
    eval_kept, eval_too_long = drop_long_prompts(tokenizer, eval_rows, recipe.max_length)
    if len(train_kept) < len(train_rows):
        validate_rows(train_kept, f"train (after dropping {train_too_long} prompts >= max_length="
                                  f"{recipe.max_length})", recipe.min_rows)
    if not eval_kept:
        raise ValueError(f"eval: all {eval_too_long} prompts reach max_length={recipe.max_length}")

    train_desirable = sum(row["label"] for row in train_kept)
    weights = class_weights(recipe, train_desirable, len(train_kept) - train_desirable)
    output_dir.mkdir(parents=True, exist_ok=True)
    args = KTOConfig(**trainer_arguments(recipe, checkpoints, progress), beta=recipe.beta,
                     desirable_weight=weights["desirable_weight"], undesirable_weight=weights["undesirable_weight"])
    peft_config = lora_config(recipe, "CAUSAL_LM")
    columns = ("prompt", "completion", "label")
    trainer = KTOTrainer(
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
    rewards = implicit_rewards(policy, tokenizer, eval_kept, recipe.per_device_train_batch_size * 2,
                               recipe.max_length)
    metrics = kto_report(rewards, [row["label"] for row in eval_kept], recipe.beta)
    metrics.update(weights)
    metrics.update(train_rows=len(train_kept), train_desirable=train_desirable,
                   train_undesirable=len(train_kept) - train_desirable,
                   train_dropped_too_long=train_too_long, eval_dropped_too_long=eval_too_long,
                   global_step=trainer.state.global_step,
                   token_boundary="chat_template(prompt + completion), completion after the generation prompt")

    # The adapter and the tokenizer (with its pad token).
    return finish_job(lambda folder: trainer.save_model(str(folder)), recipe, base, metrics, output_dir,
                      run_store, run_id, trainer.state.global_step, last_checkpoint)
