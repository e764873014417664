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


def test_unsafe_ids_are_refused(tmp_path):
    from chatbot.personas import check_id

    for bad in ("../x", "a/b", "..", ".hidden", "with space", "", "x" * 65, "_x", "-x", "a\\b",
                "zoe\u0308"):  # the last: "zoë" with a combining mark, where its one-letter form is the id
        with pytest.raises(PersonaError, match="not a safe file name"):
            check_id(bad)
    for good in ("code_reviewer-2", "爱", "zoë", "Ольга"):  # letters of any script
        assert check_id(good) == good
    write(tmp_path, "good", GOOD)
    write(tmp_path, "bad name", GOOD)
    library = PersonaLibrary(tmp_path)
    assert library.ids() == ["good"]
    assert "bad name.yaml" in library.errors[0] and "not a safe file name" in library.errors[0]


def test_oversized_file_is_refused(tmp_path):
    write(tmp_path, "huge", GOOD + "description: " + "x" * 300_000 + "\n")
    library = PersonaLibrary(tmp_path)
    assert library.ids() == [] and "larger than 256 KiB" in library.errors[0]


def test_avatar_must_be_an_image_next_to_the_file(tmp_path):
    write(tmp_path, "a", GOOD + "avatar: ../secret.png\n")
    write(tmp_path, "b", GOOD + "avatar: notes.txt\n")
    write(tmp_path, "c", GOOD + "avatar: missing.png\n")
    write(tmp_path, "d", GOOD + "avatar: d.png\n")
    (tmp_path / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    library = PersonaLibrary(tmp_path)
    assert library.ids() == ["d"] and library.get("d").avatar_path == tmp_path / "d.png"
    errors = "\n".join(library.errors)
    assert "avatar: Value error, must be a file name next to the persona file" in errors
    assert "avatar: Value error, must be an image" in errors
    assert "avatar: file missing.png not found" in errors


def test_full_schema_round_trip(tmp_path):
    import yaml

    from chatbot.knowledge.lorebook import LoreEntry
    from chatbot.personas import Persona

    entry = LoreEntry(keys=["k"], secondary_keys=["s"], selective_logic="not_any", content="lore", constant=True,
                      case_sensitive=True, whole_words=True, enabled=False, insertion_order=3, priority=7,
                      position="at_depth", depth=2, role="user", scan_depth=5, id=4, name="n", comment="c",
                      extensions={"probability": 50}).model_dump()
    data = {
        "name": "Full", "system_prompt": "sys", "greeting": "hi", "description": "d",
        "character": "who", "personality": "bold",
        "alternate_greetings": ["hey"], "scenario": "s",
        "example_dialogue": [{"user": "q", "assistant": "a"},
                             [{"user": None, "assistant": "alone"}, {"user": "then", "assistant": None}]],
        "post_history_instructions": "p",
        "depth_prompt": {"prompt": "note", "depth": 1, "role": "assistant"},
        "lorebook": {"name": "book", "description": "bd", "scan_depth": 3, "token_budget": 100,
                     "recursive_scanning": True, "entries": [entry], "extensions": {"z": 1}},
        "knowledge": {"files": ["docs/", "faq.md"], "top_k": 2, "min_score": 0.5, "token_budget": 99},
        "generation": {"temperature": 0.2, "top_p": 0.8, "top_k": 5, "repetition_penalty": 1.3,
                       "max_new_tokens": 50, "seed": 9},
        "tags": ["t"], "avatar": None, "model": "m", "adapter": "lora", "extensions": {"x": {"y": 1}},
    }
    persona = Persona(**data)
    assert persona.model_dump() == data
    assert Persona(**yaml.safe_load(yaml.safe_dump(persona.model_dump()))) == persona


def test_macros_any_case_and_spacing():
    from chatbot.personas import expand_macros

    assert expand_macros("{{char}} meets {{ USER }} and {{Char}}; {{other}}", "Mira", "Ann") == \
        "Mira meets Ann and Mira; {{other}}"


def test_refresh_notices_changed_added_and_removed_files(tmp_path):
    write(tmp_path, "a", GOOD)
    library = PersonaLibrary(tmp_path)
    assert library.refresh() is False
    write(tmp_path, "b", GOOD)
    assert library.refresh() is True and library.ids() == ["a", "b"]
    write(tmp_path, "a", GOOD.replace("Tester", "Renamed") + "\n")
    assert library.refresh() is True and library.get("a").persona.name == "Renamed"
    (tmp_path / "b.yaml").unlink()
    assert library.refresh() is True and library.ids() == ["a"]
