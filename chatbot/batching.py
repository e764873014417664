"""Continuous batching for the embedded engine: many replies decoded together.

Decoding one token reads every weight of the model once; on a CPU that read,
not the arithmetic, is what a step costs. So a step that decodes one token for
each of 8 replies costs little more than a step for one. The scheduler here
runs one loop in its own thread: each iteration admits waiting requests, feeds
the model one *packed* sequence holding the next token of every running reply
plus a bounded chunk of newcomers' prompts, and samples each reply's next
token. Requests join and leave between iterations; a long prompt is prefilled
in fixed chunks, so a newcomer stalls the others by one chunk at most.

A seeded reply is the same whoever else is chatting. Three things make it so:

- no padding: every request keeps its own key/value buffers, and attention is
  computed per request over exactly its own keys (``packed_attention``);
  padded batches changed bf16 logits by up to 0.5 on this model;
- the linear layers see the packed tokens as independent rows: oneDNN's bf16
  matmul gives a row the same result among any 2 or more rows, but rounds a
  lone row differently, so every forward carries one filler token;
- prompt chunks start at fixed offsets, and every request samples from its own
  ``torch.Generator`` seeded with its seed.

Requests with different LoRA adapters run in one forward per adapter per
iteration (PEFT's mixed-adapter batches need a batch dimension, which a packed
sequence does not have).

The model's attention implementation is switched to ``ATTENTION``, which
falls back to SDPA for ordinary forwards (a padded batch, a training step),
so the model stays usable outside the scheduler.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

log = logging.getLogger(__name__)

ATTENTION = "persona_studio_packed"
# Prompts are prefilled in chunks of this many tokens, at fixed offsets; at most
# PREFILL_BUDGET prompt tokens per iteration, so the running replies wait for
# that much prefill at most between two of their tokens.
PREFILL_CHUNK = 128
PREFILL_BUDGET = 256
# Replies decoded together; more wait for a free row.
MAX_RUNNING = 32
# A 4-D mask makes transformers pass it through instead of building one: the
# packed attention reads the segments, never a mask.
_NO_MASK = torch.zeros(1, 1, 1, 1, dtype=torch.bool)


@dataclass
class Segment:
    """One request's stretch of the packed sequence in one forward."""

    start: int  # offset in the packed sequence
    length: int  # tokens of this request in this forward
    kv: "RequestKV | None"  # None: the filler, which attends to nothing and keeps nothing


class Segments(list):
    """What ``PackedCache.update`` hands the attention function: per segment, its own keys and values."""


class RequestKV:
    """One request's keys and values for every layer, in buffers sized for its whole reply."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.lengths: dict[int, int] = {}

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``keys``/``values`` (1, kv heads, n, head dim); return all of this layer's so far."""
        if layer not in self.keys:
            shape = (1, keys.shape[1], self.capacity, keys.shape[3])
            self.keys[layer] = keys.new_empty(shape)
            self.values[layer] = values.new_empty(shape)
            self.lengths[layer] = 0
        start = self.lengths[layer]
        end = start + keys.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"request outgrew its key/value buffer ({end} > {self.capacity} tokens)")
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class PackedCache:
    """The ``cache`` a model forward is given: splits each layer's new keys by request.

    Duck-typed: the decoder layers only call ``update``; with a 4-D mask and
    position ids given, transformers asks the cache nothing else.
    """

    def __init__(self, segments: list[Segment]):
        self.segments = segments

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = Segments(), Segments()
        for seg in self.segments:
            if seg.kv is None:
                keys.append((seg, None))
                values.append((seg, None))
                continue
            k, v = seg.kv.append(layer_idx, key_states[:, :, seg.start:seg.start + seg.length],
                                 value_states[:, :, seg.start:seg.start + seg.length])
            keys.append((seg, k))
            values.append((seg, v))
        return keys, values


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of each request over its own keys only; SDPA for anything else."""
    if not isinstance(key, Segments):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    outputs = []
    for (seg, k), (_, v) in zip(key, value, strict=True):
        q = query[:, :, seg.start:seg.start + seg.length]
        if k is None:  # the filler: its output is never read
            outputs.append(torch.zeros_like(q))
            continue
        mask = None
        if seg.length > 1:  # a prompt chunk: causal, its last query is the newest key
            total = k.shape[2]
            mask = torch.ones(seg.length, total, dtype=torch.bool, device=q.device).tril(total - seg.length)
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                                      enable_gqa=k.shape[1] != q.shape[1]))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float


def sample(logits: torch.Tensor, seen: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from one request's logits (vocab,), as transformers' generate orders its processors:
    repetition penalty over the tokens seen so far, then temperature, top-k, top-p. On the CPU,
    where ``seen`` and the request's generator live."""
    logits = logits.float().cpu()
    if sampling.repetition_penalty != 1.0:
        penalised = torch.where(logits < 0, logits * sampling.repetition_penalty,
                                logits / sampling.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if sampling.temperature <= 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits)  # ascending, as TopPLogitsWarper
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[-1] = False  # keep at least one token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Request:
    """One reply being generated. The scheduler puts token ids, then ``DONE`` or an exception, on ``out``."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int
    adapter: str | None
    stop: threading.Event
    out: queue.Queue = field(default_factory=queue.Queue)
    # Scheduler-side state.
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0
    kv: RequestKV | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None
    next_logits: torch.Tensor | None = None

    DONE = object()


def _close_if_alive(ref: "weakref.ref[Scheduler]") -> None:
    scheduler = ref()
    if scheduler is not None:
        scheduler.close()


class Scheduler:
    """Runs every request on one model, continuously batched, in one thread.

    ``model_for(adapter)`` returns a context manager yielding the model to run
    for that adapter (None: the base model); ``eos_ids`` end a reply. Whatever
    goes wrong with one request is put on its own ``out``; the loop lives on.
    """

    def __init__(self, model_for: Callable, eos_ids: set[int], vocab_size: int, device: torch.device,
                 prefill_chunk: int = PREFILL_CHUNK, prefill_budget: int = PREFILL_BUDGET,
                 max_running: int = MAX_RUNNING):
        self._model_for = model_for
        self._eos_ids = eos_ids
        self._vocab_size = vocab_size
        self._device = device
        self._chunk = prefill_chunk
        self._budget = prefill_budget
        self._max_running = max_running
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._lock = threading.Lock()  # guards starting the thread
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        # Written by the decode thread only: forwards run, tokens sampled, the most tokens in one forward.
        self.stats = {"forwards": 0, "sampled": 0, "largest_forward": 0}

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the engine was closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decode-scheduler", daemon=True)
                self._thread.start()
                # End the thread before the interpreter tears torch down under it (a weak
                # reference: an engine dropped earlier is not kept alive for this).
                atexit.register(_close_if_alive, weakref.ref(self))
        self._waiting.put(request)

    def close(self) -> None:
        self._closed.set()
        self._waiting.put(None)  # wake the loop
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        running: list[Request] = []
        while not self._closed.is_set():
            block = not running
            while len(running) < self._max_running:
                try:
                    request = self._waiting.get(block=block)
                except queue.Empty:
                    break
                block = False
                if request is None:
                    continue
                try:
                    self._admit(request)
                except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                    request.out.put(exc)
                    continue
                running.append(request)
            if self._closed.is_set():
                break
            try:
                running = self._step(running)
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop everyone's replies for good
                log.exception("a decode step failed; its replies end with the error")
                for request in running:
                    request.out.put(exc)
                running = []
        closed = RuntimeError("the engine was closed")
        for request in running:
            request.out.put(closed)
        while True:  # nobody may wait forever on a request that never started
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                request.out.put(closed)

    def _admit(self, request: Request) -> None:
        request.kv = RequestKV(len(request.prompt) + request.max_new_tokens)
        request.generator = torch.Generator(device="cpu").manual_seed(request.seed)
        request.seen = torch.zeros(self._vocab_size, dtype=torch.bool)
        request.seen[torch.tensor(request.prompt)] = True

    def _step(self, running: list[Request]) -> list[Request]:
        """One iteration: a forward per adapter over decode tokens and prompt chunks; returns who still runs."""
        alive = []
        for request in running:
            if request.stop.is_set():
                request.out.put(Request.DONE)
            else:
                alive.append(request)
        budget = self._budget
        groups: dict[str | None, list[tuple[Request, list[int]]]] = {}
        for request in alive:
            if request.prefilled < len(request.prompt):
                if budget <= 0:
                    continue
                tokens = request.prompt[request.prefilled:request.prefilled + self._chunk]
                budget -= len(tokens)
            else:
                tokens = [request.generated[-1]]
            groups.setdefault(request.adapter, []).append((request, tokens))
        failed: set[int] = set()
        for adapter, items in groups.items():
            try:
                self._forward(adapter, items)
            except Exception as exc:  # noqa: BLE001 - the requests get the error, the loop lives on
                log.warning("generation failed for adapter %s: %s", adapter, exc)
                for request, _ in items:
                    request.out.put(exc)
                    failed.add(id(request))
        still = []
        for request in alive:
            if id(request) in failed:
                continue
            if request.next_logits is None:  # still prefilling
                still.append(request)
                continue
            try:
                token = sample(request.next_logits, request.seen, request.sampling, request.generator)
            except Exception as exc:  # noqa: BLE001 - e.g. a sampling setting that leaves no token
                request.out.put(exc)
                continue
            request.next_logits = None
            request.generated.append(token)
            request.seen[token] = True
            request.out.put([token])
            self.stats["sampled"] += 1
            if token in self._eos_ids or len(request.generated) >= request.max_new_tokens:
                request.out.put(Request.DONE)
            else:
                still.append(request)
        return still

    def _forward(self, adapter: str | None, items: list[tuple[Request, list[int]]]) -> None:
        ids, positions, segments = [], [], []
        for request, tokens in items:
            past = request.prefilled if request.prefilled < len(request.prompt) else \
                len(request.prompt) + len(request.generated) - 1
            segments.append(Segment(len(ids), len(tokens), request.kv))
            ids.extend(tokens)
            positions.extend(range(past, past + len(tokens)))
        # A one-token filler of its own: oneDNN's bf16 matmul rounds a lone row (M=1) differently from
        # the same row among others, so no forward may hold a single token, nor keep a single row's logits.
        segments.append(Segment(len(ids), 1, None))
        ids.append(0)
        positions.append(0)
        self.stats["forwards"] += 1
        self.stats["largest_forward"] = max(self.stats["largest_forward"], len(ids) - 1)
        input_ids = torch.tensor([ids], device=self._device)
        position_ids = torch.tensor([positions], device=self._device)
        last = torch.tensor([seg.start + seg.length - 1 for seg in segments], device=self._device)
        with self._model_for(adapter) as model, torch.inference_mode():
            # Logits only at each segment's last token: the next token's, or a prompt chunk's end.
            logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=_NO_MASK,
                           cache=PackedCache(segments), logits_to_keep=last).logits[0]
        for row, (request, tokens) in enumerate(items):
            if request.prefilled < len(request.prompt):
                request.prefilled += len(tokens)
                if request.prefilled < len(request.prompt):
                    continue  # more prompt to go: no token yet
            request.next_logits = logits[row]
