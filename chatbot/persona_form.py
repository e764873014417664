"""The persona editor's form, in plain Python: file <-> form values, drafts and saves.

The Personas tab (chatbot/ui/personas_tab.py) only lays the form out and
wires its events; what the form means lives here, without Gradio, so it can
be tested (tests/test_personas_tab.py) and reused as plain functions.

The form holds one value per field, in ``TEXT_FIELDS + GENERATION_FIELDS``
order. Saving writes only the fields whose value changed, into the file as
it is on disk at that moment: the file's comments and formatting survive
(``persona_files.update_persona_text``), and so do edits made to other
fields since the form was opened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .persona_files import save_persona, update_persona_text
from .personas import (
    LoadedPersona,
    Persona,
    PersonaError,
    PersonaLibrary,
    content_hash,
    parse_persona,
    read_plain_text,
)

TEXT_FIELDS = ["name", "description", "system_prompt", "greeting", "alternate_greetings", "scenario",
               "example_dialogue", "post_history_instructions", "tags"]
GENERATION_FIELDS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed"]
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

def form_values(persona: Persona | None) -> list:
    """The persona as the form shows it, in TEXT_FIELDS + GENERATION_FIELDS order."""
    if persona is None:
        return ["", "", "", "", "", "", [["", ""]], "", "", 0.7, 0.9, 50, 1.1, 256, -1]
    g = persona.generation
    return [persona.name, persona.description, persona.system_prompt, persona.greeting,
            "\n".join(persona.alternate_greetings), persona.scenario,
            [[e.user, e.assistant] for e in persona.example_dialogue] or [["", ""]],
            persona.post_history_instructions, ", ".join(persona.tags),
            g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.max_new_tokens,
            -1 if g.seed is None else g.seed]


def _rows(table) -> list[list[str]]:
    """Dataframe rows as [user, assistant] strings; rows left blank are dropped."""
    if table is None:
        return []
    if hasattr(table, "values"):  # a pandas DataFrame
        table = table.values.tolist()
    rows = []
    for row in table:
        cells = ["" if c is None or (isinstance(c, float) and math.isnan(c)) else str(c) for c in list(row)[:2]]
        cells += [""] * (2 - len(cells))
        if any(c.strip() for c in cells):
            rows.append(cells)
    return rows


def _same(field: str, old, new) -> bool:
    if field == "example_dialogue":
        return _rows(old) == _rows(new)
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
            changes[field] = [{"user": u, "assistant": a} for u, a in _rows(new)]
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
