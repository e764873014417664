"""The Chat tab: persona picker, streaming chat, Stop / Retry / Undo / Edit, versions, thumbs.

Handlers only validate, delegate to ChatService and turn results into
component updates. Per-user state lives in gr.State: the ChatSession and a
StopSignal (stop_signal.py) the Stop button shares with the running reply.
Who is asking comes from `identity.current(request)` on every event, never
from build time.
"""

from __future__ import annotations

import gradio as gr

from ..chat import MAX_COMMENT_CHARS, MAX_MESSAGE_CHARS, ChatError, ChatService, ChatSession, params_for
from ..engine import GenerationParams
from ..personas import PersonaError
from ..prompting import PromptTooLong
from . import history_sidebar, notices
from .identity import Identity
from .safe_markdown import literal, safe_markdown, safe_messages
from .stop_signal import StopSignal

LIKE_REASONS = ["helpful", "in character", "accurate", "funny"]
DISLIKE_REASONS = ["wrong", "out of character", "too long", "repetitive", "rude or unsafe"]


def history_of(session: ChatSession, partial: str | None = None) -> list[dict]:
    """The Chatbot's value: every message made safe to render (safe_markdown.py), a reply's
    lorebook entries under it."""
    messages = [{"role": t.role, "content": t.content + knowledge_note(t.provenance)} for t in session.turns]
    if partial is not None:
        messages.append({"role": "assistant", "content": partial})
    return safe_messages(messages)


def knowledge_note(provenance: dict | None) -> str:
    """Lines under a reply naming what persona knowledge reached its prompt: the lorebook entries
    (with the key of each) and the documents' passages (file, place, heading), its sources."""
    lore = [e for e in (provenance or {}).get("lorebook", []) if not e.get("left_out")]
    documents = [d for d in (provenance or {}).get("documents", []) if not d.get("left_out")]
    lines = []
    if lore:
        named = [literal(e["name"]) + (f" ({literal(e['key'])})" if e.get("key") else "") for e in lore]
        lines.append("*📖 Lore: " + ", ".join(named) + "*")
    if documents:
        cited = [literal(f"{d['path']}, {d['location']}" + (f" ({d['heading']})" if d.get("heading") else ""))
                 for d in documents]
        lines.append("*📄 Sources: " + "; ".join(cited) + "*")
    return "".join("\n\n" + line for line in lines)


def _params(session: ChatSession, values) -> GenerationParams:
    """Slider values -> GenerationParams; a negative or empty seed means a random one."""
    temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed = values
    return params_for(session.persona, temperature=temperature, top_p=top_p, top_k=int(top_k),
                      repetition_penalty=repetition_penalty, max_new_tokens=int(max_new_tokens),
                      seed=int(seed) if seed is not None and seed >= 0 else None)


def _persona_choices(service: ChatService) -> list[tuple[str, str]]:
    return [(p.persona.name, p.id) for p in service.personas.personas.values()]


def _greeting_choices(session: ChatSession) -> list[tuple[str, int]]:
    def label(i: int, text: str) -> str:
        short = " ".join(text.split())
        return f"{i + 1}. {short[:80]}{'…' if len(short) > 80 else ''}"

    return [(label(i, g), i) for i, g in enumerate(session.rendered.greetings)]


def persona_info(service: ChatService, session: ChatSession) -> str:
    p = session.persona.persona
    tags = " ".join(f"`{t}`" for t in p.tags)
    info = f"**{literal(p.name)}** {tags} — {p.description} _(persona version {session.persona.version})_"
    if p.model and p.model != service.engine.model_id:
        info += f"\n\nThis persona was made for `{p.model}`; replies come from `{service.engine.model_id}`."
    adapter, promoted = service.serving(session.persona)
    if promoted is not None:
        info += f"\n\nServed by model version {promoted.id} (promoted LoRA adapter `{adapter}`)."
    elif p.adapter:
        info += f"\n\nServed with the LoRA adapter `{p.adapter}`."
    return safe_markdown(info)  # the description is Markdown from the persona file


def create(app: gr.Blocks, service: ChatService, identity: Identity) -> None:
    persona_choices = _persona_choices(service)
    default_persona = persona_choices[0][1] if persona_choices else None

    session_state = gr.State(None)
    stop_state = gr.State(StopSignal())
    selected_turn = gr.State(-1)  # the message the versions arrows and the feedback form act on

    def loaded(session: ChatSession | None, request: gr.Request) -> ChatSession:
        """The session, if it exists and whoever is asking may still see its conversation.

        Checked on every event with the role and the conversation as they are
        now: a conversation deleted elsewhere, or someone else's after its
        viewer stopped being an admin, is refused, not shown.
        """
        user = identity.current(request)
        if session is None:
            raise notices.error("The chat is still loading; try again in a moment.")
        if session.user_id != user.id:
            raise notices.error("This chat belongs to another sign-in; reload the page.")
        try:
            service.check_access(session, user.is_admin)
        except ChatError as exc:
            raise notices.error(str(exc)) from None
        return session

    with gr.Row():
        persona_picker = gr.Dropdown(persona_choices, value=default_persona, label="Persona", scale=2,
                                     elem_id="persona-picker")
        greeting_picker = gr.Dropdown([], label="Greeting", scale=3, elem_id="greeting-picker")
        new_chat = gr.Button("New chat", scale=1, elem_id="new-chat")
    info = gr.Markdown(elem_id="persona-info")
    chatbot = gr.Chatbot(label="Chat", height=480, group_consecutive_messages=False, editable="user",
                         elem_id="chatbot", buttons=["copy"])
    with gr.Row(equal_height=True):
        prev_version = gr.Button("◀", scale=0, min_width=40, elem_id="prev-version")
        versions = gr.Markdown("", elem_id="versions")
        next_version = gr.Button("▶", scale=0, min_width=40, elem_id="next-version")
    with gr.Accordion("Tell us more about your vote (optional)", open=False, visible=False,
                      elem_id="feedback-details") as details:
        reasons = gr.CheckboxGroup([], label="Reasons", elem_id="feedback-reasons")
        comment = gr.Textbox(label="Comment", lines=2, elem_id="feedback-comment", max_length=MAX_COMMENT_CHARS)
        save_details = gr.Button("Save feedback", elem_id="feedback-save")
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                             scale=6, elem_id="message", autofocus=True, max_length=MAX_MESSAGE_CHARS)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, step=0.05, label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, step=0.05, label="top_p")
            top_k = gr.Slider(0, 200, step=1, label="top_k (0 = off)")
        with gr.Row():
            repetition_penalty = gr.Slider(1.0, 2.0, step=0.05, label="repetition_penalty")
            max_new_tokens = gr.Slider(1, 1024, step=1, label="max_new_tokens")
            seed = gr.Number(-1, precision=0, label="seed (-1 = random)")
    param_inputs = [temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed]

    def versions_text(session: ChatSession, turn: int) -> str:
        if not session.turns:
            return ""
        turn = turn if 0 <= turn < len(session.turns) else len(session.turns) - 1
        position, count = service.sibling_position(session, turn)
        who = "reply" if session.turns[turn].role == "assistant" else "message"
        return f"{who} {turn + 1}: version **{position}/{count}**" if count > 1 else ""

    def show(session: ChatSession, greeting: int | None = 0) -> tuple:
        """Everything that changes when another conversation or branch is shown."""
        g = session.persona.persona.generation
        avatar = str(session.persona.avatar_path) if session.persona.avatar_path else None
        if service.unanswered(session) and not session.read_only:
            notices.info("Your last message has no reply: it was cut off. Press Send with the box empty to have "
                         "it answered, or send another message in its place.")
        return (session, gr.Chatbot(value=history_of(session), avatar_images=(None, avatar)),
                persona_info(service, session),
                gr.Dropdown(choices=_persona_choices(service), value=session.persona.id),
                gr.Dropdown(choices=_greeting_choices(session), value=greeting),
                g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.max_new_tokens,
                -1 if g.seed is None else g.seed, -1, versions_text(session, -1), gr.Accordion(visible=False))

    show_outputs = [session_state, chatbot, info, persona_picker, greeting_picker, *param_inputs,
                    selected_turn, versions, details]

    def start(persona_id, greeting, request: gr.Request):
        """A new chat; re-reads the personas folder first, so edits on disk show up here."""
        user = identity.current(request)
        try:
            session = service.new_session(user.id, persona_id, user.name, int(greeting or 0))
        except (ChatError, PersonaError) as exc:
            raise notices.error(str(exc)) from None
        return show(session, int(greeting or 0))

    def open_from_link(persona_id, request: gr.Request):
        """Page load: `?conversation=ID` (links from the Feedback tab) reopens that conversation."""
        wanted = (request.query_params.get("conversation") if request is not None else None) or ""
        if wanted.isdigit():
            user = identity.current(request)
            try:
                return show(service.resume(user.id, int(wanted), user.name, as_admin=user.is_admin), None)
            except ChatError as exc:
                notices.warning(str(exc))
        return start(persona_id, 0, request)

    app.load(open_from_link, persona_picker, show_outputs)
    def pick_persona(persona_id, request: gr.Request):
        return start(persona_id, 0, request)

    # The pickers listen to `.select`: `.change` would loop, since show() itself updates both
    # pickers, and a Dropdown fires `.input` twice per pick (on the choice and again on blur),
    # which started two chats, the second replacing one the person had begun typing in.
    persona_picker.select(pick_persona, persona_picker, show_outputs)
    greeting_picker.select(start, [persona_picker, greeting_picker], show_outputs)
    new_chat.click(start, [persona_picker, greeting_picker], show_outputs)
    chatbot.clear(start, [persona_picker, greeting_picker], show_outputs)  # the trash icon = a new chat

    # Special arguments (request, event data) come before *values: Gradio injects them
    # by position and stops looking at a *args parameter.
    def stream(replies, session):
        """Chat histories as the reply grows. Refusals surface on the first step,
        before anything is yielded, so a refused message stays in the textbox."""
        try:
            for reply in replies:
                yield history_of(session, reply.text)
        except (ChatError, PromptTooLong) as exc:
            raise notices.error(str(exc)) from None
        yield history_of(session)

    def on_send(text, session, signal, request: gr.Request, *values):
        session = loaded(session, request)
        signal.event.clear()
        params = _params(session, values)
        if not (text or "").strip() and service.unanswered(session):
            # Send with the box empty answers a message whose reply was cut off (the chatbot's
            # Retry button only shows under a reply).
            replies = service.retry(session, params, signal.event)
        else:
            replies = service.send(session, text, params, signal.event)
        for history in stream(replies, session):
            yield "", history, session, ""

    send_inputs = [message, session_state, stop_state, *param_inputs]
    send_outputs = [message, chatbot, session_state, versions]

    def on_stop(signal):
        signal.event.set()

    stop.click(on_stop, stop_state, None, concurrency_limit=None)

    def on_retry(session, signal, request: gr.Request, *values):
        session = loaded(session, request)
        signal.event.clear()
        for history in stream(service.retry(session, _params(session, values), signal.event), session):
            yield history, session, versions_text(session, -1)

    def on_edit(session, signal, request: gr.Request, data: gr.EditData, *values):
        session = loaded(session, request)
        signal.event.clear()
        replies = service.edit(session, data.index, data.value, _params(session, values), signal.event)
        for history in stream(replies, session):
            yield history, session, versions_text(session, data.index)

    def on_undo(session, request: gr.Request):
        try:
            text = service.undo(loaded(session, request))
        except ChatError as exc:
            raise notices.error(str(exc)) from None
        return history_of(session), text, session, ""

    def on_select(session, request: gr.Request, data: gr.SelectData):
        session = loaded(session, request)
        return data.index, versions_text(session, data.index)

    def on_version(step):
        def switch(session, turn, request: gr.Request):
            session = loaded(session, request)
            turn = turn if 0 <= turn < len(session.turns) else len(session.turns) - 1
            try:
                service.switch_sibling(session, turn, step)
            except ChatError as exc:
                raise notices.error(str(exc)) from None
            return history_of(session), session, versions_text(session, turn)
        return switch

    def on_like(session, request: gr.Request, data: gr.LikeData):
        # The frontend sends liked=True (thumb up), False (thumb down), "" (vote cleared).
        rating = {True: 1, False: -1}.get(data.liked) if isinstance(data.liked, bool) else None
        try:
            service.vote(loaded(session, request), data.index, rating)
        except ChatError as exc:
            raise notices.error(str(exc)) from None
        if rating is None:
            return session, data.index, gr.Accordion(visible=False), gr.CheckboxGroup(), gr.Textbox()
        choices = LIKE_REASONS if rating > 0 else DISLIKE_REASONS
        return (session, data.index, gr.Accordion(visible=True, open=True),
                gr.CheckboxGroup(choices=choices, value=[]), gr.Textbox(value=""))

    def on_save_details(session, turn, chosen, text, request: gr.Request):
        session = loaded(session, request)
        try:
            service.vote(session, turn, service.current_vote(session, turn),
                         reason=",".join(chosen) or None, comment=text.strip() or None)
        except ChatError as exc:
            raise notices.error(str(exc)) from None
        notices.info("Thanks, your feedback was saved.")
        return gr.Accordion(open=False)

    refresh_history = history_sidebar.create(app, service, identity, session_state, show, show_outputs)
    message.submit(on_send, send_inputs, send_outputs).then(**refresh_history)
    send.click(on_send, send_inputs, send_outputs).then(**refresh_history)
    chatbot.retry(on_retry, [session_state, stop_state, *param_inputs], [chatbot, session_state, versions])
    chatbot.edit(on_edit, [session_state, stop_state, *param_inputs], [chatbot, session_state, versions])
    chatbot.undo(on_undo, session_state, [chatbot, message, session_state, versions])
    chatbot.select(on_select, session_state, [selected_turn, versions])
    prev_version.click(on_version(-1), [session_state, selected_turn], [chatbot, session_state, versions])
    next_version.click(on_version(+1), [session_state, selected_turn], [chatbot, session_state, versions])
    chatbot.like(on_like, session_state, [session_state, selected_turn, details, reasons, comment])
    save_details.click(on_save_details, [session_state, selected_turn, reasons, comment], details)
