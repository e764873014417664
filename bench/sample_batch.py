"""Several replies to one prompt: one at a time through `TransformersEngine.stream` vs together through
`TransformersEngine.generate_batch`, which `persona-studio simulate` uses.

    python bench/sample_batch.py [--samples 8] [--tokens 64] [--repeats 3] [--dtype auto]

Both sample with the same settings (temperature 0.7, top-p 0.9, repetition
penalty 1.1, as the shipped personas) and seeds, alternating in this one
process so that the machine's drift stays out of the ratio. Prints the median
wall time for all the replies, tokens generated per second and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chatbot.default_model import ensure_checkpoint
from chatbot.engine import GenerationParams
from chatbot.transformers_engine import TransformersEngine
from chatbot.settings import Settings

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How can I sleep better at night?"},
]


def one_at_a_time(engine: TransformersEngine, params: GenerationParams, n: int) -> tuple[float, int]:
    start, tokens = time.perf_counter(), 0
    for k in range(n):
        for reply in engine.stream(MESSAGES, GenerationParams(**{**params.to_dict(), "seed": params.seed + k})):
            pass
        tokens += reply.completion_tokens
    return time.perf_counter() - start, tokens


def together(engine: TransformersEngine, params: GenerationParams, n: int) -> tuple[float, int]:
    start = time.perf_counter()
    replies = engine.generate_batch(MESSAGES, params, n)
    return time.perf_counter() - start, sum(r.completion_tokens for r in replies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--data-dir", type=Path, default=Settings.from_sources().data_dir)
    args = parser.parse_args()
    checkpoint = ensure_checkpoint(args.data_dir)
    engine = TransformersEngine.load(str(checkpoint), Path(tempfile.gettempdir()), args.dtype)
    print(f"model {checkpoint} ({engine.model.dtype}), {args.samples} replies of up to {args.tokens} tokens, "
          f"{args.repeats} alternating repeats, torch {torch.__version__}, {torch.get_num_threads()} threads")
    together(engine, GenerationParams(max_new_tokens=4, seed=0), 2)  # warm-up
    runs: dict[str, list[tuple[float, int]]] = {"one at a time": [], "together": []}
    for repeat in range(args.repeats):
        params = GenerationParams(max_new_tokens=args.tokens, seed=100 * repeat)
        runs["one at a time"].append(one_at_a_time(engine, params, args.samples))
        runs["together"].append(together(engine, params, args.samples))
    medians = {}
    for name, results in runs.items():
        seconds = statistics.median(s for s, _ in results)
        speed = statistics.median(t / s for s, t in results)
        medians[name] = seconds
        print(f"  {name:<14} {seconds:7.1f} s for {args.samples} replies   {speed:7.1f} tokens/s")
    print(f"  together is {medians['one at a time'] / medians['together']:.2f}x faster")


if __name__ == "__main__":
    main()
