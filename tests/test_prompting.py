import pytest

from chatbot.prompting import PromptTooLong, build_messages, fit_to_context


def words(messages):
    """A stand-in token counter: one token per word, plus 2 per message for the template."""
    return sum(len(m["content"].split()) + 2 for m in messages)


def conversation(turns):
    history = [{"role": "assistant", "content": "hello there"}]  # the greeting
    for i in range(turns):
        history.append({"role": "user", "content": f"question {i} " + "x " * 8})
        history.append({"role": "assistant", "content": f"answer {i} " + "y " * 8})
    history.append({"role": "user", "content": "newest question"})
    return build_messages("be brief", history)


def test_build_messages_puts_system_prompt_first_and_keeps_order():
    messages = build_messages("sys", [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}])
    assert [m["role"] for m in messages] == ["system", "assistant", "user"]
    assert messages[0]["content"] == "sys"


def test_everything_kept_when_it_fits():
    messages = conversation(3)
    assert fit_to_context(messages, words, context_tokens=1000, reply_tokens=100) == messages


def test_oldest_turns_dropped_system_prompt_and_newest_kept():
    messages = conversation(5)
    fitted = fit_to_context(messages, words, context_tokens=80, reply_tokens=20)
    assert words(fitted) <= 60
    assert fitted[0] == messages[0]
    assert fitted[-1] == messages[-1]
    assert fitted[1]["role"] == "user", "kept history starts with a user turn"
    assert fitted[1:] == messages[-len(fitted) + 1:], "a suffix of the conversation is kept, in order"
    assert len(fitted) < len(messages)


def test_single_message_too_long_is_refused_with_sizes():
    messages = build_messages("sys", [{"role": "user", "content": "w " * 500}])
    with pytest.raises(PromptTooLong, match="too long.*shorten it"):
        fit_to_context(messages, words, context_tokens=200, reply_tokens=50)


def test_reply_budget_larger_than_context_is_refused():
    with pytest.raises(PromptTooLong, match="lower max_new_tokens"):
        fit_to_context(conversation(0), words, context_tokens=100, reply_tokens=100)


@pytest.mark.model
def test_real_tokenizer_chat_template_and_truncation(engine):
    messages = conversation(30)
    fitted = fit_to_context(messages, engine.count_tokens, context_tokens=300, reply_tokens=64)
    assert engine.count_tokens(fitted) <= 300 - 64
    assert fitted[0]["content"] == "be brief" and fitted[-1]["content"] == "newest question"
    rendered = engine.tokenizer.apply_chat_template(fitted, add_generation_prompt=True, tokenize=False)
    # The chat template (ChatML for SmolLM2) is the prompt format, not a hand-written one.
    assert rendered.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")
