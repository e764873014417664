"""The running app serves each persona's promoted adapter, switching per reply, without a restart.

Real bundled model (a fresh engine of this module's own, so the LoRA layers
PEFT injects never reach the session-wide ``engine``), two random LoRA
adapters made for it, registered as evaluated candidates and promoted one
per persona through the store, as `persona-studio models promote` does.
Greedy decoding and a few tokens keep it fast and deterministic.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from chatbot.chat import ChatService, params_for
from chatbot.store.runs import RunStore
from chatbot.transformers_engine import TransformersEngine
from chatbot.store import ChatStore

pytestmark = pytest.mark.model

PASSED = {"evaluation": {"win_rate": {"value": 0.7, "ci": [0.6, 0.8]},
                         "gate": {"passed": True, "checks": [], "bounds": {}}}}


@pytest.fixture(scope="module")
def own_engine(checkpoint) -> TransformersEngine:
    engine = TransformersEngine.load("", checkpoint.parent.parent)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Two random (non-identity) LoRA adapters on the bundled model, one per persona."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = {}
    for seed, persona in enumerate(("pirate", "assistant")):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        folder = tmp_path_factory.mktemp(f"adapter-{persona}")
        get_peft_model(model, config).save_pretrained(folder)
        folders[persona] = folder.resolve()
    return folders


@pytest.fixture
def spies(monkeypatch):
    """Counts base-model loads and, per adapter folder, adapter weight loads (PEFT's one reader)."""
    import peft.peft_model
    from transformers import AutoModelForCausalLM

    import chatbot.transformers_engine

    counts = {"base": 0, "adapters": {}}
    real_load_model, real_from_pretrained = chatbot.transformers_engine.load_model, AutoModelForCausalLM.from_pretrained
    real_weights = peft.peft_model.load_peft_weights

    def load_model(*args, **kwargs):
        counts["base"] += 1
        return real_load_model(*args, **kwargs)

    def from_pretrained(*args, **kwargs):
        counts["base"] += 1
        return real_from_pretrained(*args, **kwargs)

    def load_peft_weights(model_id, *args, **kwargs):
        counts["adapters"][str(model_id)] = counts["adapters"].get(str(model_id), 0) + 1
        return real_weights(model_id, *args, **kwargs)

    monkeypatch.setattr(chatbot.transformers_engine, "load_model", load_model)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(peft.peft_model, "load_peft_weights", load_peft_weights)
    return counts


def register(store: ChatStore, persona: str, folder: Path, base_model: str) -> int:
    runs = RunStore(store.engine)
    run_id = runs.create_run("kto", persona_id=persona)
    return runs.register_candidate(run_id, base_model=base_model, adapter_path=str(folder), metrics=PASSED)


def last_reply(replies):
    return list(replies)[-1]


def test_each_persona_serves_its_promoted_adapter_switching_per_reply(
        own_engine, adapters, personas, store, tmp_path, spies) -> None:
    service = ChatService(own_engine, personas, store)
    user = service.user_id("ada")
    pirate, helper = service.new_session(user, "pirate"), service.new_session(user, "assistant")
    assert pirate.adapter is None and helper.adapter is None, "the shipped personas name no adapter"

    def ask(session, text, *, action="send"):
        params = params_for(session.persona, max_new_tokens=4, temperature=0, seed=1)
        if action == "retry":
            reply = last_reply(service.retry(session, params))
        else:
            reply = last_reply(service.send(session, text, params))
        message = store.get_message(session.turns[-1].message_id)
        assert message.content == reply.text
        return reply, message.model_version_id

    def base_text(reply) -> str:
        return last_reply(own_engine.stream(reply.prompt, reply.params, adapter=None)).text

    base_id = store.get_or_create_model_version(own_engine.model_id, None)
    reply, version = ask(pirate, "Where be the gold?")
    assert version == base_id

    v_pirate = register(store, "pirate", adapters["pirate"], own_engine.model_id)
    v_helper = register(store, "assistant", adapters["assistant"], own_engine.model_id)
    # Promoted from "another process": its own connection pool on the same file, as the CLI would.
    operator = ChatStore.open(f"sqlite:///{tmp_path / 'chat.db'}")
    try:
        operator.promote(v_pirate, by="ops")
        operator.promote(v_helper, by="ops")

        for session, text, want, compare in ((pirate, "And the map?", v_pirate, True),
                                             (helper, "What is 2 + 2?", v_helper, True),
                                             (pirate, "Who sails with ye?", v_pirate, False),
                                             (helper, "Name a colour.", v_helper, False)):
            reply, version = ask(session, text)
            assert version == want
            if compare:
                assert reply.text != base_text(reply), f"version {want} wrote what the base model writes"
        reply, version = ask(helper, None, action="retry")
        assert version == v_helper

        # Rolled back between two replies: the very next pirate reply is the bare base model's again.
        operator.rollback("pirate", by="ops")
        reply, version = ask(pirate, "Back to port?")
        assert version == base_id and reply.text == base_text(reply)

        # Promoted again: served at once, from the adapter already loaded.
        operator.promote(v_pirate, by="ops")
        reply, version = ask(pirate, "Set sail!")
        assert version == v_pirate
    finally:
        operator.close()

    assert spies["base"] == 0, "the base model was loaded again"
    assert spies["adapters"] == {str(adapters["pirate"]): 1, str(adapters["assistant"]): 1}
    # The Feedback tab groups like rates by these ids: before and after are told apart.
    ids = [m.model_version_id for m in store.conversation_messages(pirate.conversation_id) if m.role == "assistant"]
    assert ids == [None, base_id, v_pirate, v_pirate, base_id, v_pirate]  # None: the greeting


def test_a_version_for_another_base_model_is_not_served(
        own_engine, adapters, personas, store, spies, caplog) -> None:
    service = ChatService(own_engine, personas, store)
    other = register(store, "pirate", adapters["pirate"], "some/other-model")
    store.promote(other, by="ops")
    persona = personas.get("pirate")
    with caplog.at_level(logging.WARNING, logger="chatbot.chat"):
        assert service.serving(persona) == service.serving(persona) == (None, None)
    warnings = [r.getMessage() for r in caplog.records if "promoted version" in r.getMessage()]
    assert len(warnings) == 1 and "some/other-model" in warnings[0], "warned once, not per reply"
    session = service.new_session(service.user_id("ada"), "pirate")
    last_reply(service.send(session, "one", params_for(persona, max_new_tokens=2, temperature=0, seed=1)))
    assert store.get_message(session.turns[-1].message_id).model_version_id == \
        store.get_or_create_model_version(own_engine.model_id, None)
    assert spies["adapters"] == {}


def test_try_draft_and_persona_info_follow_the_promotion(own_engine, adapters, personas, store,
                                                        monkeypatch) -> None:
    from chatbot.ui.chat_tab import persona_info

    asked_for = []
    real_stream = own_engine.stream

    def stream(*args, adapter=None, **kwargs):
        asked_for.append(adapter)
        return real_stream(*args, adapter=adapter, **kwargs)

    monkeypatch.setattr(own_engine, "stream", stream)
    service = ChatService(own_engine, personas, store)
    persona = personas.get("pirate")
    params = params_for(persona, max_new_tokens=1, temperature=0, seed=1)
    session = service.new_session(service.user_id("ada"), "pirate")
    last_reply(service.try_draft(persona, "Ahoy?", params))
    assert "model version" not in persona_info(service, session)

    version = register(store, "pirate", adapters["pirate"], own_engine.model_id)
    store.promote(version, by="ops")
    last_reply(service.try_draft(persona, "Ahoy?", params))
    assert asked_for == [None, str(adapters["pirate"])]
    assert f"Served by model version {version}" in persona_info(service, session)
