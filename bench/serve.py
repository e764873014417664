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
import json
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from chatbot.default_model import ensure_checkpoint
from chatbot.engine import Engine, GenerationParams
from chatbot.settings import Settings
from chatbot.transformers_engine import TransformersEngine
from chatbot.vllm_engine import VLLMEngine, VLLMServer, default_python, free_port

BACKENDS = ("transformers", "one-at-a-time", "vllm", "vllm-direct")

TOPICS = ["cats", "the sea", "Paris", "bread", "trains", "music", "winter", "chess", "coffee", "rivers",
          "stars", "gardens", "bees", "tea", "maps", "clocks"]


def chats(n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def timed(n: int, chat) -> tuple[float, list]:
    """Start ``chat(i, messages)`` for N chats together; (wall seconds, their results)."""
    results = [None] * n
    barrier = threading.Barrier(n + 1)

    def one(i, messages):
        barrier.wait()
        results[i] = chat(i, messages)

    threads = [threading.Thread(target=one, args=(i, m)) for i, m in enumerate(chats(n))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def run_engine(engine: Engine, n: int, tokens: int) -> tuple[float, int, list[float]]:
    params = GenerationParams(temperature=0, max_new_tokens=tokens)

    def chat(i, messages):
        for reply in engine.stream(messages, params):
            pass
        return reply

    wall, replies = timed(n, chat)
    return wall, sum(r.completion_tokens for r in replies), [r.first_token_ms / 1000 for r in replies]


def run_direct(url: str, n: int, tokens: int) -> tuple[float, int, list[float]]:
    """The same chats straight to vLLM's /v1/chat/completions, streamed, as an OpenAI client sends them."""
    import httpx

    def chat(i, messages):
        body = {"model": "bundled", "messages": messages, "max_tokens": tokens, "temperature": 0,
                "repetition_penalty": 1.1, "stream": True, "stream_options": {"include_usage": True}}
        start, first, used = time.perf_counter(), None, 0
        with httpx.stream("POST", url + "/chat/completions", json=body, timeout=600) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
        return used, first

    wall, results = timed(n, chat)
    return wall, sum(r[0] for r in results), [r[1] for r in results]


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
    lock = threading.Lock()
    model, tokenizer = engine.model, engine.tokenizer

    def chat(i, messages):
        start = time.perf_counter()
        ids = torch.tensor([engine.encode(messages)])
        streamer = _FirstToken(start)
        with lock, torch.inference_mode():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=tokens, repetition_penalty=1.1, temperature=None,
                                    top_p=None, top_k=None, streamer=streamer,
                                    pad_token_id=tokenizer.eos_token_id)
        return output.shape[1] - ids.shape[1], streamer.first

    wall, results = timed(n, chat)
    return wall, sum(r[0] for r in results), [r[1] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--plot", type=Path, default=Path("bench/serve.png"))
    parser.add_argument("--data-dir", type=Path, default=Settings.from_sources().data_dir)
    args = parser.parse_args()

    checkpoint = ensure_checkpoint(args.data_dir)
    local = TransformersEngine.load(str(checkpoint), args.data_dir, args.dtype)
    print(f"model {checkpoint.name}, {local.model.dtype} in this process, {torch.get_num_threads()} threads, "
          f"up to {args.tokens} new tokens per chat, greedy")
    print(f"{'N':>3} | {'backend':<14} | {'tokens/s':>8} | {'first token p50':>15} | {'p95':>6}")
    rows: list[dict] = []
    # Two phases: a vLLM server keeps its CPU threads busy even when idle, which would slow the
    # in-process backends; within a phase, the backends alternate per N.
    try:
        measure({"transformers": lambda n: run_engine(local, n, args.tokens),
                 "one-at-a-time": lambda n: run_one_at_a_time(local, n, args.tokens)}, args, rows)
    finally:
        local.close()
    if {"vllm", "vllm-direct"} & set(args.backends):
        server = VLLMServer(default_python(), checkpoint, "bundled", free_port(),
                            args.data_dir / "vllm-bench.log", max_model_len=2048)
        print("starting the vLLM server ...", flush=True)
        server.start()
        try:
            remote = VLLMEngine.connect(server.url, checkpoint, "bundled")
            measure({"vllm": lambda n: run_engine(remote, n, args.tokens),
                     "vllm-direct": lambda n: run_direct(server.url, n, args.tokens)}, args, rows)
        finally:
            server.stop()
    by = {(r["backend"], r["n"]): r for r in rows}
    first_n = args.n[0]
    for n in args.n:
        parts = [f"{b} N={n}/N={first_n}: {by[b, n]['tps'] / by[b, first_n]['tps']:.2f}x" for b in args.backends]
        if {"transformers", "one-at-a-time"} <= set(args.backends):
            parts.append(f"transformers/one-at-a-time: {by['transformers', n]['tps'] / by['one-at-a-time', n]['tps']:.2f}x")
        if {"vllm", "vllm-direct"} <= set(args.backends):
            parts.append(f"vllm/vllm-direct: {by['vllm', n]['tps'] / by['vllm-direct', n]['tps']:.2f}x")
        print("; ".join(parts))
    plot(rows, args.backends, args.n, args.plot)
    print(f"plot: {args.plot}")


def measure(runners: dict, args, rows: list[dict]) -> None:
    """Run the asked-for ``runners`` at every N, alternating; append a row per (backend, N)."""
    runners = {name: run for name, run in runners.items() if name in args.backends}
    for run in runners.values():
        run(1)  # warm up
    for n in args.n:
        for backend, run in runners.items():
            wall, tokens, first = run(n)
            row = dict(n=n, backend=backend, tps=tokens / wall, p50=statistics.median(first),
                       p95=percentile(first, 0.95))
            rows.append(row)
            print(f"{n:>3} | {backend:<14} | {row['tps']:>8.1f} | {row['p50']:>13.2f} s | {row['p95']:>4.2f} s",
                  flush=True)


def plot(rows: list[dict], backends: list[str], ns: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in backends:
        mine = [r for r in rows if r["backend"] == backend]
        left.plot([r["n"] for r in mine], [r["tps"] for r in mine], marker="o", label=backend)
        right.plot([r["n"] for r in mine], [r["p95"] for r in mine], marker="o", label=backend)
    left.set(xlabel="chats at once", ylabel="tokens/s, all chats", xscale="log", xticks=ns, xticklabels=ns)
    right.set(xlabel="chats at once", ylabel="first token, p95 (s)", xscale="log", yscale="log", xticks=ns,
              xticklabels=ns)
    left.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
