"""Write latency and throughput of the chat store: SQLite and PostgreSQL side by side.

    python bench/store.py [--writers 1,8,32] [--ops 200] [--pg-url URL]
                          [--backends sqlite,postgresql]

For each backend and each number of concurrent writers, a fresh database is
created (SQLite: a file in a temporary folder; PostgreSQL: a new database on
the server of ``--pg-url``, default $PERSONA_STUDIO_TEST_PG_URL, dropped
afterwards, so its role needs CREATEDB; `make postgres` or .ci/postgres.sh
starts a throwaway server that fits). Every writer is a thread with its own
user and conversation, all sharing one ChatStore opened exactly as the app
opens it (same pool, same SQLite pragmas and BEGIN IMMEDIATE), and does
``--ops`` rounds of: store an assistant reply with a realistic prompt and
generation parameters (``add_message``), then vote on it (``set_feedback``).

Printed: p50 and p99 latency of each operation, throughput (operations of
both kinds per second, from the start signal to the last writer's end), and
the SQLite/PostgreSQL ratios. Threads share one interpreter (GIL), as
Gradio's workers do, so these are the store's numbers as the app sees them,
SQLAlchemy included, not the databases' raw limits. Both backends run with
their default durability (SQLite WAL with synchronous=FULL; PostgreSQL
fsync and synchronous_commit on).

`make bench-store` runs it against the throwaway server (ARGS="..." passes options).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatbot.store import ChatStore  # noqa: E402

REPLY = ("Arr, that be a fine question, matey! " * 16).strip()  # ~600 characters
PROMPT = [
    {"role": "system", "content": "You are Captain Redbeard, an old pirate captain. " * 8},
    {"role": "assistant", "content": "Arr, ahoy there, matey! Pull up a barrel."},
    {"role": "user", "content": "Tell me about the sea."},
    {"role": "assistant", "content": REPLY},
    {"role": "user", "content": "And the treasure?"},
]
PARAMS = {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1,
          "max_new_tokens": 256, "seed": 1234}
WARMUP = 3  # untimed rounds per writer: connections opened, statements cached


@dataclass
class Result:
    backend: str
    writers: int
    add_message: list[float]  # seconds per call
    set_feedback: list[float]
    wall: float

    @property
    def throughput(self) -> float:
        return (len(self.add_message) + len(self.set_feedback)) / self.wall


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=1000, method="inclusive")[round(q * 10) - 1]


def run_writers(store: ChatStore, writers: int, ops: int, backend: str) -> Result:
    adds: list[list[float]] = [[] for _ in range(writers)]
    votes: list[list[float]] = [[] for _ in range(writers)]
    errors: list[BaseException] = []
    start = threading.Barrier(writers + 1)

    def writer(index: int) -> None:
        try:
            user = store.get_or_create_user(f"bench-{index}")
            conv = store.create_conversation(user, "pirate", "bench")
            parent = store.add_message(conv, "user", "Ahoy!")
            for _ in range(WARMUP):
                reply = store.add_message(conv, "assistant", REPLY, parent_id=parent)
                store.set_feedback(reply, user, 1)
        except BaseException as exc:
            errors.append(exc)
            start.abort()
            raise
        start.wait()
        try:
            for turn in range(ops):
                t0 = time.perf_counter()
                reply = store.add_message(
                    conv, "assistant", REPLY, parent_id=parent, prompt=PROMPT,
                    generation_params=PARAMS, prompt_tokens=180, completion_tokens=140,
                    latency_ms=8200.0, first_token_ms=95.0, finish_reason="eos",
                )
                t1 = time.perf_counter()
                store.set_feedback(reply, user, 1 if turn % 2 else -1)
                t2 = time.perf_counter()
                adds[index].append(t1 - t0)
                votes[index].append(t2 - t1)
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(writers)]
    for thread in threads:
        thread.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise SystemExit(f"{backend}, {writers} writers: {errors[0]!r}")
    return Result(backend, writers, [x for xs in adds for x in xs],
                  [x for xs in votes for x in xs], wall)


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="store-bench-") as folder:
        yield f"sqlite:///{Path(folder) / 'chat.db'}"


@contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"persona_studio_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def describe(store: ChatStore) -> str:
    """The backend's version and the settings that decide write latency."""
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "sqlite":
            version = conn.exec_driver_sql("SELECT sqlite_version()").scalar()
            journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            sync = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[
                conn.exec_driver_sql("PRAGMA synchronous").scalar()]
            return f"SQLite {version}, journal_mode={journal}, synchronous={sync}"
        version = conn.exec_driver_sql("SHOW server_version").scalar()
        fsync = conn.exec_driver_sql("SHOW fsync").scalar()
        commit = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
        pool = store.engine.pool
        return (f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={commit}, "
                f"pool {pool.size()}+{pool._max_overflow} connections (as the app opens it)")


def measure(backend: str, url_factory, writers_list: list[int], ops: int) -> list[Result]:
    results = []
    for writers in writers_list:
        with url_factory() as url:
            store = ChatStore.open(url)
            try:
                if writers == writers_list[0]:
                    print(f"  {describe(store)}", flush=True)
                result = run_writers(store, writers, ops, backend)
            finally:
                store.close()
        print(f"  {backend:<10} {writers:>3} writers: {result.throughput:8.0f} ops/s "
              f"({result.wall:.1f} s)", flush=True)
        results.append(result)
    return results


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f}"


def report(results: dict[str, list[Result]], writers_list: list[int]) -> None:
    backends = list(results)
    both = len(backends) == 2
    header = f"{'writers':>7}  {'operation':<13}"
    for backend in backends:
        header += f" | {backend + ' p50':>14} {'p99':>8}"
    if both:
        header += f" | {'ratio p50':>9} {'p99':>6}"
    print()
    print("Latency in ms per call; throughput in operations per second (both kinds);")
    print(f"ratio = {backends[0]} / {backends[-1]} (latency: > 1 means {backends[0]} is slower; "
          "throughput: > 1 means it is faster)." if both else "")
    print(header)
    print("-" * len(header))
    for i, writers in enumerate(writers_list):
        rows = {b: results[b][i] for b in backends}
        for op in ("add_message", "set_feedback"):
            line = f"{writers:>7}  {op:<13}"
            stats = {}
            for backend in backends:
                values = getattr(rows[backend], op)
                stats[backend] = (percentile(values, 50), percentile(values, 99))
                line += f" | {ms(stats[backend][0]):>14} {ms(stats[backend][1]):>8}"
            if both:
                first, last = stats[backends[0]], stats[backends[1]]
                line += f" | {first[0] / last[0]:9.2f} {first[1] / last[1]:6.2f}"
            print(line)
        line = f"{writers:>7}  {'throughput':<13}"
        for backend in backends:
            line += f" | {rows[backend].throughput:>14.0f} {'':>8}"
        if both:
            line += f" | {rows[backends[0]].throughput / rows[backends[1]].throughput:9.2f}"
        print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", default="1,8,32",
                        help="comma-separated numbers of concurrent writer threads (default 1,8,32)")
    parser.add_argument("--ops", type=int, default=200,
                        help="rounds (one add_message + one set_feedback) per writer (default 200)")
    parser.add_argument("--backends", default="sqlite,postgresql",
                        help="which of sqlite,postgresql to measure (default both)")
    parser.add_argument("--pg-url", default=os.environ.get("PERSONA_STUDIO_TEST_PG_URL"),
                        help="PostgreSQL server (a role with CREATEDB); "
                             "default $PERSONA_STUDIO_TEST_PG_URL")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    writers_list = [int(w) for w in args.writers.split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not set(backends) <= {"sqlite", "postgresql"} or args.ops < 1:
        raise SystemExit("--backends takes sqlite and/or postgresql; --ops must be positive")
    if "postgresql" in backends and not args.pg_url:
        raise SystemExit("PostgreSQL needs --pg-url or PERSONA_STUDIO_TEST_PG_URL "
                         "(`eval \"$(.ci/postgres.sh)\"` starts a throwaway server), "
                         "or pass --backends sqlite")
    factories = {"sqlite": sqlite_database,
                 "postgresql": lambda: postgres_database(args.pg_url)}
    print(f"{args.ops} rounds per writer, writers {writers_list}, CPUs {os.cpu_count()}")
    results = {}
    for backend in backends:
        results[backend] = measure(backend, factories[backend], writers_list, args.ops)
    report(results, writers_list)


if __name__ == "__main__":
    main()
