"""Persona versions, macros, hot reload and adapter overrides, through ChatService.

What reaches the model (prompts, versions) is checked on FakeEngine; the
adapter override, which must change what the model says, on the real model.
"""

import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from chatbot.chat import ChatError, ChatService, params_for
from chatbot.transformers_engine import TransformersEngine
from chatbot.personas import PersonaLibrary
from chatbot.store import ChatStore

REPO_PERSONAS = Path(__file__).resolve().parent.parent / "personas"

PERSONA = """# a test persona
name: Mira
system_prompt: You are {{char}}. Always call the user {{USER}}.
greeting: Hello {{user}}, I am {{char}}.
alternate_greetings:
  - Hi {{user}}!
example_dialogue:
  - user: Who are you, {{char}}?
    assistant: I am {{ char }}, at your service, {{user}}.
post_history_instructions: Stay {{char}}.
generation:
  temperature: 0
  max_new_tokens: 8
"""


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "personas"
    folder.mkdir()
    (folder / "mira.yaml").write_text(PERSONA)
    return folder


@pytest.fixture
def engine(fake_engine):
    """FakeEngine: the tests that take it check what reaches the model, not what it says."""
    return fake_engine


def make_service(engine, folder, db_path):
    return ChatService(engine, PersonaLibrary(folder), ChatStore.open(f"sqlite:///{db_path}"))


def test_macros_expand_everywhere_text_reaches_the_model(engine, folder, tmp_path):
    service = make_service(engine, folder, tmp_path / "chat.db")
    session = service.new_session(service.user_id("Ann"), "mira", "Ann", greeting=1)
    assert session.turns[0].content == "Hi Ann!"
    *_, reply = service.send(session, "hello", params_for(session.persona))
    assert reply.prompt[0] == {"role": "system", "content": "You are Mira. Always call the user Ann."}
    assert reply.prompt[1:3] == [{"role": "user", "content": "Who are you, Mira?"},
                                 {"role": "assistant", "content": "I am Mira, at your service, Ann."}]
    assert reply.prompt[-1] == {"role": "user", "content": "hello\n\n(Stay Mira.)"}
    assert "{{" not in str(reply.prompt)
    with pytest.raises(ChatError, match="no greeting number 5"):
        service.new_session(service.user_id("Ann"), "mira", "Ann", greeting=5)


def test_versions_on_messages_hot_reload_and_stable_across_restarts(engine, folder, tmp_path):
    db = tmp_path / "chat.db"
    service = make_service(engine, folder, db)
    user = service.user_id("Ann")
    old = service.new_session(user, "mira", "Ann")
    *_, _ = service.send(old, "first", params_for(old.persona))

    # Edit the file on disk: the running chat stays on its version, a new chat gets the new one.
    (folder / "mira.yaml").write_text(PERSONA.replace("Always call", "Politely call"))
    *_, reply = service.send(old, "second", params_for(old.persona))
    assert "Always call" in reply.prompt[0]["content"]
    new = service.new_session(user, "mira", "Ann")
    assert new.persona.version != old.persona.version
    *_, reply = service.send(new, "third", params_for(new.persona))
    assert "Politely call" in reply.prompt[0]["content"]

    # A restart (a new store and library on the same files) sees the same versions and texts.
    service.store.close()
    restarted = make_service(engine, folder, db)
    assert restarted.personas.get("mira").version == new.persona.version
    with restarted.store.engine.connect() as conn:
        by_conversation = dict(conn.execute(text(
            "select conversation_id, group_concat(distinct persona_hash) from messages "
            "group by conversation_id")).all())
        texts = dict(conn.execute(text("select content_hash, text from persona_versions")).all())
    assert by_conversation == {old.conversation_id: old.persona.version,
                               new.conversation_id: new.persona.version}
    assert texts == {old.persona.version: PERSONA,
                     new.persona.version: PERSONA.replace("Always call", "Politely call")}


def test_new_and_deleted_files_are_picked_up_without_restart(engine, folder, tmp_path):
    service = make_service(engine, folder, tmp_path / "chat.db")
    shutil.copy(REPO_PERSONAS / "pirate.yaml", folder / "pirate.yaml")
    session = service.new_session(service.user_id("Ann"), "pirate", "Ann")
    assert session.persona.persona.name == "Captain Redbeard"
    (folder / "pirate.yaml").unlink()
    with pytest.raises(Exception, match="unknown persona 'pirate'"):
        service.new_session(service.user_id("Ann"), "pirate", "Ann")


@pytest.mark.model
def test_adapter_override_serves_a_lora_adapter_per_persona_on_one_base_model(checkpoint, folder, tmp_path, request):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # A LoRA adapter with random (non-zero) weights, so it visibly changes the replies.
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(folder / "mira-lora")
    del lora, base
    (folder / "mira_tuned.yaml").write_text(PERSONA + "adapter: mira-lora\n")

    engine = TransformersEngine.load(str(checkpoint), tmp_path, "float32")
    request.addfinalizer(engine.close)
    service = make_service(engine, folder, tmp_path / "chat.db")
    user = service.user_id("Ann")

    def reply(persona_id):
        session = service.new_session(user, persona_id, "Ann")
        *_, r = service.send(session, "Tell me a story.", params_for(session.persona))
        return r.text, service.store.get_message(session.turns[-1].message_id).model_version_id

    plain, plain_version = reply("mira")
    tuned, tuned_version = reply("mira_tuned")
    again, _ = reply("mira")
    assert tuned != plain, "the adapter changes the reply"
    assert again == plain, "switching back serves the bare base model"
    assert plain_version != tuned_version
    with service.store.engine.connect() as conn:
        adapter_path = conn.execute(text("select adapter_path from model_versions where id = :i"),
                                    {"i": tuned_version}).scalar()
    assert adapter_path == str((folder / "mira-lora").resolve())

    (folder / "broken.yaml").write_text(PERSONA + "adapter: no-such-adapter\n")
    session = service.new_session(user, "broken", "Ann")
    with pytest.raises(ChatError, match="cannot load LoRA adapter"):
        list(service.send(session, "hi", params_for(session.persona)))
