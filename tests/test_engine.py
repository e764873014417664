"""The engine on the real bundled model (converted once per test session)."""

import threading

import pytest

from chatbot.engine import GenerationParams
from chatbot.transformers_engine import TransformersEngine

pytestmark = pytest.mark.model

PIRATE = [{"role": "system", "content": "You are a pirate. Talk like a pirate."},
          {"role": "user", "content": "Where is the treasure?"}]
CHEF = [{"role": "system", "content": "You are a chef."},
        {"role": "user", "content": "How do I boil an egg?"}]
GREEDY = GenerationParams(temperature=0, max_new_tokens=24)


def final(replies):
    replies = list(replies)
    assert replies[-1].done and all(not r.done for r in replies[:-1])
    return replies[-1]


def test_stream_grows_and_is_bounded_by_max_new_tokens(engine):
    replies = list(engine.stream(PIRATE, GenerationParams(max_new_tokens=16, seed=3)))
    texts = [r.text for r in replies]
    assert len(replies) > 3, "the reply arrives piece by piece"
    assert all(b.startswith(a) for a, b in zip(texts[:-2], texts[1:-1])), "each update extends the last"
    last = replies[-1]
    assert last.text.strip()
    assert 0 < last.completion_tokens <= 16
    assert last.finish_reason in ("eos", "length")
    assert last.prompt == PIRATE and last.prompt_tokens == engine.count_tokens(PIRATE)
    assert last.first_token_ms > 0 and last.latency_ms >= last.first_token_ms
    assert last.params.seed == 3


def test_reply_cut_at_max_new_tokens_reports_length_and_its_random_seed(engine):
    last = final(engine.stream(CHEF, GenerationParams(max_new_tokens=8)))
    assert last.completion_tokens == 8 and last.finish_reason == "length"
    assert isinstance(last.params.seed, int), "the seed actually used is reported for reproducibility"


def test_same_seed_same_reply(engine):
    params = GenerationParams(temperature=1.0, max_new_tokens=20, seed=1234)
    assert final(engine.stream(PIRATE, params)).text == final(engine.stream(PIRATE, params)).text


def test_stop_ends_generation_within_two_tokens_and_keeps_partial_reply(engine):
    stop = threading.Event()
    seen = None
    for reply in engine.stream(CHEF, GenerationParams(temperature=0, max_new_tokens=200), stop):
        if seen is None:
            seen = reply.completion_tokens
            stop.set()
    assert reply.done and reply.finish_reason == "stopped"
    assert reply.text.strip()
    assert reply.completion_tokens <= seen + 2, f"{reply.completion_tokens} tokens, stop asked at {seen}"


def test_two_users_at_once_get_their_own_replies(engine):
    expected = {"pirate": final(engine.stream(PIRATE, GREEDY)).text,
                "chef": final(engine.stream(CHEF, GREEDY)).text}
    got = {}

    def chat(name, messages):
        got[name] = final(engine.stream(messages, GREEDY)).text

    threads = [threading.Thread(target=chat, args=("pirate", PIRATE)),
               threading.Thread(target=chat, args=("chef", CHEF))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == expected
    assert expected["pirate"] != expected["chef"]


def test_long_history_is_truncated_to_the_context_window(checkpoint, engine):
    small = TransformersEngine(engine.model, engine.tokenizer, engine.model_id, context_tokens=256)
    history = [PIRATE[0]]
    for i in range(20):
        history += [{"role": "user", "content": f"Tell me story number {i} about the sea."},
                    {"role": "assistant", "content": "Arr, a long tale of waves and wind. " * 3}]
    history.append({"role": "user", "content": "And the last one?"})
    try:
        last = final(small.stream(history, GenerationParams(temperature=0, max_new_tokens=16)))
    finally:
        small.close()
    assert last.prompt[0] == PIRATE[0] and last.prompt[-1] == history[-1]
    assert len(last.prompt) < len(history)
    assert last.prompt_tokens + 16 <= 256


def test_generate_batch_samples_n_replies_to_one_prompt_reproducibly(engine):
    params = GenerationParams(max_new_tokens=12, seed=5)
    replies = engine.generate_batch(PIRATE, params, 3)
    again = engine.generate_batch(PIRATE, params, 3)
    assert [r.text for r in replies] == [r.text for r in again], "the seed reproduces each reply"
    assert len({r.text for r in replies}) > 1, "the rows are different samples"
    for row, reply in enumerate(replies):
        assert reply.done and reply.params.seed == 5 + row, "each reply records its own seed"
        assert reply.prompt == PIRATE and reply.prompt_tokens == engine.count_tokens(PIRATE)
        assert 0 < reply.completion_tokens <= 12 and reply.finish_reason in ("eos", "length")
        assert reply.finish_reason == "length" or reply.completion_tokens < 12
        assert reply.latency_ms > 0 and reply.first_token_ms is None
    alone = final(engine.stream(PIRATE, GenerationParams(max_new_tokens=12, seed=6)))
    assert alone.text == replies[1].text, "a batch's reply is the one its seed gives alone"
    greedy = engine.generate_batch(CHEF, GREEDY, 2)
    assert greedy[0].text == greedy[1].text == final(engine.stream(CHEF, GREEDY)).text
    unseeded = engine.generate_batch(CHEF, GenerationParams(max_new_tokens=4), 2)
    assert unseeded[1].params.seed == unseeded[0].params.seed + 1  # a random seed, recorded
    with pytest.raises(ValueError, match="at least 1 reply"):
        engine.generate_batch(CHEF, GREEDY, 0)


def test_a_seeded_reply_is_the_same_whoever_else_is_chatting(engine):
    params = GenerationParams(temperature=1.0, max_new_tokens=40, seed=77)
    alone = final(engine.stream(PIRATE, params))
    others = [[{"role": "user", "content": f"Tell me about {topic}. " * (1 + i * 20)}]  # prompts of 10-900 tokens
              for i, topic in enumerate(["cats", "rain", "bread", "ships", "owls"])]
    started, got = threading.Barrier(len(others) + 1), {}

    def chat(name, messages, params):
        started.wait()
        got[name] = final(engine.stream(messages, params))

    threads = [threading.Thread(target=chat, args=(i, messages, GenerationParams(
        temperature=1.0, max_new_tokens=30 + 5 * i, seed=i))) for i, messages in enumerate(others)]
    threads.append(threading.Thread(target=chat, args=("pirate", PIRATE, params)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(got) == len(others) + 1
    assert got["pirate"].text == alone.text, "other chats changed a seeded reply"
    assert got["pirate"].completion_tokens == alone.completion_tokens


def test_greedy_replies_are_what_transformers_generate_gives(checkpoint):
    """float32, where a padding-free forward matches generate's to the last bit of a token choice."""
    import torch

    engine = TransformersEngine.load(str(checkpoint), checkpoint.parent.parent, "float32")
    try:
        for messages in (PIRATE, CHEF):
            ids = torch.tensor([engine.encode(messages)])
            with torch.inference_mode():
                output = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                               max_new_tokens=24, repetition_penalty=1.1, temperature=None,
                                               top_p=None, top_k=None)
            expected = engine.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
            assert final(engine.stream(messages, GREEDY)).text == expected
    finally:
        engine.close()


def test_concurrent_replies_share_forwards_and_long_prompts_are_prefilled_in_chunks(checkpoint):
    from chatbot.batching import PREFILL_BUDGET

    engine = TransformersEngine.load(str(checkpoint), checkpoint.parent.parent)
    try:
        long_prompt = [{"role": "user", "content": "Tell me about the sea. " * 120}]  # ~700 tokens
        prompts = [PIRATE, CHEF, long_prompt, [{"role": "user", "content": "Hi!"}]]
        got = {}
        started = threading.Barrier(len(prompts))

        def chat(i):
            started.wait()
            got[i] = final(engine.stream(prompts[i], GenerationParams(temperature=0, max_new_tokens=20,
                                                                      repetition_penalty=1.0)))

        threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        stats = engine._scheduler.stats
        sampled = sum(r.completion_tokens for r in got.values())
        assert stats["sampled"] == sampled
        assert stats["forwards"] < sampled * 0.6, f"{stats}: replies were not decoded together"
        # A running reply waits for at most one prefill budget of other people's prompts per token.
        assert stats["largest_forward"] <= PREFILL_BUDGET + len(prompts), stats
    finally:
        engine.close()


def test_a_bad_adapter_fails_its_own_request_only(engine, tmp_path):
    from chatbot.default_model import ModelLoadError

    (tmp_path / "adapter_config.json").write_text("{not json")
    results = {}

    def chat(name, adapter):
        try:
            results[name] = final(engine.stream(CHEF, GREEDY, adapter=adapter)).text
        except ModelLoadError as exc:
            results[name] = exc

    threads = [threading.Thread(target=chat, args=("bad", str(tmp_path))),
               threading.Thread(target=chat, args=("good", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert isinstance(results["bad"], ModelLoadError) and "cannot load LoRA adapter" in str(results["bad"])
    assert results["good"] == final(engine.stream(CHEF, GREEDY)).text


def test_a_request_that_fails_inside_the_decode_loop_does_not_stop_the_others(engine):
    from chatbot.batching import Request, Sampling

    broken = Request([10**9], 4, Sampling(0.0, 1.0, 0, 1.0), 1, None, threading.Event())  # no such token id
    engine._scheduler.submit(broken)
    assert isinstance(broken.out.get(timeout=60), Exception)
    assert final(engine.stream(CHEF, GREEDY)).text, "the engine still answers"
