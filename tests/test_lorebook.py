"""Lorebooks: which entries fire (keys, secondary logic, constants, scan depth, case, whole words,
recursion, budget), where their text goes in the prompt, and the provenance stored with the reply."""

from __future__ import annotations

import pytest
from fake_engine import FakeEngine

from chatbot.chat import ChatService, params_for
from chatbot.knowledge.lorebook import Lorebook, LoreEntry, activate
from chatbot.personas import EXAMPLE_CHAT_MARK, PersonaLibrary, parse_persona
from chatbot.store import ChatStore


def words(text: str) -> int:
    return len(text.split())


def book(*entries: dict, **settings) -> Lorebook:
    return Lorebook(entries=[LoreEntry(**e) for e in entries], **settings)


def said(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 else "assistant", "content": t} for i, t in enumerate(texts)]


def fired(lore: Lorebook, *texts: str) -> dict[str, str | None]:
    return {f.label: f.key for f in activate(lore, said(*texts), words).fired}


def test_an_entry_fires_on_any_of_its_keys_and_says_which():
    lore = book({"name": "glade", "keys": ["glade", "clearing"], "content": "Fireflies light the glade."},
                {"name": "castle", "keys": ["castle"], "content": "The castle is ruined."})
    assert fired(lore, "Welcome.", "Where is the Clearing?") == {"glade": "clearing"}  # any case by default
    assert fired(lore, "Welcome.", "Hello there") == {}


def test_scan_depth_limits_how_far_back_keys_are_looked_for():
    lore = book({"name": "glade", "keys": ["glade"], "content": "lore"}, scan_depth=2)
    assert fired(lore, "the glade", "hm", "and then?") == {}  # three messages back
    assert fired(lore, "x", "the glade", "and then?") == {"glade": "glade"}
    deep = book({"name": "glade", "keys": ["glade"], "content": "lore", "scan_depth": 3}, scan_depth=1)
    assert fired(deep, "the glade", "hm", "and then?") == {"glade": "glade"}  # the entry's own depth


def test_case_sensitive_and_whole_word_keys():
    lore = book({"name": "cs", "keys": ["Ash"], "content": "a", "case_sensitive": True},
                {"name": "ww", "keys": ["cat"], "content": "b", "whole_words": True})
    assert fired(lore, "", "ash and concatenate") == {}
    assert fired(lore, "", "Ash met a cat.") == {"cs": "Ash", "ww": "cat"}


def test_secondary_keys_follow_the_selective_logic():
    def entry(logic, selective=True):
        return {"name": logic, "keys": ["king"], "secondary_keys": ["crown", "throne"], "selective": selective,
                "selective_logic": logic, "content": logic}

    lore = book(*(entry(logic) for logic in ("and_any", "and_all", "not_any", "not_all")))
    assert set(fired(lore, "", "the king")) == {"not_any", "not_all"}
    assert set(fired(lore, "", "the king's crown")) == {"and_any", "not_all"}
    assert set(fired(lore, "", "the king's crown and throne")) == {"and_any", "and_all"}
    assert set(fired(book(entry("and_all", selective=False)), "", "the king")) == {"and_all"}


def test_constant_entries_always_fire_and_disabled_ones_never():
    lore = book({"name": "always", "constant": True, "content": "The world is flat."},
                {"name": "off", "keys": ["flat"], "enabled": False, "content": "x"})
    assert fired(lore, "", "nothing relevant") == {"always": None}


def test_recursive_scanning_lets_fired_text_fire_more_entries():
    entries = ({"name": "a", "keys": ["dragon"], "content": "Dragons guard the mountain."},
               {"name": "b", "keys": ["mountain"], "content": "The mountain is cold."})
    assert set(fired(book(*entries), "", "a dragon!")) == {"a"}
    assert set(fired(book(*entries, recursive_scanning=True), "", "a dragon!")) == {"a", "b"}


def test_the_token_budget_leaves_out_the_lowest_priority_first():
    lore = book({"name": "low", "constant": True, "priority": 1, "content": "one two three four"},
                {"name": "high", "constant": True, "priority": 9, "content": "five six seven"},
                {"name": "mid", "constant": True, "priority": 5, "content": "eight nine"}, token_budget=6)
    result = activate(lore, said("", "hi"), words)
    assert [f.label for f in result.fired] == ["high", "mid"]
    assert [f.label for f in result.over_budget] == ["low"]
    assert {"name": "low", "left_out": "token budget"}.items() <= result.provenance()[-1].items()


PERSONA = """\
name: Seraphina
system_prompt: You are {{char}}.
character: "{{char}} is a guardian of the forest."
greeting: Welcome, {{user}}.
example_dialogue:
  - - assistant: "*{{char}} hums.*"
    - user: Hello
    - assistant: Hello, traveller.
  - user: Who are you?
    assistant: I keep the glade.
depth_prompt: {prompt: "Stay gentle.", depth: 1}
lorebook:
  entries:
    - {name: Glade, keys: [glade], content: "The glade of {{char}} heals wounds.", insertion_order: 2}
    - {name: Forest, keys: [forest], content: "The forest is Eldoria.", position: after_char}
    - {name: Wolves, keys: [wolves], content: "Wolves roam at night.", position: at_depth, depth: 0}
    - {name: Rule, constant: true, content: "Magic has a price.", insertion_order: 1}
"""


@pytest.fixture
def service(tmp_path):
    folder = tmp_path / "personas"
    folder.mkdir()
    (folder / "seraphina.yaml").write_text(PERSONA)
    store = ChatStore.open(f"sqlite:///{tmp_path / 'chat.db'}")
    service = ChatService(FakeEngine(), PersonaLibrary(folder), store)
    yield service
    store.close()


def test_fired_entries_are_placed_around_the_character_and_at_their_depth(service):
    session = service.new_session(service.user_id("ann"), "seraphina", "Ann")
    messages = session.prompt([{"role": "user", "content": "Tell me of the glade, the forest and wolves."}]).messages
    assert messages[0] == {"role": "system", "content": (
        "You are Seraphina.\n\nMagic has a price.\nThe glade of Seraphina heals wounds.\n\n"
        "Seraphina is a guardian of the forest.\n\nThe forest is Eldoria.")}
    # Two example chats, the mark between them, a lone {{char}} line kept; then the real chat.
    assert [m["content"] for m in messages[1:7]] == [
        "*Seraphina hums.*", "Hello", "Hello, traveller.", EXAMPLE_CHAT_MARK, "Who are you?", "I keep the glade."]
    # The character's note one message from the end; the depth-0 entry after the newest message.
    assert messages[7:] == [{"role": "assistant", "content": "Welcome, Ann."},
                            {"role": "system", "content": "Stay gentle."},
                            {"role": "user", "content": "Tell me of the glade, the forest and wolves."},
                            {"role": "system", "content": "Wolves roam at night."}]


def test_a_reply_records_which_entries_fired_and_on_which_key(service):
    session = service.new_session(service.user_id("ann"), "seraphina", "Ann")
    service.engine.queue("The glade is near.")
    list(service.send(session, "Is the GLADE safe?", params_for(session.persona)))
    stored = service.store.get_message(session.turns[-1].message_id)
    lore = stored.provenance["lorebook"]
    assert [(e["name"], e["key"]) for e in lore] == [("Rule", None), ("Glade", "glade")]
    assert stored.prompt[0]["content"].count("heals wounds") == 1  # what provenance names is what was sent
    service.engine.queue("Hm.")
    list(service.send(session, "Goodbye.", params_for(session.persona)))
    later = service.store.get_message(session.turns[-1].message_id)
    assert [e["name"] for e in later.provenance["lorebook"]] == ["Rule", "Glade"]  # "glade" still in scan depth 2


def test_a_broken_lorebook_is_refused_with_the_field_named():
    with pytest.raises(Exception, match=r"lorebook.entries.0.position"):
        parse_persona("name: a\nsystem_prompt: s\ngreeting: g\nlorebook:\n  entries:\n"
                      "    - {keys: [x], content: y, position: middle}\n", "bad.yaml")
    with pytest.raises(Exception, match=r"lorebook.entries.0.keys"):
        parse_persona("name: a\nsystem_prompt: s\ngreeting: g\nlorebook:\n  entries:\n"
                      "    - {keys: ['  '], content: y}\n", "bad.yaml")


WORLD_INFO = {"entries": {
    "0": {"uid": 0, "key": ["dragon", "wyrm"], "keysecondary": ["gold"], "selectiveLogic": 3, "selective": True,
          "comment": "Dragons", "content": "Dragons hoard gold.", "constant": False, "order": 50, "position": 4,
          "depth": 2, "role": 1, "disable": False, "caseSensitive": None, "matchWholeWords": True,
          "probability": 80, "useProbability": True, "group": "beasts", "displayIndex": 1},
    "1": {"uid": 1, "key": ["castle"], "comment": "Castle", "content": "The castle fell long ago.", "order": 10,
          "position": 2, "disable": True, "displayIndex": 0},
}}


def test_a_world_info_file_is_attached_to_a_persona_and_tried_from_the_command_line(tmp_path):
    import json

    from cli_helpers import run_cli

    folder = tmp_path / "personas"
    folder.mkdir()
    (folder / "seraphina.yaml").write_text("# my notes stay\n" + PERSONA)
    (tmp_path / "World.json").write_text(json.dumps(WORLD_INFO))
    done = run_cli("personas", "lorebook", "seraphina", str(tmp_path / "World.json"), "--personas-dir", str(folder))
    assert done.returncode == 0, done.stderr
    assert "lorebook has 6 entries (2 from" in done.stdout
    text = (folder / "seraphina.yaml").read_text()
    assert text.startswith("# my notes stay\n")  # an edit of the file, not a rewrite
    book = PersonaLibrary(folder).get("seraphina").persona.lorebook
    castle, dragons = book.entries[4:]  # in SillyTavern's display order, after the persona's own four
    assert (dragons.comment, dragons.keys, dragons.secondary_keys, dragons.selective_logic) == \
        ("Dragons", ["dragon", "wyrm"], ["gold"], "and_all")
    assert (dragons.position, dragons.depth, dragons.role, dragons.whole_words, dragons.insertion_order) == \
        ("at_depth", 2, "user", True, 50)
    assert dragons.extensions["probability"] == 80 and dragons.extensions["group"] == "beasts"
    assert castle.enabled is False and castle.extensions["position"] == 2  # author's-note top: kept as it was

    done = run_cli("personas", "lore", "seraphina", "A wyrm sits on its gold in the glade",
                   "--personas-dir", str(folder))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any("Dragons" in line and "wyrm" in line and "at_depth 2 (user)" in line for line in lines)
    assert any("Glade" in line and "glade" in line for line in lines)
    assert not any("Castle" in line for line in lines)  # disabled
    done = run_cli("personas", "lore", "seraphina", "A wyrm!", "--personas-dir", str(folder))
    assert "Dragons" not in done.stdout  # and_all: "gold" is missing


def test_attaching_something_that_is_not_world_info_is_one_line_error(tmp_path):
    from cli_helpers import run_cli

    folder = tmp_path / "personas"
    folder.mkdir()
    (folder / "seraphina.yaml").write_text(PERSONA)
    bad = tmp_path / "bad.json"
    bad.write_text('{"entries": "none"}')
    done = run_cli("personas", "lorebook", "seraphina", str(bad), "--personas-dir", str(folder))
    assert done.returncode == 1 and "not a world info file" in done.stderr
    assert (folder / "seraphina.yaml").read_text() == PERSONA  # nothing written


def test_the_chat_shows_under_a_reply_which_entries_reached_its_prompt(service):
    from chatbot.ui.chat_tab import history_of

    session = service.new_session(service.user_id("ann"), "seraphina", "Ann")
    service.engine.queue("Rest here.")
    list(service.send(session, "Take me to the [glade](x)", params_for(session.persona)))
    shown = history_of(session)[-1]["content"]
    assert shown.startswith("Rest here.") and shown.endswith("*📖 Lore: Rule, Glade (glade)*")
    resumed = service.resume(session.user_id, session.conversation_id, "Ann")  # read back from the store
    assert history_of(resumed)[-1]["content"] == shown
    assert "📖" not in history_of(resumed)[-2]["content"]  # the user's own message has no note
