"""Changing persona files: comment-preserving edits, validated atomic saves, create,
duplicate and archive (never delete)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from chatbot.persona_files import archive_persona, create_persona, duplicate_persona, save_persona, update_persona_text
from chatbot.personas import ARCHIVE_DIR, PersonaError, PersonaLibrary, content_hash, parse_persona

REPO = Path(__file__).resolve().parent.parent

COMMENTED = """\
# Top comment about this persona.
name: Captain Redbeard            # required: shown in the picker
# before system prompt
system_prompt: >-                 # required: sent to the model first
  You are Captain Redbeard, an old pirate captain,
  and this line folds.
greeting: 'Arr, ahoy there, matey!' # quoted on purpose
description: A salty pirate.      # optional: shown under the picker
generation:                       # optional: defaults of the settings panel
  temperature: 0.8                # 0..2, 0 = greedy (default 0.7)
  top_p: 0.95                     # (0, 1] (default 0.9)
  # a comment inside
  max_new_tokens: 160             # 1..4096 (default 256)
# trailing comment at end
"""

COMMENT_LINES = [line.strip() for line in COMMENTED.splitlines() if "#" in line]


def comments(text: str) -> list[str]:
    return ["#" + line.split("#", 1)[1] for line in text.splitlines() if "#" in line]


def top_keys(text: str) -> list[str]:
    return list(yaml.safe_load(text))


@pytest.fixture
def library(tmp_path) -> PersonaLibrary:
    folder = tmp_path / "personas"
    shutil.copytree(REPO / "personas", folder)
    (folder / "captain.yaml").write_text(COMMENTED)
    return PersonaLibrary(folder)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- update_persona_text

def test_no_change_returns_the_text_untouched():
    assert update_persona_text(COMMENTED, {}) == COMMENTED
    same = {"name": "Captain Redbeard", "generation": {"temperature": 0.8, "top_k": 50}}
    assert update_persona_text(COMMENTED, same) == COMMENTED, "unchanged values and defaults write nothing"


def test_comments_and_key_order_survive_a_change():
    text = update_persona_text(COMMENTED, {"system_prompt": "You are a calm lighthouse keeper.",
                                           "name": "Keeper"})
    assert comments(text) == comments(COMMENTED)
    assert top_keys(text) == top_keys(COMMENTED)
    data = parse_persona(text, "t.yaml")
    assert data.system_prompt == "You are a calm lighthouse keeper." and data.name == "Keeper"
    # Untouched lines are byte for byte the same.
    untouched = [line for line in COMMENTED.splitlines()
                 if not line.startswith(("name:", "  You are", "  and this"))]
    assert [line for line in text.splitlines() if line in untouched] == untouched
    assert "greeting: 'Arr, ahoy there, matey!' # quoted on purpose" in text


def test_nested_generation_keys_change_in_place():
    text = update_persona_text(COMMENTED, {"generation": {"temperature": 0.3, "top_k": 20, "top_p": 0.95}})
    lines = text.splitlines()
    assert "  temperature: 0.3                # 0..2, 0 = greedy (default 0.7)" in lines
    assert "  top_p: 0.95                     # (0, 1] (default 0.9)" in lines
    # The new key goes at the end of its block, before the comment that closes the file.
    assert lines[-2:] == ["  top_k: 20", "# trailing comment at end"]
    assert comments(text) == comments(COMMENTED)
    generation = parse_persona(text, "t.yaml").generation
    assert (generation.temperature, generation.top_k, generation.max_new_tokens) == (0.3, 20, 160)


def test_emptied_optional_fields_are_removed_and_new_keys_appended_in_schema_order():
    text = update_persona_text(COMMENTED, {"description": "", "tags": ["sea", "story, tales"],
                                           "scenario": "On deck at night.",
                                           "alternate_greetings": ["Ahoy!", "no"]})
    data = yaml.safe_load(text)
    assert "description" not in data
    assert top_keys(text) == ["name", "system_prompt", "greeting", "generation",
                              "alternate_greetings", "scenario", "tags"]
    assert data["alternate_greetings"] == ["Ahoy!", "no"], "'no' stays a string, not False"
    assert data["tags"] == ["sea", "story, tales"]
    assert text.rstrip().endswith("# trailing comment at end")
    assert "# optional: shown under the picker" not in text  # the removed key's own note goes with it
    assert [c for c in comments(COMMENTED) if "shown under" not in c] == comments(text)


def test_multi_line_text_is_written_as_a_block_scalar():
    text = update_persona_text(COMMENTED, {"greeting": "Ahoy!\nWelcome aboard.",
                                           "example_dialogue": [{"user": "Hi", "assistant": "Arr.\nHi."}]})
    assert "greeting: |-  # quoted on purpose\n  Ahoy!\n  Welcome aboard.\n" in text
    data = parse_persona(text, "t.yaml")
    assert data.greeting == "Ahoy!\nWelcome aboard."
    assert data.example_dialogue[0].assistant == "Arr.\nHi."


def test_long_new_text_is_folded_and_reads_back_exactly():
    prompt = " ".join(["You are a very patient tutor who explains things step by step."] * 4)
    text = update_persona_text(COMMENTED, {"scenario": prompt, "system_prompt": prompt})
    assert max(len(line) for line in text.splitlines() if not line.startswith(("greeting", "system", "name"))) <= 80
    data = parse_persona(text, "t.yaml")
    assert data.scenario == prompt and data.system_prompt == prompt


def test_yaml_look_alikes_stay_strings():
    text = update_persona_text(COMMENTED, {"name": "yes", "tags": ["1.5", "null", "on"], "description": "a: b"})
    data = parse_persona(text, "t.yaml")
    assert (data.name, data.tags, data.description) == ("yes", ["1.5", "null", "on"], "a: b")


def test_list_items_change_one_by_one_keeping_comments():
    original = ("name: X\nsystem_prompt: S\ngreeting: G\nexample_dialogue:\n"
                "  - user: a   # first\n    assistant: b\n  # between\n  - user: c\n    assistant: d\n# end\n")
    text = update_persona_text(original, {"example_dialogue": [{"user": "a", "assistant": "B"}]})
    assert text == ("name: X\nsystem_prompt: S\ngreeting: G\nexample_dialogue:\n"
                    "  - user: a   # first\n    assistant: B\n  # between\n# end\n")


def test_required_fields_are_never_removed():
    text = update_persona_text(COMMENTED, {"system_prompt": ""})
    with pytest.raises(PersonaError, match="system_prompt"):
        parse_persona(text, "t.yaml")


def test_broken_yaml_cannot_be_edited_from_the_form():
    with pytest.raises(PersonaError, match="not valid YAML"):
        update_persona_text("name: [unclosed\n", {"name": "x"})


# ---------------------------------------------------------------- saving

def test_save_writes_validates_and_refreshes_the_library(library):
    text = update_persona_text(library.get("captain").text, {"system_prompt": "You are brief."})
    loaded = save_persona(library, "captain", text)
    assert loaded.persona.system_prompt == "You are brief."
    assert library.get("captain").text == text == (library.folder / "captain.yaml").read_text()
    assert comments(text) == comments(COMMENTED)


def test_invalid_change_writes_nothing(library):
    before = snapshot(library.folder)
    old = library.get("captain")
    for bad in [update_persona_text(COMMENTED, {"generation": {"temperature": 5.0}}),
                update_persona_text(COMMENTED, {"name": ""}),
                COMMENTED + "colour: red\n",
                "name: [unclosed\n",
                COMMENTED.replace("name: Captain", "avatar: missing.png\nname: Captain")]:
        with pytest.raises(PersonaError) as error:
            save_persona(library, "captain", bad)
        assert "captain.yaml" in str(error.value)
        assert snapshot(library.folder) == before
    assert library.get("captain") == old
    with pytest.raises(PersonaError, match="temperature"):
        save_persona(library, "captain", update_persona_text(COMMENTED, {"generation": {"temperature": 5.0}}))


def test_save_leaves_no_temporary_files(library):
    names = sorted(p.name for p in library.folder.iterdir())
    save_persona(library, "captain", update_persona_text(COMMENTED, {"name": "Keeper"}))
    save_persona(library, "pirate", update_persona_text(library.get("pirate").text, {"tags": ["sea"]}))
    assert sorted(p.name for p in library.folder.iterdir()) == names


def test_a_failed_write_leaves_the_old_file(library, monkeypatch):
    import os

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(PersonaError, match="No space left"):
        save_persona(library, "captain", update_persona_text(COMMENTED, {"name": "Keeper"}))
    assert (library.folder / "captain.yaml").read_text() == COMMENTED
    assert not [p for p in library.folder.iterdir() if p.name.endswith(".tmp")]


def test_save_refuses_a_file_changed_since_it_was_opened(library):
    opened = library.get("captain")
    (library.folder / "captain.yaml").write_text(COMMENTED.replace("Redbeard", "Bluebeard"))
    with pytest.raises(PersonaError, match="changed on disk"):
        save_persona(library, "captain", COMMENTED, expected_version=opened.version)
    saved = save_persona(library, "captain", COMMENTED, expected_version=content_hash(
        COMMENTED.replace("Redbeard", "Bluebeard")))
    assert saved.persona.name == "Captain Redbeard"


@pytest.mark.parametrize("bad_id", ["", "../evil", "a/b", ".hidden", "x" * 65, "sp ace", "_x", "e\u0301"])  # the last: "é" spelled with a combining accent
def test_bad_ids_are_refused(library, bad_id):
    before = snapshot(library.folder)
    for action in (lambda: save_persona(library, bad_id, COMMENTED),
                   lambda: create_persona(library, bad_id),
                   lambda: duplicate_persona(library, "captain", bad_id),
                   lambda: archive_persona(library, bad_id)):
        with pytest.raises(PersonaError, match="not a safe file name"):
            action()
    assert snapshot(library.folder) == before


# ---------------------------------------------------------------- create, duplicate, archive

def test_create_from_the_template_and_refuse_an_existing_id(library):
    loaded = create_persona(library, "night_owl")
    assert loaded.persona.name == "Night Owl" and "# required" in loaded.text
    assert "night_owl" in library.personas
    before = snapshot(library.folder)
    with pytest.raises(PersonaError, match="already exists"):
        create_persona(library, "night_owl")
    with pytest.raises(PersonaError, match="already exists"):
        create_persona(library, "pirate", COMMENTED)
    with pytest.raises(PersonaError, match="greeting"):
        create_persona(library, "broken", "name: X\nsystem_prompt: S\n")
    assert snapshot(library.folder) == before
    assert create_persona(library, "yes").persona.name == "Yes"  # not YAML's True


def test_duplicate_copies_text_and_avatar(library):
    folder = library.folder
    (folder / "captain.png").write_bytes(b"\x89PNG fake image")
    save_persona(library, "captain", update_persona_text(COMMENTED, {"avatar": "captain.png"}))
    copy = duplicate_persona(library, "captain", "captain2")
    assert copy.persona.name == "Captain Redbeard (copy)"
    assert copy.persona.system_prompt == library.get("captain").persona.system_prompt
    assert comments(copy.text) == comments(library.get("captain").text)
    assert copy.persona.avatar == "captain2.png"
    assert (folder / "captain2.png").read_bytes() == (folder / "captain.png").read_bytes()
    with pytest.raises(PersonaError, match="already exists"):
        duplicate_persona(library, "captain", "pirate")
    with pytest.raises(PersonaError, match="unknown persona"):
        duplicate_persona(library, "nobody", "someone")


def test_archive_moves_files_and_destroys_nothing(library):
    folder = library.folder
    (folder / "captain.png").write_bytes(b"\x89PNG fake image")
    text = update_persona_text(COMMENTED, {"avatar": "captain.png"})
    save_persona(library, "captain", text)
    moved = archive_persona(library, "captain")
    assert "captain" not in library.personas
    assert not (folder / "captain.yaml").exists() and not (folder / "captain.png").exists()
    assert [p.parent for p in moved] == [folder / ARCHIVE_DIR] * 2
    assert moved[0].read_text() == text and moved[0].name.startswith("captain-")
    assert moved[1].read_bytes() == b"\x89PNG fake image"
    # The same id again, archived in the same second: a second file, nothing overwritten.
    create_persona(library, "captain")
    again = archive_persona(library, "captain")
    assert again[0] != moved[0] and moved[0].read_text() == text
    assert len(list((folder / ARCHIVE_DIR).glob("captain-*.yaml"))) == 2
    with pytest.raises(PersonaError, match="no persona"):
        archive_persona(library, "captain")


def test_archive_keeps_an_avatar_another_persona_uses(library):
    folder = library.folder
    (folder / "shared.png").write_bytes(b"img")
    save_persona(library, "captain", update_persona_text(COMMENTED, {"avatar": "shared.png"}))
    save_persona(library, "pirate", update_persona_text(library.get("pirate").text, {"avatar": "shared.png"}))
    archive_persona(library, "captain")
    assert (folder / "shared.png").read_bytes() == b"img"
    assert library.get("pirate").avatar_path == folder / "shared.png"


def test_a_broken_file_can_still_be_archived(library):
    (library.folder / "broken.yaml").write_text("name: [unclosed\n")
    library.refresh()
    assert "broken" not in library.personas and library.errors
    archive_persona(library, "broken")
    assert not library.errors
