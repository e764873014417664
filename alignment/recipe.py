"""Job recipes: YAML files of settings, loaded into dataclasses that refuse unknown keys.

Every job kind's recipe (``RewardRecipe``, ``KTORecipe``, ``DPORecipe``,
``PPORecipe``) is built from the bases here, the way TRL builds its configs
on shared dataclasses: the LoRA fields (``LoraFields``), the trainer fields
every job sets the same way (``TrainingFields``), the epoch-based trainer's
(``EpochFields``), and for jobs that make a policy, the promotion gate's
bounds (``GateFields``). A recipe redeclares a field only to change its
default or its help::

    recipe = KTORecipe.from_yaml("alignment/recipes/kto_cpu.yaml", max_steps=10)
    recipe.to_dict()   # stored with the run
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BUNDLED = "bundled"  # recipe placeholder for the converted bundled SmolLM2 checkpoint


class RecipeLoader:
    """YAML loading for recipe dataclasses; unknown keys are an error."""

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "recipe") -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            if not _fits(value, hints[name]):
                hint = ""
                if isinstance(value, str) and _fits(1.0, hints[name]) and _is_number(value):
                    hint = f" (YAML reads {value} as text; write it with a dot, e.g. 1.0e-4)"
                raise ValueError(f"{source}: {name} must be {_describe(hints[name])}, not {value!r}{hint}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Any:
        path = Path(path)
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            # ValueError like every other recipe problem: callers catch one type.
            raise ValueError(f"{path}: a recipe is a mapping of keys to values")  # noqa: TRY004
        values.update(overrides)
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value suits a recipe field's type (int, float, bool, str, list[...], dict[...], unions).

    Caught when the recipe is loaded, so ``learning_rate: fast`` is a one-line
    error naming the key rather than a traceback from inside the trainer.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    return True  # a type this check does not know: the dataclass decides


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "null"}
    if hint in names:
        return names[hint]
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    return str(hint)


@dataclass
class LoraFields(RecipeLoader):
    """The base model and the LoRA adapter trained on it (peft's LoraConfig)."""

    base_model: str = field(default=BUNDLED, metadata={
        "help": "Base checkpoint folder, or 'bundled' for the converted bundled SmolLM2."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Linear layers that get LoRA adapters."})


@dataclass
class TrainingFields(LoraFields):
    """What every job sets the same way on its TRL config (``alignment.reward.trainer_arguments``)."""

    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Rows per step and device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    eval_fraction: float = field(default=0.2, metadata={
        "help": "Share of conversations held out for eval; read by the data split, not the trainer."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision (set explicitly)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations to save memory (set explicitly)."})
    seed: int = field(default=42, metadata={"help": "Seed for the adapter's init and the data order."})


@dataclass
class EpochFields(TrainingFields):
    """Jobs that pass over a dataset in epochs (reward, KTO, DPO; PPO counts its own updates)."""

    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the train split."})
    max_steps: int = field(default=-1, metadata={
        "help": "Optimizer steps; overrides num_train_epochs when > 0."})
    max_length: int = field(default=512, metadata={
        "help": "Longest prompt+reply in tokens; what is done with longer rows depends on the job."})


@dataclass
class GateFields:
    """Jobs that make a policy: the bounds ``align evaluate``'s gate checks their candidate against."""

    gate: dict[str, float] = field(default_factory=dict, metadata={
        "help": "Promotion gate bounds for `align evaluate` (alignment/gate.py GateBounds); absent = defaults."})

    def __post_init__(self) -> None:
        from alignment.gate import GateBounds

        GateBounds.from_mapping(self.gate, source="recipe gate")  # a typo fails before training, not after
