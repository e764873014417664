"""The Personas tab's form (chatbot/persona_form.py): persona <-> form values, saves and drafts, without a browser."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatbot.persona_files import update_persona_text
from chatbot.personas import PersonaError, PersonaLibrary, example_chats, parse_persona
from chatbot.persona_form import FormSave, broken_files, draft, form_changes, form_values, open_for_editing, save_form

REPO = Path(__file__).resolve().parent.parent
LIBRARY = PersonaLibrary(REPO / "personas")


@pytest.mark.parametrize("persona_id", sorted(LIBRARY.personas))
def test_an_untouched_form_changes_nothing(persona_id):
    loaded = LIBRARY.get(persona_id)
    values = form_values(loaded.persona)
    assert form_changes(loaded.persona, values) == {}
    assert update_persona_text(loaded.text, form_changes(loaded.persona, values)) == loaded.text


def test_slider_rounding_is_not_a_change():
    persona = LIBRARY.get("pirate").persona
    values = form_values(persona)
    values[9] = persona.generation.temperature + 0.001  # what a slider's re-rounding looks like
    values[13] = float(persona.generation.max_new_tokens)  # sliders send floats
    assert form_changes(persona, values) == {}


def test_form_values_become_schema_values():
    persona = LIBRARY.get("pirate").persona
    values = form_values(persona)
    values[4] = "Ahoy!\n\n  Avast!  \n"  # alternate greetings, one per line
    values[6] = [["1", "Hi", "Arr."], ["", "", ""], ["", "Bye", "Fair winds."],  # a blank row is dropped
                 ["2", "", "*spits*"]]  # a chat of its own, a lone assistant line
    values[8] = " sea, , tales "  # tags
    values[11] = 20.0  # top_k from a number box
    values[14] = -1  # seed: random
    changes = form_changes(persona, values)
    assert changes == {
        "alternate_greetings": ["Ahoy!", "Avast!"],
        "example_dialogue": [{"user": "Hi", "assistant": "Arr."}, {"user": "Bye", "assistant": "Fair winds."},
                             [{"assistant": "*spits*"}]],
        "tags": ["sea", "tales"],
        "generation": {"top_k": 20},
    }
    text = update_persona_text(LIBRARY.get("pirate").text, changes)
    parsed = parse_persona(text, "pirate.yaml")
    assert parsed.generation.top_k == 20 and parsed.tags == ["sea", "tales"]
    values[14] = 7
    assert form_changes(persona, values)["generation"] == {"top_k": 20, "seed": 7}


def test_a_row_with_one_side_is_a_lone_message_of_its_chat():
    loaded = LIBRARY.get("pirate")
    values = form_values(loaded.persona)
    values[6] = [["1", "Hi", ""], ["1", "", "Arr."], ["3", "", "*waves*"]]
    text = update_persona_text(loaded.text, form_changes(loaded.persona, values))
    chats = [[(m["role"], m["content"]) for m in chat] for chat in example_chats(parse_persona(text, "p.yaml"))]
    assert chats == [[("user", "Hi"), ("assistant", "Arr.")], [("assistant", "*waves*")]]
    assert form_values(parse_persona(text, "p.yaml"))[6] == [["1", "Hi", "Arr."], ["2", "", "*waves*"]]


def test_the_lorebook_table_edits_entries_and_keeps_their_other_fields(tmp_path):
    text = (LIBRARY.get("pirate").text + "lorebook:\n  scan_depth: 3\n  entries:\n"
            "    - {name: Isle, keys: [isle], content: An isle., priority: 7, secondary_keys: [gold]}\n")
    persona = parse_persona(text, "p.yaml")
    values = form_values(persona)
    assert values[17] == [["Isle", "isle", "An isle.", "before_char", "false", "true"]]
    values[17] = [["Isle", "isle, island", "An isle of gold.", "after_char", "false", "true"],
                  ["Ship", "ship", "The Black Pearl.", "at_depth", "true", "true"]]
    changed = parse_persona(update_persona_text(text, form_changes(persona, values)), "p.yaml").lorebook
    isle, ship = changed.entries
    assert (isle.keys, isle.content, isle.position, isle.priority, isle.secondary_keys) == \
        (["isle", "island"], "An isle of gold.", "after_char", 7, ["gold"])  # priority, secondary keys kept
    assert ship.constant and ship.position == "at_depth" and changed.scan_depth == 3
    values[17] = [["Bad", "x", "y", "middle", "false", "true"]]
    with pytest.raises(PersonaError, match="lorebook row 1: position 'middle'"):
        form_changes(persona, values)


# -- saving the form and trying a draft (chatbot/persona_form.py) ---------------------------------------


@pytest.fixture
def folder(tmp_path):
    import shutil

    folder = tmp_path / "personas"
    folder.mkdir()
    shutil.copy(REPO / "personas" / "pirate.yaml", folder)
    return folder


def test_saving_an_untouched_form_writes_nothing(folder):
    library = PersonaLibrary(folder)
    editing = open_for_editing(library, "pirate", {})
    before = (folder / "pirate.yaml").read_text()
    assert save_form(library, editing, form_values(editing.loaded.persona)) == FormSave({})
    assert (folder / "pirate.yaml").read_text() == before


def test_saving_writes_only_the_changed_field_into_the_file_as_it_is_now(folder):
    library = PersonaLibrary(folder)
    editing = open_for_editing(library, "pirate", {})
    values = form_values(editing.loaded.persona)
    values[8] = "sea, tales"  # tags, changed in the form
    path = folder / "pirate.yaml"
    path.write_text(path.read_text() + "# added on disk meanwhile\n")  # another edit since it was opened
    result = save_form(library, editing, values)
    assert result.changes == {"tags": ["sea", "tales"]} and result.merged
    text = path.read_text()
    assert "# added on disk meanwhile" in text and result.saved.persona.tags == ["sea", "tales"]
    assert result.saved.persona.system_prompt == editing.loaded.persona.system_prompt


def test_saving_a_file_gone_meanwhile_is_refused(folder):
    library = PersonaLibrary(folder)
    editing = open_for_editing(library, "pirate", {})
    values = form_values(editing.loaded.persona)
    values[0] = "Captain Bluebeard"
    (folder / "pirate.yaml").unlink()
    with pytest.raises(PersonaError, match="is gone from the personas folder"):
        save_form(library, editing, values)


def test_a_draft_is_the_form_validated_and_not_saved(folder):
    library = PersonaLibrary(folder)
    editing = open_for_editing(library, "pirate", {})
    before = (folder / "pirate.yaml").read_text()
    values = form_values(editing.loaded.persona)
    values[2] = "You are {{char}}, a pirate who only speaks in rhymes."
    drafted = draft(editing, values)
    assert drafted.persona.system_prompt == values[2] and drafted.version != editing.version
    assert (folder / "pirate.yaml").read_text() == before
    values[0] = ""  # the name is required
    with pytest.raises(PersonaError, match="name"):
        draft(editing, values)


def test_a_broken_file_opens_with_its_text_and_problem(folder):
    (folder / "broken.yaml").write_text("name: [unclosed\n")
    library = PersonaLibrary(folder)
    broken = broken_files(library)
    assert list(broken) == ["broken"]
    editing = open_for_editing(library, "broken", broken)
    assert editing.loaded is None and editing.text == "name: [unclosed\n" and editing.problem == broken["broken"]
    with pytest.raises(PersonaError, match="does not load"):
        draft(editing, form_values(None))
