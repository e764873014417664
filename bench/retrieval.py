"""Knowledge retrieval latency per message: embedding the query plus the vector search, 10,000 chunks.

    python bench/retrieval.py [--chunks 10000] [--others 10000] [--repeats 5] [--k 4]
                              [--pg-url URL] [--threads N] [--drivers] [--only NAMES]

One persona gets ``--chunks`` chunks (100 documents) and another persona
``--others`` more, so every search filters by persona as the app's does. The
stored vectors are random unit vectors (a search's cost does not depend on
what they say; embedding 20,000 real chunks would take this 2-core machine
minutes), with chunk text of a realistic size. Each query is a real user
message embedded by the real model (all-MiniLM-L6-v2) every time.

Side by side in this process, on the same vectors:

* ``sqlite-vec``: the default, what ``KnowledgeIndex.search`` does on a SQLite file;
* ``numpy (SQLite)``: the fallback scan, the vectors read from the same file each time;
* ``numpy in memory``: the baseline, a matrix already in RAM (no database at all): the
  least any exact search can cost;
* ``pgvector`` and ``numpy (PostgreSQL)``: on a new database of the server at ``--pg-url``
  (default $PERSONA_STUDIO_TEST_PG_URL; skipped without one, pgvector skipped where the
  server lacks it), dropped afterwards.

Backends take turns query by query, so a burst of load on this shared machine
hits them alike. Printed: median and p90 of the search alone and of the whole
message (embedding + search), and each backend's ratio to the in-memory baseline
and to sqlite-vec; every backend must return the same chunks as the baseline.

``--drivers`` also times the same sqlite-vec query through the other SQLite
drivers that can load extensions, where installed (apsw, pysqlite3), and
sqlite-vec's own ``vec0`` virtual table (the layout not chosen; see bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

# One BLAS thread: after a matrix product OpenBLAS's other threads spin for a while, and on two
# cores they take the CPU from whatever is timed next (the search after the baseline's: 26 -> 14 ms).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatbot.knowledge.chunking import Chunk  # noqa: E402
from chatbot.knowledge.embedding import MODEL_NAME, TransformerEmbedder  # noqa: E402
from chatbot.knowledge.index import KnowledgeIndex  # noqa: E402

PERSONA = "bench"
QUERIES = [
    "how long do I have to send something back",
    "what time do you open on saturdays",
    "can I pay with a credit card",
    "is the kettle safe to put in the dishwasher",
    "where is my order",
    "do you ship to Canada",
    "tell me about the history of the shop",
    "what should I do if the screen stays black",
    "which size should I pick for a narrow foot",
    "how do I reset my password",
]
# Chunk text: ~800 characters (200 tokens) of words drawn at random, so that it compresses about
# as badly as prose does (PostgreSQL moves a row's values out of line past 2 KB, see migration 0011).
WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from "
         "or had by hot word but what some we can out other were all there when up use your how said an "
         "each she which do their time if will way about many then them write would like so these her long "
         "make thing see him two has look more day could go come did number sound no most people my over "
         "know water than call first who may down side been now find refund parcel order kettle").split()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def fill(index: KnowledgeIndex, persona: str, count: int, rng: np.random.Generator, dimension: int,
         embedder_name: str) -> np.ndarray:
    """`count` chunks with random unit vectors in 100 documents; returns their vectors in id order."""
    vectors = rng.standard_normal((count, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    per_document = max(1, count // 100)
    for start in range(0, count, per_document):
        part = vectors[start:start + per_document]
        chunks = []
        for _ in part:
            text = " ".join(rng.choice(WORDS, 170))
            chunks.append(Chunk(text=text, heading="Bench", char_start=0, char_end=len(text), line_start=1,
                                line_end=1))
        index.store.replace_document(persona, f"docs/{start // per_document:03d}.md", content_hash="0" * 64,
                                     embedder=embedder_name, chunker="bench", size=sum(len(c.text) for c in chunks),
                                     chunks=chunks, vectors=part)
    return vectors


def time_call(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--others", type=int, default=10_000, help="chunks of another persona in the same tables")
    parser.add_argument("--repeats", type=int, default=5, help="passes over the queries")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--pg-url", default=os.environ.get("PERSONA_STUDIO_TEST_PG_URL", ""))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--drivers", action="store_true", help="also time other SQLite drivers and vec0")
    parser.add_argument("--only", default="", help="comma-separated searches to time (with the baseline), "
                                                  "e.g. sqlite-vec: each alone, without the others between calls")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    embedder = TransformerEmbedder.load()
    rng = np.random.default_rng(0)
    print(f"{args.chunks} chunks of {embedder.dimension} dimensions (+{args.others} of another persona), "
          f"k={args.k}, {len(QUERIES)} queries x {args.repeats}; torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    searches: dict[str, Callable[[np.ndarray], list[int]]] = {}
    cleanups: list[Callable[[], None]] = []
    folder = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    sqlite_url = f"sqlite:///{folder / 'chat.db'}"
    default = KnowledgeIndex(sqlite_url, embedder)
    start = time.perf_counter()
    vectors = fill(default, PERSONA, args.chunks, rng, embedder.dimension, embedder.name)
    fill(default, "other", args.others, rng, embedder.dimension, embedder.name)
    print(f"SQLite: filled in {time.perf_counter() - start:.1f} s, file {(folder / 'chat.db').stat().st_size / 2**20:.0f} MiB")
    # A new database numbers chunks from 1 as they are inserted, the persona's first: the same
    # chunk has the same id in every backend, so their answers can be compared.
    ids = np.arange(1, args.chunks + 1)

    def via(index: KnowledgeIndex) -> Callable[[np.ndarray], list[int]]:
        return lambda q: [hit.chunk_id for hit in index.search_vector(PERSONA, q, args.k, min_score=-1)]

    def in_memory(q: np.ndarray) -> list[int]:
        scores = vectors @ q
        top = np.argpartition(-scores, args.k)[:args.k]
        return [int(ids[i]) for i in top[np.argsort(-scores[top])]]

    searches["numpy in memory"] = in_memory
    searches["sqlite-vec"] = via(default)
    scan = KnowledgeIndex(sqlite_url, embedder, search="numpy")
    searches["numpy (SQLite)"] = via(scan)
    cleanups += [default.close, scan.close]

    if args.pg_url:
        from sqlalchemy import create_engine, make_url

        admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
        name = f"bench_retrieval_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        pg_url = make_url(args.pg_url).set(database=name).render_as_string(hide_password=False)
        pg = KnowledgeIndex(pg_url, embedder)
        start = time.perf_counter()
        pg_rng = np.random.default_rng(0)  # the same vectors as SQLite's
        fill(pg, PERSONA, args.chunks, pg_rng, embedder.dimension, embedder.name)
        fill(pg, "other", args.others, pg_rng, embedder.dimension, embedder.name)
        with pg.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
        print(f"PostgreSQL: filled in {time.perf_counter() - start:.1f} s; pgvector "
              f"{'yes' if pg.backend == 'pgvector' else 'no (not on this server)'}")
        if pg.backend == "pgvector":
            searches["pgvector"] = via(pg)
        pg_scan = KnowledgeIndex(pg.engine, embedder, search="numpy")
        searches["numpy (PostgreSQL)"] = via(pg_scan)

        def drop() -> None:
            pg.close()
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.dispose()

        cleanups.append(drop)

    if args.drivers:
        searches.update(driver_searches(folder / "chat.db", vectors, args.k, args.chunks))

    if args.only:
        keep = {"numpy in memory", "sqlite-vec", *args.only.split(",")}
        searches = {name: search for name, search in searches.items() if name in keep}
    embed_times: list[float] = []
    search_times: dict[str, list[float]] = {name: [] for name in searches}
    mismatches: dict[str, int] = {name: 0 for name in searches}
    for name, search in searches.items():  # warm: connections opened, pages cached
        search(vectors[0])
    for _ in range(args.repeats):
        for query in QUERIES:
            seconds, embedded = time_call(lambda: embedder.embed([query])[0])
            embed_times.append(seconds)
            expected = None  # the baseline's answer, the first in `searches`
            for name, search in searches.items():
                seconds, found = time_call(lambda: search(embedded))
                search_times[name].append(seconds)
                expected = found if expected is None else expected
                mismatches[name] += found != expected

    embed_ms = [t * 1000 for t in embed_times]
    print(f"\nquery embedding: median {statistics.median(embed_ms):.1f} ms, p90 {percentile(embed_ms, 90):.1f} ms\n")
    base = statistics.median(search_times["numpy in memory"])
    default_median = statistics.median(search_times["sqlite-vec"])
    header = (f"{'search':22} {'search p50':>11} {'p90':>8} {'message p50':>12} {'p90':>8} "
              f"{'x baseline':>11} {'x sqlite-vec':>13}")
    print(header)
    print("-" * len(header))
    for name, times in search_times.items():
        ms = [t * 1000 for t in times]
        total = [(s + e) * 1000 for s, e in zip(times, embed_times)]
        median = statistics.median(times)
        print(f"{name:22} {statistics.median(ms):9.2f} ms {percentile(ms, 90):5.2f} ms "
              f"{statistics.median(total):10.1f} ms {percentile(total, 90):5.1f} ms "
              f"{median / base:10.1f}x {median / default_median:12.2f}x"
              + (f"  ({mismatches[name]} answers differ!)" if mismatches[name] else ""))
    for cleanup in cleanups:
        cleanup()


def driver_searches(path: Path, vectors: np.ndarray, k: int, count: int) -> dict[str, Callable]:
    """The same sqlite-vec query through apsw and pysqlite3 where installed, and a vec0 table (sqlean)."""
    import sqlite_vec

    sql = ("SELECT c.id, vec_distance_cosine(c.embedding, ?) AS distance FROM knowledge_chunks c "
           "JOIN knowledge_documents d ON d.id = c.document_id WHERE d.persona_id = ? AND d.embedder = ? "
           "ORDER BY distance LIMIT ?")
    found: dict[str, Callable] = {}

    try:
        import apsw

        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
        conn.enable_load_extension(True)
        conn.load_extension(sqlite_vec.loadable_path())
        found["sqlite-vec via apsw"] = lambda q: [row[0] for row in conn.execute(
            sql, (np.asarray(q, "<f4").tobytes(), PERSONA, MODEL_NAME, k))]
    except ImportError:
        print("apsw is not installed: skipped")
    try:
        from pysqlite3 import dbapi2 as pysqlite3

        conn3 = pysqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        conn3.enable_load_extension(True)
        sqlite_vec.load(conn3)
        found["sqlite-vec via pysqlite3"] = lambda q: [row[0] for row in conn3.execute(
            sql, (np.asarray(q, "<f4").tobytes(), PERSONA, MODEL_NAME, k))]
    except ImportError:
        print("pysqlite3 is not installed: skipped")

    import sqlean

    vec0 = sqlean.connect(str(path.with_name("vec0.db")), check_same_thread=False)
    vec0.enable_load_extension(True)
    sqlite_vec.load(vec0)
    vec0.execute(f"CREATE VIRTUAL TABLE chunks USING vec0(persona_id text partition key, "
                 f"embedding float[{vectors.shape[1]}] distance_metric=cosine)")
    vec0.executemany("INSERT INTO chunks(rowid, persona_id, embedding) VALUES (?, ?, ?)",
                     [(i + 1, PERSONA, vectors[i].tobytes()) for i in range(count)])
    other = np.random.default_rng(1).standard_normal(vectors.shape).astype(np.float32)
    vec0.executemany("INSERT INTO chunks(rowid, persona_id, embedding) VALUES (?, ?, ?)",
                     [(count + i + 1, "other", other[i].tobytes()) for i in range(len(other))])
    vec0.commit()
    found["vec0 table (sqlean)"] = lambda q: [row[0] for row in vec0.execute(
        "SELECT rowid, distance FROM chunks WHERE embedding MATCH ? AND k = ? AND persona_id = ?",
        (np.asarray(q, "<f4").tobytes(), k, PERSONA))]
    return found


if __name__ == "__main__":
    main()
