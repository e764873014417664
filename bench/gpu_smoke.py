"""The GPU recipes end to end through `accelerate launch`, a few steps each, with timings.

    python bench/gpu_smoke.py --base-model DIR [--random-weights] [--out DIR]

Seeds a fresh SQLite store with synthetic votes (per conversation a liked
pirate-style reply and a disliked plain one), then runs each job the way the
README's GPU section does, as
``accelerate launch --config_file alignment/accelerate/single_gpu.yaml -m chatbot.cli align ...``:
reward (``reward_gpu.yaml``), PPO against that reward run (``ppo_gpu.yaml``),
KTO (``kto_gpu.yaml``), and ``align evaluate`` of the PPO candidate. Only the
step counts are cut; every other recipe field is the shipped one. Prints, per
job: wall time, seconds per step (from the time stamps in metrics.jsonl,
after the first step), peak GPU memory (nvidia-smi, sampled) and the job's
final metrics, and writes the same as ``summary.json`` in --out.

``--random-weights`` builds a model of DIR's shape with random weights and
DIR's tokenizer, for a machine that has the config but not the weights: the
timings and memory hold, the metrics mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "alignment" / "recipes"
ACCELERATE_CONFIG = REPO / "alignment" / "accelerate" / "single_gpu.yaml"
PROMPTS = REPO / "alignment" / "prompts" / "everyday_train.txt"
# Steps per job: enough for a steady step time and one checkpoint each.
SHORTENED = {"reward": {"max_steps": 40, "save_steps": 20}, "ppo": {"steps": 8, "save_steps": 4},
             "kto": {"max_steps": 40, "save_steps": 20}}


def random_model(shape: Path, out: Path) -> Path:
    """A model with `shape`'s config and tokenizer and freshly initialised weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape)).save_pretrained(out)
    AutoTokenizer.from_pretrained(shape).save_pretrained(out)
    return out


def seed_store(url: str, conversations: int) -> None:
    """Synthetic votes on persona pirate: a liked 'Arr' reply and a disliked plain one per question."""
    from chatbot.store import ChatStore

    questions = [line.strip() for line in PROMPTS.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#")]
    store = ChatStore.open(url)
    try:
        user = store.get_or_create_user("gpu-smoke")
        model = store.get_or_create_model_version("gpu-smoke")
        for i in range(conversations):
            question = f"{questions[i % len(questions)]} ({i})"
            conv = store.create_conversation(user, "pirate", "v1")
            asked = store.add_message(conv, "user", question)
            prompt = [{"role": "system", "content": "You are Captain Redbeard, a pirate."},
                      {"role": "user", "content": question}]
            liked = store.add_message(conv, "assistant", f"Arr, matey! {question} Ask the sea, says I.",
                                      parent_id=asked, prompt=prompt, model_version_id=model)
            disliked = store.add_message(conv, "assistant", "Here is some general information on that topic.",
                                         parent_id=asked, prompt=prompt, model_version_id=model)
            store.set_feedback(liked, user, 1)
            store.set_feedback(disliked, user, -1)
    finally:
        store.close()


class GpuMemory:
    """Peak `memory.used` of GPU 0 while the block runs, sampled from nvidia-smi (the job is another process)."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak_mib, self._stop = every, 0, threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            try:
                done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                       "--id=0"], capture_output=True, text=True)
            except OSError:  # no nvidia-smi: the peak stays 0
                return
            if done.returncode == 0 and done.stdout.strip().isdigit():
                self.peak_mib = max(self.peak_mib, int(done.stdout.strip()))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def step_seconds(metrics: Path) -> float | None:
    """Median seconds between consecutive steps' log lines, the first step (warm-up) left out."""
    if not metrics.is_file():
        return None
    stamps = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if "time" in entry and "train_runtime" not in entry:
            stamps.setdefault(entry["step"], entry["time"])
    times = [stamps[step] for step in sorted(stamps)]
    gaps = [later - earlier for earlier, later in zip(times[1:], times[2:])]
    return statistics.median(gaps) if gaps else None


def align(args: list[str], common: list[str], log) -> tuple[dict, float, int]:
    """One `align` command under accelerate launch; (its JSON result, wall seconds, peak GPU MiB)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
               "-m", "chatbot.cli", "align", *args, *common]
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    with GpuMemory() as memory:
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"`align {args[0]}` failed ({done.returncode}); see the log")
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds, memory.peak_mib


def recipe(kind: str, base_model: Path, out: Path) -> Path:
    values = yaml.safe_load((RECIPES / f"{kind}_gpu.yaml").read_text(encoding="utf-8"))
    values.update(base_model=str(base_model), **SHORTENED[kind])
    path = out / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", type=Path, required=True, help="a converted model folder")
    parser.add_argument("--random-weights", action="store_true", help="random weights of --base-model's shape")
    parser.add_argument("--out", type=Path, default=Path("gpu-smoke"), help="work folder (must be new or empty)")
    parser.add_argument("--conversations", type=int, default=256)
    options = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no GPU: torch.cuda.is_available() is False")
    out = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    base = random_model(options.base_model, out / "model") if options.random_weights else options.base_model.resolve()
    url = f"sqlite:///{out / 'chat.db'}"
    seed_store(url, options.conversations)
    common = ["--db-url", url, "--data-dir", str(out / "data")]
    summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "random_weights": options.random_weights, "jobs": {}}

    def record(kind: str, result: dict, seconds: float, peak: int, run_dir: Path | None) -> None:
        summary["jobs"][kind] = {"wall_s": round(seconds, 1), "peak_gpu_mib": peak,
                                 "s_per_step": step_seconds(run_dir / "metrics.jsonl") if run_dir else None,
                                 "result": result}
        print(json.dumps({kind: summary["jobs"][kind]}, indent=1, default=str), flush=True)

    with (out / "jobs.log").open("w", encoding="utf-8") as log:
        runs = out / "runs"
        reward, *timing = align(["reward", "--recipe", str(recipe("reward", base, out)), "--persona", "pirate",
                                 "--output", str(runs / "reward")], common, log)
        record("reward", reward, *timing, runs / "reward")
        ppo, *timing = align(["ppo", "--recipe", str(recipe("ppo", base, out)), "--persona", "pirate",
                              "--reward-run", str(reward["run"]), "--output", str(runs / "ppo")], common, log)
        record("ppo", ppo, *timing, runs / "ppo")
        kto, *timing = align(["kto", "--recipe", str(recipe("kto", base, out)), "--persona", "pirate",
                              "--output", str(runs / "kto")], common, log)
        record("kto", kto, *timing, runs / "kto")
        evaluation, *timing = align(["evaluate", str(ppo["run"]), "--judge", str(reward["run"])], common, log)
        record("evaluate", evaluation, *timing, None)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
