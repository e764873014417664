"""ChatEngine: one model per process, streaming replies to many users.

The model is loaded once and shared. Every reply is a request to one decode
thread that batches all running replies continuously (chatbot/batching.py);
`stream()` decodes the token ids it sends back and yields the reply so far.
Each request samples from its own seeded generator, so a seeded reply is
reproducible whoever else is chatting.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import default_model
from .batching import ATTENTION, Request, Sampling, Scheduler
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


class ChatEngine:
    """The embedded transformers backend: one model, every request continuously batched.

    ``stream``/``generate_batch`` hand requests to a ``Scheduler``
    (chatbot/batching.py), whose thread decodes all running replies together.
    """

    def __init__(self, model, tokenizer, model_id: str, context_tokens: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        model_max = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context_tokens = min(context_tokens, model_max) if context_tokens > 0 else model_max
        self._adapters: dict[str, str] = {}  # adapter folder -> PEFT adapter name; loaded once each
        self._peft = None  # the PeftModel around `model`, once an adapter was asked for
        eos = model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if tokenizer.eos_token_id is not None:
            self._eos_ids.add(tokenizer.eos_token_id)
        model.set_attn_implementation(ATTENTION)
        vocab = model.get_output_embeddings().weight.shape[0]
        self._scheduler = Scheduler(self._model_for, self._eos_ids, vocab, model.device)

    @classmethod
    def load(cls, spec: str, data_dir: Path, dtype: str = "auto", context_tokens: int = 0) -> "ChatEngine":
        model, tokenizer, model_id = load_model(spec, data_dir, dtype)
        return cls(model, tokenizer, model_id, context_tokens)

    def close(self) -> None:
        """Stop the decode thread; requests still running end with an error."""
        self._scheduler.close()

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

    @contextlib.contextmanager
    def _model_for(self, adapter: str | None):
        """The model to run for the base (None) or a LoRA adapter folder; called by the decode thread only.

        The base weights are loaded once; LoRA adapters are small, loaded on
        first use, kept, and switched per forward. PEFT injects LoRA layers
        into the base model's modules, so even the bare base must be run with
        the adapters disabled once any adapter is loaded.
        """
        if adapter is None:
            if self._peft is None:
                yield self.model
            else:
                with self._peft.disable_adapter():
                    yield self._peft
            return
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
        yield self._peft

    def _request(self, prompt: list[Message], params: GenerationParams, stop: threading.Event,
                 adapter: str | None) -> tuple[Request, list[int]]:
        ids = self._encode(prompt)
        sampling = Sampling(params.temperature, params.top_p, params.top_k, params.repetition_penalty)
        request = Request(ids, params.max_new_tokens, sampling, params.seed, adapter, stop)
        self._scheduler.submit(request)
        return request, ids

    @staticmethod
    def _seeded(params: GenerationParams) -> GenerationParams:
        if params.seed is None:
            return replace(params, seed=random.randrange(2**31))
        return params

    def stream(self, messages: Prompt | list[Message], params: GenerationParams,
               stop: threading.Event | None = None, adapter: str | None = None) -> Iterator[Reply]:
        """Yield the reply as it grows; the last item has `done=True` and the statistics.

        `stop` ends generation within a token; the partial reply is kept and
        reported with finish_reason "stopped". `adapter` is a LoRA adapter
        folder to answer with instead of the bare base model. A seeded reply
        is the same whoever else is being answered at the time.
        """
        stop = stop or threading.Event()
        prompt = self.fit(messages, params.max_new_tokens)
        params = self._seeded(params)
        started = time.perf_counter()
        request, ids = self._request(prompt, params, stop, adapter)
        reply = Reply(prompt=prompt, prompt_tokens=len(ids), params=params)
        tokens: list[int] = []
        try:
            while (item := request.out.get()) is not Request.DONE:
                if isinstance(item, BaseException):
                    raise item
                tokens.extend(item)
                if reply.first_token_ms is None:
                    reply.first_token_ms = (time.perf_counter() - started) * 1000
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                # A multi-byte character split across tokens decodes to U+FFFD: wait for the rest.
                if text != reply.text and not text.endswith("\ufffd"):
                    reply.text, reply.completion_tokens = text, len(tokens)
                    yield replace(reply)  # a snapshot: the caller may keep it
        finally:
            stop.set()  # if our consumer went away, the scheduler drops the request
        self._finish(reply, tokens, params, started)
        yield reply

    def _finish(self, reply: Reply, tokens: list[int], params: GenerationParams, started: float) -> None:
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

    def generate_batch(self, messages: Prompt | list[Message], params: GenerationParams, n: int,
                       adapter: str | None = None) -> list[Reply]:
        """``n`` replies to one prompt, decoded together; not streamed.

        Reply ``i`` is seeded with the seed + i and records that seed, so each
        is the reply ``stream`` gives for it alone. Decoding reads the weights
        once per step for all of them (``bench/sample_batch.py`` measures the
        gain over one at a time).
        """
        if n < 1:
            raise ValueError(f"a batch needs at least 1 reply, not {n}")
        prompt = self.fit(messages, params.max_new_tokens)
        params = self._seeded(params)
        started = time.perf_counter()
        rows = [replace(params, seed=params.seed + i) for i in range(n)]
        requests = [self._request(prompt, row, threading.Event(), adapter) for row in rows]
        replies = []
        for (request, ids), row in zip(requests, rows, strict=True):
            tokens: list[int] = []
            while (item := request.out.get()) is not Request.DONE:
                if isinstance(item, BaseException):
                    for other, _ in requests:
                        other.stop.set()
                    raise item
                tokens.extend(item)
            reply = Reply(prompt=prompt, prompt_tokens=len(ids), params=row)
            self._finish(reply, tokens, row, started)
            replies.append(reply)
        return replies
