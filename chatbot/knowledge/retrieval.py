"""What a persona's documents add to one reply: the passages found for the message, within a budget.

    knowledge = PersonaKnowledge(store.engine, personas_folder)    # one per process, shared by every chat
    found = knowledge.retrieve("support_agent", persona.knowledge, "can I return a lamp?", count_tokens)
    found.text(), found.provenance()        # for the system message; for the reply's record

The index is kept up to date on the way: before a search, the persona's files
are looked at (names, sizes, times; no reading), and when they changed since
this process last indexed them, `index_persona` runs (incremental: only the
changed files are embedded again). The embedding model is loaded on first
use, so a server whose personas have no documents never loads it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from .embedding import EmbeddingError
from .files import find_files
from .index import Hit, IndexReport, KnowledgeIndex

log = logging.getLogger(__name__)

HEADER = "Passages from {{char}}'s documents; answer from them when they fit the question:"


@dataclass(frozen=True)
class Passages:
    """The passages that reach one prompt, best first, and those left out for the token budget."""

    used: list[Hit] = field(default_factory=list)
    left_out: list[Hit] = field(default_factory=list)
    error: str | None = None  # why nothing could be searched (the model is missing, ...)

    def text(self) -> str:
        """The passages as the system message carries them, each with its source."""
        if not self.used:
            return ""
        return "\n\n".join([HEADER, *(f"[{hit.citation}]\n{hit.text}" for hit in self.used)])

    def provenance(self) -> list[dict[str, Any]]:
        def row(hit: Hit) -> dict[str, Any]:
            return {"path": hit.path, "location": hit.location, "heading": hit.heading,
                    "score": round(hit.score, 4), "chunk": hit.chunk_id}

        return [row(hit) for hit in self.used] + [{**row(hit), "left_out": "token budget"} for hit in self.left_out]


class PersonaKnowledge:
    """The shared service behind persona documents: one index on the store's database, the embedder
    loaded on first use, each persona indexed again when its files change."""

    def __init__(self, database: Engine | str, personas_folder: Path,
                 load_embedder: Callable[[], Any] | None = None):
        self.database, self.folder = database, Path(personas_folder)
        self._load_embedder = load_embedder or _bundled_embedder
        self._index: KnowledgeIndex | None = None
        self._stamps: dict[str, tuple] = {}  # persona id -> its files as last indexed by this process
        self._lock = threading.Lock()  # one indexing run at a time (the embedder serialises its own calls)

    def index(self) -> KnowledgeIndex:
        with self._lock:
            if self._index is None:
                self._index = KnowledgeIndex(self.database, self._load_embedder())
            return self._index

    def _stamp(self, files: list[str]) -> tuple:
        """The files as they are now: names, sizes and modification times (nothing is read)."""
        found, errors = find_files(self.folder, files)
        try:
            return tuple((f.rel, f.size, f.path.stat().st_mtime_ns) for f in found), tuple(errors)
        except OSError:  # a file went away just now: index again, which reports it
            return (object(),)

    def ensure_indexed(self, persona_id: str, files: list[str],
                       progress: Callable[[int, int, str], None] | None = None,
                       force: bool = False) -> IndexReport | None:
        """Index the persona's files when they changed since this process last did; the report, or None
        when nothing needed doing."""
        index = self.index()
        with self._lock:
            stamp = (tuple(files), self._stamp(files))
            if not force and self._stamps.get(persona_id) == stamp:
                return None
            report = index.index_persona(persona_id, self.folder, files, progress=progress)
            self._stamps[persona_id] = stamp
        for problem in report.errors:
            log.warning("persona %s: %s", persona_id, problem)
        return report

    def retrieve(self, persona_id: str, settings, query: str, count_tokens: Callable[[str], int]) -> Passages:
        """The passages for `query` under the persona's knowledge `settings` (top_k, min_score, token_budget)."""
        if not query.strip():
            return Passages()
        try:
            self.ensure_indexed(persona_id, settings.files)
            hits = self.index().search(persona_id, query, k=settings.top_k, min_score=settings.min_score)
        except EmbeddingError as exc:
            log.warning("persona %s: its documents cannot be searched: %s", persona_id, exc)
            return Passages(error=str(exc))
        used, left_out, spent = [], [], 0
        for hit in hits:  # best first
            tokens = count_tokens(f"[{hit.citation}]\n{hit.text}")
            if spent + tokens > settings.token_budget:
                left_out.append(hit)
                continue
            spent += tokens
            used.append(hit)
        return Passages(used, left_out)

    def close(self) -> None:
        with self._lock:
            if self._index is not None:
                self._index.close()
                self._index = None


def _bundled_embedder():
    from .embedding import TransformerEmbedder

    return TransformerEmbedder.load()
