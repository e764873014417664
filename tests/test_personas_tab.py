"""The Personas tab's form <-> persona conversion, without a browser."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatbot.persona_files import update_persona_text
from chatbot.personas import PersonaError, PersonaLibrary, parse_persona
from chatbot.ui.personas_tab import form_changes, form_values

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
    values[6] = [["Hi", "Arr."], ["", ""], ["Bye", "Fair winds."]]  # a blank row is dropped
    values[8] = " sea, , tales "  # tags
    values[11] = 20.0  # top_k from a number box
    values[14] = -1  # seed: random
    changes = form_changes(persona, values)
    assert changes == {
        "alternate_greetings": ["Ahoy!", "Avast!"],
        "example_dialogue": [{"user": "Hi", "assistant": "Arr."}, {"user": "Bye", "assistant": "Fair winds."}],
        "tags": ["sea", "tales"],
        "generation": {"top_k": 20},
    }
    text = update_persona_text(LIBRARY.get("pirate").text, changes)
    parsed = parse_persona(text, "pirate.yaml")
    assert parsed.generation.top_k == 20 and parsed.tags == ["sea", "tales"]
    values[14] = 7
    assert form_changes(persona, values)["generation"] == {"top_k": 20, "seed": 7}


def test_an_emptied_example_row_is_reported_by_the_validator():
    loaded = LIBRARY.get("pirate")
    values = form_values(loaded.persona)
    values[6] = [["Hi", ""]]
    text = update_persona_text(loaded.text, form_changes(loaded.persona, values))
    with pytest.raises(PersonaError, match="example_dialogue.0.assistant"):
        parse_persona(text, "pirate.yaml")
