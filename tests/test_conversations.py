"""Conversation history through ChatService (replies from FakeEngine): tree navigation, resume,
rename, delete, search, export, feedback details, and that one user cannot touch another's."""

import json

import pytest

from chatbot.chat import ChatError, params_for


@pytest.fixture
def service(fake_service):
    """ChatService on FakeEngine: what is stored does not depend on what the model says.

    (The real model's replies through ChatService: test_hardening_chat.py, test_persona_character.py.)
    """
    return fake_service


def reply(replies):
    *_, last = replies
    return last


def quick(session, seed=1):
    return params_for(session.persona, max_new_tokens=6, seed=seed, temperature=1.0)


@pytest.fixture
def ann(service):
    return service.user_id("ann")


def test_retry_siblings_page_back_and_forth_and_resume_on_the_latest_branch(service, ann):
    session = service.new_session(ann, "assistant", "Ann")
    reply(service.send(session, "Name a colour.", quick(session, 1)))
    first = session.turns[-1]
    reply(service.retry(session, quick(session, 2)))
    reply(service.retry(session, quick(session, 3)))
    third = session.turns[-1]
    assert service.sibling_position(session, 2) == (3, 3)
    service.switch_sibling(session, 2, -1)
    service.switch_sibling(session, 2, -1)
    assert session.turns[-1].message_id == first.message_id
    assert service.sibling_position(session, 2) == (1, 3)
    with pytest.raises(ChatError, match="no more versions"):
        service.switch_sibling(session, 2, -1)
    # Continue on the first version: the new turns hang below it.
    reply(service.send(session, "And another?", quick(session)))
    resumed = service.resume(ann, session.conversation_id, "Ann")
    assert [t.message_id for t in resumed.turns] == [t.message_id for t in session.turns]
    service.switch_sibling(resumed, 2, +2)
    assert [t.message_id for t in resumed.turns][-1] == third.message_id and len(resumed.turns) == 3


def test_editing_a_user_message_makes_a_branch_and_its_versions_can_be_paged(service, ann):
    session = service.new_session(ann, "assistant", "Ann")
    reply(service.send(session, "Tell me about cats.", quick(session)))
    reply(service.send(session, "And dogs?", quick(session)))
    reply(service.edit(session, 1, "Tell me about birds.", quick(session)))
    assert [t.content for t in session.turns[:2]][1] == "Tell me about birds." and len(session.turns) == 3
    assert service.sibling_position(session, 1) == (2, 2)
    service.switch_sibling(session, 1, -1)
    assert [t.content for t in session.turns if t.role == "user"] == ["Tell me about cats.", "And dogs?"]
    with pytest.raises(ChatError, match="not one of your messages"):
        list(service.edit(session, 2, "x", quick(session)))


def test_list_search_rename_delete_and_export(service, ann, store):
    a = service.new_session(ann, "pirate", "Ann")
    reply(service.send(a, "Where is the treasure map?", quick(a)))
    b = service.new_session(ann, "assistant", "Ann")
    reply(service.send(b, "What is a prime number?", quick(b)))
    listed = service.conversations(ann)
    assert [c.id for c in listed] == [b.conversation_id, a.conversation_id], "newest first"
    assert listed[1].title == "Where is the treasure map?" and listed[1].persona_id == "pirate"
    assert [c.id for c in service.conversations(ann, "TREASURE")] == [a.conversation_id]
    assert [c.id for c in service.conversations(ann, "prime")] == [b.conversation_id]

    service.vote(a, 2, 1, reason="funny", comment="great voice")
    exported = service.export_conversation(ann, a.conversation_id)
    json.dumps(exported)  # JSON-ready
    assert exported["conversation"]["persona_id"] == "pirate"
    assert "Captain Redbeard" in exported["persona_text"]
    rated = [m for m in exported["messages"] if m["feedback"]]
    assert rated[0]["feedback"]["rating"] == 1 and rated[0]["feedback"]["comment"] == "great voice"
    assert rated[0]["prompt"][0]["role"] == "system"

    service.rename(ann, a.conversation_id, "  Treasure   hunt ")
    assert store.get_conversation(a.conversation_id).title == "Treasure hunt"
    service.delete(ann, a.conversation_id)
    assert [c.id for c in service.conversations(ann)] == [b.conversation_id]
    assert store.conversation_messages(a.conversation_id) == []


def test_another_user_cannot_resume_rename_delete_or_export(service, ann):
    session = service.new_session(ann, "assistant", "Ann")
    reply(service.send(session, "My secret is 42.", quick(session)))
    bob = service.user_id("bob")
    assert service.conversations(bob) == []
    for action in (lambda: service.resume(bob, session.conversation_id),
                   lambda: service.rename(bob, session.conversation_id, "mine"),
                   lambda: service.delete(bob, session.conversation_id),
                   lambda: service.export_conversation(bob, session.conversation_id)):
        with pytest.raises(ChatError, match=f"conversation {session.conversation_id} not found"):
            action()
    assert service.resume(ann, session.conversation_id).turns[1].content == "My secret is 42."


def test_resume_uses_the_persona_version_the_conversation_started_with(service, ann, tmp_path):
    import shutil

    from chatbot.personas import PersonaLibrary

    folder = tmp_path / "personas"
    folder.mkdir()
    shutil.copy(service.personas.folder / "pirate.yaml", folder)
    service.personas = PersonaLibrary(folder)
    session = service.new_session(ann, "pirate", "Ann")
    reply(service.send(session, "Ahoy!", quick(session)))
    (folder / "pirate.yaml").unlink()
    resumed = service.resume(ann, session.conversation_id, "Ann")
    assert resumed.persona.version == session.persona.version
    assert resumed.rendered.system_prompt == session.rendered.system_prompt
