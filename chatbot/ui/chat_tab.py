"""The Chat tab: persona picker, streaming chat, Stop / Retry / Undo, thumbs.

Handlers only validate, delegate to ChatService and turn results into
component updates. Per-user state lives in gr.State: the ChatSession and a
StopSignal the Stop button shares with the running reply.
"""

from __future__ import annotations

import threading

import gradio as gr

from ..chat import ChatError, ChatService, ChatSession, params_for
from ..engine import GenerationParams
from ..personas import PersonaError
from ..prompting import PromptTooLong


class StopSignal:
    """A per-session threading.Event. gr.State deep-copies initial values and
    an Event cannot be copied, so each copy is simply a fresh signal."""

    def __init__(self):
        self.event = threading.Event()

    def __deepcopy__(self, memo):
        return StopSignal()


def _history(session: ChatSession, partial: str | None = None) -> list[dict]:
    messages = session.history()
    if partial is not None:
        messages.append({"role": "assistant", "content": partial})
    return messages


def _loaded(session: ChatSession | None) -> ChatSession:
    """Events can fire before the page's load event has created the session."""
    if session is None:
        raise gr.Error("The chat is still loading; try again in a moment.")
    return session


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


def create(app: gr.Blocks, service: ChatService, user: str) -> None:
    user_id = service.user_id(user)
    persona_choices = _persona_choices(service)
    default_persona = persona_choices[0][1] if persona_choices else None

    session_state = gr.State(None)
    stop_state = gr.State(StopSignal())

    with gr.Row():
        persona_picker = gr.Dropdown(persona_choices, value=default_persona, label="Persona", scale=2,
                                     elem_id="persona-picker")
        greeting_picker = gr.Dropdown([], label="Greeting", scale=3, elem_id="greeting-picker")
        new_chat = gr.Button("New chat", scale=1, elem_id="new-chat")
    persona_info = gr.Markdown(elem_id="persona-info")
    chatbot = gr.Chatbot(label="Chat", height=480, group_consecutive_messages=False,
                         elem_id="chatbot", buttons=["copy"])
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                             scale=6, elem_id="message", autofocus=True)
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

    def start(persona_id, greeting=0):
        """A new chat; re-reads the personas folder first, so edits on disk show up here."""
        try:
            session = service.new_session(user_id, persona_id, user, int(greeting or 0))
        except (ChatError, PersonaError) as exc:
            raise gr.Error(str(exc)) from None
        p = session.persona.persona
        g = p.generation
        tags = " ".join(f"`{t}`" for t in p.tags)
        info = f"**{p.name}** {tags} — {p.description} _(persona version {session.persona.version})_"
        if p.model and p.model != service.engine.model_id:
            info += f"\n\nThis persona was made for `{p.model}`; replies come from `{service.engine.model_id}`."
        if p.adapter:
            info += f"\n\nServed with the LoRA adapter `{p.adapter}`."
        avatar = str(session.persona.avatar_path) if session.persona.avatar_path else None
        return (session, gr.Chatbot(value=_history(session), avatar_images=(None, avatar)), info,
                gr.Dropdown(choices=_persona_choices(service), value=session.persona.id),
                gr.Dropdown(choices=_greeting_choices(session), value=int(greeting or 0)),
                g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.max_new_tokens,
                -1 if g.seed is None else g.seed)

    start_outputs = [session_state, chatbot, persona_info, persona_picker, greeting_picker, *param_inputs]
    # `.input`, not `.change`: start() itself updates both pickers, which must not loop.
    app.load(start, persona_picker, start_outputs)
    persona_picker.input(start, persona_picker, start_outputs)
    greeting_picker.input(start, [persona_picker, greeting_picker], start_outputs)
    new_chat.click(start, [persona_picker, greeting_picker], start_outputs)
    chatbot.clear(start, [persona_picker, greeting_picker], start_outputs)  # the trash icon = a new chat

    def stream(replies, session):
        """Chat histories as the reply grows. Refusals surface on the first step,
        before anything is yielded, so a refused message stays in the textbox."""
        try:
            for reply in replies:
                yield _history(session, reply.text)
        except (ChatError, PromptTooLong) as exc:
            raise gr.Error(str(exc)) from None
        yield _history(session)

    def on_send(text, session, signal, *values):
        session = _loaded(session)
        signal.event.clear()
        for history in stream(service.send(session, text, _params(session, values), signal.event), session):
            yield "", history, session

    send_inputs = [message, session_state, stop_state, *param_inputs]
    send_outputs = [message, chatbot, session_state]
    message.submit(on_send, send_inputs, send_outputs)
    send.click(on_send, send_inputs, send_outputs)

    def on_stop(signal):
        signal.event.set()

    stop.click(on_stop, stop_state, None, concurrency_limit=None)

    def on_retry(session, signal, *values):
        session = _loaded(session)
        signal.event.clear()
        for history in stream(service.retry(session, _params(session, values), signal.event), session):
            yield history, session

    chatbot.retry(on_retry, [session_state, stop_state, *param_inputs], [chatbot, session_state])

    def on_undo(session):
        try:
            text = service.undo(_loaded(session))
        except ChatError as exc:
            raise gr.Error(str(exc)) from None
        return _history(session), text, session

    chatbot.undo(on_undo, session_state, [chatbot, message, session_state])

    def on_like(session, data: gr.LikeData):
        # The frontend sends liked=True (thumb up), False (thumb down), "" (vote cleared).
        rating = {True: 1, False: -1}.get(data.liked) if isinstance(data.liked, bool) else None
        try:
            service.vote(_loaded(session), data.index, rating)
        except ChatError as exc:
            raise gr.Error(str(exc)) from None
        return session

    chatbot.like(on_like, session_state, session_state)
