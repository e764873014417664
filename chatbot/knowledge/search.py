"""Nearest chunks to a query vector, inside the app's own database.

Three ways, one chosen per database when the index opens (``choose``):

* ``sqlite-vec`` (SQLite files, the default): sqlite-vec's
  ``vec_distance_cosine`` over the chunks' float32 BLOBs, an exact scan. The
  stdlib ``sqlite3`` here cannot load extensions (CPython built without
  them), so these queries go through a second, read-only engine on the same
  file that uses sqlean.py's driver, which has its own SQLite with extension
  loading. Writes stay on the app's engine: one schema, one migration path,
  and the file is an ordinary SQLite database that any tool can open.
* ``pgvector`` (PostgreSQL with the extension in the database): pgvector's
  inner-product operator over ``embedding::vector``, also an exact scan.
* ``numpy`` (anything else: PostgreSQL without pgvector, in-memory SQLite):
  every vector of the persona is fetched and scored in Python. Slower (see
  bench/README.md) but the same answers.

Every way scans the persona's chunks (no approximate index): with unit
vectors the answers are exact, a persona has thousands of chunks rather
than millions, and a filtered approximate index can return fewer than k.
Scores are cosine similarities; vectors are unit length, so that is the dot
product.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

SQLITE_MMAP_BYTES = 1 << 30  # address space, not memory: the OS keeps what it reads in its page cache

# The chunks of one persona whose vectors came from this embedder; `:persona`, `:embedder`.
_PERSONA_CHUNKS = """
    FROM knowledge_chunks c JOIN knowledge_documents d ON d.id = c.document_id
    WHERE d.persona_id = :persona AND d.embedder = :embedder"""


class VectorSearch(Protocol):
    name: str

    def nearest(self, persona_id: str, embedder: str, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to `k` (chunk id, cosine similarity) pairs, most similar first."""
        ...

    def close(self) -> None: ...


class SqliteVecSearch:
    name = "sqlite-vec"

    def __init__(self, engine: Engine) -> None:
        import sqlean
        import sqlite_vec

        # Same file, sqlean's driver. Read-only in intent (query_only), so a bug here can never
        # write behind the app engine's locking; WAL lets it read while the app writes.
        self.engine = create_engine(engine.url, module=sqlean.dbapi2,
                                    connect_args={"timeout": 30.0, "check_same_thread": False})

        @event.listens_for(self.engine, "connect")
        def _load(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.enable_load_extension(True)
            sqlite_vec.load(dbapi_connection)
            dbapi_connection.enable_load_extension(False)  # no SQL may load another one
            dbapi_connection.execute("PRAGMA query_only = ON")
            # A search reads every chunk row of the persona (10,000 chunks: 40 MB of pages). With
            # SQLite's default 2 MB page cache each search copies them all again from the OS; mapped,
            # they are read in place: 22 ms -> 10 ms for 10,000 chunks (bench/README.md). Reads only:
            # this connection never writes.
            dbapi_connection.execute(f"PRAGMA mmap_size = {SQLITE_MMAP_BYTES}")

        # Load the extension now, so that a platform where it cannot load is found out here.
        try:
            with self.engine.connect():
                pass
        except BaseException:
            self.engine.dispose()
            raise

    def nearest(self, persona_id: str, embedder: str, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        query = text(f"SELECT c.id, vec_distance_cosine(c.embedding, :vector) AS distance {_PERSONA_CHUNKS}"
                     " ORDER BY distance LIMIT :k")
        with self.engine.connect() as conn:
            rows = conn.execute(query, {"vector": np.asarray(vector, "<f4").tobytes(), "persona": persona_id,
                                        "embedder": embedder, "k": k})
            return [(row.id, 1.0 - row.distance) for row in rows]

    def close(self) -> None:
        self.engine.dispose()


class PgVectorSearch:
    name = "pgvector"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def nearest(self, persona_id: str, embedder: str, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        # <#> is the negative inner product; the cast of real[] to vector happens per row (see 0011).
        query = text("SELECT c.id, (c.embedding::vector <#> CAST(:vector AS vector)) AS negative"
                     f" {_PERSONA_CHUNKS} ORDER BY negative LIMIT :k")
        literal = "[" + ",".join(repr(float(x)) for x in np.asarray(vector, np.float32)) + "]"
        with self.engine.connect() as conn:
            rows = conn.execute(query, {"vector": literal, "persona": persona_id, "embedder": embedder, "k": k})
            return [(row.id, -float(row.negative)) for row in rows]

    def close(self) -> None:
        pass  # the app's engine, not ours


class NumpySearch:
    name = "numpy"

    def __init__(self, engine: Engine) -> None:
        # Deferred: the app's SQLite engine begins every transaction IMMEDIATE (store/db.py), which
        # would take the write lock for the length of this read.
        self.engine = engine.execution_options(sqlite_begin="DEFERRED")
        # PostgreSQL sends a real[] as text unless asked: 384 numbers to parse per row, seconds for
        # 10,000 rows. array_send gives its binary form instead (parsed in _pg_arrays).
        column = "array_send(c.embedding)" if engine.dialect.name == "postgresql" else "c.embedding"
        self._query = text(f"SELECT c.id, {column} AS embedding {_PERSONA_CHUNKS}")

    def nearest(self, persona_id: str, embedder: str, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        with self.engine.connect() as conn:
            rows = conn.execute(self._query, {"persona": persona_id, "embedder": embedder}).all()
        if not rows:
            return []
        ids = np.array([row.id for row in rows])
        blobs = [bytes(row.embedding) for row in rows]
        vector = np.asarray(vector, np.float32)
        if self.engine.dialect.name == "postgresql":
            matrix = _pg_arrays(blobs, len(vector))
        else:
            matrix = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(rows), -1)
        scores = matrix @ vector
        top = np.argsort(-scores, kind="stable")[:k]
        return [(int(ids[i]), float(scores[i])) for i in top]

    def close(self) -> None:
        pass


def _pg_arrays(blobs: list[bytes], dimension: int) -> np.ndarray:
    """PostgreSQL's binary form of one-dimensional float4 arrays without NULLs, as a matrix.

    Each: a 20-byte header (dimensions, null flag, element type, length, lower bound), then per
    element a 4-byte length and a big-endian float4.
    """
    row = np.dtype([("header", "V20"), ("values", [("length", ">i4"), ("value", ">f4")], (dimension,))])
    data = np.frombuffer(b"".join(blobs), dtype=row)
    return data["values"]["value"].astype(np.float32)


def _has_pgvector(engine: Engine) -> bool:
    """Whether the database has the `vector` extension, creating it first when the role may."""
    with engine.connect() as conn:
        installed = conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).first()
        if installed:
            return True
        available = conn.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first()
    if not available:
        return False
    # pgvector is not a trusted extension: only a superuser (or the database owner, where an
    # administrator marked it trusted) may create it. Trying costs one statement.
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
        return True
    except Exception as exc:  # noqa: BLE001 - any refusal leaves the slower search, not a failure
        log.warning("pgvector is installed on the server but this role cannot add it to the database "
                    "(%s); knowledge search scans in Python. An administrator can run "
                    "CREATE EXTENSION vector in it.", str(getattr(exc, "orig", exc)).splitlines()[0])
        return False


def choose(engine: Engine, prefer: str = "auto") -> VectorSearch:
    """The search for `engine`'s database: `prefer` one by name, or "auto" for the fastest that works."""
    if prefer not in ("auto", "sqlite-vec", "pgvector", "numpy"):
        raise ValueError(f"unknown vector search {prefer!r}: auto, sqlite-vec, pgvector or numpy")
    backend = engine.dialect.name
    if prefer == "numpy":
        return NumpySearch(engine)
    if backend == "sqlite" and prefer in ("auto", "sqlite-vec"):
        if engine.url.database in (None, "", ":memory:"):
            if prefer == "sqlite-vec":
                raise ValueError("sqlite-vec needs a SQLite file: an in-memory database is one connection's own")
        else:
            try:
                return SqliteVecSearch(engine)
            except (ImportError, AttributeError, OSError, SQLAlchemyError) as exc:
                # No wheel of sqlean.py or sqlite-vec for this platform, or a build that cannot load it.
                if prefer == "sqlite-vec":
                    raise
                log.warning("sqlite-vec cannot be loaded (%s); knowledge search scans in Python", exc)
    if backend == "postgresql" and prefer in ("auto", "pgvector"):
        if _has_pgvector(engine):
            return PgVectorSearch(engine)
        if prefer == "pgvector":
            raise ValueError("the database has no pgvector extension (CREATE EXTENSION vector)")
        log.warning("PostgreSQL without pgvector: knowledge search fetches the vectors and scores them in Python")
    if prefer not in ("auto", "numpy"):
        raise ValueError(f"{prefer} does not work with a {backend} database")
    return NumpySearch(engine)
