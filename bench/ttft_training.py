"""The chat's time to first token while an alignment job trains, against the same chats with nothing training.

    python bench/ttft_training.py [--chats 12] [--tokens 32]

Jobs run in the worker process, never in the web server's (alignment/worker.py), but on a CPU machine
they share its cores. This measures what a person chatting then gets, through the app's own /v1 API
on the bundled model, in one command:

1. idle: the app alone; ``--chats`` chats one after another, each timed to its first streamed token;
2. training: a reward-model job (``reward_cpu.yaml``, on seeded same-context pairs) queued before the
   app starts, so the app's start-up starts the worker as it does after a restart; once the job has
   made progress, the same chats again; then the job is cancelled (it writes a checkpoint) and the
   worker stopped.

Prints first-token p50/p90 for both and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from serve import app, stream_chat  # noqa: E402

from alignment.jobs import job_kind  # noqa: E402
from chatbot import default_model  # noqa: E402
from chatbot.settings import Settings  # noqa: E402
from chatbot.store import ChatStore  # noqa: E402
from chatbot.store.jobs import JobQueue  # noqa: E402

QUESTIONS = ["What is a good way to start the day?", "How do bees make honey?", "Why is the sea salty?",
             "What should I cook tonight?", "How do trains stay on the rails?", "Why do cats purr?"]


def seed_pairs(store: ChatStore, conversations: int) -> None:
    """Same-context pairs (a liked and a disliked reply to one prompt) for the reward job."""
    user, model = store.get_or_create_user("rater"), store.get_or_create_model_version("bench")
    for i in range(conversations):
        conv = store.create_conversation(user, "assistant", "v1")
        asked = store.add_message(conv, "user", f"Question {i}?")
        prompt = [{"role": "user", "content": f"Question {i}?"}]
        for text, rating in ((f"Answer {i}: three facts, each with a number.", 1), (f"No idea about {i}.", -1)):
            reply = store.add_message(conv, "assistant", text, parent_id=asked, prompt=prompt, model_version_id=model)
            store.set_feedback(reply, user, rating)


def first_tokens(url: str, chats: int, tokens: int) -> list[float]:
    times = []
    for i in range(chats):
        body = {"model": "assistant", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": tokens, "temperature": 0}
        times.append(stream_chat(url, body)[1])
    return times


def summary(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    data_dir = Settings().data_dir
    default_model.ensure_checkpoint(data_dir)  # converted once, shared by both phases
    with tempfile.TemporaryDirectory(prefix="ttft-bench-") as scratch:
        db_url = f"sqlite:///{Path(scratch) / 'chat.db'}"
        log = Path(scratch) / "app.log"
        with app(data_dir, log, "--db-url", db_url) as url:
            first_tokens(url, 2, args.tokens)  # warm-up
            idle = first_tokens(url, args.chats, args.tokens)

        store = ChatStore.open(db_url)
        seed_pairs(store, 100)  # the recipe needs 64 train pairs
        recipe = job_kind("reward").recipe_class.from_yaml(BENCH.parent / "alignment/recipes/reward_cpu.yaml",
                                                           max_steps=100000, save_steps=100000)
        queue = JobQueue(store.engine)
        job_id = queue.enqueue("reward", {"recipe": recipe.to_dict(), "part": "all"}, requested_by="bench",
                               persona_id="assistant")
        worker_pid = None
        try:
            with app(data_dir, log, "--db-url", db_url) as url:  # its start-up starts the worker
                deadline = time.monotonic() + 900
                while not ((job := queue.get(job_id)).status == "running" and job.progress > 0):
                    if job.finished or time.monotonic() > deadline:
                        raise SystemExit(f"the job did not start training ({job.status}: {job.error}); see {log}")
                    time.sleep(1)
                worker_pid = int(job.worker.rpartition(":")[2])
                first_tokens(url, 2, args.tokens)
                training = first_tokens(url, args.chats, args.tokens)
                progress = queue.get(job_id).progress
                queue.cancel(job_id)
                deadline = time.monotonic() + 300
                while not queue.get(job_id).finished and time.monotonic() < deadline:
                    time.sleep(1)
                ended = queue.get(job_id).status
        finally:
            if worker_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker_pid, signal.SIGTERM)  # the worker is detached: its own session
            store.close()
    (idle_p50, idle_p90), (busy_p50, busy_p90) = summary(idle), summary(training)
    print(f"chats: {args.chats} one after another, {args.tokens} tokens, greedy, persona assistant, bundled model")
    print(f"idle:     first token p50 {idle_p50 * 1000:.0f} ms, p90 {idle_p90 * 1000:.0f} ms")
    print(f"training: first token p50 {busy_p50 * 1000:.0f} ms, p90 {busy_p90 * 1000:.0f} ms "
          f"(the reward job {progress:.2%} done when measured, then {ended})")
    print(f"ratio training / idle: p50 {busy_p50 / idle_p50:.2f}x, p90 {busy_p90 / idle_p90:.2f}x")


if __name__ == "__main__":
    main()
