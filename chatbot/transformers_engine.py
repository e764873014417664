"""The embedded ``transformers`` backend: the model in this process, replies batched continuously.

The model is loaded once and shared. Every reply is a request to one decode
thread that batches all running replies together (chatbot/batching.py);
``stream`` decodes the token ids it sends back and yields the reply so far.
Each request samples from its own seeded generator, so a seeded reply is
reproducible whoever else is chatting.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import default_model
from .batching import ATTENTION, Request, Sampling, Scheduler
from .default_model import ModelLoadError
from .engine import Engine, GenerationParams, Reply
from .prompting import Message, Prompt


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


class TransformersEngine(Engine):
    """The embedded backend: one model in this process, every request continuously batched.

    ``stream`` hands each request to a ``Scheduler`` (chatbot/batching.py),
    whose thread decodes all running replies together.
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
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        model.set_attn_implementation(ATTENTION)
        if model.config._attn_implementation != ATTENTION:
            raise ModelLoadError(f"model {model_id!r} ({type(model).__name__}) does not let its attention be "
                                 "swapped, which batching replies together needs; use --engine vllm for it")
        vocab = model.get_output_embeddings().weight.shape[0]
        self._scheduler = Scheduler(self._model_for, self.eos_ids, vocab, model.device)

    @classmethod
    def load(cls, spec: str, data_dir: Path, dtype: str = "auto", context_tokens: int = 0) -> "TransformersEngine":
        model, tokenizer, model_id = load_model(spec, data_dir, dtype)
        return cls(model, tokenizer, model_id, context_tokens)

    def describe(self) -> str:
        return f"transformers, model {self.model_id}, {self.model.dtype} on {self.model.device}"

    def close(self) -> None:
        self._scheduler.close()

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
        ids = self.encode(prompt)
        sampling = Sampling(params.temperature, params.top_p, params.top_k, params.repetition_penalty)
        request = Request(ids, params.max_new_tokens, sampling, params.seed, adapter, stop)
        self._scheduler.submit(request)
        return request, ids

    def stream(self, messages: Prompt | list[Message], params: GenerationParams,
               stop: threading.Event | None = None, adapter: str | None = None) -> Iterator[Reply]:
        """As ``Engine.stream``; stop acts within a token, and a seeded reply is the same whoever
        else is being answered at the time."""
        stop = stop or threading.Event()
        prompt = self.fit(messages, params.max_new_tokens)
        params = self.seeded(params)
        started = time.perf_counter()
        request, ids = self._request(prompt, params, stop, adapter)
        reply = Reply(prompt=prompt, prompt_tokens=len(ids), params=params, prompt_ids=ids)
        tokens: list[int] = []
        try:
            while (item := request.out.get()) is not Request.DONE:
                if isinstance(item, BaseException):
                    raise item
                if (snapshot := self.grow(reply, tokens, item, started)) is not None:
                    yield snapshot
        finally:
            stop.set()  # if our consumer went away, the scheduler drops the request
        yield self.finish(reply, tokens, started, time.perf_counter())
