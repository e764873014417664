import pytest

from chatbot.prompting import Prompt, PromptTooLong, build_prompt, fit_to_context


def words(messages):
    """A stand-in token counter: one token per word, plus 2 per message for the template."""
    return sum(len(m["content"].split()) + 2 for m in messages)


def conversation(turns):
    history = [{"role": "assistant", "content": "hello there"}]  # the greeting
    for i in range(turns):
        history.append({"role": "user", "content": f"question {i} " + "x " * 8})
        history.append({"role": "assistant", "content": f"answer {i} " + "y " * 8})
    history.append({"role": "user", "content": "newest question"})
    return build_prompt("be brief", history)


def test_build_prompt_orders_system_examples_history_post_history():
    prompt = build_prompt("sys", [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}],
                          examples=[{"role": "user", "content": "eg q"}, {"role": "assistant", "content": "eg a"}],
                          post_history="stay in character")
    assert [(m["role"], m["content"]) for m in prompt.messages] == [
        ("system", "sys"), ("user", "eg q"), ("assistant", "eg a"), ("assistant", "hi"),
        ("user", "yo\n\n(stay in character)")]
    assert (prompt.head, prompt.tail) == (3, 1)


def test_everything_kept_when_it_fits():
    prompt = conversation(3)
    assert fit_to_context(prompt, words, context_tokens=1000, reply_tokens=100) == prompt.messages


def test_oldest_turns_dropped_system_prompt_and_newest_kept():
    messages = conversation(5).messages
    fitted = fit_to_context(Prompt(messages), words, context_tokens=80, reply_tokens=20)
    assert words(fitted) <= 60
    assert fitted[0] == messages[0]
    assert fitted[-1] == messages[-1]
    assert fitted[1]["role"] == "user", "kept history starts with a user turn"
    assert fitted[1:] == messages[-len(fitted) + 1:], "a suffix of the conversation is kept, in order"
    assert len(fitted) < len(messages)


def test_examples_and_post_history_are_pinned_while_old_turns_go():
    examples = [{"role": "user", "content": "example question"}, {"role": "assistant", "content": "example answer"}]
    prompt = build_prompt("sys", conversation(6).messages[1:], examples=examples, post_history="be a pirate")
    fitted = fit_to_context(prompt, words, context_tokens=90, reply_tokens=20)
    assert fitted[:3] == prompt.messages[:3]
    assert fitted[-1] == {"role": "user", "content": "newest question\n\n(be a pirate)"}
    assert len(fitted) < len(prompt.messages) and words(fitted) <= 70


def test_single_message_too_long_is_refused_with_sizes():
    prompt = build_prompt("sys", [{"role": "user", "content": "w " * 500}])
    with pytest.raises(PromptTooLong, match="too long.*shorten it"):
        fit_to_context(prompt, words, context_tokens=200, reply_tokens=50)


def test_reply_budget_larger_than_context_is_refused():
    with pytest.raises(PromptTooLong, match="lower max_new_tokens"):
        fit_to_context(conversation(0), words, context_tokens=100, reply_tokens=100)


@pytest.mark.model
def test_real_tokenizer_chat_template_and_truncation(engine):
    fitted = fit_to_context(conversation(30), engine.count_tokens, context_tokens=300, reply_tokens=64)
    assert engine.count_tokens(fitted) <= 300 - 64
    assert fitted[0]["content"] == "be brief" and fitted[-1]["content"] == "newest question"
    rendered = engine.tokenizer.apply_chat_template(fitted, add_generation_prompt=True, tokenize=False)
    # The chat template (ChatML for SmolLM2) is the prompt format, not a hand-written one.
    assert rendered.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")


def test_a_lone_message_is_sent_once():
    only = [{"role": "user", "content": "Tell me about cats."}]
    assert fit_to_context(Prompt(only), lambda m: 10 * len(m), 100, 10) == only
