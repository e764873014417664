"""Evaluate a policy run's candidate against a baseline on held-out prompts, and gate it.

    persona-studio align evaluate RUN [--baseline VERSION|base] [--judge RUN] [--prompts FILE]
                                      [--samples K] [--max-new-tokens N] [--rule RULE] [--seed S]

(the command, its options and its summary are in chatbot/cli/align.py; this module is the library)

From Python::

    evaluation = evaluate(store, run_id, EvalOptions(baseline="base", judge=reward_run),
                          personas=PersonaLibrary(folder))
    evaluation["win_rate"]["ci"], evaluation["gate"]["passed"]

What is compared:

- candidate: the version a policy run (kto, ppo, dpo) registered, its LoRA adapter
  at ``<output_dir>/adapter``;
- baseline: ``--baseline VERSION``, ``base`` (no adapter), or by default what
  serves the persona now (``ChatStore.serving_version``; with nothing
  promoted, the persona file's adapter or the base model);
- prompts: the eval side of the run's own prompt split (``build_prompts``
  with the run's eval_fraction, seed and split; each as it was sent, lore and
  document passages included), or ``--prompts FILE`` rendered as the chat
  renders a first message (the lore it fires, the passages the persona's
  documents hold for it); minus every prompt the judge or the candidate was
  trained on (their ``train_prompts.json``);
- judges: never a model the candidate was trained against. A reward run
  scores ``chat_template(prompt) + reply + EOS`` exactly as it was trained
  (``alignment.reward.encode_pair_side``); it counts as a judge only when it
  is independent of the candidate (``independence``: not the reward model a
  PPO run was optimised against, and no training conversation or prompt in
  common with the candidate or that reward model; ``align reward --part
  judge`` trains one). Default: the newest independent reward run for the
  persona, else the newest one, reported as not independent. A declared
  ``--rule`` (the rule `simulate` voted by) is a judge too: its rate's gain
  over the baseline, paired by prompt, with a CI. People are the third judge,
  through an A/B (`persona-studio models canary`);

The base causal LM is loaded once; candidate and baseline are two named PEFT
adapters on it and the reference is the same model with adapters disabled.
The K samples of a prompt are one generate() batch, seeded per prompt with
the same seed for both models, so sample k of prompt i draws the same random
numbers in both. KL and perplexity are computed on the raw (temperature 1)
distributions over each reply's generated tokens, EOS included; the KL is
the exact one over the vocabulary at each of those positions, so it is never
negative (``kl_and_reference_nll``).

Outputs go to ``<run output_dir>/evaluation/``: evaluation.json,
samples.jsonl (every reply), report.md and PNG plots; the evaluation, with
the gate verdict (alignment/gate.py) under "gate", is also stored on the
candidate's model_versions row (``metrics["evaluation"]``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alignment import eval_metrics as em
from alignment.gate import GateBounds
from chatbot.engine import encode_chat
from chatbot.prompting import estimate_tokens
from chatbot.store.errors import NotFound
from chatbot.store.runs import RunRecord, RunStore

log = logging.getLogger(__name__)

POLICY_KINDS = ("kto", "ppo", "dpo")
JUDGE_KIND = "reward"
EVALUATION_DIR = "evaluation"
SHOWN_SAMPLES = 6  # side-by-side replies in evaluation.json and report.md
BATCH = 8


class EvaluationError(ValueError):
    """The evaluation cannot be run as asked; the message says what was wrong, in one line."""


@dataclass(frozen=True)
class EvalOptions:
    baseline: str | None = None  # a version id, "base", or None: what serves the persona now
    judge: int | None = None  # a reward run id; None: the newest independent one for the persona
    prompts_file: Path | None = None
    samples: int = 2
    max_new_tokens: int = 64
    rule: str | None = None
    seed: int = 0
    resamples: int = em.RESAMPLES
    batch: int = 16  # prompts in flight at once (x samples replies), decoded together by the engine


@dataclass(frozen=True)
class Side:
    """One of the two models compared."""

    label: str
    version: int | None
    adapter: str | None  # None: the base model with adapters disabled
    source: str  # candidate | explicit | serving | persona_adapter | base

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "version": self.version, "adapter": self.adapter, "source": self.source}


@dataclass
class Reply:
    prompt_index: int
    sample: int
    text: str
    token_ids: list[int]  # generated, EOS included when it ended with one
    eos: bool
    reward: float | None = None
    kl: float | None = None
    ref_nll: float | None = None  # summed over token_ids
    liked: bool | None = None

    @property
    def length(self) -> int:
        return len(self.token_ids) - int(self.eos)


@dataclass
class Prompts:
    rows: list[list[dict[str, Any]]]
    stats: dict[str, Any] = field(default_factory=dict)


# -- what to compare ------------------------------------------------------------


def _run(runs: RunStore, run_id: int, what: str) -> RunRecord:
    try:
        return runs.get_run(run_id)
    except NotFound:
        raise EvaluationError(f"{what} run {run_id} does not exist (see `persona-studio align runs`)") from None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvaluationError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{what} {path} is not valid JSON: {exc}") from None


def _adapter_task(adapter: Path) -> str | None:
    config = adapter / "adapter_config.json"
    if not config.is_file():
        return None
    return _read_json(config, "adapter config").get("task_type")


def candidate_of(store, runs: RunStore, run_id: int) -> tuple[RunRecord, Side, dict[str, Any]]:
    """The policy run, its candidate side and its report.json; EvaluationError if it is not one."""
    run = _run(runs, run_id, "alignment")
    if run.kind not in POLICY_KINDS:
        raise EvaluationError(f"run {run_id} is a {run.kind} run, not a policy run ({', '.join(POLICY_KINDS)}): "
                              "only a policy's replies can be evaluated")
    version_id = runs.candidate_for_run(run_id)
    if version_id is None:
        raise EvaluationError(f"run {run_id} has no candidate version (status {run.status}"
                              f"{': ' + run.error if run.error else ''}); finish or resume it first")
    version = store.get_version(version_id)
    adapter = Path(version.adapter_path or Path(run.output_dir or "") / "adapter")
    if _adapter_task(adapter) != "CAUSAL_LM":
        raise EvaluationError(f"run {run_id}'s candidate version {version_id} has no causal-LM LoRA adapter "
                              f"at {adapter}")
    report = _read_json(Path(run.output_dir) / "report.json", f"run {run_id}'s report")
    return run, Side(f"candidate v{version_id} (run {run_id})", version_id, str(adapter), "candidate"), report


def baseline_of(store, spec: str | None, run: RunRecord, candidate: Side, personas) -> Side:
    """The baseline side for ``--baseline`` ``spec`` (see the module docstring)."""
    if spec is not None and spec.strip().lower() == "base":
        return Side("base model", None, None, "base")
    if spec is not None:
        try:
            version_id = int(spec)
        except ValueError:
            raise EvaluationError(f"--baseline must be a model version id or 'base', not {spec!r}") from None
        return _version_side(store, version_id, candidate, "explicit", f"v{version_id}")
    if run.persona_id is None:
        return Side("base model (the run has no persona)", None, None, "base")
    serving = store.serving_version(run.persona_id) if hasattr(store, "serving_version") else None
    if serving is not None:
        if serving.id == candidate.version:
            raise EvaluationError(f"the candidate v{candidate.version} already serves persona {run.persona_id}: "
                                  "pass --baseline VERSION or --baseline base")
        return _version_side(store, serving.id, candidate, "serving", f"serving v{serving.id}")
    adapter = _persona_adapter(personas, run.persona_id)
    if adapter is not None:
        return Side(f"persona file adapter {adapter}", None, adapter, "persona_adapter")
    return Side("base model (nothing promoted)", None, None, "base")


def _version_side(store, version_id: int, candidate: Side, source: str, label: str) -> Side:
    if version_id == candidate.version:
        raise EvaluationError(f"the baseline v{version_id} is the candidate itself")
    try:
        version = store.get_version(version_id)
    except NotFound:
        raise EvaluationError(f"baseline model version {version_id} does not exist") from None
    cand = store.get_version(candidate.version)
    if version.base_model != cand.base_model:
        raise EvaluationError(f"baseline v{version_id} runs on base model {version.base_model!r}, the candidate "
                              f"on {cand.base_model!r}: they must share one")
    if version.adapter_path is None:
        return Side(f"{label} (base model)", version_id, None, source)
    if _adapter_task(Path(version.adapter_path)) != "CAUSAL_LM":
        raise EvaluationError(f"baseline v{version_id} has no causal-LM LoRA adapter at {version.adapter_path} "
                              "(a reward model cannot write replies)")
    return Side(label, version_id, version.adapter_path, source)


def _persona_adapter(personas, persona_id: str) -> str | None:
    persona = _persona(personas, persona_id)
    if persona is None or not persona.persona.adapter:
        return None
    return str((persona.path.parent / persona.persona.adapter).resolve())


def _persona(personas, persona_id: str | None):
    if personas is None or persona_id is None:
        return None
    from chatbot.personas import PersonaError

    personas.refresh()
    try:
        return personas.get(persona_id)
    except PersonaError:
        return None


def judge_of(runs: RunStore, judge_id: int | None, run: RunRecord,
             rule_declared: bool = False) -> tuple[RunRecord | None, set[str], dict[str, Any]]:
    """The reward run that scores replies, the prompts it trained on, and whether it is independent.

    Default: the newest succeeded reward run for the persona that is independent
    of the candidate (``independence``); failing that, the newest one, which is
    then reported as not independent and judges nothing in the gate. With no
    reward run at all a declared rule judges alone; without a rule that is an
    EvaluationError.
    """
    trainer = reward_run_of(runs, run)
    if judge_id is None:
        found = [r for r in runs.list_runs(JUDGE_KIND, limit=10_000)
                 if r.status == "succeeded" and r.persona_id == run.persona_id
                 and train_keys(Path(r.output_dir or ""), f"reward run {r.id}") is not None]
        if not found:
            if rule_declared:
                return None, set(), {"independent": False, "why": "no reward run to judge with: the rule judges alone"}
            raise EvaluationError(
                f"no succeeded reward run for persona {run.persona_id or '(all)'} to judge with: train an "
                "independent judge with `persona-studio align reward --part judge`, pass --judge RUN, or declare "
                "--rule for simulated feedback")
        verdicts = [(r, independence(r, run, trainer)) for r in found]
        judge, verdict = next(((r, v) for r, v in verdicts if v["independent"]), verdicts[0])
    else:
        judge = _run(runs, judge_id, "judge")
        verdict = None
    if judge.kind != JUDGE_KIND:
        raise EvaluationError(f"judge run {judge.id} is a {judge.kind} run, not a reward run")
    if judge.status != "succeeded":
        raise EvaluationError(f"judge run {judge.id} has status {judge.status}, not succeeded")
    keys = train_keys(Path(judge.output_dir or ""), f"judge run {judge.id}")
    if keys is None:
        raise EvaluationError(f"judge run {judge.id} has no train_prompts.json in {judge.output_dir}: which "
                              "prompts it was trained on is unknown, so it cannot judge held-out prompts")
    return judge, keys, verdict or independence(judge, run, trainer)


def reward_run_of(runs: RunStore, run: RunRecord) -> RunRecord | None:
    """The reward run a PPO run was optimised against (its report's ``reward_model`` folder); None otherwise."""
    if run.kind != "ppo" or not run.output_dir:
        return None
    report = Path(run.output_dir) / "report.json"
    folder = (_read_json(report, f"run {run.id}'s report").get("metrics") or {}).get("reward_model") \
        if report.is_file() else None
    if not folder:
        return None
    for candidate in runs.list_runs(JUDGE_KIND, limit=10_000):
        if candidate.output_dir and Path(candidate.output_dir).resolve() == Path(folder).resolve():
            return candidate
    return None


def independence(judge: RunRecord, run: RunRecord, trainer: RunRecord | None) -> dict[str, Any]:
    """``{"independent", "why"}``: was ``judge`` trained on nothing the candidate learned from?

    The candidate learned from its own train conversations and, for PPO, from
    its reward model (``trainer``) and the conversations that one trained on. A
    judge is independent when it is not that reward model and shares none of
    those conversations and none of their prompts, as their train_prompts.json
    files record. What cannot be shown (a file from before conversations were
    recorded) counts as not independent.
    """
    def no(why: str) -> dict[str, Any]:
        return {"independent": False, "why": why}

    if trainer is not None and trainer.id == judge.id:
        return no(f"judge run {judge.id} is the reward model run {run.id} was optimised against: a win rate by it "
                  "measures how well the policy exploits it, not what raters meant")
    if run.kind == "ppo" and trainer is None:
        return no(f"the reward model run {run.id} was optimised against is not a known run, so the judge cannot be "
                  "shown to be another one")
    judge_record = _train_record(judge)
    if judge_record.get("conversations") is None:
        return no(f"judge run {judge.id} did not record its training conversations, so its independence cannot "
                  "be shown")
    learners = [(f"the candidate (run {run.id})", run)] + ([(f"its reward model (run {trainer.id})", trainer)]
                                                           if trainer is not None else [])
    for label, learner in learners:
        record = _train_record(learner)
        if record.get("conversations") is None:
            return no(f"{label} did not record its training conversations, so the judge's independence cannot "
                      "be shown")
        shared = set(judge_record["conversations"]) & set(record["conversations"])
        if shared:
            return no(f"judge run {judge.id} shares {len(shared)} of its {len(judge_record['conversations'])} "
                      f"training conversations with {label}")
        shared_prompts = set(judge_record.get("keys", [])) & set(record.get("keys", []))
        if shared_prompts:
            return no(f"judge run {judge.id} trained on {len(shared_prompts)} prompts {label} trained on")
    part = (judge.dataset_stats or {}).get("part", "all")
    return {"independent": True,
            "why": f"judge run {judge.id} trained on {len(judge_record['conversations'])} conversations (the {part} "
                   f"part of the feedback), none of them or their prompts seen by "
                   f"{' or '.join(label for label, _ in learners)}"}


def _train_record(run: RunRecord) -> dict[str, Any]:
    from alignment.data import TRAIN_PROMPTS_FILE

    path = Path(run.output_dir or "") / TRAIN_PROMPTS_FILE
    return _read_json(path, f"run {run.id}'s train prompts") if path.is_file() else {}


def train_keys(run_dir: Path, what: str) -> set[str] | None:
    """The prompt fingerprints in ``run_dir/train_prompts.json``; None if there is no such file."""
    from alignment.data import TRAIN_PROMPTS_FILE

    path = run_dir / TRAIN_PROMPTS_FILE
    if not path.is_file():
        return None
    keys = _read_json(path, f"{what}'s train prompts").get("keys")
    if not isinstance(keys, list):
        raise EvaluationError(f"{path} has no list of 'keys'")
    return set(keys)


# -- prompts --------------------------------------------------------------------


def held_out_prompts(store, run: RunRecord) -> Prompts:
    """The eval side of the run's own prompt split."""
    from alignment.data import build_prompts

    config = run.config or {}
    missing = [key for key in ("eval_fraction", "seed") if key not in config]
    if missing:
        raise EvaluationError(f"run {run.id}'s config has no {' or '.join(missing)}, so its held-out prompts "
                              "are unknown: pass --prompts FILE")
    split = build_prompts(store, persona=run.persona_id, split=(run.dataset_stats or {}).get("split", "conversation"),
                          eval_fraction=config["eval_fraction"], seed=config["seed"])
    return Prompts([row["prompt"] for row in split.eval],
                   {"source": "held-out", "file": None, "feedback_prompts": len(split.train) + len(split.eval),
                    "available": len(split.eval)})


def file_prompts(path: Path, persona, user_name: str = "User", knowledge=None,
                 count_tokens: Callable[[str], int] = estimate_tokens) -> Prompts:
    """One user message per line, each rendered as the first message of a new chat with ``persona``.

    As ChatService.new_session + send build the prompt: system prompt (with the lore the message
    fires and, given ``knowledge``, the passages the persona's documents hold for it), examples,
    the greeting, the message. ``count_tokens`` counts against the lorebook's and documents' budgets.
    """
    from chatbot.chat import ChatSession, Turn
    from chatbot.personas import render
    from chatbot.simulation import load_prompts

    texts = load_prompts(path)
    session = ChatSession(user_id=0, persona=persona, rendered=render(persona, user_name))
    session.turns = [Turn("assistant", session.rendered.greetings[0])]
    settings = persona.persona.knowledge
    rows, with_passages = [], 0
    for text in texts:
        passages = None
        if knowledge is not None and settings is not None:
            passages = knowledge.retrieve(persona.id, settings, text, count_tokens)
            with_passages += bool(passages.used)
        rows.append(session.prompt([{"role": "user", "content": text}], count_tokens, passages).messages)
    stats = {"source": "file", "file": str(path), "available": len(rows)}
    if settings is not None:
        stats["with_passages"] = with_passages if knowledge is not None else None
    return Prompts(rows, stats)


def _rendered_file_prompts(store, path: Path, persona, personas, user_name: str, tokenizer) -> Prompts:
    """file_prompts as the chat renders them for this persona: its documents searched on the
    store's index, budgets counted with the base model's ``tokenizer``."""
    from chatbot.knowledge.retrieval import PersonaKnowledge

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    if persona.persona.knowledge is None:
        return file_prompts(path, persona, user_name, count_tokens=count)
    knowledge = PersonaKnowledge(store.engine, personas.folder)
    try:
        return file_prompts(path, persona, user_name, knowledge, count)
    finally:
        knowledge.close()


def drop_trained(prompts: Prompts, judge_keys: set[str], candidate_keys: set[str] | None) -> Prompts:
    """Without duplicates and without any prompt the judge or the candidate was trained on."""
    from alignment.data import prompt_fingerprints

    kept, seen = [], set()
    removed_judge = removed_candidate = duplicates = 0
    for row in prompts.rows:
        key = prompt_fingerprints([{"prompt": row}])[0]
        if key in seen:
            duplicates += 1
        elif key in judge_keys:
            removed_judge += 1
        elif candidate_keys is not None and key in candidate_keys:
            removed_candidate += 1
        else:
            seen.add(key)
            kept.append(row)
    stats = {**prompts.stats, "duplicates": duplicates, "removed_judge_trained": removed_judge,
             "removed_candidate_trained": removed_candidate,
             "candidate_train_prompts_known": candidate_keys is not None, "used": len(kept)}
    return Prompts(kept, stats)


def _no_prompts_left(stats: dict[str, Any], judge: RunRecord | None, run: RunRecord) -> EvaluationError:
    where = f"prompt file {stats['file']}" if stats["source"] == "file" else f"run {run.id}'s held-out split"
    judge_name = f"judge run {judge.id}" if judge is not None else "the judge"
    return EvaluationError(
        f"no held-out prompts left: {stats['available']} from {where}, {stats['removed_judge_trained']} "
        f"removed as {judge_name} trained on them, {stats['removed_candidate_trained']} as the candidate "
        f"did, {stats['duplicates']} duplicates, {stats.get('removed_too_long', 0)} too long; "
        "rate replies to more prompts or pass --prompts FILE with new ones")


# -- models ---------------------------------------------------------------------


def _padded(sequences: Sequence[list[int]], pad_id: int):
    """(input_ids, attention_mask) of equal-length rows, padded on the right."""
    import torch

    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
    return input_ids, attention


def _reply_rows(logits: Any, prompts: Sequence[list[int]], replies: Sequence[list[int]]) -> list[Any]:
    """Per row, the log-distributions that predicted its reply tokens: (len(reply), V) each."""
    import torch

    # logits (B, T, V); position t predicts token t + 1, so a reply starting at column len(prompt)
    # is predicted from column len(prompt) - 1 on.
    return [torch.log_softmax(logits[i, len(p) - 1:len(p) - 1 + len(r)].float(), dim=-1)
            for i, (p, r) in enumerate(zip(prompts, replies, strict=True))]


def kl_and_reference_nll(model: Any, name: str | None, pad_id: int, prompts: Sequence[list[int]],
                         replies: Sequence[list[int]], batch_size: int = BATCH) -> tuple[list[float], list[float]]:
    """Per reply: KL of adapter ``name`` to the reference along the reply, and the reference's NLL of it.

    The KL is exact at every position: sum over the vocabulary of
    p(v) (log p(v) - log q(v)) with p the adapter's and q the reference's raw
    (temperature 1) next-token distribution, summed over the reply's tokens.
    It is never negative. The single-sample estimate log p(reply) - log q(reply)
    is unbiased only for replies drawn from p itself at temperature 1; the
    chat samples with the persona's temperature, top-p and repetition penalty,
    and on those replies that estimate came out negative for a KTO candidate.
    ``name`` None (the reference itself) gives KL 0.
    """
    import torch

    kls: list[float] = []
    nlls: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(replies), batch_size):
        prompt_batch, reply_batch = prompts[start:start + batch_size], replies[start:start + batch_size]
        sequences = [p + r for p, r in zip(prompt_batch, reply_batch, strict=True)]
        input_ids, attention = _padded(sequences, pad_id)
        inputs = dict(input_ids=input_ids.to(device), attention_mask=attention.to(device))
        with _adapter_context(model, None):
            reference = _reply_rows(model(**inputs).logits, prompt_batch, reply_batch)
        own = reference
        if name is not None:
            with _adapter_context(model, name):
                own = _reply_rows(model(**inputs).logits, prompt_batch, reply_batch)
        for ref, mine, reply in zip(reference, own, reply_batch, strict=True):
            tokens = torch.tensor(reply, device=ref.device).unsqueeze(-1)  # (L, 1)
            nlls.append(-ref.gather(-1, tokens).sum().item())
            kls.append(0.0 if mine is ref else (mine.exp() * (mine - ref)).sum().clamp_min(0.0).item())
    return kls, nlls


def _device():
    """A GPU when there is one (the jobs train there too), else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _adapter_context(model: Any, name: str | None):
    """Make adapter ``name`` active; None: the reference (adapters disabled)."""
    import contextlib

    if name is None:
        return model.disable_adapter()
    model.set_adapter(name)
    return contextlib.nullcontext()


def generate_and_measure(base_path: Path, candidate: Side, baseline: Side, prompts: list[list[dict]],
                         options: EvalOptions, params, bar) -> tuple[dict[str, list[Reply]], Any]:
    """Sample both models on every prompt; KL and reference NLL of every reply. Returns (replies, tokenizer).

    The replies come from the chat's own engine (chatbot/transformers_engine.py), so they are
    what the chat would show: ``options.batch`` prompts at a time are in flight, decoded
    together. Reply k to prompt i is seeded ``seed * 1_000_003 + i * samples + k`` on both
    sides: both models draw the same random numbers for it, so what differs is the adapters'
    doing. KL and NLL are then computed in float32 with the adapters loaded by name.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.training import ensure_pad_token
    from chatbot.transformers_engine import TransformersEngine

    def load():
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        ensure_pad_token(tokenizer, model)  # as the jobs did before training the adapters
        return tokenizer, model.to(_device()).eval()

    tokenizer, model = load()
    engine = TransformersEngine(model, tokenizer, str(base_path))
    replies: dict[str, list[Reply]] = {"candidate": [], "baseline": []}
    try:
        for side, adapter in (("candidate", candidate.adapter), ("baseline", baseline.adapter)):
            replies[side] = _sample_side(engine, adapter, prompts, options, params, bar)
    finally:
        engine.close()
    del engine, model
    tokenizer, model = load()  # fresh: the engine's PEFT layers stay out of the log-prob pass
    peft = PeftModel.from_pretrained(model, candidate.adapter, adapter_name="candidate")
    names = {"candidate": "candidate", "baseline": None}
    if baseline.adapter is not None:
        peft.load_adapter(baseline.adapter, adapter_name="baseline")
        names["baseline"] = "baseline"
    peft.eval()
    prompt_ids = [encode_chat(tokenizer, p) for p in prompts]  # as the engine encoded them
    for side, name in names.items():
        bar.set_description(f"log-probs ({side})")
        kls, nlls = kl_and_reference_nll(peft, name, tokenizer.pad_token_id,
                                         [prompt_ids[r.prompt_index] for r in replies[side]],
                                         [r.token_ids for r in replies[side]])
        for reply, kl, nll in zip(replies[side], kls, nlls, strict=True):
            reply.kl, reply.ref_nll = kl, nll
    del peft, model
    return replies, tokenizer


def _sample_side(engine, adapter: str | None, prompts: list[list[dict]], options: EvalOptions, params,
                 bar) -> list[Reply]:
    """Every (prompt, sample) reply of one side, ``options.batch`` prompts in flight at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int):
        seed = options.seed * 1_000_003 + i * options.samples
        got = engine.generate_batch(prompts[i], replace(params, seed=seed), options.samples, adapter=adapter)
        bar.update(len(got))
        return [Reply(i, k, r.text, r.completion_ids, r.finish_reason == "eos") for k, r in enumerate(got)]

    bar.set_description("generating")
    with ThreadPoolExecutor(max_workers=options.batch) as pool:
        return [reply for replies in pool.map(one, range(len(prompts))) for reply in replies]


def score_replies(judge_dir: Path, base_path: Path, policy_tokenizer, prompts: list[list[dict]],
                  replies: dict[str, list[Reply]], judge_id: int, bar) -> None:
    """Fill ``reward`` of every reply with the judge's score, tokenized as the judge was trained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignment.reward import encode_pair_side
    from alignment.training import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise EvaluationError(f"judge run {judge_id} uses another tokenizer than the candidate's base model: "
                              "the reward model must share the policy's tokenizer")
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
    ensure_pad_token(tokenizer, model)
    model.to(_device())
    judge = PeftModel.from_pretrained(model, str(judge_dir / "adapter"))  # LoRA + the score head (modules_to_save)
    judge.eval()
    device = next(judge.parameters()).device
    # Each side in batches of its own: the same replies then meet the same padding, and score the same.
    batches = [replies[side][start:start + BATCH] for side in ("candidate", "baseline")
               for start in range(0, len(replies[side]), BATCH)]
    with torch.inference_mode():
        for batch in batches:
            sequences = [encode_pair_side(tokenizer, prompts[r.prompt_index], r.text) for r in batch]
            input_ids, attention = _padded(sequences, tokenizer.pad_token_id)
            # The model pools at the last non-pad token: the EOS ending each reply.
            logits = judge(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits  # (B, 1)
            for reply, score in zip(batch, logits[:, 0].float().cpu().tolist(), strict=True):
                reply.reward = score
            bar.update(len(batch))
    del judge, model


def _judge_base(judge: RunRecord, data_dir: Path | None) -> Path:
    report = _read_json(Path(judge.output_dir) / "report.json", f"judge run {judge.id}'s report")
    return _base_path(report, judge, data_dir)


def _base_path(report: dict[str, Any], run: RunRecord, data_dir: Path | None) -> Path:
    path = Path(report.get("base_model") or "")
    if (path / "config.json").is_file():
        return path
    from alignment.training import resolve_base_model

    try:
        return resolve_base_model((run.config or {}).get("base_model", ""), data_dir)
    except ValueError as exc:
        raise EvaluationError(f"run {run.id}'s base model {str(path)!r} is gone: {exc}") from None


# -- metrics --------------------------------------------------------------------


def side_metrics(replies: list[Reply], n_prompts: int, options: EvalOptions) -> dict[str, Any]:
    import math

    def by_prompt(value) -> list[list[float]]:
        groups: list[list[float]] = [[] for _ in range(n_prompts)]
        for r in replies:
            groups[r.prompt_index].append(float(value(r)))
        return groups

    texts = [r.text for r in replies]
    tokens = sum(len(r.token_ids) for r in replies)
    judged = all(r.reward is not None for r in replies)
    rewards = by_prompt(lambda r: r.reward) if judged else None
    metrics: dict[str, Any] = {
        "replies": len(replies),
        "reward_mean": em.group_mean(rewards) if judged else None,
        "reward_ci": em.bootstrap_ci(rewards, options.resamples, options.seed) if judged else None,
        "kl_mean": em.group_mean(by_prompt(lambda r: r.kl)),
        "length_mean": em.group_mean(by_prompt(lambda r: r.length)),
        "eos_rate": em.group_mean(by_prompt(lambda r: r.eos)),
        "distinct_1": em.distinct_n(texts, 1),
        "distinct_2": em.distinct_n(texts, 2),
        "repeated_3gram_rate": em.repeated_ngram_rate(texts, 3),
        "reference_perplexity": math.exp(sum(r.ref_nll for r in replies) / tokens) if tokens else None,
        "rule_rate": None,
        "rule_ci": None,
    }
    if options.rule is not None:
        liked = by_prompt(lambda r: r.liked)
        metrics["rule_rate"] = em.group_mean(liked)
        metrics["rule_ci"] = em.bootstrap_ci(liked, options.resamples, options.seed)
    return metrics


def _per_prompt(replies: list[Reply], n_prompts: int, value=lambda r: r.reward) -> list[list[float]]:
    """``value`` of each reply, grouped by prompt, in sample order."""
    groups: list[list[float]] = [[] for _ in range(n_prompts)]
    for r in sorted(replies, key=lambda r: (r.prompt_index, r.sample)):
        groups[r.prompt_index].append(float(value(r)))
    return groups


def rule_judgement(rule, spec: str, replies: dict[str, list[Reply]], n_prompts: int,
                   options: EvalOptions) -> dict[str, Any]:
    """The declared rule as a judge: its rate's gain over the baseline, paired by prompt, with a CI."""
    for side in replies.values():
        for r in side:
            r.liked = rule.likes(r.text)
    gain = em.paired_gain(_per_prompt(replies["candidate"], n_prompts, lambda r: r.liked),
                          _per_prompt(replies["baseline"], n_prompts, lambda r: r.liked),
                          options.resamples, options.seed)
    return {"spec": spec, "description": rule.describe(), "gain": gain, "independent": True,
            "why": "the rule the simulated raters voted by: no model was trained on it, only on the thumbs "
                   "it gave, so a candidate that exploits a reward model does not move it"}


def _user_text(prompt: list[dict]) -> str:
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


# -- the whole evaluation -------------------------------------------------------


def evaluate(store, run_id: int, options: EvalOptions = EvalOptions(), personas=None,
             data_dir: Path | None = None, user_name: str = "User", progress: bool = True) -> dict[str, Any]:
    """Evaluate run ``run_id``'s candidate, write ``<output_dir>/evaluation/`` and store the result.

    Returns the evaluation (the content of evaluation.json). Raises
    EvaluationError for anything the user asked that cannot be done.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from alignment.eval_report import write_outputs
    from chatbot.chat import params_for
    from chatbot.engine import GenerationParams
    from chatbot.simulation import parse_rule

    if options.samples < 1 or options.max_new_tokens < 1 or options.batch < 1:
        raise EvaluationError("--samples, --max-new-tokens and --batch must be at least 1")
    rule = parse_rule(options.rule) if options.rule is not None else None
    runs = RunStore(store.engine)
    run, candidate, report = candidate_of(store, runs, run_id)
    try:
        bounds = GateBounds.from_config(run.config)
    except ValueError as exc:
        raise EvaluationError(f"run {run_id}: {exc}") from None
    baseline = baseline_of(store, options.baseline, run, candidate, personas)
    judge, judge_keys, judge_verdict = judge_of(runs, options.judge, run, rule_declared=rule is not None)
    persona = _persona(personas, run.persona_id)
    base_path = _base_path(report, run, data_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_path)

    if options.prompts_file is not None:
        if persona is None:
            raise EvaluationError(f"--prompts needs the run's persona to render them, and persona "
                                  f"{run.persona_id or '(none)'} is not in the persona library")
        prompts = _rendered_file_prompts(store, options.prompts_file, persona, personas, user_name, tokenizer)
    else:
        prompts = held_out_prompts(store, run)
    candidate_keys = train_keys(Path(run.output_dir), f"run {run.id}")
    if candidate_keys is None:
        log.warning("run %s has no train_prompts.json: relying on its split alone to hold prompts out", run.id)
    prompts = drop_trained(prompts, judge_keys, candidate_keys)

    params = params_for(persona) if persona is not None else GenerationParams()
    params = replace(params, max_new_tokens=options.max_new_tokens, seed=options.seed)
    prompts = _drop_too_long(prompts, base_path, tokenizer, options.max_new_tokens)
    if not prompts.rows:
        raise _no_prompts_left(prompts.stats, judge, run)
    if params.temperature == 0 and options.samples > 1:
        log.warning("persona %s decodes greedily (temperature 0): the %d samples per prompt are identical",
                    run.persona_id, options.samples)

    n = len(prompts.rows)
    total = 2 * n * options.samples
    with tqdm(total=total, desc="generating", unit="reply", disable=not progress, file=sys.stderr) as bar:
        replies, tokenizer = generate_and_measure(base_path, candidate, baseline, prompts.rows, options, params, bar)
    if judge is not None:
        with tqdm(total=total, desc="judging", unit="reply", disable=not progress, file=sys.stderr) as bar:
            score_replies(Path(judge.output_dir), _judge_base(judge, data_dir), tokenizer, prompts.rows, replies,
                          judge.id, bar)

    evaluation: dict[str, Any] = {
        "run": run.id,
        "kind": run.kind,
        "persona": run.persona_id,
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": str(base_path),
        "candidate": candidate.to_dict(),
        "baseline": baseline.to_dict(),
        # The reward model that scored the replies (None: none did), and whether it counts as a judge.
        "judge": None if judge is None else {
            "run": judge.id, "adapter": str(Path(judge.output_dir) / "adapter"),
            "part": (judge.dataset_stats or {}).get("part", "all"),
            "eval_pairwise_accuracy": ((judge.metrics or {}).get("eval") or {}).get("pairwise_accuracy"),
            **judge_verdict},
        "prompts": prompts.stats,
        "sampling": {"samples": options.samples, "max_new_tokens": options.max_new_tokens, "seed": options.seed,
                     "batch": options.batch, "temperature": params.temperature, "top_p": params.top_p,
                     "top_k": params.top_k, "repetition_penalty": params.repetition_penalty},
        "rule": None if rule is None else rule_judgement(rule, options.rule, replies, n, options),
        "metrics": {side: side_metrics(replies[side], n, options) for side in ("candidate", "baseline")},
        "win_rate": None if judge is None else em.win_rate(
            _per_prompt(replies["candidate"], n), _per_prompt(replies["baseline"], n), options.resamples,
            options.seed),
    }
    evaluation["gate"] = bounds.check(evaluation)
    shown = [(c, b) for c, b in zip(replies["candidate"], replies["baseline"], strict=True) if c.sample == 0]
    evaluation["samples"] = [
        {"prompt": _user_text(prompts.rows[c.prompt_index]), "candidate": c.text, "baseline": b.text,
         "candidate_reward": c.reward, "baseline_reward": b.reward} for c, b in shown[:SHOWN_SAMPLES]]

    out = Path(run.output_dir) / EVALUATION_DIR
    evaluation["files"] = write_outputs(out, evaluation, replies, prompts.rows, Path(run.output_dir))
    runs.record_evaluation(candidate.version, evaluation)
    return evaluation


def _drop_too_long(prompts: Prompts, base_path: Path, tokenizer, max_new_tokens: int) -> Prompts:
    """Without prompts that leave no room for a max_new_tokens reply in the model's context."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(base_path), "max_position_embeddings", None)
    if not limit:
        return Prompts(prompts.rows, {**prompts.stats, "removed_too_long": 0})
    kept = [p for p in prompts.rows if len(encode_chat(tokenizer, p)) + max_new_tokens <= limit]
    removed = len(prompts.rows) - len(kept)
    return Prompts(kept, {**prompts.stats, "removed_too_long": removed, "used": len(kept)})
