"""Card import and export, on fixtures built here from the public specs.

Card V2: github.com/malfoyslastname/character-card-spec-v2 (PNG: base64 JSON in a
`chara` tEXt chunk). Card V3: github.com/kwaroran/character-card-spec-v3 (`ccv3`
chunk, preferred over `chara`). text-generation-webui: `characters/*.yaml` with
name/greeting/context, or the older char_name/char_persona/... keys.
"""

import base64
import datetime
import json

import pytest
import yaml
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from chatbot.persona_cards import (
    export_card_v2,
    import_card,
    normalise_text,
    parse_examples,
    png_text_chunks,
)
from chatbot.personas import PersonaError, PersonaLibrary, example_chats, load_persona, parse_persona

V2_DATA = {
    "name": "Seraphina",
    "description": "{{char}} is the guardian elf of the Eldoria forest.\nShe has long pink hair.",
    "personality": "caring, protective, gentle",
    "scenario": "<USER> wakes up in <BOT>'s glade.",
    "first_mes": "*Seraphina kneels beside you.*\r\nYou're awake, {{User}}!",
    "mes_example": ("<START>\n{{user}}: Who are you?\n{{char}}: I am Seraphina, guardian of this forest.\n"
                    "{{user}}: Where am I?\n<BOT>: In my glade.\nYou are safe here.\n"
                    "<START>\n{{char}}: *hums a quiet tune while tending the fire*"),
    "creator_notes": "A gentle forest guardian.\n\nBest with 8k context; see the lorebook for the forest.",
    "system_prompt": "{{original}} Never speak for {{user}}.",
    "post_history_instructions": "{{original}}Stay in character as {{char}}.",
    "alternate_greetings": ["*The glade is quiet.* Oh, {{user}}, you came back.", ""],
    "character_book": {"name": "Eldoria", "extensions": {}, "entries": [
        {"keys": ["glade"], "content": "A hidden glade.", "extensions": {}, "enabled": True,
         "insertion_order": 0}]},
    "tags": ["fantasy", "elf", ""],
    "creator": "someone",
    "character_version": "1.2",
    "extensions": {"talkativeness": "0.5", "depth_prompt": {"prompt": "Be kind.", "depth": 4}},
}
# SillyTavern also writes the V1 fields at the top level, plus its own bookkeeping.
V2_CARD = {"name": "Seraphina", "description": V2_DATA["description"], "first_mes": V2_DATA["first_mes"],
           "avatar": "none", "create_date": "2024-1-1 @12h", "spec": "chara_card_v2", "spec_version": "2.0",
           "data": V2_DATA}

V3_DATA = {
    "name": "Aria", "nickname": "Ari", "description": "{{char}} is a starship AI.", "personality": "",
    "scenario": "", "first_mes": "Systems online. Hello, {{user}}.", "mes_example": "",
    "creator_notes": "Sci-fi companion.", "system_prompt": "", "post_history_instructions": "",
    "alternate_greetings": [], "group_only_greetings": ["Hello, crew."], "tags": ["sci-fi"],
    "creator": "", "character_version": "", "extensions": {},
    "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
    "source": ["https://example.org/aria"], "creation_date": 1700000000, "modification_date": 1700000100,
    "creator_notes_multilingual": {"de": "Sci-Fi-Begleiterin."},
}
V3_CARD = {"spec": "chara_card_v3", "spec_version": "3.0", "data": V3_DATA}

WEBUI_OLD = """\
char_name: Chiharu Yamada
char_persona: <BOT> is a young computer engineer who loves old hardware.
char_greeting: '*Chiharu looks up from her desk.* Oh, hi!'
world_scenario: A cluttered university lab.
example_dialogue: |-
  You: What are you building?
  Chiharu Yamada: A retro console, of course!
your_name: You
"""

WEBUI_NEW = """\
name: Chiharu Yamada
greeting: |-
  *Chiharu strides into the room with a smile.*
  Hey! I'm so excited to finally meet you.
context: |-
  Chiharu Yamada's Persona: Chiharu Yamada is a young computer engineer.

  {{user}}: So how did you get into computer engineering?
  {{char}}: I've always loved tinkering with technology.
"""

TODAY = datetime.date(2025, 5, 17)


def b64json(card: dict) -> str:
    return base64.b64encode(json.dumps(card).encode("utf-8")).decode("ascii")


def make_png(path, chunks: dict[str, str], kind: str = "tEXt"):
    """A 4x4 PNG with the given text chunks, written by Pillow as a card tool would."""
    info = PngInfo()
    for key, value in chunks.items():
        if kind == "iTXt":
            info.add_itxt(key, value, zip=True)
        else:
            info.add_text(key, value, zip=kind == "zTXt")
    Image.new("RGB", (4, 4), (200, 80, 120)).save(path, pnginfo=info)
    return path


def write_json(path, card):
    path.write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    return path


def install(result, folder):
    """Write an import result the way the CLI does and load it back."""
    if result.avatar is not None:
        (folder / result.avatar_name).write_bytes(result.avatar)
    path = folder / f"{result.persona_id}.yaml"
    path.write_text(result.yaml_text, encoding="utf-8")
    return load_persona(path)


def chats(persona) -> list[list[tuple[str, str]]]:
    """The persona's example chats as (role, text) pairs."""
    return [[(m["role"], m["content"]) for m in chat] for chat in example_chats(persona)]


def contains(big, small) -> bool:
    """Everything in `small` is in `big` with the same value (mappings may have more keys)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and contains(big[k], v) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(big) == len(small) and all(map(contains, big, small))
    return big == small


def assert_seraphina(result, tmp_path):
    p = result.persona
    assert result.persona_id == "seraphina"
    assert p.name == "Seraphina"
    # The card's own prompt, `{{original}}` kept for send time; the definition in its own fields.
    assert p.system_prompt == "{{original}} Never speak for {{user}}."
    assert p.character == "{{char}} is the guardian elf of the Eldoria forest.\nShe has long pink hair."
    assert p.personality == "caring, protective, gentle"
    assert p.greeting == "*Seraphina kneels beside you.*\nYou're awake, {{user}}!"
    assert p.alternate_greetings == ["*The glade is quiet.* Oh, {{user}}, you came back."]
    assert p.scenario == "{{user}} wakes up in {{char}}'s glade."
    # Each <START> block is an example chat of its own; a {{char}}-only one too.
    assert chats(p) == [
        [("user", "Who are you?"), ("assistant", "I am Seraphina, guardian of this forest."),
         ("user", "Where am I?"), ("assistant", "In my glade.\nYou are safe here.")],
        [("assistant", "*hums a quiet tune while tending the fire*")]]
    assert p.post_history_instructions == "{{original}}Stay in character as {{char}}."
    assert p.tags == ["fantasy", "elf"]
    assert p.description == "A gentle forest guardian."
    assert p.depth_prompt.model_dump() == {"prompt": "Be kind.", "depth": 4, "role": "system"}
    entry = p.lorebook.entries[0]
    assert p.lorebook.name == "Eldoria" and entry.keys == ["glade"] and entry.content == "A hidden glade."
    assert entry.insertion_order == 0 and entry.position == "after_char"  # a card's default place
    ext = p.extensions
    assert ext["creator_notes"] == V2_DATA["creator_notes"]
    assert ext["creator"] == "someone" and ext["character_version"] == "1.2"
    assert ext["extensions"] == {"talkativeness": "0.5"}
    assert ext["card_top_level"] == {"avatar": "none", "create_date": "2024-1-1 @12h"}
    assert set(ext) == {"creator_notes", "creator", "character_version", "extensions", "card_top_level"}
    for pair in [("data.name", "name"), ("data.system_prompt", "system_prompt"),
                 ("data.description", "character"), ("data.personality", "personality"),
                 ("data.first_mes", "greeting"), ("data.alternate_greetings", "alternate_greetings"),
                 ("data.scenario", "scenario"), ("data.mes_example", "example_dialogue"),
                 ("data.post_history_instructions", "post_history_instructions"),
                 ("data.tags", "tags"), ("data.creator_notes", "description"),
                 ("data.character_book", "lorebook"), ("data.extensions.depth_prompt", "depth_prompt"),
                 ("data.extensions", "extensions.extensions"), ("data.creator", "extensions.creator")]:
        assert pair in result.mapping
    # The text on disk is a persona file: it validates, loads, and says where it came from.
    assert parse_persona(result.yaml_text, "x") == p
    assert result.yaml_text.startswith("# Imported by `persona-studio personas import` on 2025-05-17\n")
    assert "character: |" in result.yaml_text  # multi-line text as a block, not "...\n..."
    loaded = install(result, tmp_path)
    assert PersonaLibrary(tmp_path).get("seraphina").persona == p
    return loaded


def test_v2_json(tmp_path):
    result = import_card(write_json(tmp_path / "seraphina.json", V2_CARD), today=TODAY)
    assert result.source_format == "Character Card V2 (JSON)"
    assert result.avatar is None and result.persona.avatar is None
    assert_seraphina(result, tmp_path)
    assert "from seraphina.json (Character Card V2 (JSON))" in result.yaml_text


@pytest.mark.parametrize("kind", ["tEXt", "zTXt", "iTXt"])
def test_v2_png(tmp_path, kind):
    source = make_png(tmp_path / "card.png", {"chara": b64json(V2_CARD)}, kind)
    result = import_card(source, today=TODAY)
    assert result.source_format == "Character Card V2 (PNG)"
    assert result.avatar_name == "seraphina.png" and result.persona.avatar == "seraphina.png"
    assert ("PNG image", "avatar") in result.mapping
    folder = tmp_path / "personas"
    folder.mkdir()
    loaded = assert_seraphina(result, folder)
    # The avatar is the same picture, without the card inside it.
    with Image.open(loaded.avatar_path) as image:
        assert image.size == (4, 4) and image.getpixel((0, 0)) == (200, 80, 120)
    assert png_text_chunks(loaded.avatar_path.read_bytes(), "avatar") == {}


def test_v3_png_prefers_ccv3_and_keeps_v3_fields(tmp_path):
    old = {"spec": "chara_card_v2", "spec_version": "2.0", "data": dict(V2_DATA, name="Old Name")}
    source = make_png(tmp_path / "aria card.png", {"chara": b64json(old), "ccv3": b64json(V3_CARD)})
    result = import_card(source, today=TODAY)
    p = result.persona
    assert result.source_format == "Character Card V3 (PNG)"
    assert result.persona_id == "aria" and p.name == "Aria"
    assert p.system_prompt == "{{original}}" and p.character == "{{char}} is a starship AI."
    assert p.greeting == "Systems online. Hello, {{user}}." and p.description == "Sci-fi companion."
    assert p.example_dialogue == [] and p.alternate_greetings == [] and p.tags == ["sci-fi"]
    for key in ("nickname", "group_only_greetings", "assets", "source", "creation_date",
                "modification_date", "creator_notes_multilingual"):
        assert p.extensions[key] == V3_DATA[key]
        assert (f"data.{key}", f"extensions.{key}") in result.mapping
    # Empty fields carry nothing and are not kept.
    assert "creator" not in p.extensions and "extensions" not in p.extensions
    loaded = install(result, tmp_path)
    assert loaded.avatar_path.name == "aria.png"


def test_v1_json_with_legacy_placeholders(tmp_path):
    card = {"name": "Bob", "description": "<BOT> fixes bikes.", "personality": "grumpy",
            "scenario": "", "first_mes": "What do you want, <USER>?",
            "mes_example": "<USER>: Can you fix it?\n<BOT>: Maybe.", "creatorcomment": "A mechanic.",
            "talkativeness": "0.5"}
    result = import_card(write_json(tmp_path / "bob.json", card))
    p = result.persona
    assert result.source_format == "Character Card V1 (JSON)"
    assert p.system_prompt == "{{original}}"
    assert p.character == "{{char}} fixes bikes." and p.personality == "grumpy"
    assert p.greeting == "What do you want, {{user}}?" and p.description == "A mechanic."
    assert chats(p) == [[("user", "Can you fix it?"), ("assistant", "Maybe.")]]
    assert p.extensions == {"talkativeness": "0.5"}
    assert ("first_mes", "greeting") in result.mapping


def test_webui_yaml_old_keys_with_avatar(tmp_path):
    source = tmp_path / "Chiharu.yaml"
    source.write_text(WEBUI_OLD)
    Image.new("RGB", (2, 2)).save(tmp_path / "Chiharu.png")
    result = import_card(source)
    p = result.persona
    assert result.source_format == "text-generation-webui character (YAML)"
    assert result.persona_id == "chiharu_yamada" and p.name == "Chiharu Yamada"
    assert p.system_prompt == ("{{char}}'s Persona: "
                               "{{char}} is a young computer engineer who loves old hardware.")
    assert p.greeting == "*Chiharu looks up from her desk.* Oh, hi!"
    assert p.scenario == "A cluttered university lab."
    # Speakers named by the literal names count as {{user}} and {{char}}.
    assert chats(p) == [[("user", "What are you building?"), ("assistant", "A retro console, of course!")]]
    assert p.extensions == {"your_name": "You"}
    assert ("char_persona", "system_prompt") in result.mapping
    assert ("char_greeting", "greeting") in result.mapping
    assert ("Chiharu.png", "avatar") in result.mapping and result.avatar_name == "chiharu_yamada.png"
    folder = tmp_path / "personas"
    folder.mkdir()
    assert install(result, folder).avatar_path.is_file()


def test_webui_yaml_current_keys(tmp_path):
    source = tmp_path / "chiharu.yml"
    source.write_text(WEBUI_NEW)
    p = import_card(source).persona
    assert p.name == "Chiharu Yamada"
    assert p.greeting.startswith("*Chiharu strides") and p.greeting.endswith("meet you.")
    # webui sends the whole context, example lines included, as the system message: so do we.
    assert p.system_prompt == yaml.safe_load(WEBUI_NEW)["context"]
    assert p.extensions == {}


def test_export_then_import_round_trips(tmp_path):
    original = install(import_card(write_json(tmp_path / "in.json", V2_CARD)), tmp_path)
    card = export_card_v2(original)
    assert card["spec"] == "chara_card_v2" and card["spec_version"] == "2.0"
    data = card["data"]
    assert set(data) >= {"name", "description", "personality", "scenario", "first_mes", "mes_example",
                         "creator_notes", "system_prompt", "post_history_instructions",
                         "alternate_greetings", "character_book", "tags", "creator",
                         "character_version", "extensions"}
    # The definition goes back to its own fields, with nothing of this app's added.
    for key in ("name", "description", "personality", "scenario", "system_prompt", "post_history_instructions",
                "creator_notes", "creator", "character_version"):
        assert data[key] == normalise_text(V2_DATA[key]), key  # `<USER>` read as `{{user}}`, and so on
    assert data["tags"] == ["fantasy", "elf"]
    assert data["first_mes"] == original.persona.greeting
    assert contains(data["character_book"], V2_DATA["character_book"])  # all of the book, SillyTavern's fields added
    assert data["extensions"] == {"talkativeness": "0.5", "depth_prompt": {"prompt": "Be kind.", "depth": 4,
                                                                         "role": "system"}}
    assert card["avatar"] == "none"  # the source's top-level bookkeeping goes back where it was
    blocks, narration = parse_examples(data["mes_example"], ["{{char}}"], ["{{user}}"])
    assert len(blocks) == 2 and blocks[1] == [{"assistant": "*hums a quiet tune while tending the fire*"}]
    assert narration == []
    again = import_card(write_json(tmp_path / "out.json", card)).persona
    assert again == original.persona.model_copy(update={"avatar": None})


def test_shipped_persona_round_trips_with_its_settings(personas, tmp_path):
    for loaded in personas.personas.values():
        path = write_json(tmp_path / f"{loaded.id}.json", export_card_v2(loaded))
        again = import_card(path).persona
        # Examples come back as the same chats, written as lists (each <START> block is one).
        assert chats(again) == chats(loaded.persona), loaded.id
        same = {"avatar": None, "example_dialogue": again.example_dialogue}
        assert again == loaded.persona.model_copy(update=same), loaded.id


def test_each_example_block_is_a_chat_of_its_own_and_narration_is_kept_apart():
    text = ("Narration first.\n{{char}}: Hi.\n{{char}}: Still me.\n{{user}}: Hello\n{{char}}: Welcome\n"
            "<START>\n{{user}}: Anyone?\n")
    blocks, narration = parse_examples(text, ["{{char}}"], ["{{user}}"])
    assert blocks == [[{"assistant": "Hi.\nStill me."}, {"user": "Hello"}, {"assistant": "Welcome"}],
                      [{"user": "Anyone?"}]]
    assert narration == ["Narration first."]


@pytest.mark.parametrize("change, expected", [
    ({"first_mes": "", "alternate_greetings": []}, "data.first_mes: empty"),
    ({"name": "  "}, "data.name: empty"),
    ({"tags": "x", "first_mes": 3.5, "description": ["a"]}, "data.description: expected text"),
    ({"character_book": "x"}, "data.character_book: expected an object with a list of entries"),
    ({"character_book": {"entries": [{"keys": ["k"], "content": "c", "extensions": {"role": 1, "depth": -2}}]}},
     r"data.character_book.entries\[0\]: depth: Input should be greater than or equal to 0"),
])
def test_bad_cards_name_file_and_field(tmp_path, change, expected):
    path = write_json(tmp_path / "bad.json", {**V2_CARD, "data": {**V2_DATA, **change}})
    with pytest.raises(PersonaError, match=expected) as info:
        import_card(path)
    assert str(info.value).startswith(str(path))


def test_first_alternate_greeting_stands_in_for_an_empty_first_mes(tmp_path):
    path = write_json(tmp_path / "c.json", {**V2_CARD, "data": {**V2_DATA, "first_mes": ""}})
    result = import_card(path)
    assert result.persona.greeting.startswith("*The glade is quiet.*")
    assert result.persona.alternate_greetings == []
    assert ("data.alternate_greetings[0]", "greeting") in result.mapping


@pytest.mark.parametrize("name, content, expected", [
    ("persona.yaml", "name: X\nsystem_prompt: You are X.\ngreeting: Hi\n", "is a persona file"),
    ("notes.json", '{"title": "nope"}', "not a character card"),
    ("list.json", "[1, 2]", "expected a character card"),
    ("broken.json", '{"spec": ', "not valid JSON"),
])
def test_not_a_card(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PersonaError, match=expected):
        import_card(path)


def test_png_without_a_card(tmp_path):
    path = make_png(tmp_path / "plain.png", {"Comment": "just a picture"})
    with pytest.raises(PersonaError, match="no character card"):
        import_card(path)


def test_unicode_name_gets_a_safe_id_and_explicit_id_wins(tmp_path):
    path = write_json(tmp_path / "ゆき.json", {**V2_CARD, "data": {**V2_DATA, "name": "Élodie ✨ Dubois"}})
    assert import_card(path).persona_id == "elodie_dubois"
    path = write_json(tmp_path / "yuki.json", {**V2_CARD, "data": {**V2_DATA, "name": "ゆき"}})
    assert import_card(path).persona_id == "ゆき"  # any script's letters make an id
    path = write_json(tmp_path / "love.json", {**V2_CARD, "data": {**V2_DATA, "name": "爱"}})
    assert import_card(path).persona_id == "爱"
    path = write_json(tmp_path / "stars.json", {**V2_CARD, "data": {**V2_DATA, "name": "✨✨"}})
    assert import_card(path).persona_id == "stars"  # no letters at all: the file's stem
    result = import_card(make_png(tmp_path / "c.png", {"chara": b64json(V2_CARD)}), persona_id="sera-2")
    assert result.persona_id == "sera-2" and result.persona.avatar == "sera-2.png"
    with pytest.raises(PersonaError, match="not a safe file name"):
        import_card(path, persona_id="../evil")


def test_unicode_text_is_written_as_is(tmp_path):
    card = {**V2_CARD, "data": {**V2_DATA, "first_mes": "こんにちは、{{user}}！"}}
    path = write_json(tmp_path / "y.json", card)
    result = import_card(path)
    assert "greeting: こんにちは、{{user}}！\n" in result.yaml_text  # allow_unicode: no \u escapes
    assert result.persona.greeting == "こんにちは、{{user}}！"


def test_a_png_card_export_carries_both_versions_and_the_avatar_and_imports_back(tmp_path):
    from chatbot.persona_cards import export_card_png

    folder = tmp_path / "personas"
    folder.mkdir()
    original = install(import_card(make_png(tmp_path / "card.png", {"chara": b64json(V2_CARD)})), folder)
    png = export_card_png(original)
    chunks = png_text_chunks(png, "exported")
    v2, v3 = (json.loads(base64.b64decode(chunks[k])) for k in ("chara", "ccv3"))
    assert v2["spec"] == "chara_card_v2" and v3["spec"] == "chara_card_v3" and v3["spec_version"] == "3.0"
    assert v2["data"]["description"] == v3["data"]["description"] == original.persona.character
    assert v3["data"]["group_only_greetings"] == [] and v3["data"]["character_book"]["entries"][0]["use_regex"] is False
    exported = tmp_path / "out.png"
    exported.write_bytes(png)
    result = import_card(exported, persona_id="again")
    assert result.source_format == "Character Card V3 (PNG)"  # ccv3 is preferred, as readers do
    v3_fields = ("name", "system_prompt", "character", "personality", "scenario", "greeting", "example_dialogue",
                 "depth_prompt", "post_history_instructions", "description", "tags")
    assert all(getattr(result.persona, f) == getattr(original.persona, f) for f in v3_fields)
    assert result.persona.lorebook.entries[0].content == original.persona.lorebook.entries[0].content
    # The V2 chunk alone (a V2-only reader): exactly the persona again.
    v2_only = import_card(make_png(tmp_path / "v2.png", {"chara": chunks["chara"]}), persona_id="again").persona
    assert v2_only.model_copy(update={"avatar": None}) == original.persona.model_copy(update={"avatar": None})
    (folder / "again.png").write_bytes(result.avatar)
    with Image.open(folder / "again.png") as image:
        assert image.size == (4, 4) and image.getpixel((0, 0)) == (200, 80, 120)


def test_a_persona_without_an_avatar_exports_a_png_card_too(personas):
    from chatbot.persona_cards import export_card_png

    png = export_card_png(personas.get("pirate"))
    assert set(png_text_chunks(png, "x")) == {"chara", "ccv3"}


def test_v3_export_puts_v3_fields_back_where_they_were_and_adds_nothing_of_its_own(tmp_path):
    from chatbot.persona_cards import export_card_v3

    original = install(import_card(write_json(tmp_path / "aria.json", V3_CARD)), tmp_path)
    data = export_card_v3(original)["data"]
    for key in ("nickname", "group_only_greetings", "assets", "source", "creation_date", "modification_date",
                "creator_notes_multilingual"):
        assert data[key] == V3_DATA[key], key
    assert data["system_prompt"] == "" and data["description"] == V3_DATA["description"]
    assert data["extensions"] == {}  # nothing under persona_studio: the card had nothing the app added


def test_import_faults_tags_text_and_a_png_cut_short(tmp_path):
    card = {**V2_CARD, "data": {**V2_DATA, "tags": "fantasy, elf ,, forest"}}
    assert import_card(write_json(tmp_path / "t.json", card)).persona.tags == ["fantasy", "elf", "forest"]
    whole = make_png(tmp_path / "whole.png", {"chara": b64json(V2_CARD)}).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[:-12])  # everything but the IEND chunk
    with pytest.raises(PersonaError, match="PNG is truncated"):
        import_card(cut)


def test_original_is_kept_in_the_file_and_resolved_when_sent(tmp_path):
    from chatbot.personas import DEFAULT_SYSTEM_PROMPT, render

    loaded = install(import_card(write_json(tmp_path / "s.json", V2_CARD)), tmp_path)
    rendered = render(loaded, "Ann")
    assert rendered.system_prompt.startswith(DEFAULT_SYSTEM_PROMPT.replace("{{char}}", "Seraphina")
                                             .replace("{{user}}", "Ann") + " Never speak for Ann.\n\n"
                                             "Seraphina is the guardian elf")
    assert rendered.post_history_instructions == "Stay in character as Seraphina."
