"""The Personas tab: browse, create, duplicate, edit (form or raw YAML), archive, try.

The form only writes the fields that changed (comments and formatting of the
file survive, see `persona_files.update_persona_text`); "Save YAML" writes the
raw text as typed. Both validate first and write atomically. "Try it" streams
a reply from the persona as it is in the form, without saving or storing
anything. Per-user state (which persona is open, as read) is a gr.State.
What the form means (file <-> field values, drafts, saves) is plain Python in
chatbot/persona_form.py; this module lays the tab out and wires its events.

Everyone may browse personas and try them; writing (Save, Save YAML, New,
Duplicate, Delete) is for admins. The check is in each write handler, on the
server, so a call to the API is refused like a click is; for non-admins the
buttons are also disabled when the page loads.
"""

from __future__ import annotations

import functools

import gradio as gr

from ..chat import ChatError, ChatService, params_for
from ..persona_files import archive_persona, create_persona, duplicate_persona, save_persona
from ..persona_form import LORE_COLUMNS, Editing, broken_files, draft, form_values, open_for_editing, save_form
from ..personas import LoadedPersona, PersonaError, PersonaLibrary, lore_for_message, render
from ..prompting import PromptTooLong
from . import notices
from .identity import CurrentUser, Identity, NotAllowed
from .persona_thumbnails import caption, thumbnail
from .safe_markdown import literal, safe_markdown, safe_messages
from .stop_signal import StopSignal


class Refusal(Exception):
    """A request the tab turns down; the message is shown and nothing changes."""


REFUSALS = (Refusal, NotAllowed, PersonaError, ChatError, PromptTooLong)
EDIT_ACTION = "edit personas"  # "Only admins can edit personas."

WARNING_SECONDS = 20  # validator messages can be long



def lore_report(loaded: LoadedPersona, message: str, user: str) -> str:
    """Markdown: the entries that fire for `message`, each with the key that fired it and its place."""
    if not message.strip():
        return "Type a message to see which lorebook entries it would fire."
    result = lore_for_message(loaded, message, user)
    if not (result.fired or result.over_budget):
        entries = len(loaded.persona.lorebook.entries) if loaded.persona.lorebook else 0
        return f"No entry fires for that message ({entries} entries)."
    rows = ["| entry | fired on | placed |", "|---|---|---|"]
    for f in result.fired:
        rows.append(f"| {literal(f.label)} | {literal(f.key) if f.key is not None else '(constant)'} | {f.place} |")
    rows += [f"| {literal(f.label)} | left out: over the token budget | |" for f in result.over_budget]
    return "\n".join(rows)


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
                notices.warning(str(exc), duration=WARNING_SECONDS)
                return [gr.skip()] * outputs
        return guarded
    return decorate


# ---------------------------------------------------------------- the list

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
                character = gr.Textbox(label="Character", info="who {{char}} is; sent after the system prompt",
                                       lines=3, max_lines=20, elem_id="persona-character")
                personality = gr.Textbox(label="Personality", info="sent as \"{{char}}'s personality: ...\"",
                                         elem_id="persona-personality")
                scenario = gr.Textbox(label="Scenario", info="sent after the character", lines=2,
                                      max_lines=10, elem_id="persona-scenario")
                example_dialogue = gr.Dataframe(
                    headers=["chat", "user", "assistant"], datatype=["str", "str", "str"], type="array",
                    interactive=True,
                    column_count=(3, "fixed"),  # the tuple form still fixes the columns; column_limits is a no-op
                    wrap=True, label="Example dialogue (rows of one chat number make one example chat)",
                    elem_id="persona-examples")
                post_history = gr.Textbox(label="Post-history instructions",
                                          info="added to the newest user message", lines=2,
                                          max_lines=10, elem_id="persona-post-history")
                with gr.Accordion("Lorebook", open=False, elem_id="persona-lorebook-section"):
                    lorebook = gr.Dataframe(
                        headers=LORE_COLUMNS, datatype=["str"] * len(LORE_COLUMNS), type="array",
                        interactive=True, column_count=(len(LORE_COLUMNS), "fixed"), wrap=True,
                        label="Entries (keys comma separated; position before_char, after_char or at_depth; "
                              "other fields in Raw YAML)", elem_id="persona-lorebook")
                    with gr.Row():
                        lore_message = gr.Textbox(placeholder="A message: which entries would fire?",
                                                  show_label=False, scale=4, elem_id="persona-lore-message")
                        lore_test = gr.Button("Which fire?", scale=1, min_width=60, elem_id="persona-lore-test")
                    lore_result = gr.Markdown(elem_id="persona-lore-result")
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
            post_history, tags, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed,
            character, personality, lorebook]
    view = [editing_state, gallery, problems, picker, status, *form, raw, try_chat]

    def show(persona_id: str | None, who: CurrentUser) -> list:
        """Everything the tab shows to `who`, with `persona_id` open (re-read from disk)."""
        library.refresh()
        broken = broken_files(library)
        ids = list(library.personas) + list(broken)
        if persona_id not in ids:
            persona_id = ids[0] if ids else None
        editing = open_for_editing(library, persona_id, broken) if persona_id else None
        loaded = editing.loaded if editing else None
        thumbs = [(thumbnail(p), caption(p)) for p in library.personas.values()]
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
        result = save_form(library, require(editing, loadable=True), list(values))
        if not result.changes:
            notices.info("Nothing changed.")
            return show(editing.id, who)
        merged = " (merged with changes made to the file since you opened it)" if result.merged else ""
        notices.info(f"Saved {result.saved.path.name}: {', '.join(result.changes)}{merged}. New chats use it.")
        return show(result.saved.id, who)

    @refusing(len(view))
    def on_save_raw(request: gr.Request, editing, text):
        who = admin(request)
        editing = require(editing)
        saved = save_persona(library, editing.id, text or "", expected_version=editing.version)
        notices.info(f"Saved {saved.path.name}. New chats use it.")
        return show(saved.id, who)

    @refusing(1 + len(view))
    def on_new(request: gr.Request, persona_id):
        who = admin(request)
        created = create_persona(library, (persona_id or "").strip())
        notices.info(f"Created {created.path.name} from the template.")
        return ["", *show(created.id, who)]

    @refusing(1 + len(view))
    def on_duplicate(request: gr.Request, editing, persona_id):
        who = admin(request)
        editing = require(editing, loadable=True)
        copy = duplicate_persona(library, editing.id, (persona_id or "").strip())
        notices.info(f"Duplicated {editing.id} as {copy.path.name}.")
        return ["", *show(copy.id, who)]

    @refusing(len(view))
    def on_delete(request: gr.Request, persona_id, editing):
        who = admin(request)
        if not persona_id:  # the confirmation was cancelled
            return [gr.skip()] * len(view)
        moved = archive_persona(library, persona_id)
        notices.info(f"Moved {persona_id}.yaml to {moved[0].parent.name}/{moved[0].name}; "
                     "move it back to restore it.")
        return show(None, who)

    def on_try(request: gr.Request, message, editing, signal, *values):
        signal.event.clear()
        try:
            user = identity.current(request).name
            loaded = draft(require(editing, loadable=True), values)
            history = [{"role": "assistant", "content": render(loaded, user).greetings[0]},
                       {"role": "user", "content": (message or "").strip()}]
            for reply in service.try_draft(loaded, message or "", params_for(loaded), user, signal.event):
                yield "", safe_messages(history + [{"role": "assistant", "content": reply.text}])
        except REFUSALS as exc:
            notices.warning(str(exc), duration=WARNING_SECONDS)
            yield gr.skip(), gr.skip()

    def on_stop(signal):
        signal.event.set()

    def on_lore_test(request: gr.Request, message, editing, *values):
        """Which entries of the lorebook as it is in the form fire for a message after the greeting."""
        try:
            loaded = draft(require(editing, loadable=True), values)
            return safe_markdown(lore_report(loaded, message or "", identity.current(request).name))
        except REFUSALS as exc:
            notices.warning(str(exc), duration=WARNING_SECONDS)
            return gr.skip()

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
    lore_inputs = [lore_message, editing_state, *form]
    lore_test.click(on_lore_test, lore_inputs, lore_result)
    lore_message.submit(on_lore_test, lore_inputs, lore_result)

