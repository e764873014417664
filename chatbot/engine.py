"""ChatEngine: one model per process, streaming replies to many users.

The model is loaded once and shared. Generation runs in a worker thread that
pushes token ids into a queue; `stream()` decodes them and yields the reply
so far. Replies are generated one at a time (a lock): on a 2-core CPU two
concurrent generations are no faster than two in a row, and serializing keeps
a seeded reply reproducible (the torch RNG is process-wide).
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from . import default_model
from .default_model import ModelLoadError
from .prompting import Message, Prompt, fit_to_context


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 0.9
    top_k: int = 50  # 0 disables top-k
    repetition_penalty: float = 1.1
    max_new_tokens: int = 256
    seed: int | None = None  # None: a random seed, recorded with the reply

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reply:
    """The reply so far; the last one yielded by `stream()` has `done=True`."""

    text: str = ""
    done: bool = False
    finish_reason: str | None = None  # "eos", "length" or "stopped"
    prompt: list[Message] = field(default_factory=list)  # what the model was given, after truncation
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_ms: float | None = None
    latency_ms: float | None = None
    params: GenerationParams = field(default_factory=GenerationParams)  # seed filled in
    # From `generate_batch`: {"size": n, "row": i}. The recorded seed drove the whole batch; with the
    # size and the row it reproduces this reply.
    batch: dict | None = None


def pick_dtype(name: str) -> torch.dtype:
    """`auto`: bfloat16 where the hardware runs it natively (measured faster on AMX/AVX512-bf16 CPUs)."""
    if name != "auto":
        try:
            return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]
        except KeyError:
            raise ModelLoadError(f"unknown dtype {name!r}: use auto, bfloat16, float32 or float16") from None
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # oneDNN reports whether the CPU has bf16 instructions (AVX512-BF16 or AMX).
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def load_model(spec: str, data_dir: Path, dtype: str = "auto"):
    """Load (model, tokenizer, model_id) from the bundled model, a local folder or a hub id."""
    if spec:
        source, model_id = spec, spec
    else:
        source, model_id = default_model.ensure_checkpoint(Path(data_dir)), default_model.MODEL_ID
    torch_dtype = pick_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        where = "is not a checkpoint folder" if Path(str(source)).exists() else \
            "is neither a local folder nor a model the Hugging Face hub could provide (offline?)"
        raise ModelLoadError(f"cannot load model {spec or source!r}: it {where}. "
                             f"({str(exc).splitlines()[0][:200]})") from None
    if not tokenizer.chat_template:
        raise ModelLoadError(f"model {model_id!r} has no chat template; use an instruction-tuned "
                             "(chat) model, or add a chat_template to its tokenizer_config.json")
    model.eval()
    return model, tokenizer, model_id


class _StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once `event` is set (the Stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Receives new token ids from `generate` (the first `put` is the prompt)."""

    DONE = object()

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self):
        self.queue.put(self.DONE)


class ChatEngine:
    def __init__(self, model, tokenizer, model_id: str, context_tokens: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        model_max = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context_tokens = min(context_tokens, model_max) if context_tokens > 0 else model_max
        self._generate_lock = threading.Lock()
        self._adapters: dict[str, str] = {}  # adapter folder -> PEFT adapter name; loaded once each
        self._peft = None  # the PeftModel around `model`, once an adapter was asked for
        eos = model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if tokenizer.eos_token_id is not None:
            self._eos_ids.add(tokenizer.eos_token_id)

    @classmethod
    def load(cls, spec: str, data_dir: Path, dtype: str = "auto", context_tokens: int = 0) -> "ChatEngine":
        model, tokenizer, model_id = load_model(spec, data_dir, dtype)
        return cls(model, tokenizer, model_id, context_tokens)

    def _encode(self, messages: list[Message]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return list(ids)

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self._encode(messages))

    def fit(self, prompt: Prompt | list[Message], max_new_tokens: int) -> list[Message]:
        """Raises PromptTooLong when the pinned parts and the newest message cannot fit."""
        if not isinstance(prompt, Prompt):
            prompt = Prompt(list(prompt))
        return fit_to_context(prompt, self.count_tokens, self.context_tokens, max_new_tokens)

    def _activate(self, adapter: str | None):
        """(model to generate with, context to generate in) for the base model or an adapter.

        Call with the generation lock held. The base weights are loaded once;
        LoRA adapters are small, loaded on first use, kept, and switched per
        request. PEFT injects LoRA layers into the base model's modules, so
        even the bare base must be asked for with the adapters disabled.
        """
        if adapter is None:
            if self._peft is None:
                return self.model, contextlib.nullcontext()
            return self._peft, self._peft.disable_adapter()
        name = self._adapters.get(adapter)
        if name is None:
            from peft import PeftModel

            name = f"adapter_{len(self._adapters)}"
            try:
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(self.model, adapter, adapter_name=name)
                    self._peft.eval()
                else:
                    self._peft.load_adapter(adapter, adapter_name=name)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"cannot load LoRA adapter {adapter!r}: "
                                     f"{str(exc).splitlines()[0][:200]}") from None
            self._adapters[adapter] = name
        self._peft.set_adapter(name)
        return self._peft, contextlib.nullcontext()

    def stream(self, messages: Prompt | list[Message], params: GenerationParams,
               stop: threading.Event | None = None, adapter: str | None = None) -> Iterator[Reply]:
        """Yield the reply as it grows; the last item has `done=True` and the statistics.

        `stop` ends generation within a token; the partial reply is kept and
        reported with finish_reason "stopped". `adapter` is a LoRA adapter
        folder to answer with instead of the bare base model.
        """
        stop = stop or threading.Event()
        prompt = self.fit(messages, params.max_new_tokens)
        if params.seed is None:
            params = GenerationParams(**{**params.to_dict(), "seed": random.randrange(2**31)})
        input_ids = torch.tensor([self._encode(prompt)], device=self.model.device)
        reply = Reply(prompt=prompt, prompt_tokens=input_ids.shape[1], params=params)
        streamer = _TokenQueue()
        errors: list[BaseException] = []
        started = time.perf_counter()

        tokens: list[int] = []
        with contextlib.ExitStack() as held:
            held.enter_context(self._generate_lock)
            model, context = self._activate(adapter)
            held.enter_context(context)
            torch.manual_seed(params.seed)
            worker = threading.Thread(
                target=self._generate, args=(model, input_ids, params, streamer, stop, errors), daemon=True)
            worker.start()
            try:
                while (item := streamer.queue.get()) is not _TokenQueue.DONE:
                    tokens.extend(item)
                    if reply.first_token_ms is None:
                        reply.first_token_ms = (time.perf_counter() - started) * 1000
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    # A multi-byte character split across tokens decodes to U+FFFD: wait for the rest.
                    if text != reply.text and not text.endswith("\ufffd"):
                        reply.text, reply.completion_tokens = text, len(tokens)
                        yield replace(reply)  # a snapshot: the caller may keep it
            finally:
                stop.set()  # if our consumer went away, end the worker too
                worker.join()
        if errors:
            raise errors[0]
        reply.text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        reply.completion_tokens = len(tokens)
        reply.latency_ms = (time.perf_counter() - started) * 1000
        if tokens and tokens[-1] in self._eos_ids:
            reply.finish_reason = "eos"
        elif len(tokens) >= params.max_new_tokens:
            reply.finish_reason = "length"
        else:
            reply.finish_reason = "stopped"
        reply.done = True
        yield reply

    def generate_batch(self, messages: Prompt | list[Message], params: GenerationParams, n: int,
                       adapter: str | None = None) -> list[Reply]:
        """``n`` replies to one prompt, sampled together in one ``generate`` call; not streamed.

        Decoding reads the weights once per step for the whole batch, so on a
        CPU this is several times the throughput of ``n`` calls to ``stream``
        (``bench/sample_batch.py``: 7.2x for 8 replies). One seed drives the batch; every
        reply records it with its row and the batch size (``Reply.batch``).
        Latency is the batch's; a first-token time is not measured.
        """
        if n < 1:
            raise ValueError(f"a batch needs at least 1 reply, not {n}")
        prompt = self.fit(messages, params.max_new_tokens)
        if params.seed is None:
            params = GenerationParams(**{**params.to_dict(), "seed": random.randrange(2**31)})
        ids = self._encode(prompt)
        input_ids = torch.tensor([ids] * n, device=self.model.device)  # (n, prompt length)
        started = time.perf_counter()
        with contextlib.ExitStack() as held:
            held.enter_context(self._generate_lock)
            model, context = self._activate(adapter)
            held.enter_context(context)
            torch.manual_seed(params.seed)
            with torch.inference_mode():
                output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        pad_token_id=self._pad_id(), **self._sampling(params))
        latency_ms = (time.perf_counter() - started) * 1000
        replies = []
        for row, new in enumerate(output[:, len(ids):].tolist()):  # (n, new tokens), padded after EOS
            end = next((j for j, token in enumerate(new) if token in self._eos_ids), None)
            tokens = new if end is None else new[:end + 1]
            replies.append(Reply(
                text=self.tokenizer.decode(tokens, skip_special_tokens=True), done=True,
                finish_reason="eos" if end is not None else "length", prompt=prompt, prompt_tokens=len(ids),
                completion_tokens=len(tokens), latency_ms=latency_ms, params=params,
                batch={"size": n, "row": row}))
        return replies

    def _pad_id(self) -> int | None:
        return self.tokenizer.pad_token_id or next(iter(self._eos_ids), None)

    @staticmethod
    def _sampling(params: GenerationParams) -> dict:
        kwargs = dict(do_sample=params.temperature > 0, max_new_tokens=params.max_new_tokens,
                      repetition_penalty=params.repetition_penalty)
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:  # keep generation_config's sampling defaults from warning about unused settings
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _generate(self, model, input_ids, params: GenerationParams, streamer, stop, errors) -> None:
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
                    pad_token_id=self._pad_id(), **self._sampling(params))
        except BaseException as exc:  # surfaced by stream() in the caller's thread
            errors.append(exc)
            streamer.end()
