"""Many people chatting at once, through the app's own HTTP API: tokens/s and time to first token per N.

    python bench/serve.py [--n 1 2 4 8 16] [--tokens 128] [--repeats 3] [--backends ...] [--plot bench/serve.png]

For each N, N chats (each asking the ``assistant`` persona for a long essay on
its own topic) start together, greedy, up to --tokens new tokens each, on the bundled model, and
are streamed from ``POST /v1/chat/completions`` as an OpenAI client would:

- ``transformers``: the app (``python app.py --engine transformers``), whose
  embedded engine decodes concurrent replies together (chatbot/batching.py);
- ``one-at-a-time`` (only when asked for with --backends): the reference for it,
  in this process: transformers' ``generate`` behind one lock, as the app
  served before continuous batching;
- ``vllm``: the app again, started with ``--engine-url`` on a vLLM server;
- ``vllm-direct``: the baseline, the same chats sent straight to that vLLM
  server, with the very messages the app renders for the persona (the
  prompt token counts of both are compared and printed).

Two phases, because an idle vLLM server keeps its CPU threads spinning: the
in-process and embedded backends first, then the vLLM pair. Within a phase
the backends alternate per N and repeat, so the machine's drift stays out
of the ratios; tokens/s is the median of the repeats. Each app runs in a
scratch data directory (its own database) that shares the converted model.
Prints aggregate tokens/s, first-token p50/p95, the ratios and the goals
(``transformers`` at N=8: 3x its N=1 or more, p95 first token 2 s or less;
``vllm`` at most 10 % slower than ``vllm-direct`` at every N), and saves a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chatbot import default_model  # noqa: E402
from chatbot.chat import ChatService, Turn, params_for  # noqa: E402
from chatbot.personas import PersonaLibrary  # noqa: E402
from chatbot.settings import REPO_PERSONAS, Settings  # noqa: E402
from chatbot.vllm_engine import VLLMServer, default_python, free_port  # noqa: E402

BACKENDS = ("transformers", "one-at-a-time", "vllm", "vllm-direct")
PERSONA = "assistant"
USER = "User"
APP_START_TIMEOUT = 900  # seconds: loading the model on a busy 2-core machine

TOPICS = ["cats", "the sea", "Paris", "bread", "trains", "music", "winter", "chess", "coffee", "rivers",
          "stars", "gardens", "bees", "tea", "maps", "clocks"]


def question(i: int) -> str:
    # Asks for more than --tokens, so (nearly) every reply runs the whole length: otherwise N replies
    # that end early leave one long reply decoding alone, and "tokens/s at N" measures that tail.
    return f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}."


@functools.cache
def persona_messages(text: str) -> list[dict]:
    """What the app gives the model for a new chat's first message: persona, examples, greeting, text.

    Cached, and made for every question before any timing (``prepare``), so reading the persona
    file is not part of what the baselines measure."""
    session = ChatService(None, PersonaLibrary(REPO_PERSONAS), None).new_session(0, PERSONA, USER)
    session.turns.append(Turn("user", text))
    return session.prompt().messages


def prepare() -> None:
    """Render every question's messages now, outside the timed runs."""
    for i in range(len(TOPICS)):
        persona_messages(question(i))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def together(n: int, chat) -> tuple[float, list]:
    """Start ``chat(i)`` for i < N together; (wall seconds, their results)."""
    results = [None] * n
    barrier = threading.Barrier(n + 1)

    def one(i):
        barrier.wait()
        results[i] = chat(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def stream_chat(url: str, body: dict) -> tuple[int, float, int]:
    """One streamed chat completion; (completion tokens, first token seconds, prompt tokens)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start, first, usage = time.perf_counter(), None, None
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=900) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.read().decode()[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
    if usage is None:
        raise RuntimeError(f"{url}: the stream ended without usage")
    return usage["completion_tokens"], first, usage["prompt_tokens"]


def through_app(url: str, tokens: int):
    """Chat i: a new conversation with the persona, as an OpenAI client sends it to the app."""
    return lambda n: together(n, lambda i: stream_chat(url, {
        "model": PERSONA, "messages": [{"role": "user", "content": question(i)}],
        "max_tokens": tokens, "temperature": 0}))


def direct(url: str, served: str, tokens: int):
    """Chat i straight to vLLM, with the messages and repetition penalty the app would use."""
    penalty = params_for(PersonaLibrary(REPO_PERSONAS).get(PERSONA)).repetition_penalty
    prepare()
    return lambda n: together(n, lambda i: stream_chat(url, {
        "model": served, "messages": persona_messages(question(i)), "max_tokens": tokens, "temperature": 0,
        "repetition_penalty": penalty}))


def one_at_a_time(data_dir: Path, dtype: str, tokens: int):
    """transformers' generate behind one lock, in this process: how the app served before batching."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from chatbot.transformers_engine import TransformersEngine

    engine = TransformersEngine.load("", data_dir, dtype)
    prepare()
    lock = threading.Lock()
    penalty = params_for(PersonaLibrary(REPO_PERSONAS).get(PERSONA)).repetition_penalty

    class FirstToken(BaseStreamer):
        def __init__(self, start):
            self.start, self.first, self.prompt = start, None, True

        def put(self, value):
            if self.prompt:
                self.prompt = False
            elif self.first is None:
                self.first = time.perf_counter() - self.start

        def end(self):
            pass

    def chat(i):
        start = time.perf_counter()
        ids = torch.tensor([engine.encode(persona_messages(question(i)))])
        streamer = FirstToken(start)
        with lock, torch.inference_mode():
            output = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=tokens, repetition_penalty=penalty, temperature=None,
                                           top_p=None, top_k=None, streamer=streamer,
                                           pad_token_id=engine.tokenizer.eos_token_id)
        return output.shape[1] - ids.shape[1], streamer.first, ids.shape[1]

    return (lambda n: together(n, chat)), engine.close


@contextlib.contextmanager
def app(data_dir: Path, log_path: Path, *options: str):
    """``python app.py`` in a scratch data directory sharing the converted model; yields its /v1 URL."""
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        (Path(scratch) / "models").symlink_to(Path(data_dir, "models").resolve())
        port = free_port()
        with log_path.open("ab") as log:
            process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--data-dir", scratch,
                                        "--port", str(port), *options], cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.monotonic() + APP_START_TIMEOUT
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"the app exited with status {process.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/models", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"the app did not answer {url}/models in {APP_START_TIMEOUT} s; see {log_path}")
                time.sleep(1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def measure(runners: dict, ns: list[int], repeats: int, rows: list[dict]) -> None:
    """Run every runner at every N, ``repeats`` times, alternating; append a row per (backend, N):
    the median of the repeats' aggregate tokens/s, first-token percentiles over all their replies."""
    for run in runners.values():
        run(1)  # warm up
    for n in ns:
        tps: dict[str, list[float]] = {backend: [] for backend in runners}
        replies: dict[str, list] = {backend: [] for backend in runners}
        for _ in range(repeats):
            for backend, run in runners.items():
                wall, results = run(n)
                tps[backend].append(sum(r[0] for r in results) / wall)
                replies[backend] += results
        for backend in runners:
            first = [r[1] for r in replies[backend]]
            row = dict(n=n, backend=backend, tps=statistics.median(tps[backend]), p50=statistics.median(first),
                       p95=percentile(first, 0.95), prompt_tokens=[r[2] for r in replies[backend][:n]],
                       per_reply=statistics.mean(r[0] for r in replies[backend]))
            rows.append(row)
            print(f"{n:>3} | {backend:<14} | {row['tps']:>8.1f} | {row['p50']:>13.2f} s | {row['p95']:>4.2f} s "
                  f"| {row['per_reply']:>9.0f} | {' '.join(f'{t:.1f}' for t in tps[backend])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["transformers", "vllm", "vllm-direct"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per backend and N; the median is reported")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--plot", type=Path, default=Path("bench/serve.png"))
    parser.add_argument("--data-dir", type=Path, default=Settings.from_sources().data_dir,
                        help="where the converted bundled model is (or is made)")
    args = parser.parse_args()

    checkpoint = default_model.ensure_checkpoint(args.data_dir)
    log_path = args.data_dir / "serve-bench.log"
    print(f"model {checkpoint.name}, dtype {args.dtype}, up to {args.tokens} new tokens per chat, greedy, "
          f"persona {PERSONA}; the apps' output goes to {log_path}")
    print(f"{'N':>3} | {'backend':<14} | {'tokens/s':>8} | {'first token p50':>15} | {'p95':>6} | tokens/reply | tokens/s of each run")
    rows: list[dict] = []
    wanted = set(args.backends)
    with contextlib.ExitStack() as phase:
        runners = {}
        if "transformers" in wanted:
            url = phase.enter_context(app(args.data_dir, log_path, "--engine", "transformers", "--dtype", args.dtype))
            runners["transformers"] = through_app(url, args.tokens)
        if "one-at-a-time" in wanted:
            run, close = one_at_a_time(args.data_dir, args.dtype, args.tokens)
            phase.callback(close)
            runners["one-at-a-time"] = run
        measure(runners, args.n, args.repeats, rows)
    if wanted & {"vllm", "vllm-direct"}:
        server = VLLMServer(default_python(), checkpoint, default_model.MODEL_ID, free_port(),
                            args.data_dir / "vllm-bench.log", max_model_len=2048)
        print("starting the vLLM server ...", flush=True)
        server.start()
        try:
            with contextlib.ExitStack() as phase:
                runners = {}
                if "vllm" in wanted:
                    url = phase.enter_context(app(args.data_dir, log_path, "--engine-url", server.url,
                                                  "--context-tokens", "2048"))
                    runners["vllm"] = through_app(url, args.tokens)
                if "vllm-direct" in wanted:
                    runners["vllm-direct"] = direct(server.url, default_model.MODEL_ID, args.tokens)
                measure(runners, args.n, args.repeats, rows)
        finally:
            server.stop()
    report(rows, args.backends, args.n)
    plot(rows, args.backends, args.n, args.plot)
    print(f"plot: {args.plot}")


def report(rows: list[dict], backends: list[str], ns: list[int]) -> None:
    by = {(r["backend"], r["n"]): r for r in rows}
    first_n = ns[0]
    for n in ns:
        parts = [f"{b} N={n}/N={first_n}: {by[b, n]['tps'] / by[b, first_n]['tps']:.2f}x" for b in backends]
        for a, b in (("transformers", "one-at-a-time"), ("vllm", "vllm-direct")):
            if {a, b} <= set(backends):
                parts.append(f"{a}/{b}: {by[a, n]['tps'] / by[b, n]['tps']:.2f}x")
        print("; ".join(parts))
    if "transformers" in backends and {1, 8} <= set(ns):
        gain, p95 = by["transformers", 8]["tps"] / by["transformers", 1]["tps"], by["transformers", 8]["p95"]
        print(f"goal, transformers at N=8: {gain:.2f}x its N=1 (>= 3x), p95 first token {p95:.2f} s (<= 2 s): "
              + ("met" if gain >= 3 and p95 <= 2 else "NOT met"))
    if {"vllm", "vllm-direct"} <= set(backends):
        worst = min(by["vllm", n]["tps"] / by["vllm-direct", n]["tps"] for n in ns)
        print(f"goal, vllm through the app at most 10 % slower than vllm-direct at every N: worst "
              f"{worst:.2f}x: " + ("met" if worst >= 0.90 else "NOT met"))
    prompts = {b: by[b, ns[-1]]["prompt_tokens"] for b in backends}
    same = len({tuple(p) for p in prompts.values()}) == 1
    print(f"prompt tokens of the N={ns[-1]} chats: " + ("the same for every backend" if same else
                                                        "DIFFER: " + json.dumps(prompts)))


def plot(rows: list[dict], backends: list[str], ns: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in backends:
        mine = [r for r in rows if r["backend"] == backend]
        left.plot([r["n"] for r in mine], [r["tps"] for r in mine], marker="o", label=backend)
        right.plot([r["n"] for r in mine], [r["p95"] for r in mine], marker="o", label=backend)
    left.set(xlabel="chats at once", ylabel="tokens/s, all chats", xscale="log", xticks=ns, xticklabels=ns,
             title="through POST /v1/chat/completions")
    right.set(xlabel="chats at once", ylabel="first token, p95 (s)", xscale="log", yscale="log", xticks=ns,
              xticklabels=ns)
    left.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
