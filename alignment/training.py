"""What every alignment job does the same way around its TRL trainer.

The base model and its pad token, the TRL config fields and LoRA settings a
recipe maps onto, per-step progress and metrics, checkpoints and resume, the
run's status when training raises, and finishing: the adapter, report.json
and the candidate version, registered together. The job modules
(reward.py, kto.py, dpo.py, ppo.py) hold only what is their own::

    last = find_checkpoint(checkpoints, resume)
    return run_tracked(run_store, run_id, lambda: _train(...))   # in _train:
    args = KTOConfig(**trainer_arguments(recipe, checkpoints, progress), ...)
    ...
    return finish_job(lambda folder: trainer.save_model(str(folder)), recipe, base, metrics, output_dir,
                      run_store, run_id, trainer.state.global_step, last)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.recipe import BUNDLED
from chatbot.store.runs import RunStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    """What a finished job made: its metrics, the adapter folder and the candidate version it registered."""

    metrics: dict[str, Any]
    adapter_dir: Path
    global_step: int = 0
    resumed_from: Path | None = None
    version_id: int | None = None  # None: no run store, or not the main process


def finish_job(save_adapter: Callable[[Path], None], recipe: Any, base: Path, metrics: dict[str, Any],
               output_dir: Path, run_store: RunStore | None, run_id: int | None, global_step: int,
               resumed_from: Path | None) -> JobResult:
    """Save the adapter to ``output_dir/adapter``, write report.json, register the candidate version.

    Registering also marks the run succeeded, in one transaction: a job killed
    before it leaves no version behind, only an unfinished run.
    """
    adapter_dir = output_dir / "adapter"
    save_adapter(adapter_dir)
    (output_dir / "report.json").write_text(json.dumps(
        {"recipe": recipe.to_dict(), "base_model": str(base), "metrics": metrics}, indent=2, default=str),
        encoding="utf-8")
    version_id = None
    if run_store is not None and run_id is not None:
        version_id = run_store.register_candidate(
            run_id, base_model=served_model_id(recipe.base_model), adapter_path=str(adapter_dir.resolve()),
            metrics=metrics)
    return JobResult(metrics=metrics, adapter_dir=adapter_dir, global_step=global_step,
                     resumed_from=resumed_from, version_id=version_id)


def trl_rows(rows: Any, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Conversational ``rows`` cut to a TRL trainer's ``columns``, message text kept plain text.

    TRL's DPO and KTO trainers tokenize conversational rows themselves and
    pass a row's ``chat_template_kwargs`` on to ``apply_chat_template``. With
    ``sanitize_control_tokens`` a control token typed into a message
    (``<|im_end|>``) is trained on as the characters it is, as the chat
    encodes it (chatbot.engine.encode_chat), and cannot forge a turn.
    """
    return [{**{k: row[k] for k in columns}, "chat_template_kwargs": {"sanitize_control_tokens": True}}
            for row in rows]


def ensure_pad_token(tokenizer: Any, model: Any | None = None) -> None:
    """Give the tokenizer a pad token distinct from EOS.

    Sequence classification scores the last non-pad token; with pad == EOS a
    reply ending at EOS would be scored one token early. An existing special
    token distinct from EOS (SmolLM2's ``<|endoftext|>``) is reused so that
    the vocabulary, and hence the policy sharing this tokenizer, stays the
    same size; otherwise ``<|pad|>`` is added and the embeddings resized.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        pass
    elif tokenizer.unk_token is not None and tokenizer.unk_token_id not in (
            tokenizer.eos_token_id, tokenizer.bos_token_id):
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        if model is not None:
            model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def resolve_base_model(base_model: str, data_dir: Path | None) -> Path:
    if base_model == BUNDLED:
        if data_dir is None:
            raise ValueError("recipe base_model is 'bundled': pass data_dir to find the converted checkpoint")
        from chatbot import default_model

        return default_model.ensure_checkpoint(Path(data_dir))
    path = Path(base_model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"base_model {base_model!r} is not a checkpoint folder (no config.json)")
    return path


def served_model_id(base_model: str) -> str:
    """The id the chat app records for this base model (``Engine.model_id``).

    Candidate versions are registered under it so that a promoted adapter is
    the same ``model_versions`` row the app writes replies with: the bundled
    model's id for ``bundled``, otherwise the folder exactly as written (give
    ``serve --model`` the same string).
    """
    if base_model == BUNDLED:
        from chatbot import default_model

        return default_model.MODEL_ID
    return base_model


def job_callback(run_store: RunStore | None, run_id: int | None, metrics_path: Path, step_offset: int = 0):
    """Per-step progress and logs to the run store and metrics.jsonl.

    ``step_offset``: steps done before this process started, for a resumed job
    whose trainer counts from 0 again (PPO); the logged step and the progress
    are over the whole run.
    """
    from transformers import TrainerCallback

    def progress(state) -> float:
        # Leave the last percent for eval and registration.
        return 0.99 * (step_offset + state.global_step) / (step_offset + state.max_steps)

    class JobCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if run_store is not None and run_id is not None and state.max_steps and state.is_world_process_zero:
                run_store.record_step(run_id, progress(state))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:  # one writer under `accelerate launch`
                return
            # `time` (Unix seconds) makes a run's step speed readable from the file alone.
            entry = {"step": step_offset + state.global_step, "time": round(time.time(), 3),
                     **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}}
            with metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
            if run_store is not None and run_id is not None and state.max_steps:
                run_store.record_step(run_id, progress(state), entry)

    return JobCallback()


def trainer_arguments(recipe: Any, checkpoints: Path, progress: bool) -> dict[str, Any]:
    """The TRL config fields every job kind sets the same way from its recipe.

    Epochs, max_steps and max_length are included when the recipe has them:
    the reward and KTO recipes do, PPO's counts its steps itself.
    """
    arguments = dict(
        output_dir=str(checkpoints),
        learning_rate=recipe.learning_rate,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        logging_steps=1,
        eval_strategy="no",  # eval metrics are computed by the job itself, per pair or row
        bf16=recipe.bf16,
        # bf16 on a machine without a GPU is CPU autocast, which the arguments accept only with use_cpu.
        use_cpu=not _has_gpu(),
        gradient_checkpointing=recipe.gradient_checkpointing,
        seed=recipe.seed,
        report_to=["tensorboard"],  # event files under checkpoints/runs/ (tensorboardX)
        disable_tqdm=not progress,  # the trainer's bar shows steps and ETA
        dataset_num_proc=None,
    )
    for name in ("num_train_epochs", "max_steps", "max_length"):
        if hasattr(recipe, name):
            arguments[name] = getattr(recipe, name)
    return arguments


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def lora_config(recipe: Any, task_type: str, **extra: Any):
    """The recipe's LoRA settings as a peft LoraConfig (imported here: peft is slow to import)."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                      lora_dropout=recipe.lora_dropout, target_modules=list(recipe.lora_target_modules),
                      **extra)


def last_complete_checkpoint(checkpoints: Path, complete_marker: str = "trainer_state.json") -> Path | None:
    """The highest-numbered ``checkpoint-N`` folder that was written to the end (it has
    ``complete_marker``, which the trainer writes last). A job killed while saving leaves a newer,
    partial folder behind; resuming from it would fail, so it is passed over."""
    numbered = []
    for folder in checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else ():
        step = folder.name.removeprefix("checkpoint-")
        if step.isdigit() and (folder / complete_marker).exists():
            numbered.append((int(step), folder))
    return max(numbered)[1] if numbered else None


def find_checkpoint(checkpoints: Path, resume: bool, complete_marker: str = "trainer_state.json") -> Path | None:
    """The checkpoint to resume from; ValueError if one exists and ``resume`` is false."""
    last_checkpoint = last_complete_checkpoint(checkpoints, complete_marker)
    if last_checkpoint and not resume:
        raise ValueError(f"{checkpoints} already has {Path(last_checkpoint).name}: "
                         "resume it, or use a new output directory")
    if resume and not last_checkpoint:
        log.warning("no checkpoint under %s: starting from step 0", checkpoints)
    return Path(last_checkpoint) if last_checkpoint else None


def run_tracked(run_store: RunStore | None, run_id: int | None, train: Any) -> Any:
    """Call ``train()`` with the run marked running; interrupted or failed (re-raised) if it raises."""
    if run_store is not None and run_id is not None:
        run_store.set_status(run_id, "running")
    try:
        result = train()
    except KeyboardInterrupt:
        if run_store is not None and run_id is not None:
            run_store.set_status(run_id, "interrupted", "interrupted; resume with --resume")
        raise
    except BaseException as exc:
        if run_store is not None and run_id is not None:
            run_store.set_status(run_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    return result


class JobCancelled(KeyboardInterrupt):
    """A cancelled job stopped after writing its checkpoint.

    A KeyboardInterrupt, so ``run_tracked`` marks the run interrupted, as for
    Ctrl-C: it continues from that checkpoint with ``--resume``.
    """


def cancel_callback(cancelled: Callable[[], bool]):
    """A trainer callback that, once ``cancelled()`` is true, saves a checkpoint at the end of the
    step and then raises JobCancelled (the trainer calls ``on_save`` after writing it)."""
    from transformers import TrainerCallback

    class CancelCallback(TrainerCallback):
        requested_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested_at is None and cancelled():
                self.requested_at = state.global_step
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            if self.requested_at is not None:
                raise JobCancelled(f"cancelled at step {state.global_step}; its checkpoint is saved")

    return CancelCallback()
