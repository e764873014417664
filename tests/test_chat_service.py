"""ChatService: what lands in the SQLite file for each user action (replies from FakeEngine)."""

import pytest

from chatbot.chat import ChatError, params_for
from chatbot.prompting import PromptTooLong


@pytest.fixture
def service(fake_service):
    """ChatService on FakeEngine: what is stored does not depend on what the model says.

    (The real model's replies through ChatService: test_hardening_chat.py, test_persona_character.py.)
    """
    return fake_service


def reply_of(replies):
    replies = list(replies)
    return replies[-1]


def short(session, **kw):
    return params_for(session.persona, max_new_tokens=12, **kw)


def test_send_stores_greeting_user_message_and_reply_with_everything_to_rebuild_it(service, store):
    user = service.user_id("ada")
    session = service.new_session(user, "pirate")
    assert session.conversation_id is None, "an idle visit stores nothing"
    reply = reply_of(service.send(session, "  Where be the gold?  ", short(session, seed=7)))

    rows = store.conversation_messages(session.conversation_id)
    assert [r.role for r in rows] == ["assistant", "user", "assistant"]
    greeting, asked, answer = rows
    assert greeting.content == session.persona.persona.greeting and greeting.finish_reason == "greeting"
    assert asked.content == "Where be the gold?" and asked.parent_id == greeting.id
    assert answer.parent_id == asked.id and answer.content == reply.text and answer.content.strip()
    assert answer.model_version_id == store.get_or_create_model_version(service.engine.model_id, None)
    assert answer.generation_params["seed"] == 7 and answer.generation_params["max_new_tokens"] == 12
    assert answer.generation_params["temperature"] == session.persona.persona.generation.temperature
    assert answer.prompt[0] == {"role": "system", "content": session.persona.persona.system_prompt}
    assert answer.prompt[-1] == {"role": "user", "content": "Where be the gold?"}
    assert 0 < answer.completion_tokens <= 12 and answer.prompt_tokens > 10
    assert answer.latency_ms > 0 and answer.first_token_ms > 0
    assert answer.finish_reason in ("eos", "length")
    with store.engine.connect() as conn:
        from sqlalchemy import text
        persona_row = conn.execute(text("select persona_id, content_hash, text from persona_versions")).one()
        conv = conn.execute(text("select persona_id, persona_hash, title from conversations")).one()
    assert persona_row == ("pirate", session.persona.version, session.persona.text)
    assert conv == ("pirate", session.persona.version, "Where be the gold?")


def test_retry_stores_a_sibling_and_undo_branches_from_the_turn_before(service, store):
    session = service.new_session(service.user_id("bo"), "assistant")
    reply_of(service.send(session, "Name a colour.", short(session, seed=1)))
    first_id = session.turns[-1].message_id
    reply_of(service.retry(session, short(session, seed=2)))
    second = store.get_message(session.turns[-1].message_id)
    assert second.id != first_id and second.parent_id == store.get_message(first_id).parent_id
    assert len(session.turns) == 3, "the retried reply replaces the old one on screen"

    assert service.undo(session) == "Name a colour."
    assert len(session.turns) == 1
    reply_of(service.send(session, "Name a fruit.", short(session)))
    rows = store.conversation_messages(session.conversation_id)
    users = [r for r in rows if r.role == "user"]
    assert len(users) == 2 and users[0].parent_id == users[1].parent_id == rows[0].id, \
        "the edited message is a sibling branch under the greeting; nothing was deleted"


def test_votes_are_recorded_changed_and_cleared(service, store):
    session = service.new_session(service.user_id("cy"), "socratic_tutor")
    reply_of(service.send(session, "What is 2+2?", short(session)))
    reply_id, user_id = session.turns[2].message_id, session.user_id
    service.vote(session, 2, 1)
    assert store.get_feedback(reply_id, user_id) == 1
    service.vote(session, 2, -1)
    assert store.get_feedback(reply_id, user_id) == -1
    service.vote(session, 2, None)
    assert store.get_feedback(reply_id, user_id) is None
    with pytest.raises(ChatError, match="not a reply"):
        service.vote(session, 1, 1)


def test_voting_on_the_greeting_of_a_fresh_chat_stores_it(service, store):
    session = service.new_session(service.user_id("di"), "pirate")
    service.vote(session, 0, 1)
    assert store.get_feedback(session.turns[0].message_id, session.user_id) == 1


def test_refused_messages_store_nothing(service, store):
    session = service.new_session(service.user_id("ed"), "assistant")
    with pytest.raises(ChatError, match="empty"):
        list(service.send(session, "   ", short(session)))
    with pytest.raises(PromptTooLong, match="too long"):
        list(service.send(session, "word " * 9000, short(session)))
    with pytest.raises(ChatError, match="nothing to undo"):
        service.undo(session)
    with pytest.raises(ChatError, match="no reply to retry"):
        list(service.retry(session, short(session)))
    assert session.conversation_id is None and len(session.turns) == 1
