"""Character cards in and out: SillyTavern Card V1/V2/V3 and text-generation-webui characters.

`import_card(path)` reads a card (JSON, or PNG with a `ccv3`/`chara` text chunk)
or a text-generation-webui character (YAML or JSON) and returns the text of a
persona file, the suggested id, the avatar (a PNG card is its own avatar) and a
report of which source field went where. `export_card_v2`/`export_card_v3` turn
a persona back into a card dict, `export_card_png` into a PNG card. Specs:
github.com/malfoyslastname/character-card-spec-v2, github.com/kwaroran/character-card-spec-v3,
text-generation-webui `modules/chat.py`. The persona is sent as SillyTavern
sends a card (chatbot/personas.py `render`).

How a card maps (`data.*` for V2/V3; the same names at the top level for V1):

| card field                  | persona field                                                   |
|-----------------------------|-----------------------------------------------------------------|
| name                        | name                                                            |
| system_prompt               | system_prompt, as written (`{{original}}` is resolved when sent |
|                             | to the app's main prompt); empty -> `{{original}}`              |
| description                 | character (sent after the system prompt)                        |
| personality                 | personality (sent as "{{char}}'s personality: ...")             |
| scenario                    | scenario (sent as "Scenario: ...")                              |
| first_mes                   | greeting (empty: the first alternate greeting, else an error)   |
| alternate_greetings         | alternate_greetings                                             |
| mes_example                 | example_dialogue: each `<START>` block one example chat, a list |
|                             | of user/assistant messages (lone `{{char}}:` lines included);   |
|                             | narration before a block's first speaker (never sent) ->        |
|                             | extensions.mes_example_unpaired                                 |
| post_history_instructions   | post_history_instructions (`{{original}}` -> "" when sent)      |
| character_book              | lorebook (chatbot/knowledge/world_info.py)                      |
| extensions.depth_prompt     | depth_prompt (the character's note, sent at its depth)          |
| creator_notes (V1: creatorcomment) | description: its first paragraph, at most 200 characters |
|                             | (it is the card's text for people); the full text also goes to  |
|                             | extensions.creator_notes when that is not the same              |
| tags                        | tags (a text "a, b" is split at its commas)                     |
| creator, character_version, extensions, and V3's nickname, assets,                    |
| group_only_greetings, source, creator_notes_multilingual, creation_date,              |
| modification_date, and any other key -> extensions.<same key>                         |
| V2/V3 top-level keys that are not copies of `data` (SillyTavern's avatar, chat,       |
| create_date, ...) -> extensions.card_top_level                                         |

text-generation-webui: name (or char_name, bot) -> name; context, or the old
char_persona as "{{char}}'s Persona: ..." -> system_prompt; greeting (or
char_greeting) -> greeting; world_scenario -> scenario; example_dialogue ->
example_dialogue as above; your_name and anything else -> extensions. An image
with the same stem next to the file becomes the avatar, as in the webui.

Text is normalised: legacy `<BOT>`/`<USER>` and `{{Char}}`-style spellings
become `{{char}}`/`{{user}}` (the app expands them at send time), line endings
become `\\n`, trailing spaces go. Values kept in `extensions` are stored as read.

Export is the table read backwards: every card field from its persona field
(system_prompt `{{original}}` alone -> ""), each kept extension back to the
field it came from, extensions.card_top_level back to the top level (V2).
Only what a card has no field for (generation settings, model, adapter, a
description edited away from the notes) goes under data.extensions.persona_studio,
which import reads back: export then import gives the same persona, but for the
avatar (a JSON card carries no image). V3 adds its required fields
(group_only_greetings, assets, use_regex) with the spec's defaults when absent.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
import struct
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .knowledge.world_info import lorebook_from_card, lorebook_to_card
from .personas import (
    AVATAR_SUFFIXES,
    MAX_AVATAR_PIXELS,
    MAX_FILE_BYTES,
    GenerationSettings,
    LoadedPersona,
    Persona,
    PersonaError,
    check_id,
    example_chats,
    parse_persona,
    safe_json,
    safe_yaml,
)

MAX_SOURCE_BYTES = 32 * 1024 * 1024  # card PNGs are a few MB; refuse anything absurd
MAX_PNG_TEXT_BYTES = MAX_SOURCE_BYTES  # all text chunks of a PNG together, decompressed
ORIGINAL = "{{original}}"  # a card's "the frontend's own prompt goes here"; resolved when sent
DESCRIPTION_CHARS = 200
NAMESPACE = "persona_studio"  # our key in a card's data.extensions
UNPAIRED = "mes_example_unpaired"  # narration in example blocks: kept, never sent (as in SillyTavern)
# Persona fields a card has no place for: exported under data.extensions.persona_studio, read back on import.
OWN_FIELDS = ("description", "generation", "model", "adapter", "knowledge")
TOP_LEVEL = "card_top_level"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_CHUNK_KEYWORDS = ("ccv3", "chara")  # in order of preference (Card V3 spec)
CARD_SPECS = {"chara_card_v2": "Character Card V2", "chara_card_v3": "Character Card V3"}
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
V2_FIELDS = (*V1_FIELDS, "creator_notes", "system_prompt", "post_history_instructions",
             "alternate_greetings", "character_book", "tags", "creator", "character_version",
             "extensions")
WEBUI_NAME_KEYS = ("name", "char_name", "bot", "<|bot|>")
WEBUI_USER_KEYS = ("your_name", "user_name", "user", "<|user|>")


@dataclass
class ImportResult:
    persona_id: str  # suggested id: the name made safe for check_id
    yaml_text: str  # a persona file; validates with parse_persona
    persona: Persona
    mapping: list[tuple[str, str]]  # (source field, persona field or "extensions.<key>")
    source_format: str  # e.g. "Character Card V2 (PNG)"
    avatar: bytes | None = None  # image to write next to the persona as `avatar_name`
    avatar_name: str | None = None


@dataclass
class _Draft:
    """Persona fields being filled from a source, and the report of where each came from."""

    fields: dict[str, Any] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)
    mapping: list[tuple[str, str]] = field(default_factory=list)

    def put(self, source: str, target: str, value: Any) -> None:
        if not _blank(value):
            self.fields[target] = value
            self.mapping.append((source, target))

    def keep(self, source: str, key: str, value: Any) -> None:
        if not _blank(value):
            self.extensions[key] = value
            self.mapping.append((source, f"extensions.{key}"))


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and not value)


# --- text helpers -------------------------------------------------------------------------

_LEGACY = re.compile(r"<(BOT|USER)>|\{\{\s*(char|user)\s*\}\}", re.IGNORECASE)


def normalise_text(text: str) -> str:
    """`<BOT>`, `{{ Char }}` -> `{{char}}` (same for user); `\\n` line ends, no trailing spaces."""
    text = _LEGACY.sub(lambda m: "{{char}}" if (m.group(1) or m.group(2)).lower() in ("bot", "char")
                       else "{{user}}", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _text(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise PersonaError(f"{where}{key}: expected text, got {type(value).__name__}")
    return normalise_text(value)


def _text_list(data: dict, key: str, where: str, commas: bool = False) -> list[str]:
    """A list of texts; one text is a list of one, or with `commas` ("a, b" tags) split at its commas."""
    value = data.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",") if commas else [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise PersonaError(f"{where}{key}: expected a list of texts")
    items = [normalise_text(str(v)) for v in value]
    return list(dict.fromkeys(item for item in items if item))  # no empties (the schema refuses them)


def _short_description(notes: str) -> str:
    """The first paragraph, on one line, cut at a word to DESCRIPTION_CHARS."""
    first = " ".join(re.split(r"\n\s*\n", notes.strip(), maxsplit=1)[0].split())
    if len(first) <= DESCRIPTION_CHARS:
        return first
    return first[:DESCRIPTION_CHARS - 1].rsplit(" ", 1)[0].rstrip(" ,;:.") + "…"


def parse_examples(text: str, char_labels: list[str], user_labels: list[str]):
    """`<START>` blocks of `{{user}}: ...` / `{{char}}: ...` lines -> (example chats, narration).

    Each block is an example chat of its own, as SillyTavern sends it: a list of
    {"user": ...} / {"assistant": ...} messages, lone `{{char}}:` lines included.
    A turn runs until the next speaker line; consecutive turns of one speaker are
    joined. Text before a block's first speaker (narration, which SillyTavern
    does not send) is returned apart, one string per block, so nothing is lost.
    """
    labels = [(label, "user") for label in user_labels] + [(label, "char") for label in char_labels]
    labels.sort(key=lambda item: -len(item[0]))  # "{{char}}" before a name that is its prefix
    speaker = re.compile(r"^\s*(" + "|".join(re.escape(lbl) for lbl, _ in labels) + r")\s*:[ \t]?(.*)$",
                         re.IGNORECASE)
    role_of = {lbl.lower(): role for lbl, role in labels}
    chats, narrations = [], []
    for block in re.split(r"^\s*<START>\s*$", text, flags=re.IGNORECASE | re.MULTILINE):
        preamble, turns = [], []  # turns: [role, lines]
        for line in block.split("\n"):
            match = speaker.match(line)
            if match:
                role = role_of[match.group(1).lower()]
                if turns and turns[-1][0] == role:
                    turns[-1][1].append(match.group(2))
                else:
                    turns.append([role, [match.group(2)]])
            elif turns:
                turns[-1][1].append(line)
            else:
                preamble.append(line)
        chat = [{"user" if role == "user" else "assistant": said}
                for role, said in ((role, "\n".join(lines).strip()) for role, lines in turns) if said]
        if chat:
            chats.append(chat)
        narration = "\n".join(preamble).strip()
        if narration:
            narrations.append(narration)
    return chats, narrations


def render_examples(chats: list[list[dict]], narrations: list[str] = ()) -> str:
    """Example chats ({role, content} messages) and narration as a card's mes_example: `<START>` blocks."""
    blocks = ["<START>\n" + "\n".join(f"{{{{{'user' if m['role'] == 'user' else 'char'}}}}}: {m['content']}"
                                       for m in chat) for chat in chats]
    blocks += [f"<START>\n{text}" for text in narrations]
    return "\n".join(blocks)


def suggest_id(name: str, fallback: str = "") -> str:
    """A persona id from a name: its letters and digits joined by `_`, at most 64 characters.

    Accents go where the letter has a plain Latin form ("Zoë" -> "zoe"); other
    scripts stay as they are ("爱" -> "爱"), since an id is any script's letters.
    """
    for candidate in (name, fallback, "character"):
        letters = "".join(c for c in unicodedata.normalize("NFKD", candidate) if not unicodedata.combining(c))
        slug = re.sub(r"[\W_]+", "_", unicodedata.normalize("NFC", letters).lower()).strip("_")[:64].rstrip("_")
        if slug:
            return check_id(slug)
    raise AssertionError("unreachable")


# --- reading the source -------------------------------------------------------------------

def _png_chunks(png: bytes, where: str):
    """(type, body, whole chunk) of each chunk up to IEND; PersonaError for a file cut short."""
    if not png.startswith(PNG_SIGNATURE):
        raise PersonaError(f"{where}: not a PNG file")
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(png):  # a download cut short: what is missing may be the card itself
            raise PersonaError(f"{where}: PNG is truncated (it ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        end = pos + 12 + length
        if end > len(png):
            raise PersonaError(f"{where}: PNG is truncated (its {kind.decode('latin-1')} chunk is cut short)")
        yield kind, png[pos + 8:pos + 8 + length], png[pos:end]
        if kind == b"IEND":
            return
        pos = end


def png_pixels(png: bytes, where: str) -> int:
    """Width x height from the IHDR chunk; PersonaError past MAX_AVATAR_PIXELS.

    The pixels are not decoded here, but every thumbnail and browser showing the
    avatar would: a 20000x20000 picture compresses to kilobytes and decodes to 1.6 GB.
    """
    kind, body, _ = next(_png_chunks(png, where))
    if kind != b"IHDR" or len(body) < 8:
        raise PersonaError(f"{where}: PNG does not start with its IHDR chunk")
    width, height = struct.unpack(">II", body[:8])
    if width * height > MAX_AVATAR_PIXELS:
        raise PersonaError(f"{where}: the image is {width}x{height} pixels, over the "
                           f"{MAX_AVATAR_PIXELS / 1e6:.1f} million pixels of an avatar")
    return width * height


class _TooMuchText(Exception):
    """The text chunks of a PNG decompress to more than MAX_PNG_TEXT_BYTES."""


def _inflate(data: bytes, budget: int) -> bytes:
    """zlib data, decompressing at most `budget` + 1 bytes: a few KB can inflate to gigabytes."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, budget + 1)
    if len(out) > budget:
        raise _TooMuchText
    if not inflater.eof:
        raise zlib.error("incomplete or truncated stream")
    return out


def png_text_chunks(png: bytes, where: str) -> dict[str, str]:
    """Keyword -> text of the tEXt, zTXt and iTXt chunks (the first of each keyword).

    All of them together may hold at most MAX_PNG_TEXT_BYTES, decompressed.
    """
    texts, budget = {}, MAX_PNG_TEXT_BYTES
    for kind, body, _ in _png_chunks(png, where):
        try:
            if kind == b"tEXt":
                key, _, value = body.partition(b"\0")
            elif kind == b"zTXt":
                key, _, value = body.partition(b"\0")
                value = _inflate(value[1:], budget)
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _language, _, rest = rest.partition(b"\0")
                _translated, _, value = rest.partition(b"\0")
                value = _inflate(value, budget) if compressed else value
            else:
                continue
            budget -= len(value)
            if budget < 0:
                raise _TooMuchText
            text = value.decode("utf-8" if kind == b"iTXt" else "latin-1")
        except _TooMuchText:
            raise PersonaError(f"{where}: the PNG's text chunks hold more than "
                               f"{MAX_PNG_TEXT_BYTES // 2**20} MiB of text") from None
        except (zlib.error, UnicodeDecodeError, IndexError) as exc:
            raise PersonaError(f"{where}: broken {kind.decode()} chunk in PNG: {exc}") from None
        texts.setdefault(key.decode("latin-1"), text)
    return texts


def strip_card_chunks(png: bytes) -> bytes:
    """The PNG without its card text chunks: the avatar should not carry a stale copy of the card."""
    out = [PNG_SIGNATURE]
    for kind, body, chunk in _png_chunks(png, "PNG"):
        keyword = body[:80].partition(b"\0")[0].decode("latin-1")
        if kind in (b"tEXt", b"zTXt", b"iTXt") and (
                keyword in CARD_CHUNK_KEYWORDS or keyword.startswith("chara-ext-asset_")):
            continue
        out.append(chunk)
    return b"".join(out)


def _card_from_png(png: bytes, where: str) -> tuple[dict, str]:
    texts = png_text_chunks(png, where)
    for keyword in CARD_CHUNK_KEYWORDS:
        if keyword in texts:
            try:
                payload = base64.b64decode(texts[keyword].strip(), validate=False).decode("utf-8")
            except (binascii.Error, ValueError) as exc:
                raise PersonaError(f"{where}: the {keyword!r} chunk is not base64 JSON: {exc}") from None
            return safe_json(payload, f"{where} ({keyword} chunk)"), keyword
    raise PersonaError(f"{where}: PNG has no character card in it (no 'ccv3' or 'chara' text chunk)")


def _read_structured(raw: bytes, where: str) -> Any:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PersonaError(f"{where}: neither a PNG nor UTF-8 text") from None
    if text.lstrip().startswith(("{", "[")):
        return safe_json(text, where)
    return safe_yaml(text, where)


# --- mapping ------------------------------------------------------------------------------

def _map_card(card: dict, where: str, prefix: str) -> _Draft:
    """A Card V1/V2/V3 field dict -> persona fields; `prefix` ("data." or "") names source fields."""
    at = f"{where}: {prefix}"
    draft, used = _Draft(), set()

    def text(key):
        used.add(key)
        return _text(card, key, at)

    name = text("name")
    if not name:
        raise PersonaError(f"{at}name: empty; a persona needs a name")
    draft.put(prefix + "name", "name", name)

    # The card's own prompt, or `{{original}}` (the app's main prompt, as a frontend's own stands in
    # for an empty one); the definition in its own fields, sent after it as SillyTavern sends them.
    own = text("system_prompt")
    draft.fields["system_prompt"] = own or ORIGINAL
    draft.mapping.append((prefix + "system_prompt", "system_prompt" if own else "system_prompt ({{original}})"))
    draft.put(prefix + "description", "character", text("description"))
    draft.put(prefix + "personality", "personality", text("personality"))

    alternates = _text_list(card, "alternate_greetings", at)
    used.add("alternate_greetings")
    greeting = text("first_mes")
    if greeting:
        draft.put(prefix + "first_mes", "greeting", greeting)
    elif alternates:
        draft.put(prefix + "alternate_greetings[0]", "greeting", alternates.pop(0))
    else:
        raise PersonaError(f"{at}first_mes: empty; a persona needs a greeting")
    draft.put(prefix + "alternate_greetings", "alternate_greetings", alternates)
    draft.put(prefix + "scenario", "scenario", text("scenario"))

    chats, narrations = parse_examples(text("mes_example"), ["{{char}}", name], ["{{user}}"])
    draft.put(prefix + "mes_example", "example_dialogue", chats)
    draft.keep(prefix + "mes_example", UNPAIRED, narrations)

    draft.put(prefix + "post_history_instructions", "post_history_instructions", text("post_history_instructions"))
    draft.put(prefix + "tags", "tags", _text_list(card, "tags", at, commas=True))
    used.add("tags")
    if not _blank(card.get("character_book")):
        draft.put(prefix + "character_book", "lorebook",
                  lorebook_from_card(card["character_book"], f"{at}character_book").model_dump(exclude_defaults=True))
    used.add("character_book")

    notes_key = "creator_notes" if "creator_notes" in card else "creatorcomment"
    notes = text(notes_key)
    draft.put(prefix + notes_key, "description", _short_description(notes))
    if notes and draft.fields.get("description") != notes:
        draft.keep(prefix + notes_key, notes_key, card[notes_key])

    extensions = card.get("extensions")
    used.add("extensions")
    if isinstance(extensions, dict) and isinstance(extensions.get(NAMESPACE), dict):
        extensions = dict(extensions)
        _restore_own_fields(draft, extensions.pop(NAMESPACE), prefix + f"extensions.{NAMESPACE}.")
    depth_prompt = _depth_prompt(extensions)
    if depth_prompt is not None:
        extensions = {k: v for k, v in extensions.items() if k != "depth_prompt"}
        draft.put(prefix + "extensions.depth_prompt", "depth_prompt", depth_prompt)
    draft.keep(prefix + "extensions", "extensions", extensions)
    for key, value in card.items():  # creator, character_version, character_book, V3 fields, the rest
        if key not in used:
            draft.keep(prefix + key, key, value)
    return draft


def _depth_prompt(extensions: Any) -> dict | None:
    """SillyTavern's character note (`extensions.depth_prompt`) as a persona's depth_prompt; None when
    there is none, or it is not one this can read (it then stays in extensions as it was)."""
    note = extensions.get("depth_prompt") if isinstance(extensions, dict) else None
    if not isinstance(note, dict) or not isinstance(note.get("prompt"), str) or not note["prompt"].strip():
        return None
    depth, role = note.get("depth", 4), note.get("role", "system")
    if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= 1000 \
            or role not in ("system", "user", "assistant"):
        return None
    return {"prompt": normalise_text(note["prompt"]), "depth": depth, "role": role}


def _restore_own_fields(draft: _Draft, saved: dict, source: str) -> None:
    """Read back what export_card_v2 put under data.extensions.persona_studio."""
    for key in OWN_FIELDS:
        if key in saved:  # set even when empty: an empty description is what was exported
            draft.fields[key] = saved[key]
            draft.mapping.append((source + key, key))
    for key, value in (saved.get("extensions") or {}).items():
        draft.keep(f"{source}extensions.{key}", key, value)


def _map_webui(data: dict, where: str) -> _Draft:
    at = f"{where}: "
    draft, used = _Draft(), set()
    name_key = next((k for k in WEBUI_NAME_KEYS if _text(data, k, at)), "name")
    name = _text(data, name_key, at)
    if not name:
        raise PersonaError(f"{at}name: empty; a persona needs a name")
    draft.put(name_key, "name", name)
    used.add(name_key)
    user_key = next((k for k in WEBUI_USER_KEYS if k in data), None)
    user_name = _text(data, user_key, at) if user_key else ""

    if "context" in data or "char_persona" not in data:
        context_key, context = "context", _text(data, "context", at)
    else:
        context_key, persona = "char_persona", _text(data, "char_persona", at)
        context = f"{{{{char}}}}'s Persona: {persona}" if persona else ""
    used.add(context_key)
    draft.put(context_key, "system_prompt", context)
    draft.fields.setdefault("system_prompt", ORIGINAL)

    greeting_key = "greeting" if "greeting" in data or "char_greeting" not in data else "char_greeting"
    greeting = _text(data, greeting_key, at)
    if not greeting:
        raise PersonaError(f"{at}{greeting_key}: empty; a persona needs a greeting")
    draft.put(greeting_key, "greeting", greeting)
    used.add(greeting_key)
    draft.put("world_scenario", "scenario", _text(data, "world_scenario", at))
    used.add("world_scenario")

    users = ["{{user}}"] + ([user_name] if user_name else [])
    chats, narrations = parse_examples(_text(data, "example_dialogue", at), ["{{char}}", name], users)
    draft.put("example_dialogue", "example_dialogue", chats)
    draft.keep("example_dialogue", UNPAIRED, narrations)
    used.add("example_dialogue")
    for key, value in data.items():  # your_name, other name keys, turn_template, ...
        if key not in used:
            draft.keep(key, key, value)
    return draft


def _detect(data: Any, where: str) -> tuple[str, _Draft]:
    """(format name, draft) for a parsed JSON/YAML document."""
    if not isinstance(data, dict):
        raise PersonaError(f"{where}: expected a character card (a JSON object), got {type(data).__name__}")
    spec = data.get("spec")
    inner = data.get("data")
    for level in (data, inner if isinstance(inner, dict) else {}):
        # Field names become report lines and extension keys; YAML also allows `1:` or `yes:`.
        odd = next((key for key in level if not isinstance(key, str)), None)
        if odd is not None:
            raise PersonaError(f"{where}: field name {odd!r} is not text")
    if isinstance(inner, dict) and (spec in CARD_SPECS or str(spec or "").startswith("chara_card_v")
                                    or "first_mes" in inner):
        label = CARD_SPECS.get(spec, f"Character Card ({spec or 'no spec'})")
        draft = _map_card(inner, where, "data.")
        # V2/V3 writers copy the V1 fields to the top level; keep only what is not such a copy.
        extra = {k: v for k, v in data.items()
                 if k not in ("spec", "spec_version", "data") and not _blank(v) and inner.get(k) != v}
        draft.keep(", ".join(extra) or "top level", TOP_LEVEL, extra)
        if "spec_version" in data:
            draft.mapping.append(("spec_version", "(format version, not kept)"))
        return label, draft
    if spec:
        raise PersonaError(f"{where}: spec {spec!r} without a 'data' object is not a card this can read")
    if "first_mes" in data or "mes_example" in data or {"description", "personality"} <= data.keys():
        return "Character Card V1", _map_card(data, where, "")
    if "system_prompt" in data and not {"context", "char_persona", "char_greeting"} & data.keys():
        raise PersonaError(f"{where}: this is a persona file, not a character card; copy it into the "
                           "personas folder (with its avatar) instead of importing it")
    if {"context", "char_persona", "char_greeting", "greeting"} & data.keys():
        return "text-generation-webui character", _map_webui(data, where)
    raise PersonaError(f"{where}: not a character card (no spec, first_mes, context or greeting field)")


# --- writing ------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as `|` blocks, the way people write prompts."""

    def ignore_aliases(self, data) -> bool:
        return True  # the persona loader refuses aliases (safe_yaml): write a shared value twice


def _represent_str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _represent_str)


def dump_persona_yaml(fields: dict[str, Any], header: str = "") -> str:
    """Persona fields in the schema's order, empty ones left out, with `header` as # comments."""
    ordered = {key: fields[key] for key in Persona.model_fields if not _blank(fields.get(key))}
    body = yaml.dump(ordered, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comment + body


def import_card(path: Path, persona_id: str | None = None,
                today: datetime.date | None = None) -> ImportResult:
    """Read a card or webui character and map it to a persona file; PersonaError names file and field."""
    path = Path(path)
    where = str(path)
    try:
        if path.stat().st_size > MAX_SOURCE_BYTES:
            raise PersonaError(f"{where}: file is larger than {MAX_SOURCE_BYTES // 2**20} MiB")
        raw = path.read_bytes()
    except OSError as exc:
        raise PersonaError(f"{where}: cannot read file: {exc.strerror or exc}") from None

    avatar = avatar_suffix = None
    if raw.startswith(PNG_SIGNATURE):
        png_pixels(raw, where)  # the card's picture becomes the avatar
        card, keyword = _card_from_png(raw, where)
        label, draft = _detect(card, f"{where} ({keyword} chunk)")
        label += " (PNG)"
        avatar, avatar_suffix = strip_card_chunks(raw), ".png"
    else:
        label, draft = _detect(_read_structured(raw, where), where)
        label += " (JSON)" if raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else " (YAML)"
        if label.startswith("text-generation-webui"):  # the webui shows <name>.png/.jpg next to it
            images = [path.with_suffix(s) for s in AVATAR_SUFFIXES]
            image = next((i for i in images if i.is_file()), None)
            if image is not None:
                if image.stat().st_size > MAX_SOURCE_BYTES:
                    raise PersonaError(f"{image}: file is larger than {MAX_SOURCE_BYTES // 2**20} MiB")
                avatar, avatar_suffix = image.read_bytes(), image.suffix.lower()
                if avatar.startswith(PNG_SIGNATURE):
                    png_pixels(avatar, str(image))
                draft.mapping.append((image.name, "avatar"))

    persona_id = check_id(persona_id) if persona_id else suggest_id(draft.fields["name"], path.stem)
    fields = dict(draft.fields, extensions=draft.extensions)
    avatar_name = f"{persona_id}{avatar_suffix}" if avatar is not None else None
    fields["avatar"] = avatar_name
    if avatar is not None and raw.startswith(PNG_SIGNATURE):
        draft.mapping.append(("PNG image", "avatar"))

    date = (today or datetime.date.today()).isoformat()
    header = (f"Imported by `persona-studio personas import` on {date}\n"
              f"from {path.name} ({label}).\n"
              "Fields with no persona equivalent are kept under `extensions`; export puts them back.")
    text = dump_persona_yaml(fields, header)
    size = len(text.encode("utf-8"))
    if size > MAX_FILE_BYTES:
        def size_of(value):
            return len(json.dumps(value, ensure_ascii=False, default=str))

        biggest = max(fields, key=lambda k: size_of(fields[k]))
        if biggest == "extensions":
            biggest += "." + max(draft.extensions, key=lambda k: size_of(draft.extensions[k]))
        raise PersonaError(f"{where}: the persona would be {size // 1024} KiB, over the "
                           f"{MAX_FILE_BYTES // 1024} KiB limit of a persona file (largest: {biggest})")
    persona = parse_persona(text, f"{where} (imported)")
    return ImportResult(persona_id, text, persona, draft.mapping, label, avatar, avatar_name)


# Fields a persona keeps in `extensions` only for the way back (export puts them where they were).
_BOOKKEEPING = (UNPAIRED, TOP_LEVEL, "creator_notes", "creatorcomment", "extensions")
V3_DEFAULTS = {"group_only_greetings": [], "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main",
                                                        "ext": "png"}]}


def _card_data(loaded: LoadedPersona) -> tuple[dict, dict | None]:
    """(data, the source's top-level fields) of a card for the persona; see export_card_v2."""
    p = loaded.persona
    ext = dict(p.extensions)
    narrations = ext.get(UNPAIRED) or []
    if isinstance(narrations, str):
        narrations = [narrations]
    notes = ext.get("creator_notes", ext.get("creatorcomment"))
    own_extensions = dict(ext["extensions"]) if isinstance(ext.get("extensions"), dict) else {}
    if p.depth_prompt is not None:
        own_extensions["depth_prompt"] = p.depth_prompt.model_dump()
    data = {
        "name": p.name,
        "description": p.character,
        "personality": p.personality,
        "scenario": p.scenario,
        "first_mes": p.greeting,
        "mes_example": render_examples(example_chats(p), narrations),
        "creator_notes": notes if isinstance(notes, str) else p.description,
        "system_prompt": "" if p.system_prompt.strip() == ORIGINAL else p.system_prompt,
        "post_history_instructions": p.post_history_instructions,
        "alternate_greetings": list(p.alternate_greetings),
        "tags": list(p.tags),
        "creator": str(ext.get("creator", "") or ""),
        "character_version": str(ext.get("character_version", "") or ""),
        "extensions": own_extensions,
    }
    if p.lorebook is not None:
        data["character_book"] = lorebook_to_card(p.lorebook)
    # Every other field the source card had (V3's nickname, assets, source, ...) goes back where it was.
    data.update({k: v for k, v in ext.items() if k not in data and k not in _BOOKKEEPING})
    own = {"generation": p.generation.model_dump(exclude_defaults=True)
           if p.generation != GenerationSettings() else None,
           "model": p.model, "adapter": p.adapter,
           "knowledge": p.knowledge.model_dump(exclude_defaults=True) if p.knowledge else None}
    own = {k: v for k, v in own.items() if not _blank(v)}
    if p.description != _short_description(normalise_text(data["creator_notes"])):
        own["description"] = p.description  # import would derive another one from creator_notes
    if own:
        data["extensions"][NAMESPACE] = own
    top = ext.get(TOP_LEVEL)
    return data, top if isinstance(top, dict) else None


def export_card_v2(loaded: LoadedPersona) -> dict:
    """A persona as a Card V2 dict (spec chara_card_v2, spec_version 2.0); see the module docstring."""
    data, top = _card_data(loaded)
    card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}
    if top is not None:  # the source file's top-level bookkeeping (avatar, chat, dates), back where it was
        card = {**{k: v for k, v in top.items() if k not in card}, **card}
    return card


def export_card_v3(loaded: LoadedPersona) -> dict:
    """A persona as a Card V3 dict (spec chara_card_v3, spec_version 3.0): V2's fields and V3's own,
    whose required ones get their spec defaults when the persona has none."""
    data, _top = _card_data(loaded)
    for key, value in V3_DEFAULTS.items():
        data.setdefault(key, value)
    if "character_book" in data:
        for entry in data["character_book"]["entries"]:
            entry.setdefault("use_regex", False)  # required in V3; this app's keys are plain text
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": data}


def _text_chunk(keyword: str, text: str) -> bytes:
    body = keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    return struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))


def _avatar_png(loaded: LoadedPersona) -> bytes:
    """The persona's avatar as PNG bytes (converted when it is another format); a plain square without one."""
    import io

    from PIL import Image

    path = loaded.avatar_path
    if path is not None and path.suffix.lower() == ".png":
        png = path.read_bytes()
        png_pixels(png, str(path))
        return strip_card_chunks(png)
    out = io.BytesIO()
    if path is not None:
        with Image.open(path) as image:
            if image.width * image.height > MAX_AVATAR_PIXELS:
                raise PersonaError(f"{path}: the image is {image.width}x{image.height} pixels, over the "
                                   f"{MAX_AVATAR_PIXELS / 1e6:.1f} million pixels of an avatar")
            image.convert("RGBA").save(out, "PNG")
    else:
        Image.new("RGB", (400, 600), (64, 64, 72)).save(out, "PNG")
    return out.getvalue()


def export_card_png(loaded: LoadedPersona) -> bytes:
    """A PNG card: the avatar with the card in a `chara` (V2) and a `ccv3` (V3) text chunk, base64 JSON,
    placed before the image data as readers expect."""
    png = _avatar_png(loaded)
    chunks = b"".join(_text_chunk(keyword, base64.b64encode(json.dumps(card, ensure_ascii=False)
                                                            .encode("utf-8")).decode("ascii"))
                      for keyword, card in (("chara", export_card_v2(loaded)), ("ccv3", export_card_v3(loaded))))
    out = [PNG_SIGNATURE]
    for kind, _body, chunk in _png_chunks(png, "avatar"):
        if kind == b"IDAT" and chunks:
            out.append(chunks)
            chunks = b""
        out.append(chunk)
    return b"".join(out)
