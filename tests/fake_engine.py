"""FakeEngine: an Engine that answers with queued text, for tests that are not about the model.

Loading and running the bundled model costs seconds per test; most tests of
the chat's plumbing (what is stored, who may see it, branches, refusals) do
not care what the reply says. Like simonw/llm's MockModel, the test says what
the next replies are::

    engine = FakeEngine()
    engine.queue("Arr, the gold be buried.", "Aye.")
    service = ChatService(engine, personas, store)
    *_, reply = service.send(session, "Where be the gold?", params)
    assert reply.text == "Arr, the gold be buried."
    assert engine.prompts[-1][-1]["content"].startswith("Where be the gold?")

Each reply streams its text word by word (one token per word with the
whitespace after it, then an end-of-sequence token), through the same
``Engine.grow`` / ``Engine.finish`` the real backends use, so a ``Reply``
looks as theirs do: snapshots while it grows, then one with ``done=True``,
token counts, timings, the seed and ``finish_reason`` "eos", "length" (cut
at ``max_new_tokens``) or "stopped".

An empty queue answers ``DEFAULT_REPLY``: plumbing tests send many messages
and rarely care what comes back. ``FakeEngine(default=None)`` makes an empty
queue raise ``NothingQueued`` instead, for a test that must account for every
reply. ``next_text`` is the one place a reply's text is chosen; a subclass may
override it (tests/test_canary.py answers by adapter and seed).

Stop is honoured as the real engines do: the ``stop`` event is read before
every token, the partial reply is kept and ends with "stopped", and the event
is set when the stream ends or its consumer goes away. ``delay`` (seconds
between tokens, cut short by a stop) makes a reply last long enough to be
stopped from another thread or by a client hanging up.

Token counts come from a word-level stand-in for a tokenizer: each message is
its words plus a role and an end marker (what a chat template adds), so the
context window (``context_tokens``, 8,192 as for the bundled model) refuses
or truncates long prompts as the real one does, in words instead of tokens.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import replace

from chatbot.engine import Engine, GenerationParams, Reply
from chatbot.prompting import Message, Prompt

DEFAULT_REPLY = "fake reply"
BUNDLED_CONTEXT = 8192  # the bundled model's context window: "too long" is too long here too


class NothingQueued(AssertionError):
    """FakeEngine(default=None) was asked for a reply that no test queued."""


class WordTokenizer:
    """A stand-in tokenizer: one token per word with the whitespace after it; ids given out as first seen.

    Implements what ``Engine`` calls: ``apply_chat_template`` (through
    ``chatbot.engine.encode_chat``) and ``decode``. Role and end markers are
    special tokens, dropped by ``decode(skip_special_tokens=True)`` as a real
    tokenizer drops its control tokens.
    """

    EOS = 0
    END = "<|end|>"

    def __init__(self):
        self._lock = threading.Lock()  # replies stream from several threads at once
        self._pieces = [""]  # id -> text; id 0 is EOS, which decodes to nothing
        self._ids = {"": self.EOS}
        self._special = {self.EOS}

    def _id(self, piece: str, special: bool = False) -> int:
        with self._lock:
            if piece not in self._ids:
                self._ids[piece] = len(self._pieces)
                self._pieces.append(piece)
            if special:
                self._special.add(self._ids[piece])
            return self._ids[piece]

    def encode_text(self, text: str) -> list[int]:
        """The token ids of plain text: joined back, the pieces are the text exactly."""
        return [self._id(piece) for piece in re.findall(r"\S+\s*|\s+", text)]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encode_text(text)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            tokenize: bool = True, **_options):
        ids = []
        for message in messages:
            ids += [self._id(f"<|{message['role']}|>", special=True), *self.encode_text(message["content"]),
                    self._id(self.END, special=True)]
        if add_generation_prompt:
            ids.append(self._id("<|assistant|>", special=True))
        return ids if tokenize else self.decode(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._lock:
            return "".join(self._pieces[i] for i in ids if not (skip_special_tokens and i in self._special))


class FakeEngine(Engine):
    """Replies with queued text (see the module docstring); records what it was asked.

    ``prompts``, ``params`` and ``adapters`` hold, per reply asked for and in
    that order, the messages the model was given (after fitting to the
    context), the sampling settings (seed filled in) and the LoRA adapter
    folder (None: the bare base model). ``counted`` is how many times a
    prompt's tokens were counted.
    """

    def __init__(self, *replies: str, default: str | None = DEFAULT_REPLY, model_id: str = "fake-engine",
                 context_tokens: int = BUNDLED_CONTEXT, delay: float = 0.0):
        self.tokenizer = WordTokenizer()
        self.model_id = model_id
        self.context_tokens = context_tokens
        self.eos_ids = {WordTokenizer.EOS}
        self.default = default
        self.delay = delay
        self.prompts: list[list[Message]] = []
        self.params: list[GenerationParams] = []
        self.adapters: list[str | None] = []
        self.counted = 0
        self.closed = False
        self._queue: deque[str] = deque(replies)
        self._lock = threading.Lock()

    def queue(self, *replies: str) -> FakeEngine:
        """Add replies, answered in order after those already queued."""
        with self._lock:
            self._queue.extend(replies)
        return self

    @property
    def queued(self) -> list[str]:
        """The replies not given yet."""
        with self._lock:
            return list(self._queue)

    def next_text(self, prompt: list[Message], params: GenerationParams, adapter: str | None) -> str:
        """The text of the next reply: the next queued one, else the default (or NothingQueued)."""
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        if self.default is None:
            raise NothingQueued(f"FakeEngine has no reply queued for {prompt[-1]['content'][:60]!r}; "
                                "queue one with engine.queue(...)")
        return self.default

    def describe(self) -> str:
        return f"fake engine, model {self.model_id}"

    def close(self) -> None:
        self.closed = True

    def count_tokens(self, messages: list[Message]) -> int:
        with self._lock:
            self.counted += 1
        return super().count_tokens(messages)

    def stream(self, messages: Prompt | list[Message], params: GenerationParams,
               stop: threading.Event | None = None, adapter: str | None = None):
        stop = stop or threading.Event()
        prompt = self.fit(messages, params.max_new_tokens)
        params = self.seeded(params)
        with self._lock:
            self.prompts.append(prompt)
            self.params.append(params)
            self.adapters.append(adapter)
        planned = self.tokenizer.encode_text(self.next_text(prompt, params, adapter)) + [WordTokenizer.EOS]
        ids = self.encode(prompt)
        started = time.perf_counter()
        reply = Reply(prompt=prompt, prompt_tokens=len(ids), params=params, prompt_ids=ids)
        tokens: list[int] = []
        try:
            for token in planned[:params.max_new_tokens]:
                if stop.wait(self.delay) if self.delay else stop.is_set():
                    break
                if (snapshot := self.grow(reply, tokens, [token], started)) is not None:
                    yield snapshot
        finally:
            stop.set()  # as the real engines: a consumer that went away ends its reply
        yield self.finish(reply, tokens, started, time.perf_counter())

    def generate_batch(self, messages: Prompt | list[Message], params: GenerationParams, n: int,
                       adapter: str | None = None) -> list[Reply]:
        """As ``Engine.generate_batch``, one reply after another: reply i gets the i-th queued text."""
        if n < 1:
            raise ValueError(f"a batch needs at least 1 reply, not {n}")
        self.fit(messages, params.max_new_tokens)
        params = self.seeded(params)
        replies = []
        for i in range(n):
            *_, reply = self.stream(messages, replace(params, seed=params.seed + i), adapter=adapter)
            reply.first_token_ms = None  # not streamed to anyone
            replies.append(reply)
        return replies
