"""The persona editor's form, in plain Python: file <-> form values, drafts and saves.

The Personas tab (chatbot/ui/personas_tab.py) only lays the form out and
wires its events; what the form means lives here, without Gradio, so it can
be tested (tests/test_personas_tab.py) and reused as plain functions.

The form holds one value per field, in ``TEXT_FIELDS + GENERATION_FIELDS +
DEFINITION_FIELDS`` order. Example dialogue is a table of (chat, user,
assistant) rows: rows with the same chat number make one example chat, and a
row may leave one side empty (a lone `{{char}}` line). The lorebook is a table
of its entries' main fields; the others (secondary keys, depth, priority, ...)
are edited in the raw YAML and kept when the table is saved. Saving writes only the fields whose value changed, into the file as
it is on disk at that moment: the file's comments and formatting survive
(``persona_files.update_persona_text``), and so do edits made to other
fields since the form was opened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .persona_files import save_persona, update_persona_text
from .knowledge.lorebook import LoreEntry
from .personas import (
    LoadedPersona,
    Persona,
    PersonaError,
    PersonaLibrary,
    content_hash,
    example_chats,
    parse_persona,
    read_plain_text,
)

TEXT_FIELDS = ["name", "description", "system_prompt", "greeting", "alternate_greetings", "scenario",
               "example_dialogue", "post_history_instructions", "tags"]
GENERATION_FIELDS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed"]
DEFINITION_FIELDS = ["character", "personality", "lorebook"]
LORE_COLUMNS = ["name", "keys", "content", "position", "constant", "enabled"]
LORE_POSITIONS = ("before_char", "after_char", "at_depth")
INTEGER_FIELDS = ("top_k", "max_new_tokens", "seed")
FLOAT_TOLERANCE = 0.005  # half a slider step: a value the slider only re-rounded is not a change


@dataclass(frozen=True)
class Editing:
    """The persona file open in the editor, as it was read (a broken file has no `loaded`)."""

    id: str
    text: str
    version: str
    loaded: LoadedPersona | None = None
    problem: str = ""


# ---------------------------------------------------------------- opening files

def broken_files(library: PersonaLibrary) -> dict[str, str]:
    """Persona files that failed to load: id -> the loader's message, without the path."""
    broken = {}
    for path in sorted(library.folder.glob("*.yaml")):
        if path.stem not in library.personas:
            prefix = f"{path}: "
            message = next((e for e in library.errors if e.startswith(prefix)), "it cannot be loaded")
            broken[path.stem] = message.removeprefix(prefix)
    return broken


def open_for_editing(library: PersonaLibrary, persona_id: str, broken: dict[str, str]) -> Editing:
    """The file ``persona_id`` as the editor opens it; a broken one with its text and what is wrong."""
    loaded = library.personas.get(persona_id)
    if loaded is not None:
        return Editing(persona_id, loaded.text, loaded.version, loaded)
    path = library.path_for(persona_id)
    try:
        text = read_plain_text(path)  # never through a link: `x.yaml -> /etc/passwd` is not shown
    except PersonaError as exc:
        text = ""
        problem = f"cannot read it: {str(exc).removeprefix(f'{path}: ')}"
    else:
        problem = broken.get(persona_id, "it cannot be loaded")
    return Editing(persona_id, text, content_hash(text), None, problem)


# ---------------------------------------------------------------- form <-> persona

EMPTY_EXAMPLES = [["1", "", ""]]
EMPTY_LORE = [["", "", "", "before_char", "false", "true"]]


def example_rows(persona: Persona) -> list[list[str]]:
    """The example chats as (chat, user, assistant) rows: a user message and the answer after it share a row."""
    rows = []
    for number, chat in enumerate(example_chats(persona), start=1):
        for message in chat:
            if message["role"] == "assistant" and rows and rows[-1][0] == str(number) and not rows[-1][2] \
                    and rows[-1][1]:
                rows[-1][2] = message["content"]
            else:
                rows.append([str(number), message["content"], ""] if message["role"] == "user"
                            else [str(number), "", message["content"]])
    return rows or EMPTY_EXAMPLES


def lore_rows(persona: Persona) -> list[list[str]]:
    book = persona.lorebook
    if book is None or not book.entries:
        return EMPTY_LORE
    return [[e.name, ", ".join(e.keys), e.content, e.position, str(e.constant).lower(), str(e.enabled).lower()]
            for e in book.entries]


def form_values(persona: Persona | None) -> list:
    """The persona as the form shows it, in TEXT_FIELDS + GENERATION_FIELDS + DEFINITION_FIELDS order."""
    if persona is None:
        return ["", "", "", "", "", "", EMPTY_EXAMPLES, "", "", 0.7, 0.9, 50, 1.1, 256, -1, "", "", EMPTY_LORE]
    g = persona.generation
    return [persona.name, persona.description, persona.system_prompt, persona.greeting,
            "\n".join(persona.alternate_greetings), persona.scenario, example_rows(persona),
            persona.post_history_instructions, ", ".join(persona.tags),
            g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.max_new_tokens,
            -1 if g.seed is None else g.seed, persona.character, persona.personality, lore_rows(persona)]


def _cells(table, width: int) -> list[list[str]]:
    """Dataframe rows as `width` strings each; rows left blank are dropped."""
    if table is None:
        return []
    if hasattr(table, "values"):  # a pandas DataFrame
        table = table.values.tolist()
    rows = []
    for row in table:
        cells = ["" if c is None or (isinstance(c, float) and math.isnan(c)) else str(c).strip()
                 for c in list(row)[:width]]
        rows.append(cells + [""] * (width - len(cells)))
    return rows


def _rows(table) -> list[list[str]]:
    """Example rows as [chat, user, assistant]; a blank chat number is the row above's; blank rows go."""
    rows, chat = [], "1"
    for number, user, assistant in _cells(table, 3):
        if not (user or assistant):
            continue
        chat = number or chat
        rows.append([chat, user, assistant])
    return rows


def _examples(rows: list[list[str]]) -> list:
    """Example rows as example_dialogue: the first chat as user/assistant exchanges when every row is one,
    any other chat (or one with a lone side) as a list of messages, which keeps it a chat of its own."""
    chats: list[list[list[str]]] = []
    for row in rows:
        if chats and chats[-1][0][0] == row[0]:
            chats[-1].append(row)
        else:
            chats.append([row])
    dialogue: list = []
    for n, chat in enumerate(chats):
        if n == 0 and all(user and assistant for _, user, assistant in chat):
            dialogue += [{"user": user, "assistant": assistant} for _, user, assistant in chat]
            continue
        messages = []
        for _, user, assistant in chat:
            messages += ([{"user": user}] if user else []) + ([{"assistant": assistant}] if assistant else [])
        dialogue.append(messages)
    return dialogue


def _lore(table, persona: Persona | None) -> dict | None:
    """The lorebook table applied to the persona's lorebook: row i updates entry i's shown fields and
    keeps the rest; a new row is a new entry; a removed row removes its entry."""
    book = persona.lorebook if persona is not None and persona.lorebook is not None else None
    old = book.entries if book is not None else []
    entries = []
    for i, (name, keys, content, position, constant, enabled) in enumerate(_cells(table, len(LORE_COLUMNS))):
        if not (name or keys or content):
            continue
        if position not in LORE_POSITIONS:
            raise PersonaError(f"lorebook row {i + 1}: position {position!r}: use one of {', '.join(LORE_POSITIONS)}")
        base = old[i].model_dump(exclude_defaults=True) if i < len(old) else {}
        base.update({"name": name, "keys": [k.strip() for k in keys.split(",") if k.strip()], "content": content,
                     "position": position, "constant": constant.lower() in ("true", "yes", "1"),
                     "enabled": enabled.lower() not in ("false", "no", "0")})
        try:
            entries.append(LoreEntry(**base).model_dump(exclude_defaults=True))
        except ValueError as exc:  # pydantic's ValidationError: an empty key, say
            raise PersonaError(f"lorebook row {i + 1}: {' '.join(str(exc).split())}") from None
    if not entries and book is None:
        return None
    settings = book.model_dump(exclude_defaults=True, exclude={"entries"}) if book is not None else {}
    return {**settings, "entries": entries}


def _same(field: str, old, new) -> bool:
    if field == "example_dialogue":
        return _rows(old) == _rows(new)
    if field == "lorebook":
        return _cells(old, len(LORE_COLUMNS)) == _cells(new, len(LORE_COLUMNS))
    if isinstance(old, float) or isinstance(new, float):
        try:
            return abs(float(old) - float(new)) < FLOAT_TOLERANCE
        except (TypeError, ValueError):
            return False
    return old == new


def _number(value, integer: bool):
    if value is None or value == "":
        return None
    return round(float(value)) if integer else round(float(value), 4)


def form_changes(persona: Persona | None, values: list) -> dict:
    """The fields whose form value differs from `persona`, as schema values."""
    before = form_values(persona)
    changes: dict = {}
    for field, old, new in zip(TEXT_FIELDS, before, values):
        if persona is not None and _same(field, old, new):
            continue
        if field in ("alternate_greetings",):
            changes[field] = [line.strip() for line in (new or "").splitlines() if line.strip()]
        elif field == "tags":
            changes[field] = [tag.strip() for tag in (new or "").split(",") if tag.strip()]
        elif field == "example_dialogue":
            changes[field] = _examples(_rows(new))
        elif field == "name":
            changes[field] = (new or "").strip()
        else:
            changes[field] = new or ""
    generation = {}
    for field, old, new in zip(GENERATION_FIELDS, before[len(TEXT_FIELDS):], values[len(TEXT_FIELDS):]):
        if persona is not None and _same(field, old, new):
            continue
        value = _number(new, integer=field in INTEGER_FIELDS)
        generation[field] = None if field == "seed" and (value is None or value < 0) else value
    if generation:
        changes["generation"] = generation
    offset = len(TEXT_FIELDS) + len(GENERATION_FIELDS)
    for field, old, new in zip(DEFINITION_FIELDS, before[offset:], values[offset:]):
        if persona is not None and _same(field, old, new):
            continue
        changes[field] = _lore(new, persona) if field == "lorebook" else (new or "")
    return changes


# ---------------------------------------------------------------- drafts and saves

def draft(editing: Editing, values: list) -> LoadedPersona:
    """The persona as it is in the form, validated but not saved; PersonaError names a bad field."""
    if editing.loaded is None:
        raise PersonaError(f"{editing.id}.yaml does not load; fix it in Raw YAML first.")
    text = update_persona_text(editing.text, form_changes(editing.loaded.persona, list(values)))
    persona = parse_persona(text, f"{editing.id}.yaml (draft)")
    return LoadedPersona(id=editing.id, persona=persona, text=text, version=content_hash(text),
                         path=editing.loaded.path)


@dataclass(frozen=True)
class FormSave:
    """What saving the form did."""

    changes: dict  # the fields written; empty: nothing changed and nothing was written
    saved: LoadedPersona | None = None
    merged: bool = False  # the file had changed on disk since it was opened; those changes were kept


def save_form(library: PersonaLibrary, editing: Editing, values: list) -> FormSave:
    """Write the form's changed fields into the file as it is now, validated; PersonaError if refused."""
    if editing.loaded is None:
        raise PersonaError(f"{editing.id}.yaml does not load; fix it in Raw YAML first.")
    changes = form_changes(editing.loaded.persona, list(values))
    if not changes:
        return FormSave(changes)
    path = library.path_for(editing.id)
    if not path.exists():
        raise PersonaError(f"{editing.id}.yaml is gone from the personas folder (archived elsewhere?).")
    current = read_plain_text(path)  # refuses a link, or a file too big
    # Only the changed fields are applied, to the file as it is now: edits made
    # to other fields since it was opened are kept.
    saved = save_persona(library, editing.id, update_persona_text(current, changes))
    return FormSave(changes, saved, merged=content_hash(current) != editing.version)
