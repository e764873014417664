"""Reward model job: TRL RewardTrainer on the base model, LoRA + score head.

Usage (from Python; the CLI wraps this)::

    recipe = RewardRecipe.from_yaml("alignment/recipes/reward_cpu.yaml")
    result = train_reward(recipe, train_rows, eval_rows, out_dir,
                          run_store=RunStore(store.engine), run_id=run_id,
                          data_dir=data_dir, resume=False)
    result.metrics["pairwise_accuracy"], result.adapter_dir

Rows are TRL conversational preference rows: ``{"prompt": [messages],
"chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}``.

Token boundary (a silent trap): TRL's own conversational tokenization
renders prompt + reply through the chat template, which ends the sequence
with ``<|im_end|>`` and a newline; a PPO policy's reply ends at the EOS
token (``<|im_end|>``) it generated. A reward model scores the last token,
so the two disagree. This module therefore tokenizes itself, with one
function, ``encode_pair_side``, used for training and for scoring:

    chat_template(prompt, add_generation_prompt=True) + tokens(reply) + [EOS]

That is exactly the ids a policy produces (prompt, generated reply, EOS), so
PPO can score ``query + response`` ending at EOS as the reward model was
trained. The trainer receives ``chosen_ids``/``rejected_ids`` and skips its
own tokenization.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.metrics import Reply, reward_report, shortcut_report
from alignment.recipe import EpochFields
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
)
from chatbot.engine import encode_chat
from chatbot.store.runs import RunStore

log = logging.getLogger(__name__)

KIND = "reward"


@dataclass
class RewardRecipe(EpochFields):
    """Settings of one reward-model job; each maps onto RewardConfig/LoraConfig (bases: alignment/recipe.py)."""

    per_device_train_batch_size: int = field(default=4, metadata={"help": "Pairs per step and device."})
    max_length: int = field(default=512, metadata={
        "help": "Longest prompt+reply in tokens; longer pairs are dropped and counted."})
    min_pairs: int = field(default=16, metadata={"help": "Refuse to train on fewer usable train pairs."})
    seed: int = field(default=42, metadata={"help": "Seed for the score-head init and data order."})


# -- data ---------------------------------------------------------------------


def reply_text(messages: Any) -> str | None:
    """The content of a one-message assistant reply, or None if malformed."""
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict):
        return None
    message = messages[0]
    content = message.get("content")
    if message.get("role") != "assistant" or not isinstance(content, str) or not content.strip():
        return None
    return content


def validate_rows(rows: Sequence[dict[str, Any]], split: str, min_pairs: int = 1) -> list[dict[str, Any]]:
    """The usable pairs of ``rows``; ValueError naming the counts otherwise.

    Pairs whose chosen and rejected replies are identical carry no signal
    and are dropped; malformed rows are an error, not silently skipped.
    """
    if not rows:
        raise ValueError(f"{split}: no preference rows (0 pairs)")
    malformed: dict[str, int] = {}
    for row in rows:
        if not isinstance(row, dict):
            malformed["not a mapping"] = malformed.get("not a mapping", 0) + 1
            continue
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                malformed[f"missing {key!r}"] = malformed.get(f"missing {key!r}", 0) + 1
        if "prompt" in row and (not isinstance(row["prompt"], list) or not row["prompt"]):
            malformed["empty or non-list 'prompt'"] = malformed.get("empty or non-list 'prompt'", 0) + 1
        for key in ("chosen", "rejected"):
            if key in row and reply_text(row[key]) is None:
                reason = f"{key!r} is not one non-empty assistant message"
                malformed[reason] = malformed.get(reason, 0) + 1
    if malformed:
        details = "; ".join(f"{count} {reason}" for reason, count in sorted(malformed.items()))
        raise ValueError(f"{split}: {len(rows)} rows, malformed: {details}")
    usable = [row for row in rows if reply_text(row["chosen"]) != reply_text(row["rejected"])]
    identical = len(rows) - len(usable)
    if not usable:
        raise ValueError(f"{split}: all {len(rows)} pairs have chosen == rejected; nothing to learn")
    if len(usable) < min_pairs:
        raise ValueError(
            f"{split}: {len(usable)} usable pairs ({len(rows)} rows, {identical} with chosen == rejected); "
            f"the recipe needs min_pairs={min_pairs}")
    return usable


def encode_pair_side(tokenizer: Any, prompt: list[dict[str, Any]], reply: str) -> list[int]:
    """Token ids of ``prompt`` followed by ``reply`` ending at EOS (see module docstring).

    Message and reply text stay text: a control token's spelling in them is
    not read as that token (chatbot.engine.encode_chat).
    """
    prompt_ids = encode_chat(tokenizer, prompt)
    reply_ids = tokenizer(reply, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return prompt_ids + list(reply_ids) + [tokenizer.eos_token_id]


def encode_rows(tokenizer: Any, rows: Sequence[dict[str, Any]],
                max_length: int | None) -> tuple[list[dict[str, Any]], int]:
    """``chosen_ids``/``rejected_ids`` per pair, and how many pairs exceeded max_length."""
    encoded, too_long = [], 0
    for row in rows:
        chosen = encode_pair_side(tokenizer, row["prompt"], reply_text(row["chosen"]))
        rejected = encode_pair_side(tokenizer, row["prompt"], reply_text(row["rejected"]))
        if max_length is not None and max(len(chosen), len(rejected)) > max_length:
            too_long += 1
            continue
        prompt_length = len(encode_pair_side(tokenizer, row["prompt"], "")) - 1  # the sequence less its EOS
        encoded.append({"chosen_ids": chosen, "rejected_ids": rejected,
                        "chosen_chars": len(reply_text(row["chosen"])),
                        "rejected_chars": len(reply_text(row["rejected"])),
                        "chosen_tokens": len(chosen) - prompt_length - 1,  # without the EOS every side ends with
                        "rejected_tokens": len(rejected) - prompt_length - 1,
                        "chosen_eos": row.get("chosen_eos"), "rejected_eos": row.get("rejected_eos")})
    return encoded, too_long


def score_pairs(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], batch_size: int = 8,
                max_length: int | None = None) -> tuple[list[float], list[float]]:
    """Scores of each pair's chosen and rejected reply, tokenized as in training."""
    encoded, _ = encode_rows(tokenizer, rows, max_length)
    return _score_encoded(model, tokenizer, encoded, batch_size)


def _score_encoded(model: Any, tokenizer: Any, encoded: list[dict[str, Any]],
                   batch_size: int) -> tuple[list[float], list[float]]:
    import torch

    sequences = [item["chosen_ids"] for item in encoded] + [item["rejected_ids"] for item in encoded]
    scores: list[float] = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            # Right padding: the model pools at the last non-pad token.
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for i, ids in enumerate(batch):
                input_ids[i, :len(ids)] = torch.tensor(ids)
                attention[i, :len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits  # (B, 1)
            scores.extend(logits[:, 0].float().cpu().tolist())
    if was_training:
        model.train()
    return scores[:len(encoded)], scores[len(encoded):]


# -- training -----------------------------------------------------------------


def train_reward(
    recipe: RewardRecipe,
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
    """Train a reward model, report it on ``eval_rows`` and register a candidate.

    Layout of ``output_dir``: ``checkpoints/checkpoint-N`` (every save_steps),
    ``adapter/`` (LoRA + score head + tokenizer), ``metrics.jsonl`` (per
    step), ``checkpoints/runs/`` (TensorBoard), ``report.json``.
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
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    base = resolve_base_model(recipe.base_model, data_dir)
    set_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    ensure_pad_token(tokenizer, model)

    train_encoded, train_too_long = encode_rows(tokenizer, train_rows, recipe.max_length)
    eval_encoded, eval_too_long = encode_rows(tokenizer, eval_rows, recipe.max_length)
    if len(train_encoded) < recipe.min_pairs:
        raise ValueError(f"train: {len(train_encoded)} pairs fit max_length={recipe.max_length} "
                         f"({train_too_long} too long); the recipe needs min_pairs={recipe.min_pairs}")
    if not eval_encoded:
        raise ValueError(f"eval: all {eval_too_long} pairs exceed max_length={recipe.max_length}")

    output_dir.mkdir(parents=True, exist_ok=True)
    args = RewardConfig(**trainer_arguments(recipe, checkpoints, progress))
    peft_config = lora_config(recipe, "SEQ_CLS",
                              modules_to_save=["score"])  # the head is trained in full and saved with the adapter
    columns = ("chosen_ids", "rejected_ids")
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{k: item[k] for k in columns} for item in train_encoded]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[job_callback(run_store, run_id, output_dir / "metrics.jsonl"), *callbacks],
    )
    trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)

    chosen, rejected = _score_encoded(trainer.model, tokenizer, eval_encoded, recipe.per_device_train_batch_size * 2)
    metrics: dict[str, Any] = reward_report(
        chosen, rejected,
        [item["chosen_chars"] for item in eval_encoded],
        [item["rejected_chars"] for item in eval_encoded],
    )
    metrics.update(shortcut_report([
        tuple(Reply(tuple(item[f"{side}_ids"]), score, item[f"{side}_tokens"], item[f"{side}_eos"])
              for side, score in (("chosen", c), ("rejected", r)))
        for item, c, r in zip(eval_encoded, chosen, rejected, strict=True)]))
    metrics.update(train_pairs=len(train_encoded), train_dropped_too_long=train_too_long,
                   eval_dropped_too_long=eval_too_long, global_step=trainer.state.global_step,
                   token_boundary="chat_template(prompt, add_generation_prompt) + reply + eos")

    # The adapter with the score head and the tokenizer (with its pad token).
    return finish_job(lambda folder: trainer.save_model(str(folder)), recipe, base, metrics, output_dir,
                      run_store, run_id, trainer.state.global_step, last_checkpoint)
