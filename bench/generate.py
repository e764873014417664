"""Generation speed of the bundled model: the app's streaming path vs plain `model.generate`.

    python bench/generate.py [--tokens 128] [--repeats 5] [--dtypes bfloat16,float32]

For each dtype, runs greedy decoding of the same prompt alternately through
`TransformersEngine.stream` (worker thread, token queue, incremental decoding, stop
check) and a bare `model.generate` call, in this one process, and prints
tokens/s and time to first token (medians) and their ratios. Alternating
runs side by side keeps this noisy 2-core machine's drift out of the ratio.

The baseline also runs in a fresh thread, as the engine's worker does: a
thread's OpenMP team keeps spinning for a moment after its last torch op, so
mixing main-thread and worker-thread generation in one process measured the
worker up to 30 % slower from that alone (bfloat16, 2 cores), which is not a
cost the app pays (its main thread generates nothing).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from chatbot.default_model import ensure_checkpoint
from chatbot.engine import GenerationParams
from chatbot.transformers_engine import TransformersEngine
from chatbot.settings import Settings

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant who explains things in detail."},
    {"role": "user", "content": "Explain how a steam engine works, step by step, in detail."},
]


class FirstTokenClock(BaseStreamer):
    """Notes when `generate` emits its first new token (the first put is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def plain_generate(engine: TransformersEngine, tokens: int) -> tuple[float, float]:
    result = []
    worker = threading.Thread(target=lambda: result.append(_plain_generate(engine, tokens)))
    worker.start()
    worker.join()
    return result[0]


def _plain_generate(engine: TransformersEngine, tokens: int) -> tuple[float, float]:
    ids = torch.tensor([engine.encode(MESSAGES)])
    clock = FirstTokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=tokens, streamer=clock, temperature=None, top_p=None,
                                    top_k=None, repetition_penalty=1.0,
                                    pad_token_id=engine.tokenizer.eos_token_id)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) / elapsed, (clock.first - start) * 1000


def app_stream(engine: TransformersEngine, tokens: int) -> tuple[float, float]:
    params = GenerationParams(temperature=0, max_new_tokens=tokens, repetition_penalty=1.0)
    for reply in engine.stream(MESSAGES, params):
        pass
    return reply.completion_tokens / (reply.latency_ms / 1000), reply.first_token_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--data-dir", type=Path, default=Settings.from_sources().data_dir)
    args = parser.parse_args()
    checkpoint = ensure_checkpoint(args.data_dir)
    print(f"model {checkpoint}, {args.tokens} new tokens, greedy, {args.repeats} alternating repeats, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    speeds = {}
    for dtype in args.dtypes.split(","):
        engine = TransformersEngine.load(str(checkpoint), Path(tempfile.gettempdir()), dtype)
        app_stream(engine, 8), plain_generate(engine, 8)  # warm-up
        base, app = [], []
        for _ in range(args.repeats):
            base.append(plain_generate(engine, args.tokens))
            app.append(app_stream(engine, args.tokens))
        b_tps, b_ttft = (statistics.median(x) for x in zip(*base))
        a_tps, a_ttft = (statistics.median(x) for x in zip(*app))
        speeds[dtype] = a_tps
        print(f"\n{dtype}:")
        print(f"  model.generate   {b_tps:7.1f} tokens/s   first token {b_ttft:6.1f} ms")
        print(f"  app stream path  {a_tps:7.1f} tokens/s   first token {a_ttft:6.1f} ms")
        print(f"  app / generate   {a_tps / b_tps:7.3f} x throughput ({(1 - a_tps / b_tps) * 100:+.1f} % cost)")
    if len(speeds) > 1:
        (fast, f), (slow, s) = sorted(speeds.items(), key=lambda kv: -kv[1])[:2]
        print(f"\ndtype: {fast} is {f / s:.2f}x the speed of {slow} through the app's path")


if __name__ == "__main__":
    main()
