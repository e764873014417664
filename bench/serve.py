"""Many people chatting at once: aggregate tokens/s and time to first token per number of chats.

    python bench/serve.py [--n 1 2 4 8 16] [--tokens 128] [--dtype auto] [--plot bench/serve.png]

For each N, N chats (each its own question) start together, greedy, up to
--tokens new tokens each, on the bundled model:

- ``engine``: through ``TransformersEngine.stream``, the embedded backend that decodes
  concurrent replies together (chatbot/batching.py);
- ``one-at-a-time``: the baseline, transformers' ``generate`` behind one lock,
  as the app served before continuous batching.

Both run in this one process, alternating per N, so the machine's drift stays
out of the ratio. Prints aggregate tokens/s, first-token p50/p95 and the
ratio, and saves a plot.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from chatbot.default_model import ensure_checkpoint
from chatbot.engine import GenerationParams
from chatbot.transformers_engine import TransformersEngine
from chatbot.settings import Settings

TOPICS = ["cats", "the sea", "Paris", "bread", "trains", "music", "winter", "chess", "coffee", "rivers",
          "stars", "gardens", "bees", "tea", "maps", "clocks"]


def chats(n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_engine(engine: TransformersEngine, n: int, tokens: int) -> tuple[float, int, list[float]]:
    params = GenerationParams(temperature=0, max_new_tokens=tokens)
    results = [None] * n
    barrier = threading.Barrier(n + 1)

    def chat(i, messages):
        barrier.wait()
        for reply in engine.stream(messages, params):
            pass
        results[i] = reply

    threads = [threading.Thread(target=chat, args=(i, m)) for i, m in enumerate(chats(n))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return wall, sum(r.completion_tokens for r in results), [r.first_token_ms / 1000 for r in results]


class _FirstToken(BaseStreamer):
    def __init__(self, start: float):
        self.start, self.first, self._prompt = start, None, True

    def put(self, value):
        if self._prompt:
            self._prompt = False
        elif self.first is None:
            self.first = time.perf_counter() - self.start

    def end(self):
        pass


def run_one_at_a_time(engine: TransformersEngine, n: int, tokens: int) -> tuple[float, int, list[float]]:
    lock, results = threading.Lock(), [None] * n
    barrier = threading.Barrier(n + 1)
    model, tokenizer = engine.model, engine.tokenizer

    def chat(i, messages):
        barrier.wait()
        start = time.perf_counter()
        ids = torch.tensor([engine.encode(messages)])
        streamer = _FirstToken(start)
        with lock, torch.inference_mode():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=tokens, repetition_penalty=1.1, temperature=None,
                                    top_p=None, top_k=None, streamer=streamer,
                                    pad_token_id=tokenizer.eos_token_id)
        results[i] = (output.shape[1] - ids.shape[1], streamer.first)

    threads = [threading.Thread(target=chat, args=(i, m)) for i, m in enumerate(chats(n))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return wall, sum(r[0] for r in results), [r[1] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--plot", type=Path, default=Path("bench/serve.png"))
    parser.add_argument("--data-dir", type=Path, default=Settings.from_sources().data_dir)
    args = parser.parse_args()

    checkpoint = ensure_checkpoint(args.data_dir)
    engine = TransformersEngine.load(str(checkpoint), args.data_dir, args.dtype)
    print(f"model {checkpoint.name}, {engine.model.dtype}, {torch.get_num_threads()} threads, "
          f"up to {args.tokens} new tokens per chat, greedy")
    run_engine(engine, 1, 8)  # warm up both paths
    run_one_at_a_time(engine, 1, 8)
    rows = []
    print(f"{'N':>3} | {'backend':<14} | {'tokens/s':>8} | {'first token p50':>15} | {'p95':>6}")
    for n in args.n:
        for name, run in (("engine", run_engine), ("one-at-a-time", run_one_at_a_time)):
            wall, tokens, first = run(engine, n, args.tokens)
            row = dict(n=n, backend=name, tps=tokens / wall, p50=statistics.median(first),
                       p95=percentile(first, 0.95))
            rows.append(row)
            print(f"{n:>3} | {name:<14} | {row['tps']:>8.1f} | {row['p50']:>13.2f} s | {row['p95']:>4.2f} s",
                  flush=True)
    engine.close()
    by = {(r["backend"], r["n"]): r for r in rows}
    for n in args.n:
        print(f"N={n}: engine / one-at-a-time tokens/s = "
              f"{by['engine', n]['tps'] / by['one-at-a-time', n]['tps']:.2f}x; engine N={n} / N={args.n[0]} = "
              f"{by['engine', n]['tps'] / by['engine', args.n[0]]['tps']:.2f}x")
    plot(rows, args.n, args.plot)
    print(f"plot: {args.plot}")


def plot(rows: list[dict], ns: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in ("engine", "one-at-a-time"):
        mine = [r for r in rows if r["backend"] == backend]
        left.plot([r["n"] for r in mine], [r["tps"] for r in mine], marker="o", label=backend)
        right.plot([r["n"] for r in mine], [r["p95"] for r in mine], marker="o", label=backend)
    left.set(xlabel="chats at once", ylabel="tokens/s, all chats", xscale="log", xticks=ns, xticklabels=ns)
    right.set(xlabel="chats at once", ylabel="first token, p95 (s)", xscale="log", xticks=ns, xticklabels=ns)
    left.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
