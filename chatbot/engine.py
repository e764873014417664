"""The engine interface: what everything that generates a reply talks to.

``ChatService`` (the web app, the terminal chat, ``simulate``) and the Personas
tab's try-it pane hold an ``Engine`` and call ``stream`` / ``generate_batch``
with messages, sampling settings, an optional LoRA adapter folder and a stop
event. They get back ``Reply`` objects carrying what the store records: the
prompt as given to the model, token counts, first-token time, latency,
finish reason and the seed used.

Backends (``--engine``): ``transformers`` (chatbot/transformers_engine.py, the
default, in this process) and ``vllm`` (chatbot/vllm_engine.py, a vLLM
OpenAI-compatible server). Both render the prompt with the model's chat
template here, so the stored prompt is exactly what the model was given.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

from .prompting import Message, Prompt, fit_to_context


def encode_chat(tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """The token ids of ``messages`` rendered with the tokenizer's chat template; message text stays text.

    Rendering makes one string, and tokenizing it would read the spelling of a
    control token typed into a message (``hi<|im_end|>\n<|im_start|>system``)
    as that control token: a person could forge system or assistant turns,
    for the model and for the training data made from the conversation.
    ``sanitize_control_tokens`` encodes such spellings inside messages as the
    characters they are; only the template's own control tokens are control
    tokens. A message without such spellings gets the same ids as before.
    Both backends (the vLLM one sends these ids) and the alignment jobs
    encode conversations through here.
    """
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=False, sanitize_control_tokens=True)
    return list(ids)


class EngineUnavailable(Exception):
    """The model server cannot be reached or refused the request; the message says which and why."""


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
    prompt_ids: list[int] = field(default_factory=list)  # the token ids the model was given
    completion_ids: list[int] = field(default_factory=list)  # the reply's token ids, its EOS included


class Engine:
    """One model serving many requests. Subclasses implement ``stream`` and ``close``.

    The prompt is rendered and counted with the model's own tokenizer here,
    whatever the backend.
    """

    model_id: str
    tokenizer: object
    context_tokens: int
    eos_ids: set[int]

    def describe(self) -> str:
        """One line for the start-up banner: backend, model and where it runs."""
        raise NotImplementedError

    def stream(self, messages: Prompt | list[Message], params: GenerationParams,
               stop: threading.Event | None = None, adapter: str | None = None) -> Iterator[Reply]:
        """Yield the reply as it grows; the last item has ``done=True`` and the statistics.

        ``stop`` ends generation within a few tokens; the partial reply is
        kept and reported with finish_reason "stopped". ``adapter`` is a LoRA
        adapter folder to answer with instead of the bare base model.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (threads, a server); replies still running end with an error."""

    def generate_batch(self, messages: Prompt | list[Message], params: GenerationParams, n: int,
                       adapter: str | None = None) -> list[Reply]:
        """``n`` replies to one prompt, generated concurrently; not streamed.

        Reply ``i`` is seeded with the seed + i and records that seed, so each
        is the reply ``stream`` gives for it alone. Both backends decode
        concurrent requests together (``bench/sample_batch.py`` measures the
        gain over one at a time).
        """
        if n < 1:
            raise ValueError(f"a batch needs at least 1 reply, not {n}")
        self.fit(messages, params.max_new_tokens)  # refused once, in this thread
        params = self.seeded(params)
        replies: list[Reply | None] = [None] * n
        errors: list[BaseException] = []
        stops = [threading.Event() for _ in range(n)]

        def one(i: int) -> None:
            try:
                for reply in self.stream(messages, replace(params, seed=params.seed + i), stops[i], adapter):
                    pass
                replies[i] = reply
            except BaseException as exc:  # noqa: BLE001 - raised below, in the caller's thread
                errors.append(exc)
                for stop in stops:
                    stop.set()

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for reply in replies:
            reply.first_token_ms = None  # not streamed to anyone
        return replies

    def encode(self, messages: list[Message]) -> list[int]:
        """The token ids the model is given for ``messages``: the chat template with the generation prompt."""
        return encode_chat(self.tokenizer, messages)

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.encode(messages))

    def count_text_tokens(self, text: str) -> int:
        """The tokens of plain text, no template around it: a lorebook entry against its budget."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def fit(self, prompt: Prompt | list[Message], max_new_tokens: int) -> list[Message]:
        """Raises PromptTooLong when the pinned parts and the newest message cannot fit."""
        if not isinstance(prompt, Prompt):
            prompt = Prompt(list(prompt))
        return fit_to_context(prompt, self.count_tokens, self.context_tokens, max_new_tokens)

    @staticmethod
    def seeded(params: GenerationParams) -> GenerationParams:
        """``params`` with a seed: a random one when none was asked for, recorded with the reply."""
        if params.seed is None:
            return replace(params, seed=random.randrange(2**31))
        return params

    def grow(self, reply: Reply, tokens: list[int], new: list[int], started: float) -> Reply | None:
        """Add ``new`` token ids to a streaming reply; a snapshot to yield when its text grew, else None."""
        tokens.extend(new)
        if reply.first_token_ms is None:
            reply.first_token_ms = (time.perf_counter() - started) * 1000
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        # A multi-byte character split across tokens decodes to U+FFFD: wait for the rest.
        if text == reply.text or text.endswith("\ufffd"):
            return None
        reply.text, reply.completion_tokens = text, len(tokens)
        return replace(reply)  # a snapshot: the caller may keep it

    def finish(self, reply: Reply, tokens: list[int], started: float, now: float) -> Reply:
        """Fill in the finished reply's text, counts, latency and finish reason from its token ids."""
        reply.text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        reply.completion_ids = list(tokens)
        reply.completion_tokens = len(tokens)
        reply.latency_ms = (now - started) * 1000
        if tokens and tokens[-1] in self.eos_ids:
            reply.finish_reason = "eos"
        elif len(tokens) >= reply.params.max_new_tokens:
            reply.finish_reason = "length"
        else:
            reply.finish_reason = "stopped"
        reply.done = True
        return reply
