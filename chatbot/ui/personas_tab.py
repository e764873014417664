"""The Personas tab: browse, create, duplicate, edit (form or raw YAML), archive, try.

The form only writes the fields that changed (comments and formatting of the
file survive, see `persona_files.update_persona_text`); "Save YAML" writes the
raw text as typed. Both validate first and write atomically. "Try it" streams
a reply from the persona as it is in the form, without saving or storing
anything. Per-user state (which persona is open, as read) is a gr.State.

Everyone may browse personas and try them; writing (Save, Save YAML, New,
Duplicate, Delete) is for admins. The check is in each write handler, on the
server, so a call to the API is refused like a click is; for non-admins the
buttons are also disabled when the page loads.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import math
from dataclasses import dataclass

import gradio as gr
from PIL import Image, ImageDraw, ImageFont

from ..chat import ChatError, ChatService, params_for
from ..persona_files import archive_persona, create_persona, duplicate_persona, save_persona, update_persona_text
from ..personas import (
    MAX_AVATAR_PIXELS,
    LoadedPersona,
    Persona,
    PersonaError,
    PersonaLibrary,
    content_hash,
    open_plain_file,
    parse_persona,
    read_plain_text,
    render,
)
from ..prompting import PromptTooLong
from .chat_tab import StopSignal
from .identity import CurrentUser, Identity, NotAllowed
from .safe_markdown import literal, safe_markdown, safe_messages

TEXT_FIELDS = ["name", "description", "system_prompt", "greeting", "alternate_greetings", "scenario",
               "example_dialogue", "post_history_instructions", "tags"]
GENERATION_FIELDS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed"]
FLOAT_TOLERANCE = 0.005  # half a slider step: a value the slider only re-rounded is not a change
THUMB = 160


class Refusal(Exception):
    """A request the tab turns down; the message is shown and nothing changes."""


REFUSALS = (Refusal, NotAllowed, PersonaError, ChatError, PromptTooLong)
EDIT_ACTION = "edit personas"  # "Only admins can edit personas."

WARNING_SECONDS = 20  # validator messages can be long


def refusing(outputs: int):
    """Show a refusal as a warning and leave every output as it is.

    A raised gr.Error would mark every output component as failed and blank
    it, losing the text being edited; a warning keeps it for fixing.
    """
    def decorate(handler):
        @functools.wraps(handler)
        def guarded(*args):
            try:
                return handler(*args)
            except REFUSALS as exc:
                gr.Warning(str(exc), duration=WARNING_SECONDS)
                return [gr.skip()] * outputs
        return guarded
    return decorate


@dataclass(frozen=True)
class Editing:
    """The persona file open in the editor, as it was read (a broken file has no `loaded`)."""

    id: str
    text: str
    version: str
    loaded: LoadedPersona | None = None
    problem: str = ""


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
        value = _number(new, integer=field in ("top_k", "max_new_tokens", "seed"))
        generation[field] = None if field == "seed" and (value is None or value < 0) else value
    if generation:
        changes["generation"] = generation
    return changes


# ---------------------------------------------------------------- the list

def _placeholder(persona_id: str, name: str) -> Image.Image:
    """A coloured square with the persona's initials, for personas without an avatar."""
    hue = int(hashlib.sha256(persona_id.encode()).hexdigest()[:2], 16) / 255
    colour = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.35, 0.78))
    image = Image.new("RGB", (THUMB, THUMB), colour)
    initials = "".join(word[0] for word in name.split()[:2]).upper() or "?"
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=THUMB // 3)
    draw.text((THUMB / 2, THUMB / 2), initials, fill="white", font=font, anchor="mm")
    return image


def _thumbnail(loaded: LoadedPersona) -> Image.Image:
    path = loaded.avatar_path
    if path is not None:
        try:
            with open_plain_file(path) as handle, Image.open(handle) as image:
                if image.width * image.height > MAX_AVATAR_PIXELS:  # checked before decoding anything
                    raise ValueError(f"{image.width}x{image.height} pixels")
                image.draft("RGB", (THUMB, THUMB))  # a JPEG decodes at a fraction of its size
                image = image.convert("RGB")
                image.thumbnail((THUMB, THUMB))
                return image
        except Exception:  # noqa: BLE001 - PIL raises OSError, ValueError (a text chunk over 1 MB),
            pass  # DecompressionBombError, SyntaxError... for hostile files; the placeholder says who it is
    return _placeholder(loaded.id, loaded.persona.name)


def _caption(loaded: LoadedPersona) -> str:
    tags = " ".join(f"#{t}" for t in loaded.persona.tags)
    return f"{loaded.persona.name}\n{tags}" if tags else loaded.persona.name


def _broken(library: PersonaLibrary) -> dict[str, str]:
    """Persona files that failed to load: id -> the loader's message, without the path."""
    broken = {}
    for path in sorted(library.folder.glob("*.yaml")):
        if path.stem not in library.personas:
            prefix = f"{path}: "
            message = next((e for e in library.errors if e.startswith(prefix)), "it cannot be loaded")
            broken[path.stem] = message.removeprefix(prefix)
    return broken


def _escape(message: str) -> str:
    """A loader message as Markdown text: one line, shown as written (`<unicode string>` is not a
    tag, a quoted `![x](url)` is not an image)."""
    return literal(message)


def _choices(library: PersonaLibrary, broken: dict[str, str]) -> list[tuple[str, str]]:
    return [(f"{p.persona.name} ({p.id})", p.id) for p in library.personas.values()] + \
           [(f"⚠ {pid} (broken)", pid) for pid in broken]


def _problems(broken: dict[str, str]) -> str:
    if not broken:
        return ""
    lines = "\n".join(f"- `{pid}.yaml`: {_escape(msg)}" for pid, msg in broken.items())
    return safe_markdown(f"**Files that do not load** (open them to fix the YAML):\n{lines}")  # any file name


def _open(library: PersonaLibrary, persona_id: str, broken: dict[str, str]) -> Editing:
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


# ---------------------------------------------------------------- the tab

def create(app: gr.Blocks, service: ChatService, identity: Identity) -> None:
    library = service.personas

    editing_state = gr.State(None)
    stop_state = gr.State(StopSignal())

    gallery = gr.Gallery(label="Personas", columns=8, height=200, allow_preview=False, object_fit="cover",
                         fit_columns=False, buttons=[], interactive=False, elem_id="persona-gallery")
    problems = gr.Markdown(elem_id="persona-problems")
    with gr.Row(equal_height=False):
        picker = gr.Dropdown([], label="Edit persona", scale=3, elem_id="persona-select")
        new_id = gr.Textbox(label="Id for New / Duplicate", placeholder="e.g. night_owl (the file name)",
                            scale=2, elem_id="persona-new-id")
        with gr.Column(scale=2, min_width=240):
            with gr.Row():
                new = gr.Button("New", size="md", min_width=60, elem_id="persona-new")
                duplicate = gr.Button("Duplicate", size="md", min_width=60, elem_id="persona-duplicate")
            with gr.Row():
                reload = gr.Button("Reload", size="md", min_width=60, elem_id="persona-reload")
                delete = gr.Button("Delete", variant="stop", size="md", min_width=60, elem_id="persona-delete")
    status = gr.Markdown(elem_id="persona-status")
    rights = gr.Markdown(visible=False, elem_id="persona-rights")

    with gr.Row():
        with gr.Column(scale=3):
            with gr.Tab("Form", elem_id="persona-form-tab"):
                with gr.Row():
                    name = gr.Textbox(label="Name", scale=1, elem_id="persona-name")
                    tags = gr.Textbox(label="Tags", info="comma separated", scale=1, elem_id="persona-tags")
                description = gr.Textbox(label="Description", info="shown to people, not sent to the model",
                                         elem_id="persona-description")
                system_prompt = gr.Textbox(label="System prompt", lines=5, max_lines=20,
                                           info="{{char}} = the persona's name, {{user}} = the user's",
                                           elem_id="persona-system-prompt")
                greeting = gr.Textbox(label="Greeting", lines=2, max_lines=10, elem_id="persona-greeting")
                alternate_greetings = gr.Textbox(label="Alternate greetings", info="one per line", lines=2,
                                                 max_lines=10, elem_id="persona-alternate-greetings")
                scenario = gr.Textbox(label="Scenario", info="appended to the system prompt", lines=2,
                                      max_lines=10, elem_id="persona-scenario")
                example_dialogue = gr.Dataframe(
                    headers=["user", "assistant"], datatype=["str", "str"], type="array", interactive=True,
                    column_count=(2, "fixed"),  # the tuple form still fixes the columns; column_limits is a no-op
                    wrap=True, label="Example dialogue", elem_id="persona-examples")
                post_history = gr.Textbox(label="Post-history instructions",
                                          info="added to the newest user message", lines=2,
                                          max_lines=10, elem_id="persona-post-history")
                with gr.Accordion("Generation defaults", open=False):
                    with gr.Row():
                        temperature = gr.Slider(0.0, 2.0, step=0.01, label="temperature (0 = greedy)",
                                                elem_id="persona-temperature")
                        top_p = gr.Slider(0.01, 1.0, step=0.01, label="top_p", elem_id="persona-top-p")
                        top_k = gr.Number(precision=0, minimum=0, label="top_k (0 = off)",
                                          elem_id="persona-top-k")
                    with gr.Row():
                        repetition_penalty = gr.Slider(1.0, 2.0, step=0.01, label="repetition_penalty",
                                                       elem_id="persona-repetition-penalty")
                        max_new_tokens = gr.Slider(1, 4096, step=1, label="max_new_tokens",
                                                   elem_id="persona-max-new-tokens")
                        seed = gr.Number(precision=0, label="seed (-1 = random)", elem_id="persona-seed")
                save = gr.Button("Save", variant="primary", elem_id="persona-save")
            with gr.Tab("Raw YAML", elem_id="persona-raw-tab"):
                raw = gr.Code(language="yaml", lines=22, max_lines=40, interactive=True, label="persona file",
                              elem_id="persona-raw")
                save_raw = gr.Button("Save YAML", variant="primary", elem_id="persona-save-raw")
        with gr.Column(scale=2):
            gr.Markdown("**Try it** — a test message to the persona as it is in the form, "
                        "before saving. Each message starts from the greeting; nothing is stored.")
            try_chat = gr.Chatbot(label="Try it", height=420, group_consecutive_messages=False,
                                  elem_id="persona-try-chat")
            with gr.Row():
                try_message = gr.Textbox(placeholder="A test message", show_label=False, scale=4,
                                         elem_id="persona-try-message")
                try_send = gr.Button("Send", scale=1, min_width=60, elem_id="persona-try-send")
                try_stop = gr.Button("Stop", variant="stop", scale=1, min_width=60, elem_id="persona-try-stop")

    form = [name, description, system_prompt, greeting, alternate_greetings, scenario, example_dialogue,
            post_history, tags, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed]
    view = [editing_state, gallery, problems, picker, status, *form, raw, try_chat]

    def show(persona_id: str | None, who: CurrentUser) -> list:
        """Everything the tab shows to `who`, with `persona_id` open (re-read from disk)."""
        library.refresh()
        broken = _broken(library)
        ids = list(library.personas) + list(broken)
        if persona_id not in ids:
            persona_id = ids[0] if ids else None
        editing = _open(library, persona_id, broken) if persona_id else None
        loaded = editing.loaded if editing else None
        thumbs = [(_thumbnail(p), _caption(p)) for p in library.personas.values()]
        selected = list(library.personas).index(persona_id) if persona_id in library.personas else None
        if editing is None:
            state_line = "No personas yet: type an id and press **New**."
        elif loaded is None:
            state_line = f"⚠ `{editing.id}.yaml` does not load: {_escape(editing.problem)} Fix it in **Raw YAML**."
        else:
            state_line = f"Editing `{loaded.path.name}` (version {loaded.version})"
        greeting_text = render(loaded, who.name).greetings[0] if loaded else None
        return [editing, gr.Gallery(value=thumbs, selected_index=selected), _problems(broken),
                gr.Dropdown(choices=_choices(library, broken), value=persona_id), safe_markdown(state_line),
                *form_values(loaded.persona if loaded else None), editing.text if editing else "",
                safe_messages([{"role": "assistant", "content": greeting_text}]) if greeting_text else []]

    def require(editing: Editing | None, loadable: bool = False) -> Editing:
        if editing is None:
            raise Refusal("No persona is open.")
        if loadable and editing.loaded is None:
            raise Refusal(f"{editing.id}.yaml does not load; fix it in Raw YAML first.")
        return editing

    def admin(request: gr.Request) -> CurrentUser:
        """The first line of every write handler: NotAllowed (a warning) for non-admins."""
        return identity.require_admin(request, EDIT_ACTION)

    def on_load(request: gr.Request):
        return show(None, identity.current(request))

    def on_rights(request: gr.Request):
        """Non-admins get the write buttons disabled and a line saying why."""
        allowed = identity.current(request).is_admin
        note = gr.Markdown("Only admins can edit personas; you can browse them and try them.",
                           visible=not allowed)
        return [note] + [gr.Button(interactive=allowed) for _ in write_buttons]

    def on_pick(request: gr.Request, persona_id):
        return show(persona_id, identity.current(request))

    def on_gallery(request: gr.Request, editing, evt: gr.SelectData):
        ids = list(library.personas)
        return show(ids[evt.index] if isinstance(evt.index, int) and evt.index < len(ids) else
                    (editing.id if editing else None), identity.current(request))

    def on_reload(request: gr.Request, editing):
        return show(editing.id if editing else None, identity.current(request))

    @refusing(len(view))
    def on_save(request: gr.Request, editing, *values):
        who = admin(request)
        editing = require(editing, loadable=True)
        changes = form_changes(editing.loaded.persona, list(values))
        if not changes:
            gr.Info("Nothing changed.")
            return show(editing.id, who)
        path = library.path_for(editing.id)
        if not path.exists():
            raise Refusal(f"{editing.id}.yaml is gone from the personas folder (archived elsewhere?).")
        current = read_plain_text(path)  # a PersonaError (a link, too big) is shown as a warning
        # Only the changed fields are applied, to the file as it is now: edits made
        # to other fields since it was opened are kept.
        saved = save_persona(library, editing.id, update_persona_text(current, changes))
        merged = " (merged with changes made to the file since you opened it)" \
            if content_hash(current) != editing.version else ""
        gr.Info(f"Saved {saved.path.name}: {', '.join(changes)}{merged}. New chats use it.")
        return show(saved.id, who)

    @refusing(len(view))
    def on_save_raw(request: gr.Request, editing, text):
        who = admin(request)
        editing = require(editing)
        saved = save_persona(library, editing.id, text or "", expected_version=editing.version)
        gr.Info(f"Saved {saved.path.name}. New chats use it.")
        return show(saved.id, who)

    @refusing(1 + len(view))
    def on_new(request: gr.Request, persona_id):
        who = admin(request)
        created = create_persona(library, (persona_id or "").strip())
        gr.Info(f"Created {created.path.name} from the template.")
        return ["", *show(created.id, who)]

    @refusing(1 + len(view))
    def on_duplicate(request: gr.Request, editing, persona_id):
        who = admin(request)
        editing = require(editing, loadable=True)
        copy = duplicate_persona(library, editing.id, (persona_id or "").strip())
        gr.Info(f"Duplicated {editing.id} as {copy.path.name}.")
        return ["", *show(copy.id, who)]

    @refusing(len(view))
    def on_delete(request: gr.Request, persona_id, editing):
        who = admin(request)
        if not persona_id:  # the confirmation was cancelled
            return [gr.skip()] * len(view)
        moved = archive_persona(library, persona_id)
        gr.Info(f"Moved {persona_id}.yaml to {moved[0].parent.name}/{moved[0].name}; "
                "move it back to restore it.")
        return show(None, who)

    def draft(editing: Editing | None, values) -> LoadedPersona:
        """The persona as it is in the form, parsed but not saved."""
        editing = require(editing, loadable=True)
        text = update_persona_text(editing.text, form_changes(editing.loaded.persona, list(values)))
        persona = parse_persona(text, f"{editing.id}.yaml (draft)")
        return LoadedPersona(id=editing.id, persona=persona, text=text, version=content_hash(text),
                             path=editing.loaded.path)

    def on_try(request: gr.Request, message, editing, signal, *values):
        signal.event.clear()
        try:
            user = identity.current(request).name
            loaded = draft(editing, values)
            history = [{"role": "assistant", "content": render(loaded, user).greetings[0]},
                       {"role": "user", "content": (message or "").strip()}]
            for reply in service.try_draft(loaded, message or "", params_for(loaded), user, signal.event):
                yield "", safe_messages(history + [{"role": "assistant", "content": reply.text}])
        except REFUSALS as exc:
            gr.Warning(str(exc), duration=WARNING_SECONDS)
            yield gr.skip(), gr.skip()

    def on_stop(signal):
        signal.event.set()

    write_buttons = [save, save_raw, new, duplicate, delete]
    app.load(on_load, None, view)
    app.load(on_rights, None, [rights, *write_buttons])
    # `.select`, not `.input`: a Gradio 6 Dropdown fires `input` twice per pick (on the
    # choice and again on blur), and the late second load wiped edits typed in between.
    picker.select(on_pick, picker, view)
    gallery.select(on_gallery, editing_state, view)
    reload.click(on_reload, editing_state, view)
    save.click(on_save, [editing_state, *form], view)
    save_raw.click(on_save_raw, [editing_state, raw], view)
    new.click(on_new, new_id, [new_id, *view])
    duplicate.click(on_duplicate, [editing_state, new_id], [new_id, *view])
    # Archiving is undoable by hand, but still ask: the persona leaves every picker at once.
    delete.click(on_delete, [picker, editing_state], view,
                 js="(id, s) => [confirm(`Move ${id}.yaml to the archive?`) ? id : null, s]")
    try_inputs = [try_message, editing_state, stop_state, *form]
    try_message.submit(on_try, try_inputs, [try_message, try_chat])
    try_send.click(on_try, try_inputs, [try_message, try_chat])
    try_stop.click(on_stop, stop_state, None, concurrency_limit=None)

