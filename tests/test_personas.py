from pathlib import Path

import pytest

from chatbot.personas import PersonaError, PersonaLibrary, load_persona

GOOD = "name: Tester\nsystem_prompt: You test.\ngreeting: Hi!\n"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_shipped_personas_all_load_and_differ(personas):
    assert len(personas.personas) >= 3
    assert personas.errors == []
    prompts = {p.persona.system_prompt for p in personas.personas.values()}
    assert len(prompts) == len(personas.personas)


def test_id_is_file_name_and_version_is_content_hash(tmp_path):
    path = write(tmp_path, "tester", GOOD)
    first = load_persona(path)
    assert first.id == "tester" and first.persona.name == "Tester"
    assert first.persona.generation.max_new_tokens == 256  # defaults fill what the file omits
    path.write_text(GOOD + "description: changed\n")
    assert load_persona(path).version != first.version
    path.write_text(GOOD)
    assert load_persona(path).version == first.version


@pytest.mark.parametrize("text, expected", [
    ("name: [unclosed\n", "not valid YAML"),
    ("- a list\n", "expected a mapping"),
    (GOOD + "colour: red\n", "colour: Extra inputs are not permitted"),
    ("name: T\ngreeting: Hi\n", "system_prompt: Field required"),
    (GOOD + "generation:\n  temperature: hot\n", "generation.temperature"),
    (GOOD + "generation:\n  max_new_tokens: 0\n", "generation.max_new_tokens"),
])
def test_broken_file_reported_by_name_and_field_others_still_load(tmp_path, text, expected):
    write(tmp_path, "good", GOOD)
    bad = write(tmp_path, "bad", text)
    library = PersonaLibrary(tmp_path)
    assert library.ids() == ["good"]
    assert len(library.errors) == 1
    assert str(bad) in library.errors[0] and expected in library.errors[0]


def test_unknown_persona_and_missing_folder(tmp_path):
    write(tmp_path, "good", GOOD)
    with pytest.raises(PersonaError, match="unknown persona 'nope' \\(known: good\\)"):
        PersonaLibrary(tmp_path).get("nope")
    with pytest.raises(PersonaError, match="does not exist"):
        PersonaLibrary(tmp_path / "missing")
