"""FakeEngine (tests/fake_engine.py) keeps the Engine contract the plumbing tests rely on."""

from __future__ import annotations

import threading

import pytest
from fake_engine import DEFAULT_REPLY, FakeEngine, NothingQueued

from chatbot.engine import GenerationParams
from chatbot.prompting import PromptTooLong

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_queued_replies_stream_word_by_word_in_order_then_the_default():
    engine = FakeEngine().queue("Ahoy, matey!  Well met.", "Aye.")
    replies = list(engine.stream(ASK, GenerationParams(seed=3)))
    assert [r.text for r in replies] == ["Ahoy, ", "Ahoy, matey!  ", "Ahoy, matey!  Well ",
                                         "Ahoy, matey!  Well met.", "Ahoy, matey!  Well met."]
    assert [r.done for r in replies] == [False] * 4 + [True]
    last = replies[-1]
    assert last.finish_reason == "eos" and last.completion_tokens == 5  # four words and the EOS
    assert last.params.seed == 3 and last.prompt == ASK and last.prompt_tokens == len(last.prompt_ids) > 0
    assert last.latency_ms > 0 and last.first_token_ms > 0
    assert [*engine.stream(ASK, GenerationParams())][-1].text == "Aye."
    assert [*engine.stream(ASK, GenerationParams())][-1].text == DEFAULT_REPLY
    assert engine.prompts == [ASK] * 3 and engine.adapters == [None] * 3 and engine.queued == []


def test_an_empty_queue_can_be_an_error():
    with pytest.raises(NothingQueued, match="'Hello there'"):
        list(FakeEngine(default=None).stream(ASK, GenerationParams()))


def test_max_new_tokens_cuts_the_reply_and_says_length():
    *_, reply = FakeEngine("one two three four").stream(ASK, GenerationParams(max_new_tokens=2))
    assert (reply.text, reply.finish_reason, reply.completion_tokens) == ("one two ", "length", 2)


def test_stop_keeps_the_partial_reply_and_says_stopped():
    stop = threading.Event()
    replies = FakeEngine("one two three four").stream(ASK, GenerationParams(), stop)
    assert next(replies).text == "one "
    stop.set()
    assert [r.text for r in replies] == ["one "] and stop.is_set()
    engine = FakeEngine("a b c", delay=30)  # a stop from another thread cuts the wait short
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    *_, reply = engine.stream(ASK, GenerationParams(), stop)
    assert reply.finish_reason == "stopped" and reply.text == ""


def test_a_consumer_that_goes_away_sets_the_stop_event():
    stop = threading.Event()
    replies = FakeEngine("one two").stream(ASK, GenerationParams(), stop)
    next(replies)
    replies.close()
    assert stop.is_set()


def test_the_context_window_refuses_and_truncates_as_the_real_one():
    engine = FakeEngine(context_tokens=50)
    with pytest.raises(PromptTooLong):
        list(engine.stream([{"role": "user", "content": "word " * 60}], GenerationParams(max_new_tokens=8)))
    long = [{"role": "system", "content": "sys"}] + [
        {"role": ("user", "assistant")[i % 2], "content": "a few words here"} for i in range(21)]
    *_, reply = engine.stream(long, GenerationParams(max_new_tokens=8))
    assert reply.prompt[0] == long[0] and reply.prompt[-1] == long[-1] and len(reply.prompt) < len(long)
    assert engine.count_tokens(reply.prompt) <= 50 - 8 and engine.counted > 0


def test_a_batch_takes_the_queue_in_row_order_with_consecutive_seeds():
    engine = FakeEngine("first", "second", "third")
    replies = engine.generate_batch(ASK, GenerationParams(seed=10), 3, adapter="/adapters/x")
    assert [(r.text, r.params.seed, r.first_token_ms) for r in replies] == [
        ("first", 10, None), ("second", 11, None), ("third", 12, None)]
    assert engine.adapters == ["/adapters/x"] * 3
    with pytest.raises(ValueError, match="at least 1"):
        engine.generate_batch(ASK, GenerationParams(), 0)
